"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-28
"""
from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('ts', sa.DateTime(timezone=True), nullable=False),
    sa.Column('element', sa.String(length=32), nullable=False),
    sa.Column('node', sa.String(length=64), nullable=True),
    sa.Column('ksid', sa.String(length=36), nullable=True),
    sa.Column('kind', sa.String(length=64), nullable=False),
    sa.Column('details', sa.JSON(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.create_index('ix_events_ksid_ts', ['ksid', 'ts'], unique=False)
        batch_op.create_index('ix_events_node_ts', ['node', 'ts'], unique=False)
        batch_op.create_index('ix_events_ts', ['ts'], unique=False)

    op.create_table('network_meta',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('source', sa.Text(), nullable=True),
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('loaded_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_table('nodes',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('qkdn_id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('location', sa.String(length=255), nullable=True),
    sa.Column('km_host', sa.String(length=255), nullable=False),
    sa.Column('km_port', sa.Integer(), nullable=False),
    sa.Column('status', sa.Enum('NEW', 'OPERATING', 'DOWN', 'FAILURE', 'OUT', name='node_status', native_enum=False, length=16), nullable=False),
    sa.Column('version', sa.String(length=64), nullable=True),
    sa.Column('last_seen', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint('km_port > 0 AND km_port < 65536', name='ck_nodes_km_port'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('km_host', 'km_port', name='uq_nodes_km_address'),
    sa.UniqueConstraint('name'),
    sa.UniqueConstraint('qkdn_id')
    )
    op.create_table('sessions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('ksid', sa.String(length=36), nullable=False),
    sa.Column('interface', sa.String(length=8), nullable=False),
    sa.Column('src_sae_id', sa.String(length=64), nullable=False),
    sa.Column('dst_sae_id', sa.String(length=64), nullable=False),
    sa.Column('src_node', sa.String(length=64), nullable=False),
    sa.Column('dst_node', sa.String(length=64), nullable=False),
    sa.Column('user', sa.String(length=64), nullable=True),
    sa.Column('qos', sa.JSON(), nullable=False),
    sa.Column('priority', sa.BigInteger(), nullable=False),
    sa.Column('state', sa.Enum('pending', 'accepted', 'active', 'terminated', name='session_state', native_enum=False, length=16), nullable=False),
    sa.Column('route', sa.JSON(), nullable=True),
    sa.Column('reservations', sa.JSON(), nullable=True),
    sa.Column('rate_bps', sa.Float(), nullable=True),
    sa.Column('inactivity_timeout_s', sa.Float(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_activity', sa.DateTime(timezone=True), nullable=True),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('terminated_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('ksid')
    )
    with op.batch_alter_table('sessions', schema=None) as batch_op:
        batch_op.create_index('ix_sessions_state', ['state'], unique=False)

    op.create_table('users',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('revoked', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_table('applications',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('app_id', sa.String(length=36), nullable=False),
    sa.Column('sae_id', sa.String(length=64), nullable=False),
    sa.Column('node_id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('priority', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['node_id'], ['nodes.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('app_id'),
    sa.UniqueConstraint('sae_id')
    )
    op.create_table('interfaces',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('node_id', sa.Integer(), nullable=False),
    sa.Column('qkdi_id', sa.BigInteger(), nullable=False),
    sa.Column('model', sa.String(length=128), nullable=True),
    sa.Column('qkd_type', sa.String(length=16), nullable=False),
    sa.Column('att_device', sa.String(length=128), nullable=True),
    sa.Column('att_port', sa.String(length=128), nullable=True),
    sa.Column('role', sa.String(length=16), nullable=True),
    sa.Column('wavelength_nm', sa.Integer(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.CheckConstraint('qkdi_id >= 0 AND qkdi_id <= 4294967295', name='ck_interfaces_qkdi_id'),
    sa.ForeignKeyConstraint(['node_id'], ['nodes.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('node_id', 'qkdi_id', name='uq_interfaces_node_qkdi')
    )
    op.create_table('slas',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('max_priority', sa.BigInteger(), nullable=False),
    sa.Column('max_bps', sa.BigInteger(), nullable=False),
    sa.Column('max_sessions', sa.Integer(), nullable=False),
    sa.Column('bucket_bits', sa.BigInteger(), nullable=False),
    sa.Column('allowed_destinations', sa.JSON(), nullable=True),
    sa.CheckConstraint('bucket_bits > 0', name='ck_slas_bucket_positive'),
    sa.CheckConstraint('max_bps > 0', name='ck_slas_max_bps_positive'),
    sa.CheckConstraint('max_priority >= 0', name='ck_slas_priority_non_negative'),
    sa.CheckConstraint('max_sessions > 0', name='ck_slas_max_sessions_positive'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('user_id')
    )
    op.create_table('credentials',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.Enum('cert_sha256', 'token_pbkdf2', name='credential_kind', native_enum=False, length=16), nullable=False),
    sa.Column('value', sa.String(length=255), nullable=False),
    sa.Column('application_id', sa.Integer(), nullable=True),
    sa.Column('user_id', sa.Integer(), nullable=True),
    sa.Column('revoked', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint('(application_id IS NULL) <> (user_id IS NULL)', name='ck_credentials_one_owner'),
    sa.ForeignKeyConstraint(['application_id'], ['applications.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('kind', 'value', name='uq_credentials_kind_value')
    )
    op.create_table('links',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('qkdl_id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('kind', sa.Enum('PHYS', 'VIRT', name='link_kind', native_enum=False, length=16), nullable=False),
    sa.Column('src_node_id', sa.Integer(), nullable=False),
    sa.Column('dst_node_id', sa.Integer(), nullable=False),
    sa.Column('src_interface_id', sa.Integer(), nullable=True),
    sa.Column('dst_interface_id', sa.Integer(), nullable=True),
    sa.Column('length_km', sa.Float(), nullable=True),
    sa.Column('attenuation_db_km', sa.Float(), nullable=True),
    sa.Column('channel_att_db', sa.Float(), nullable=True),
    sa.Column('wavelength_nm', sa.Integer(), nullable=True),
    sa.Column('skr_bps', sa.Float(), nullable=True),
    sa.Column('eskr_bps', sa.Float(), nullable=True),
    sa.Column('qber', sa.Float(), nullable=True),
    sa.Column('status', sa.Enum('ACTIVE', 'PASSIVE', 'PENDING', 'OFF', name='link_status', native_enum=False, length=16), nullable=False),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('reserved_bps', sa.Float(), nullable=False),
    sa.Column('session_count', sa.Integer(), nullable=False),
    sa.Column('device', sa.JSON(), nullable=True),
    sa.Column('ksid', sa.String(length=36), nullable=True),
    sa.Column('path', sa.JSON(), nullable=True),
    sa.Column('bandwidth_bps', sa.Float(), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint('length_km IS NULL OR length_km > 0', name='ck_links_length_positive'),
    sa.CheckConstraint('reserved_bps >= 0', name='ck_links_reserved_non_negative'),
    sa.CheckConstraint('session_count >= 0', name='ck_links_session_count_non_negative'),
    sa.CheckConstraint('src_node_id <> dst_node_id', name='ck_links_no_self_loop'),
    sa.ForeignKeyConstraint(['dst_interface_id'], ['interfaces.id'], ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['dst_node_id'], ['nodes.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['src_interface_id'], ['interfaces.id'], ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['src_node_id'], ['nodes.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name'),
    sa.UniqueConstraint('qkdl_id')
    )
    with op.batch_alter_table('links', schema=None) as batch_op:
        batch_op.create_index('ix_links_ends', ['src_node_id', 'dst_node_id'], unique=False)

    op.create_table('link_samples',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('link_id', sa.Integer(), nullable=False),
    sa.Column('ts', sa.DateTime(timezone=True), nullable=False),
    sa.Column('skr_bps', sa.Float(), nullable=True),
    sa.Column('eskr_bps', sa.Float(), nullable=True),
    sa.Column('qber', sa.Float(), nullable=True),
    sa.Column('pool_bits_src', sa.Integer(), nullable=True),
    sa.Column('pool_bits_dst', sa.Integer(), nullable=True),
    sa.Column('reserved_bps', sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(['link_id'], ['links.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('link_samples', schema=None) as batch_op:
        batch_op.create_index('ix_link_samples_link_ts', ['link_id', 'ts'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('link_samples', schema=None) as batch_op:
        batch_op.drop_index('ix_link_samples_link_ts')

    op.drop_table('link_samples')
    with op.batch_alter_table('links', schema=None) as batch_op:
        batch_op.drop_index('ix_links_ends')

    op.drop_table('links')
    op.drop_table('credentials')
    op.drop_table('slas')
    op.drop_table('interfaces')
    op.drop_table('applications')
    op.drop_table('users')
    with op.batch_alter_table('sessions', schema=None) as batch_op:
        batch_op.drop_index('ix_sessions_state')

    op.drop_table('sessions')
    op.drop_table('nodes')
    op.drop_table('network_meta')
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index('ix_events_ts')
        batch_op.drop_index('ix_events_node_ts')
        batch_op.drop_index('ix_events_ksid_ts')

    op.drop_table('events')
