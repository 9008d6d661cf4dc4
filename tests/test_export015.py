"""ETSI 015 documents built from the databases validate against the ETSI YANG."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from db import models as m
from db.bootstrap import load_network
from db.database import make_engine, session_factory, upgrade
from db.export015 import node_document, node_model
from db.netfile import load
from qkdsdn.cli import main
from dbutil import db_url  # noqa: F401  (fixture)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ALL_EXAMPLES = sorted(EXAMPLES.glob("*.yaml"))


@pytest.fixture(scope="module")
def yang():
    import yang_helper

    return yang_helper.validate_with_yang


@pytest.mark.parametrize("example", ALL_EXAMPLES, ids=lambda p: p.stem)
def test_every_node_of_every_example_validates(db_url, example, yang):  # noqa: F811
    net = load(example)
    engine = make_engine(db_url)
    upgrade(engine)
    sessions = session_factory(engine)
    with sessions.begin() as s:
        load_network(s, net)
    with sessions() as s:
        for node in net.nodes:
            doc = node_document(s, node.name)
            yang(doc)
            body = doc["etsi-qkd-sdn-node:qkd_node"]
            assert body["qkdn_id"] == node.qkdn_id
            links = body["qkd_links"]["qkd_link"]
            assert len(links) == len(net.links_of(node.name))
            assert all(link["qkdl_type"] == "etsi-qkd-node-types:PHYS" for link in links)
    engine.dispose()


def test_sessions_appear_as_apps_and_virt_links(db_url, yang):  # noqa: F811
    net = load(EXAMPLES / "paper-poc.yaml")
    engine = make_engine(db_url)
    upgrade(engine)
    sessions = session_factory(engine)
    ksid = str(uuid.uuid4())
    with sessions.begin() as s:
        load_network(s, net)
        km = {n.name: n for n in s.scalars(select(m.Node))}
        s.add(m.Session(ksid=ksid, src_sae_id="SAE-KM2", dst_sae_id="SAE-KM3", src_node="KM2", dst_node="KM3",
                        qos={"Key_chunk_size": 32, "Max_bps": 8000, "Min_bps": 1000, "Jitter": 100},
                        priority=3, state=m.SessionState.ACTIVE, route=["KM2", "KM0", "KM3"],
                        reservations={"L02": 8000, "L03": 8000}, rate_bps=8000, inactivity_timeout_s=30))
        s.add(m.Link(qkdl_id=str(uuid.uuid4()), name=f"virt-{ksid}", kind=m.LinkKind.VIRT, src_node=km["KM2"],
                     dst_node=km["KM3"], status=m.LinkStatus.ACTIVE, ksid=ksid, path=["KM2", "KM0", "KM3"],
                     bandwidth_bps=8000))
    with sessions() as s:
        for name, prev, nxt in (("KM2", None, "KM0"), ("KM0", "KM2", "KM3"), ("KM3", "KM0", None)):
            doc = node_document(s, name)
            yang(doc)
            node = node_model(s, name)
            virt = [link for link in node.links if link.is_virtual]
            assert len(virt) == 1
            assert virt[0].virt_prev_hop == (net.node(prev).qkdn_id if prev else None)
            assert virt[0].virt_next_hop == ([net.node(nxt).qkdn_id] if nxt else [])
            app = node.application(ksid)
            assert app.server_app_id == "SAE-KM2" and app.client_app_id == ["SAE-KM3"]
            assert app.backing_qkdl_id == [virt[0].qkdl_id]
            assert app.app_qos.max_bandwidth == 8000
        # a node off the route knows nothing of the session
        assert node_model(s, "KM1").applications == []
    engine.dispose()


def test_monitored_performance_is_exported(tmp_path, yang):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    assert main(["db", "init", str(EXAMPLES / "paper-poc.yaml"), "--db", url]) == 0
    engine = make_engine(url)
    sessions = session_factory(engine)
    with sessions.begin() as s:
        link = s.scalar(select(m.Link).where(m.Link.name == "L01"))
        link.skr_bps, link.eskr_bps, link.qber, link.status = 190000.4, 150000, 0.0213, m.LinkStatus.ACTIVE
    with sessions() as s:
        doc = node_document(s, "KM1")
    yang(doc)
    (phys,) = doc["etsi-qkd-sdn-node:qkd_node"]["qkd_links"]["qkd_link"]
    assert phys["qkdl_status"] == "etsi-qkd-node-types:ACTIVE"
    assert phys["qkdl_performance"]["skr"] == 190000
    assert phys["qkdl_performance"]["phys_perf"] == [{"perf_type": "etsi-qkd-node-types:QBER", "value": "0.021"}]
    assert phys["phys_qkd_role"] == "etsi-qkd-node-types:RECEIVER"
    engine.dispose()


def test_export_command_from_file_and_database(tmp_path, capsys, yang):
    poc = str(EXAMPLES / "paper-poc.yaml")
    assert main(["topology", "export", "--node", "KM2", poc]) == 0
    from_file = json.loads(capsys.readouterr().out)
    yang(from_file)
    url = f"sqlite:///{tmp_path / 'x.db'}"
    assert main(["db", "init", poc, "--db", url]) == 0
    capsys.readouterr()
    assert main(["topology", "export", "--node", "KM2", "--db", url]) == 0
    assert json.loads(capsys.readouterr().out) == from_file
    assert main(["topology", "export", "--node", "KM9", poc]) == 2
    assert "no node 'KM9'" in capsys.readouterr().err


def test_show_command(tmp_path, capsys):
    assert main(["topology", "show", str(EXAMPLES / "paper-poc.yaml")]) == 0
    out = capsys.readouterr().out
    for name in [f"KM{i}" for i in range(6)] + ["L01", "L45"]:
        assert name in out
    assert "200 kb/s" in out and "2.00%" in out and "twin/fixed" in out
    url = f"sqlite:///{tmp_path / 'y.db'}"
    assert main(["topology", "show", "--db", url]) == 2
    assert "qkdsdn db init" in capsys.readouterr().err
    assert main(["db", "init", str(EXAMPLES / "linear-5.yaml"), "--db", url]) == 0
    capsys.readouterr()
    assert main(["topology", "show", "--db", url]) == 0
    out = capsys.readouterr().out
    assert "N0 → N1" in out and "model" in out and "Mb/s" in out
