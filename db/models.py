"""SQLAlchemy models of the control plane's databases.

- topology DB: ``Node``, ``Interface``, ``Link`` (physical and virtual), ``LinkSample``;
- user-profile DB: ``User``, ``SLA``, ``Application``, ``Credential``;
- ``Session`` (one per KSID) and ``Event`` (the timestamped stream of every element);
- ``NetworkMeta``: which network file the databases were loaded from.

Only the controller writes these tables. Credentials are certificate
fingerprints or salted token hashes, never secrets in clear.
"""
from __future__ import annotations

import datetime as dt
import enum
from typing import Any, Optional

from sqlalchemy import (JSON, BigInteger, Boolean, CheckConstraint, DateTime, Enum, Float, ForeignKey, Index, Integer,
                        String, Text, UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class LinkKind(str, enum.Enum):
    PHYS = "PHYS"
    VIRT = "VIRT"


class LinkStatus(str, enum.Enum):
    # ETSI 015 qkdl_status identities (etsi-qkd-node-types:ACTIVE, ...)
    ACTIVE = "ACTIVE"
    PASSIVE = "PASSIVE"
    PENDING = "PENDING"
    OFF = "OFF"


class NodeStatus(str, enum.Enum):
    # ETSI 015 qkdn_status identities
    NEW = "NEW"
    OPERATING = "OPERATING"
    DOWN = "DOWN"
    FAILURE = "FAILURE"
    OUT = "OUT"


class SessionState(str, enum.Enum):
    # admission-control side of DESIGN.md's session life cycle
    PENDING = "pending"
    ACCEPTED = "accepted"
    ACTIVE = "active"
    TERMINATED = "terminated"


class CredentialKind(str, enum.Enum):
    CERT_SHA256 = "cert_sha256"
    TOKEN_PBKDF2 = "token_pbkdf2"


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Stored as the value string, not a native ENUM type: the same schema on SQLite and PostgreSQL.
    return Enum(cls, name=name, native_enum=False, values_callable=lambda e: [m.value for m in e],
                validate_strings=True, length=16)


class NetworkMeta(Base):
    __tablename__ = "network_meta"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[Optional[str]] = mapped_column(Text)
    source: Mapped[Optional[str]] = mapped_column(Text)
    # SHA-256 of the canonical form of the parsed file: the same network twice changes nothing.
    digest: Mapped[str] = mapped_column(String(64))
    loaded_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


# ------------------------------------------------------------------ topology DB


class Node(Base):
    __tablename__ = "nodes"

    id: Mapped[int] = mapped_column(primary_key=True)
    qkdn_id: Mapped[str] = mapped_column(String(36), unique=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    location: Mapped[Optional[str]] = mapped_column(String(255))
    km_host: Mapped[str] = mapped_column(String(255))
    km_port: Mapped[int] = mapped_column(Integer)
    status: Mapped[NodeStatus] = mapped_column(_enum(NodeStatus, "node_status"), default=NodeStatus.NEW)
    version: Mapped[Optional[str]] = mapped_column(String(64))
    last_seen: Mapped[Optional[dt.datetime]] = mapped_column(DateTime(timezone=True))

    interfaces: Mapped[list["Interface"]] = relationship(back_populates="node", cascade="all, delete-orphan",
                                                         order_by="Interface.qkdi_id")
    applications: Mapped[list["Application"]] = relationship(back_populates="node")

    __table_args__ = (UniqueConstraint("km_host", "km_port", name="uq_nodes_km_address"),
                      CheckConstraint("km_port > 0 AND km_port < 65536", name="ck_nodes_km_port"))

    @property
    def km_address(self) -> str:
        return f"{self.km_host}:{self.km_port}"


class Interface(Base):
    """A node's QKD interface (ETSI 015 qkd_interface): one per physical link end."""

    __tablename__ = "interfaces"

    id: Mapped[int] = mapped_column(primary_key=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"))
    qkdi_id: Mapped[int] = mapped_column(BigInteger)  # uint32, unique within the node
    model: Mapped[Optional[str]] = mapped_column(String(128))
    qkd_type: Mapped[str] = mapped_column(String(16), default="DV-QKD")
    att_device: Mapped[Optional[str]] = mapped_column(String(128))
    att_port: Mapped[Optional[str]] = mapped_column(String(128))
    role: Mapped[Optional[str]] = mapped_column(String(16))  # TRANSMITTER / RECEIVER / TRANSCEIVER
    wavelength_nm: Mapped[Optional[int]] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="ENABLED")

    node: Mapped[Node] = relationship(back_populates="interfaces")

    __table_args__ = (UniqueConstraint("node_id", "qkdi_id", name="uq_interfaces_node_qkdi"),
                      CheckConstraint("qkdi_id >= 0 AND qkdi_id <= 4294967295", name="ck_interfaces_qkdi_id"))


class Link(Base):
    """A QKD link: PHYS (a device pair on a fibre) or VIRT (a key-relay path for sessions)."""

    __tablename__ = "links"

    id: Mapped[int] = mapped_column(primary_key=True)
    qkdl_id: Mapped[str] = mapped_column(String(36), unique=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[LinkKind] = mapped_column(_enum(LinkKind, "link_kind"))
    src_node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"))
    dst_node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"))
    src_interface_id: Mapped[Optional[int]] = mapped_column(ForeignKey("interfaces.id", ondelete="SET NULL"))
    dst_interface_id: Mapped[Optional[int]] = mapped_column(ForeignKey("interfaces.id", ondelete="SET NULL"))
    length_km: Mapped[Optional[float]] = mapped_column(Float)
    attenuation_db_km: Mapped[Optional[float]] = mapped_column(Float)
    channel_att_db: Mapped[Optional[float]] = mapped_column(Float)
    wavelength_nm: Mapped[Optional[int]] = mapped_column(Integer)
    # Monitored state (the routing element's inputs).
    skr_bps: Mapped[Optional[float]] = mapped_column(Float)
    eskr_bps: Mapped[Optional[float]] = mapped_column(Float)
    qber: Mapped[Optional[float]] = mapped_column(Float)
    status: Mapped[LinkStatus] = mapped_column(_enum(LinkStatus, "link_status"), default=LinkStatus.PENDING)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    reserved_bps: Mapped[float] = mapped_column(Float, default=0.0)
    session_count: Mapped[int] = mapped_column(Integer, default=0)
    # Emulated device parameters or real KME endpoints, as given in the network file.
    device: Mapped[Optional[dict[str, Any]]] = mapped_column(JSON)
    # VIRT links: the session (KSID) the path serves and its ordered hops.
    ksid: Mapped[Optional[str]] = mapped_column(String(36))
    path: Mapped[Optional[list[Any]]] = mapped_column(JSON)
    bandwidth_bps: Mapped[Optional[float]] = mapped_column(Float)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    src_node: Mapped[Node] = relationship(foreign_keys=[src_node_id])
    dst_node: Mapped[Node] = relationship(foreign_keys=[dst_node_id])
    src_interface: Mapped[Optional[Interface]] = relationship(foreign_keys=[src_interface_id])
    dst_interface: Mapped[Optional[Interface]] = relationship(foreign_keys=[dst_interface_id])
    samples: Mapped[list["LinkSample"]] = relationship(back_populates="link", cascade="all, delete-orphan",
                                                       passive_deletes=True)

    __table_args__ = (
        CheckConstraint("src_node_id <> dst_node_id", name="ck_links_no_self_loop"),
        CheckConstraint("reserved_bps >= 0", name="ck_links_reserved_non_negative"),
        CheckConstraint("session_count >= 0", name="ck_links_session_count_non_negative"),
        CheckConstraint("length_km IS NULL OR length_km > 0", name="ck_links_length_positive"),
        Index("ix_links_ends", "src_node_id", "dst_node_id"),
    )


class LinkSample(Base):
    """One monitoring sample of a link's performance."""

    __tablename__ = "link_samples"

    id: Mapped[int] = mapped_column(primary_key=True)
    link_id: Mapped[int] = mapped_column(ForeignKey("links.id", ondelete="CASCADE"))
    ts: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    skr_bps: Mapped[Optional[float]] = mapped_column(Float)
    eskr_bps: Mapped[Optional[float]] = mapped_column(Float)
    qber: Mapped[Optional[float]] = mapped_column(Float)
    pool_bits_src: Mapped[Optional[int]] = mapped_column(Integer)
    pool_bits_dst: Mapped[Optional[int]] = mapped_column(Integer)
    reserved_bps: Mapped[Optional[float]] = mapped_column(Float)

    link: Mapped[Link] = relationship(back_populates="samples")

    __table_args__ = (Index("ix_link_samples_link_ts", "link_id", "ts"),)


# ------------------------------------------------------------------ user-profile DB


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    sla: Mapped["SLA"] = relationship(back_populates="user", cascade="all, delete-orphan", uselist=False)
    applications: Mapped[list["Application"]] = relationship(back_populates="user")
    credentials: Mapped[list["Credential"]] = relationship(back_populates="user", cascade="all, delete-orphan")


class SLA(Base):
    """A user's service-level agreement, checked by admission control."""

    __tablename__ = "slas"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), unique=True)
    # uint32 / large values: 64-bit columns (PostgreSQL INTEGER is signed 32-bit).
    max_priority: Mapped[int] = mapped_column(BigInteger)
    max_bps: Mapped[int] = mapped_column(BigInteger)
    max_sessions: Mapped[int] = mapped_column(Integer)
    bucket_bits: Mapped[int] = mapped_column(BigInteger)
    # Node names; NULL means every destination.
    allowed_destinations: Mapped[Optional[list[Any]]] = mapped_column(JSON)

    user: Mapped[User] = relationship(back_populates="sla")

    __table_args__ = (
        CheckConstraint("max_bps > 0", name="ck_slas_max_bps_positive"),
        CheckConstraint("max_sessions > 0", name="ck_slas_max_sessions_positive"),
        CheckConstraint("bucket_bits > 0", name="ck_slas_bucket_positive"),
        CheckConstraint("max_priority >= 0", name="ck_slas_priority_non_negative"),
    )


class Application(Base):
    """An application (SAE) at its home node; ETSI 015 qkd_app when it runs a session."""

    __tablename__ = "applications"

    id: Mapped[int] = mapped_column(primary_key=True)
    app_id: Mapped[str] = mapped_column(String(36), unique=True)
    sae_id: Mapped[str] = mapped_column(String(64), unique=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    priority: Mapped[int] = mapped_column(BigInteger, default=0)

    node: Mapped[Node] = relationship(back_populates="applications")
    user: Mapped[User] = relationship(back_populates="applications")
    credentials: Mapped[list["Credential"]] = relationship(back_populates="application",
                                                           cascade="all, delete-orphan")


class Credential(Base):
    """How an application or user proves who it is: a certificate fingerprint or a salted token hash."""

    __tablename__ = "credentials"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[CredentialKind] = mapped_column(_enum(CredentialKind, "credential_kind"))
    value: Mapped[str] = mapped_column(String(255))
    application_id: Mapped[Optional[int]] = mapped_column(ForeignKey("applications.id", ondelete="CASCADE"))
    user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    application: Mapped[Optional[Application]] = relationship(back_populates="credentials")
    user: Mapped[Optional[User]] = relationship(back_populates="credentials")

    __table_args__ = (
        UniqueConstraint("kind", "value", name="uq_credentials_kind_value"),
        CheckConstraint("(application_id IS NULL) <> (user_id IS NULL)", name="ck_credentials_one_owner"),
    )


# ------------------------------------------------------------------ sessions and events


class Session(Base):
    """A key session (KSID) as admission control sees it."""

    __tablename__ = "sessions"

    id: Mapped[int] = mapped_column(primary_key=True)
    ksid: Mapped[str] = mapped_column(String(36), unique=True)
    interface: Mapped[str] = mapped_column(String(8), default="004")  # "004" or "014"
    src_sae_id: Mapped[str] = mapped_column(String(64))
    dst_sae_id: Mapped[str] = mapped_column(String(64))
    src_node: Mapped[str] = mapped_column(String(64))
    dst_node: Mapped[str] = mapped_column(String(64))
    user: Mapped[Optional[str]] = mapped_column(String(64))
    qos: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    priority: Mapped[int] = mapped_column(BigInteger, default=0)
    state: Mapped[SessionState] = mapped_column(_enum(SessionState, "session_state"),
                                                default=SessionState.PENDING)
    # Node names from source to destination.
    route: Mapped[Optional[list[Any]]] = mapped_column(JSON)
    # Per link name: reserved bits/s.
    reservations: Mapped[Optional[dict[str, Any]]] = mapped_column(JSON)
    rate_bps: Mapped[Optional[float]] = mapped_column(Float)
    inactivity_timeout_s: Mapped[Optional[float]] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    last_activity: Mapped[Optional[dt.datetime]] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime(timezone=True))
    terminated_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime(timezone=True))
    reason: Mapped[Optional[str]] = mapped_column(Text)

    __table_args__ = (Index("ix_sessions_state", "state"),)


class Event(Base):
    """One timestamped event of an element (the paper's Fig. 4 stream). Never carries key bytes."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(primary_key=True)
    ts: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    element: Mapped[str] = mapped_column(String(32))  # e.g. key_manager, admission_control
    node: Mapped[Optional[str]] = mapped_column(String(64))
    ksid: Mapped[Optional[str]] = mapped_column(String(36))
    kind: Mapped[str] = mapped_column(String(64))
    details: Mapped[Optional[dict[str, Any]]] = mapped_column(JSON)

    __table_args__ = (
        Index("ix_events_ts", "ts"),
        Index("ix_events_node_ts", "node", "ts"),
        Index("ix_events_ksid_ts", "ksid", "ts"),
    )
