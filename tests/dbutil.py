"""Database fixtures: every DB test runs on SQLite and, when QKDSDN_TEST_POSTGRES_URL is set, on PostgreSQL."""
from __future__ import annotations

import os
import uuid

import pytest
from sqlalchemy import text

from db.database import make_engine

POSTGRES_URL = os.environ.get("QKDSDN_TEST_POSTGRES_URL")
SKIP_PG = "QKDSDN_TEST_POSTGRES_URL is not set: PostgreSQL tests skipped (.ci/run sets it)"

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.skipif(not POSTGRES_URL, reason=SKIP_PG))]


@pytest.fixture(params=BACKENDS)
def db_url(request, tmp_path):
    """A URL of an empty database: an SQLite file, or a fresh schema in the test PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'qkdsdn.db'}"
        return
    schema = f"qkdsdn_test_{uuid.uuid4().hex[:12]}"
    admin = make_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in POSTGRES_URL else "?"
    # search_path puts every table (alembic_version too) in the test's own schema.
    yield f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()
