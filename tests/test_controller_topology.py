"""controller.topology: the SDN controller's decisions, without threads, sockets or os_ken."""
from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from pathlib import Path

import pytest

from controller.topology import (ConfigTracker, LinkRef, Liveness, NodeRef, TopologyConfig, TopologyTracker,
                                 build_session_config, refs_from_network, reset_runtime_state)
from db import models as dbm
from etsi015 import model as em
from etsi015.session import session_entries, virt_link_id

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
IDS = {n: str(uuid.uuid5(uuid.NAMESPACE_DNS, n)) for n in ("A", "B", "C")}
LINKS = {"AB": str(uuid.uuid5(uuid.NAMESPACE_URL, "AB")), "BC": str(uuid.uuid5(uuid.NAMESPACE_URL, "BC"))}


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def tracker(failures_to_down: int = 2) -> TopologyTracker:
    return TopologyTracker([NodeRef(n, i) for n, i in IDS.items()],
                           [LinkRef("AB", LINKS["AB"], "A", "B"), LinkRef("BC", LINKS["BC"], "B", "C")],
                           TopologyConfig(failures_to_down=failures_to_down))


def link(name: str, status: str | None = "ACTIVE", skr: int | None = 1000, qber: str | None = "0.02",
         enabled: bool = True) -> em.Link:
    perf = em.LinkPerformance(skr=skr, phys_perf=[em.PhysPerf(em.PhysPerfType.QBER, Decimal(qber))] if qber else [])
    return em.Link(qkdl_id=LINKS[name], qkdl_type=em.LinkType.PHYS, qkdl_enable=enabled,
                   qkdl_status=em.LinkStatus(f"{em.TYPES_MODULE}:{status}") if status else None,
                   qkdl_performance=perf)


def node(name: str, links: list[em.Link], status: str = "OPERATING", version: str = "qkdsdn 0.1",
         qkdn_id: str | None = None) -> em.QkdNode:
    return em.QkdNode(qkdn_id=qkdn_id or IDS[name], qkdn_status=em.NodeStatus(f"{em.TYPES_MODULE}:{status}"),
                      qkdn_version=version,
                      interfaces=[em.Interface(qkdi_id=1, qkdi_model="twin",
                                               qkdi_status=em.InterfaceStatus.ENABLED)],
                      links=links)


def discover_all(t: TopologyTracker, now: float = 0.0, ab: str = "ACTIVE", bc: str = "ACTIVE", skr: int = 1000):
    outs = [t.discovered("A", node("A", [link("AB", ab, skr)]), at(now)),
            t.discovered("B", node("B", [link("AB", ab, skr), link("BC", bc, skr)]), at(now)),
            t.discovered("C", node("C", [link("BC", bc, skr)]), at(now))]
    return outs


def test_links_start_pending_and_become_active_when_both_ends_are_discovered_with_key_flowing():
    t = tracker()
    assert t.link_status("AB") == "PENDING"
    out_a = t.discovered("A", node("A", [link("AB")]), at(0))
    # B not yet seen: the link waits.
    assert t.link_status("AB") == "PENDING" and not out_a.changes
    assert out_a.nodes[0].status is dbm.NodeStatus.OPERATING and out_a.nodes[0].version == "qkdsdn 0.1"
    assert [e.kind for e in out_a.events] == ["node_up"]
    out_b = t.discovered("B", node("B", [link("AB"), link("BC")]), at(1))
    assert [(c.link, c.status, c.up) for c in out_b.changes] == [("AB", "ACTIVE", True)]
    assert any(r.name == "AB" and r.status is dbm.LinkStatus.ACTIVE for r in out_b.links)
    assert t.link_status("BC") == "PENDING"


def test_samples_come_from_the_master_end_of_an_active_link_only():
    t = tracker()
    outs = discover_all(t)
    samples = [s for o in outs for s in o.samples]
    # A is the master of AB, B of BC: one sample per link, from the master's report, when the
    # link comes up (its slave end answered last).
    assert sorted((s.link, s.skr_bps, s.qber) for s in samples) == [("AB", 1000.0, 0.02), ("BC", 1000.0, 0.02)]
    assert [s.link for s in outs[1].samples] == ["AB"] and [s.link for s in outs[2].samples] == ["BC"]
    again = t.discovered("C", node("C", [link("BC", skr=2000)]), at(5))
    assert again.samples == []  # C is BC's slave
    again = t.discovered("B", node("B", [link("AB"), link("BC", skr=2000)]), at(5))
    assert [(s.link, s.skr_bps, s.ts) for s in again.samples] == [("BC", 2000.0, at(5).timestamp())]
    assert [(r.name, r.skr_bps) for r in again.links] == [("BC", 2000.0)]


def test_pending_links_are_not_sampled():
    t = tracker()
    outs = discover_all(t, ab="PENDING", bc="PENDING", skr=0)
    assert all(not o.samples for o in outs)
    assert t.link_status("AB") == t.link_status("BC") == "PENDING"


def test_key_flowing_in_a_perf_notification_makes_a_pending_link_active():
    t = tracker()
    discover_all(t, ab="PENDING", bc="PENDING", skr=0)
    assert t.link_status("AB") == "PENDING"
    perf = em.LinkPerfUpdate(qkdl_id=LINKS["AB"], performance=em.LinkPerformance(skr=500))
    out = t.notification("A", perf, at(2))
    assert [(c.link, c.status) for c in out.changes] == [("AB", "ACTIVE")]
    assert [(s.link, s.skr_bps) for s in out.samples] == [("AB", 500.0)]


def test_link_down_notification_then_recovery():
    t = tracker()
    discover_all(t)
    out = t.notification("B", em.LinkDown(qkdl_id=LINKS["BC"], reason="fibre cut"), at(3))
    assert [(c.link, c.status, c.up) for c in out.changes] == [("BC", "OFF", False)]
    assert "fibre cut" in out.changes[0].reason
    assert [e.kind for e in out.events] == ["link_down"]
    # A later report from the same end with key flowing brings it back.
    out = t.discovered("B", node("B", [link("AB"), link("BC")]), at(8))
    assert [(c.link, c.status) for c in out.changes] == [("BC", "ACTIVE")]


def test_node_goes_down_after_consecutive_failures_and_takes_its_links_off():
    t = tracker(failures_to_down=2)
    discover_all(t)
    first = t.unreachable("B", "connection refused", at(5))
    assert t.liveness("B") is Liveness.UP and not first.changes  # one failure may be a hiccup
    second = t.unreachable("B", "connection refused", at(10))
    assert t.liveness("B") is Liveness.DOWN
    assert sorted((c.link, c.status) for c in second.changes) == [("AB", "OFF"), ("BC", "OFF")]
    assert [r.status for r in second.nodes] == [dbm.NodeStatus.DOWN]
    back = t.discovered("B", node("B", [link("AB"), link("BC")]), at(15))
    assert t.liveness("B") is Liveness.UP
    assert sorted((c.link, c.status) for c in back.changes) == [("AB", "ACTIVE"), ("BC", "ACTIVE")]


def test_a_node_never_seen_that_does_not_answer_is_down_at_once():
    t = tracker(failures_to_down=3)
    out = t.unreachable("C", "timeout", at(0))
    assert t.liveness("C") is Liveness.DOWN
    assert [r.status for r in out.nodes] == [dbm.NodeStatus.DOWN]


def test_bus_status_offline_takes_a_node_down_at_once_and_online_rediscovers_it():
    t = tracker()
    discover_all(t)
    out = t.bus_status("agent-C", "offline", at(4))
    assert t.liveness("C") is Liveness.DOWN
    assert [(c.link, c.status) for c in out.changes] == [("BC", "OFF")]
    # Its old RESTCONF answer does not count: down until it answers again.
    out = t.bus_status("agent-C", "online", at(5))
    assert t.liveness("C") is Liveness.DOWN and out.rediscover == ["C"]
    t.discovered("C", node("C", [link("BC")]), at(6))
    assert t.liveness("C") is Liveness.UP and t.link_status("BC") == "ACTIVE"
    # Other processes (the controller itself) and unknown states are ignored.
    assert not t.bus_status("controller", "offline", at(7))
    assert not t.bus_status("agent-C", "sleepy", at(7))


def test_a_node_answering_as_another_node_is_down():
    t = tracker()
    discover_all(t)
    out = t.discovered("C", node("C", [link("BC")], qkdn_id=IDS["A"]), at(5))
    assert t.liveness("C") is Liveness.DOWN
    assert "qkdn_id" in out.events[0].details["reason"]


def test_a_node_reporting_a_failed_status_is_down_and_recorded_as_such():
    t = tracker()
    discover_all(t)
    out = t.discovered("C", node("C", [link("BC")], status="FAILURE"), at(5))
    assert t.liveness("C") is Liveness.DOWN
    assert out.nodes[-1].status is dbm.NodeStatus.DOWN and t.link_status("BC") == "OFF"


def test_a_link_missing_or_disabled_at_one_end_is_off():
    t = tracker()
    discover_all(t)
    out = t.discovered("C", node("C", []), at(5))
    assert [(c.link, c.status) for c in out.changes] == [("BC", "OFF")]
    t.discovered("C", node("C", [link("BC")]), at(6))
    out = t.discovered("C", node("C", [link("BC", enabled=False)]), at(7))
    assert [(c.link, c.status) for c in out.changes] == [("BC", "OFF")]


def test_node_rows_are_written_on_change_and_last_seen_now_and_then():
    t = TopologyTracker([NodeRef("A", IDS["A"])], [], TopologyConfig(last_seen_interval_s=30))
    assert [r.last_seen for r in t.discovered("A", node("A", []), at(0)).nodes] == [at(0)]
    assert t.discovered("A", node("A", []), at(5)).nodes == []
    assert [r.version for r in t.discovered("A", node("A", [], version="v2"), at(6)).nodes] == ["v2"]
    assert [r.last_seen for r in t.discovered("A", node("A", [], version="v2"), at(36)).nodes] == [at(36)]
    t.unreachable("A", "gone", at(40))
    t.unreachable("A", "gone", at(41))
    back = t.discovered("A", node("A", [], version="v2"), at(42)).nodes
    assert [(r.status, r.last_seen) for r in back] == [(dbm.NodeStatus.OPERATING, at(42))]


def test_interface_changes_are_reported_once():
    t = tracker()
    first = t.discovered("A", node("A", [link("AB")]), at(0))
    assert [(r.node, r.qkdi_id, r.status) for r in first.interfaces] == [("A", 1, "ENABLED")]
    assert t.discovered("A", node("A", [link("AB")]), at(1)).interfaces == []
    out = t.notification("A", em.InterfaceDown(qkdi_id=1, reason="laser"), at(2))
    assert out.rediscover == ["A"] and out.events[0].kind == "sdqkdn_interface_down"


def test_refs_from_a_network_file():
    from db.netfile import load

    net = load(Path(__file__).resolve().parents[1] / "examples" / "paper-poc.yaml")
    nodes, links = refs_from_network(net)
    assert [n.name for n in nodes] == ["KM0", "KM1", "KM2", "KM3", "KM4", "KM5"]
    assert [(l.name, l.master, l.slave) for l in links][0] == ("L01", "KM0", "KM1")
    TopologyTracker(nodes, links)
    with pytest.raises(ValueError):
        TopologyTracker(nodes[:1], links)


# --------------------------------------------------------------------------- configuration


def config(node_prev: str | None, node_next: str | None, ksid: str):
    return build_session_config(ksid=ksid, priority=3, bucket_bits=2048, rate_bps=1024, inactivity_timeout_s=29.5,
                                prev_hop=node_prev, next_hop=node_next, src_sae="SAE-A", dst_sae="SAE-C",
                                src_node="A", dst_node="C", qkdn_ids=IDS)


def test_build_session_config_maps_names_to_qkdn_ids():
    ksid = str(uuid.uuid4())
    c = config("A", "C", ksid)
    assert (c.prev_hop, c.next_hop) == (IDS["A"], IDS["C"])
    assert (c.source_qkdn_id, c.destination_qkdn_id) == (IDS["A"], IDS["C"])
    assert c.inactivity_timeout_s == 30 and c.virt_link_id == virt_link_id(ksid)
    with pytest.raises(KeyError):
        build_session_config(ksid=ksid, priority=0, bucket_bits=1, rate_bps=1, inactivity_timeout_s=1,
                             prev_hop="Z", next_hop=None, src_sae="a", dst_sae="b", src_node="A", dst_node="C",
                             qkdn_ids=IDS)


def test_replies_are_matched_by_msg_id_and_node():
    tracker_ = ConfigTracker(IDS)
    ksid = str(uuid.uuid4())
    push = tracker_.configure("B", config("A", "C", ksid))
    tracker_.sent("m1", push, at(0))
    assert tracker_.reply("C", {"msg_id": "m1", "ok": True}) is None  # not sent to C
    assert tracker_.reply("B", {"msg_id": "other", "ok": True}) is None
    result = tracker_.reply("B", {"msg_id": "m1", "ok": False})
    assert (result.node, result.ksid, result.op, result.ok, result.awaited) == ("B", ksid, "configure", False, True)
    assert result.error == "refused without a reason"
    assert tracker_.reply("B", {"msg_id": "m1", "ok": True}) is None  # answered once
    assert tracker_.pending() == 0


def test_unanswered_pushes_expire():
    tracker_ = ConfigTracker(IDS, pending_timeout_s=10)
    tracker_.sent("m1", tracker_.deconfigure("A", "k"), at(0))
    assert tracker_.expire(at(9)) == []
    assert [p.ksid for p in tracker_.expire(at(10))] == ["k"]


def test_resync_pushes_what_differs():
    tracker_ = ConfigTracker(IDS)
    held, changed, missing, stray = (str(uuid.uuid4()) for _ in range(4))
    for i, ksid in enumerate((held, changed, missing)):
        tracker_.sent(f"m{i}", tracker_.configure("B", config("A", "C", ksid)), at(0))
    app_h, link_h = session_entries(config("A", "C", held), IDS["B"])
    other = config("A", "C", changed)
    app_c, link_c = session_entries(type(other)(**{**other.__dict__, "priority": 1}), IDS["B"])
    app_s, link_s = session_entries(config("A", "C", stray), IDS["B"])
    reported = [{"ksid": held, "qkd_app": app_h, "qkd_link": link_h},
                {"ksid": changed, "qkd_app": app_c, "qkd_link": link_c},
                {"ksid": stray, "qkd_app": app_s, "qkd_link": link_s},
                {"ksid": None}]
    pushes = tracker_.resync("B", reported)
    assert sorted((p.ksid, p.op, p.awaited) for p in pushes) == sorted([
        (changed, "configure", False), (stray, "deconfigure", False), (missing, "configure", False)])
    # A deconfigure sent since removes the session from what the node should hold.
    tracker_.sent("m9", tracker_.deconfigure("B", missing), at(1))
    assert missing not in tracker_.held("B")


# --------------------------------------------------------------------------- start-up


def test_reset_runtime_state_forgets_the_previous_run(tmp_path):
    from db.bootstrap import load_network
    from db.database import make_engine, session_factory, upgrade
    from db.netfile import load

    engine = make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    upgrade(engine)
    factory = session_factory(engine)
    net = load(Path(__file__).resolve().parents[1] / "examples" / "paper-poc.yaml")
    with factory.begin() as s:
        load_network(s, net)
        for n in s.query(dbm.Node):
            n.status = dbm.NodeStatus.OPERATING
        for l in s.query(dbm.Link):
            l.status, l.reserved_bps, l.session_count = dbm.LinkStatus.ACTIVE, 100.0, 1
        s.add(dbm.Session(ksid="live", src_sae_id="SAE-KM2", dst_sae_id="SAE-KM3", src_node="KM2", dst_node="KM3",
                          state=dbm.SessionState.ACTIVE, route=["KM2", "KM0", "KM3"]))
        s.add(dbm.Session(ksid="done", src_sae_id="SAE-KM2", dst_sae_id="SAE-KM3", src_node="KM2", dst_node="KM3",
                          state=dbm.SessionState.TERMINATED, route=["KM2", "KM0", "KM3"]))
    with factory.begin() as s:
        stale = reset_runtime_state(s, at(100))
    assert [(x.ksid, x.route) for x in stale] == [("live", ("KM2", "KM0", "KM3"))]
    with factory() as s:
        assert {n.status for n in s.query(dbm.Node)} == {dbm.NodeStatus.NEW}
        assert {(l.status, l.reserved_bps, l.session_count) for l in s.query(dbm.Link)} == {
            (dbm.LinkStatus.PENDING, 0.0, 0)}
        live = s.query(dbm.Session).filter_by(ksid="live").one()
        assert live.state is dbm.SessionState.TERMINATED and live.reason == "controller restarted"
        assert s.query(dbm.Event).filter_by(ksid="live", kind="session_terminated").count() == 1
    engine.dispose()
