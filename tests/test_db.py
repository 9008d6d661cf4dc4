"""Databases: migrations, bootstrap from network files, idempotency, one transaction per load.

Runs on SQLite and, with QKDSDN_TEST_POSTGRES_URL, on PostgreSQL."""
from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, inspect, select

from db import models as m
from db.bootstrap import BootstrapError, load_network
from db.database import current_revision, head_revision, make_engine, session_factory, upgrade
from db.netfile import load, parse
from qkdsdn.cli import main
from dbutil import db_url  # noqa: F401  (fixture)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ALL_EXAMPLES = sorted(EXAMPLES.glob("*.yaml"))


def snapshot(url: str) -> dict:
    """Every row of every table, as comparable tuples (timestamps of events excluded)."""
    engine = make_engine(url)
    out = {}
    with engine.connect() as conn:
        for table in m.Base.metadata.sorted_tables:
            if not inspect(conn).has_table(table.name):
                continue
            cols = [c for c in table.columns if c.name not in ("loaded_at", "ts", "created_at", "updated_at")]
            out[table.name] = sorted(tuple(map(repr, row)) for row in conn.execute(select(*cols)))
    engine.dispose()
    return out


def counts(url: str) -> dict[str, int]:
    return {name: len(rows) for name, rows in snapshot(url).items()}


@pytest.mark.parametrize("example", ALL_EXAMPLES, ids=lambda p: p.stem)
def test_examples_load(db_url, example):  # noqa: F811
    net = load(example)
    assert main(["db", "init", str(example), "--db", db_url]) == 0
    c = counts(db_url)
    assert c["nodes"] == len(net.nodes)
    assert c["links"] == len(net.links)
    assert c["interfaces"] == 2 * len(net.links)
    assert c["users"] == c["slas"] == len(net.users)
    assert c["applications"] == len(net.applications)
    assert c["network_meta"] == 1


def test_schema_is_at_head_and_matches_models(db_url):  # noqa: F811
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(db_url)
    upgrade(engine)
    assert current_revision(engine) == head_revision(engine) == "0001"
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), m.Base.metadata)
    engine.dispose()
    assert diff == [], "models changed without a migration"


def test_same_file_twice_changes_nothing(db_url, capsys):  # noqa: F811
    poc = str(EXAMPLES / "paper-poc.yaml")
    assert main(["db", "init", poc, "--db", db_url]) == 0
    before = snapshot(db_url)
    assert main(["db", "init", poc, "--db", db_url]) == 0
    assert "unchanged" in capsys.readouterr().out
    assert snapshot(db_url) == before


def test_other_network_needs_replace(db_url, capsys):  # noqa: F811
    assert main(["db", "init", str(EXAMPLES / "paper-poc.yaml"), "--db", db_url]) == 0
    before = snapshot(db_url)
    assert main(["db", "init", str(EXAMPLES / "linear-5.yaml"), "--db", db_url]) == 2
    assert "--replace" in capsys.readouterr().err
    assert snapshot(db_url) == before
    assert main(["db", "init", str(EXAMPLES / "linear-5.yaml"), "--db", db_url, "--replace"]) == 0
    engine = make_engine(db_url)
    with session_factory(engine)() as s:
        assert sorted(s.scalars(select(m.Node.name))) == [f"N{i}" for i in range(6)]
        assert s.scalar(select(m.NetworkMeta.name)) == "linear-5"
        # history is kept across reloads
        assert s.scalar(select(func.count()).select_from(m.Event).where(m.Event.kind == "network_loaded")) == 2
    engine.dispose()


def test_invalid_file_writes_nothing(db_url, tmp_path, capsys):  # noqa: F811
    assert main(["db", "init", str(EXAMPLES / "paper-poc.yaml"), "--db", db_url]) == 0
    before = snapshot(db_url)
    bad = tmp_path / "bad.yaml"
    bad.write_text((EXAMPLES / "paper-poc.yaml").read_text().replace("ends: [KM0, KM3]", "ends: [KM0, KM9]"))
    assert main(["db", "init", str(bad), "--db", db_url, "--replace"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:22: links[2].ends[1]: unknown node 'KM9'" in err
    assert snapshot(db_url) == before


def test_failure_inside_the_transaction_rolls_back(db_url):  # noqa: F811
    engine = make_engine(db_url)
    upgrade(engine)
    sessions = session_factory(engine)
    with sessions.begin() as s:
        load_network(s, load(EXAMPLES / "paper-poc.yaml"))
    before = snapshot(db_url)
    net = load(EXAMPLES / "linear-5.yaml")
    with pytest.raises(RuntimeError):
        with sessions.begin() as s:
            load_network(s, net, replace=True)
            raise RuntimeError("crash after the rows were written")
    assert snapshot(db_url) == before
    engine.dispose()


def test_database_constraints_back_the_file_checks(db_url):  # noqa: F811
    from sqlalchemy.exc import IntegrityError

    engine = make_engine(db_url)
    upgrade(engine)
    sessions = session_factory(engine)
    with sessions.begin() as s:
        load_network(s, load(EXAMPLES / "paper-poc.yaml"))
    with pytest.raises(IntegrityError):
        with sessions.begin() as s:
            km0 = s.scalar(select(m.Node).where(m.Node.name == "KM0"))
            s.add(m.Link(qkdl_id="00000000-0000-4000-8000-000000000000", name="loop", kind=m.LinkKind.PHYS,
                         src_node=km0, dst_node=km0))
    with pytest.raises(IntegrityError):
        with sessions.begin() as s:
            s.scalar(select(m.SLA).limit(1)).max_bps = 0
    engine.dispose()


def test_loaded_content(db_url):  # noqa: F811
    engine = make_engine(db_url)
    upgrade(engine)
    sessions = session_factory(engine)
    text = (EXAMPLES / "paper-poc.yaml").read_text().replace(
        "  - name: alice\n",
        "  - name: alice\n    token_hash: pbkdf2_sha256$600000$00112233445566778899aabbccddeeff$"
        "0011223344556677889900112233445566778899001122334455667788990011\n")
    net = parse(text, "poc.yaml")
    with sessions.begin() as s:
        load_network(s, net)
    with sessions() as s:
        carol = s.scalar(select(m.User).where(m.User.name == "carol"))
        assert carol.sla.allowed_destinations == ["KM0", "KM1", "KM2", "KM3"]
        assert carol.sla.max_bps == 32000
        alice = s.scalar(select(m.User).where(m.User.name == "alice"))
        assert [c.kind for c in alice.credentials] == [m.CredentialKind.TOKEN_PBKDF2]
        assert alice.sla.allowed_destinations is None
        l45 = s.scalar(select(m.Link).where(m.Link.name == "L45"))
        assert (l45.src_node.name, l45.dst_node.name) == ("KM4", "KM5")
        assert l45.device["model"] == "fixed" and l45.device["skr_bps"] == 200000
        assert l45.src_interface.node.name == "KM4" and l45.src_interface.role == "TRANSMITTER"
        km0 = s.scalar(select(m.Node).where(m.Node.name == "KM0"))
        assert [i.qkdi_id for i in km0.interfaces] == [1, 2, 3, 4, 5]
        assert km0.km_address == "127.0.0.1:8400" and km0.qkdn_id == net.node("KM0").qkdn_id
        app = s.scalar(select(m.Application).where(m.Application.sae_id == "SAE-KM2"))
        assert (app.node.name, app.user.name) == ("KM2", "carol")
    engine.dispose()


def test_replace_with_existing_loose_rows_requires_flag(db_url):  # noqa: F811
    engine = make_engine(db_url)
    upgrade(engine)
    sessions = session_factory(engine)
    with sessions.begin() as s:
        s.add(m.User(name="manual"))
    with pytest.raises(BootstrapError, match="no network file loaded"):
        with sessions.begin() as s:
            load_network(s, load(EXAMPLES / "paper-poc.yaml"))
    engine.dispose()


def test_upgrade_and_status_commands(db_url, capsys):  # noqa: F811
    assert main(["db", "upgrade", "--db", db_url]) == 0
    assert "schema at revision 0001" in capsys.readouterr().out
    assert main(["db", "status", "--db", db_url]) == 0
    assert "network: none loaded" in capsys.readouterr().out


def test_default_url_from_environment(monkeypatch, tmp_path):
    from db.database import DEFAULT_URL, database_url

    monkeypatch.delenv("QKDSDN_DB", raising=False)
    assert database_url() == DEFAULT_URL == "sqlite:///qkdsdn.db"
    monkeypatch.setenv("QKDSDN_DB", f"sqlite:///{tmp_path}/x.db")
    assert database_url() == f"sqlite:///{tmp_path}/x.db"
    assert database_url("sqlite:///y.db") == "sqlite:///y.db"


def test_uint32_values_fit_on_every_backend(db_url):  # noqa: F811
    text = (EXAMPLES / "paper-poc.yaml").read_text().replace(
        "sla: {max_priority: 7, max_bps: 64000", "sla: {max_priority: 4294967295, max_bps: 4294967295", 1).replace(
        "{sae_id: SAE-KM0, node: KM0, user: alice, priority: 5}",
        "{sae_id: SAE-KM0, node: KM0, user: alice, priority: 4294967295}")
    engine = make_engine(db_url)
    upgrade(engine)
    with session_factory(engine).begin() as s:
        load_network(s, parse(text, "poc.yaml"))
    with session_factory(engine)() as s:
        alice = s.scalar(select(m.User).where(m.User.name == "alice"))
        assert alice.sla.max_priority == alice.sla.max_bps == 4294967295
        assert s.scalar(select(m.Application.priority).where(m.Application.sae_id == "SAE-KM0")) == 4294967295
    engine.dispose()


def test_largest_file_values_load_and_read_back(db_url, tmp_path):  # noqa: F811
    """Every bounded integer of the file at its largest accepted value, through `db init`, read back."""
    text = (EXAMPLES / "paper-poc.yaml").read_text().replace(
        "sla: {max_priority: 7, max_bps: 64000, max_sessions: 4, bucket_bits: 65536}",
        "sla: {max_priority: 4294967295, max_bps: 4294967295, max_sessions: 2147483647, bucket_bits: 4294967295}",
        1).replace(
        "{sae_id: SAE-KM0, node: KM0, user: alice, priority: 5}",
        "{sae_id: SAE-KM0, node: KM0, user: alice, priority: 4294967295}").replace(
        "{name: L01, ends: [KM0, KM1], length_km: 10,",
        "{name: L01, ends: [KM0, KM1], length_km: 10, wavelength_nm: 9999,")
    big = tmp_path / "big.yaml"
    big.write_text(text)
    assert main(["db", "init", str(big), "--db", db_url]) == 0
    engine = make_engine(db_url)
    with session_factory(engine)() as s:
        sla = s.scalar(select(m.User).where(m.User.name == "alice")).sla
        assert (sla.max_priority, sla.max_bps, sla.max_sessions, sla.bucket_bits) == (
            4294967295, 4294967295, 2147483647, 4294967295)
        assert s.scalar(select(m.Application.priority).where(m.Application.sae_id == "SAE-KM0")) == 4294967295
        l01 = s.scalar(select(m.Link).where(m.Link.name == "L01"))
        assert l01.wavelength_nm == l01.src_interface.wavelength_nm == 9999
    engine.dispose()


def test_values_the_database_cannot_hold_write_nothing(db_url, tmp_path, capsys):  # noqa: F811
    assert main(["db", "init", str(EXAMPLES / "paper-poc.yaml"), "--db", db_url]) == 0
    before = snapshot(db_url)
    bad = tmp_path / "bad.yaml"
    bad.write_text((EXAMPLES / "paper-poc.yaml").read_text().replace(
        "sla: {max_priority: 7, max_bps: 64000, max_sessions: 4, bucket_bits: 65536}",
        "sla: {max_priority: 7, max_bps: 4294967296, max_sessions: 2147483648, bucket_bits: 65536}", 1))
    assert main(["db", "init", str(bad), "--db", db_url, "--replace"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:29: users[0].sla.max_bps: must be between 1 and 4294967295 (uint32), got 4294967296" in err
    assert f"{bad}:29: users[0].sla.max_sessions: must be between 1 and 2147483647, got 2147483648" in err
    assert snapshot(db_url) == before


# The longest texts the network file accepts for length-bounded columns (String(N): VARCHAR(N) on PostgreSQL).
LONG_LOCATION = ("5TONIC Gebäude Ä, Raum " * 12)[:255]  # characters, not bytes: non-ASCII counts once
LONG_HOST = ("a" * 63 + ".") * 3 + "b" * 63  # 255
LONG_TOKEN_HASH = "pbkdf2_sha256$600000$00112233445566778899aabbccddeeff$" + "0f" * 100 + "1"  # 255
LONG_A, LONG_B = "N" * 64, "M" * 63  # default link name: 128


def _long_texts(location: str, host: str, token_hash: str, b: str) -> str:
    return (EXAMPLES / "paper-poc.yaml").read_text().replace(
        '{name: KM0, location: 5TONIC rack A, km_address: "127.0.0.1:8400"}',
        f'{{name: KM0, location: "{location}", km_address: "{host}:8400"}}').replace(
        '  - {name: KM5, location: 5TONIC rack F, km_address: "127.0.0.1:8405"}\n',
        f'  - {{name: KM5, location: 5TONIC rack F, km_address: "127.0.0.1:8405"}}\n'
        f'  - {{name: {LONG_A}, km_address: "127.0.0.1:8406"}}\n'
        f'  - {{name: {b}, km_address: "127.0.0.1:8407"}}\n').replace(
        "  - {name: L45, ends: [KM4, KM5], length_km: 10, device: {model: fixed, skr_bps: 200000, qber: 0.02}}\n",
        "  - {name: L45, ends: [KM4, KM5], length_km: 10, device: {model: fixed, skr_bps: 200000, qber: 0.02}}\n"
        f"  - {{ends: [{LONG_A}, {b}], length_km: 10}}\n").replace(
        "  - name: alice\n", f"  - name: alice\n    token_hash: {token_hash}\n")


def test_longest_file_texts_load_and_read_back(db_url, tmp_path):  # noqa: F811
    """Every length-bounded text of the file at its longest accepted value, through `db init`, read back."""
    assert (len(LONG_LOCATION), len(LONG_HOST), len(LONG_TOKEN_HASH), len(f"{LONG_A}-{LONG_B}")) == (
        255, 255, 255, 128)
    big = tmp_path / "big.yaml"
    big.write_text(_long_texts(LONG_LOCATION, LONG_HOST, LONG_TOKEN_HASH, LONG_B), encoding="utf-8")
    assert main(["db", "init", str(big), "--db", db_url]) == 0
    engine = make_engine(db_url)
    with session_factory(engine)() as s:
        km0 = s.scalar(select(m.Node).where(m.Node.name == "KM0"))
        assert (km0.location, km0.km_host, km0.km_port) == (LONG_LOCATION, LONG_HOST, 8400)
        alice = s.scalar(select(m.User).where(m.User.name == "alice"))
        assert [c.value for c in alice.credentials] == [LONG_TOKEN_HASH]
        link = s.scalar(select(m.Link).where(m.Link.name == f"{LONG_A}-{LONG_B}"))
        assert (link.src_node.name, link.dst_node.name) == (LONG_A, LONG_B)
        assert link.src_interface.att_device == LONG_A
    engine.dispose()


def test_texts_the_database_cannot_hold_write_nothing(db_url, tmp_path, capsys):  # noqa: F811
    assert main(["db", "init", str(EXAMPLES / "paper-poc.yaml"), "--db", db_url]) == 0
    before = snapshot(db_url)
    bad = tmp_path / "bad.yaml"
    bad.write_text(_long_texts(LONG_LOCATION + "x", LONG_HOST + "c", LONG_TOKEN_HASH + "0", LONG_B + "M"),
                   encoding="utf-8")
    assert main(["db", "init", str(bad), "--db", db_url, "--replace"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:12: nodes[0].location: must be at most 255 characters, got 256" in err
    assert f"{bad}:12: nodes[0].km_address: host part must be at most 255 characters, got 256" in err
    assert (f"{bad}:28: links[6]: the default name MASTER-SLAVE would have 129 characters, more than the 128 a"
            " link name may have: give the link an explicit 'name' (or use shorter node names)") in err
    assert f"{bad}:32: users[0].token_hash: must be at most 255 characters, got 256" in err
    assert snapshot(db_url) == before
