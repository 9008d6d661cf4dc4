"""Database connection and schema management.

The default is an SQLite file in the working directory; any SQLAlchemy URL
(e.g. ``postgresql+psycopg://user@host/db``) can be given with ``--db`` or the
``QKDSDN_DB`` environment variable. The schema is owned by Alembic migrations
(``db/migrations``); ``upgrade()`` brings any database to the newest revision.
"""
from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

DEFAULT_URL = "sqlite:///qkdsdn.db"
MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def database_url(explicit: str | None = None) -> str:
    """--db first, then QKDSDN_DB, then the SQLite file default."""
    return explicit or os.environ.get("QKDSDN_DB") or DEFAULT_URL


def make_engine(url: str | None = None, **kwargs) -> Engine:
    url = database_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        # Plain postgresql:// would pick psycopg2, which is not a dependency.
        parsed = parsed.set(drivername="postgresql+psycopg")
    engine = create_engine(parsed, future=True, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # noqa: ANN001
            cur = dbapi_conn.cursor()
            # SQLite ignores foreign keys unless asked, per connection.
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(engine: Engine):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("path_separator", "os")
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (idempotent)."""
    from alembic import command

    command.upgrade(alembic_config(engine), revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision(engine: Engine) -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
