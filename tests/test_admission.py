"""Admission control: SLA checks, peer wait, routing and reservation, configuration, timers,
close, link failures; over the real routing element and reservations."""
from __future__ import annotations

import datetime as dt
from dataclasses import fields, replace

import pytest
from sqlalchemy import select

from controller.access import ApplicationProfile, SLAProfile, UserProfile, UserProfiles
from controller.admission import (AdmissionConfig, AdmissionControl, AdmissionRequest, Configure, Delete, QoS,
                                  Reply, Status)
from controller.routing import LinkView, Reservations, RoutingElement
from db import models as m
from db.database import make_engine, session_factory, upgrade
from db.models import SessionState
from dbutil import db_url  # noqa: F401  (fixture)

NOW = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.timezone.utc)
K = "0b6f2c1e-6a0e-4d6e-9a55-1c2d3e4f5a6b"
K2 = "5d0c4f2a-3b1e-4c7d-8e9f-a0b1c2d3e4f5"


def at(seconds: float) -> dt.datetime:
    return NOW + dt.timedelta(seconds=seconds)


# The paper's star around KM0 with the extra KM4-KM5 link, plus KM6: a second two-hop path KM2-KM6-KM3.
LINKS = {"L01": ("KM0", "KM1"), "L02": ("KM0", "KM2"), "L03": ("KM0", "KM3"), "L04": ("KM0", "KM4"),
         "L05": ("KM0", "KM5"), "L45": ("KM4", "KM5"), "L26": ("KM2", "KM6"), "L36": ("KM6", "KM3")}
HOME = {"KM0": "alice", "KM1": "bob", "KM2": "carol", "KM3": "carol", "KM4": "alice", "KM5": "bob", "KM6": "bob"}

PROFILES = UserProfiles(
    users=[UserProfile("alice", SLAProfile(max_priority=7, max_bps=64000, max_sessions=2, bucket_bits=65536)),
           UserProfile("bob", SLAProfile(max_priority=7, max_bps=64000, max_sessions=4, bucket_bits=65536)),
           UserProfile("carol", SLAProfile(max_priority=3, max_bps=32000, max_sessions=2, bucket_bits=32768,
                                           allowed_destinations=frozenset({"KM0", "KM1", "KM2", "KM3"}))),
           UserProfile("mallory", SLAProfile(max_priority=7, max_bps=64000, max_sessions=4, bucket_bits=65536),
                       revoked=True)],
    applications=[ApplicationProfile(f"SAE-{n}", n, u, priority=3 if u == "carol" else 5) for n, u in HOME.items()])

# A fully specified QoS: 32-byte chunks, jitter 500 ms, 5 s peer wait, 60 s TTL.
Q = QoS(key_chunk_size=32, max_bps=20000, min_bps=1000, jitter=500, priority=3, timeout=5000, ttl=60)


def replace_qos(**changes) -> QoS:
    return replace(Q, **changes)


class Net:
    def __init__(self, skr: dict[str, float] | None = None, config: AdmissionConfig | None = None):
        skr = skr or {}
        self.routing = RoutingElement()
        self.routing.load([LinkView(name, a, b, skr_bps=skr.get(name, 200000.0)) for name, (a, b) in LINKS.items()])
        self.reservations = Reservations(self.routing)
        self.ac = AdmissionControl(PROFILES, self.routing, self.reservations, config)

    def residual(self, link: str) -> float:
        return self.routing.residual_bps(link)


def req(src: str, dst: str, at_node: str, qos: QoS = Q, *, ksid: str = K, interface: str = "004",
        user: str | None = None) -> AdmissionRequest:
    return AdmissionRequest(ksid=ksid, interface=interface, src_sae=f"SAE-{src}", dst_sae=f"SAE-{dst}",
                            src_node=src, dst_node=dst, requesting_node=at_node,
                            user=user if user is not None else HOME[at_node], qos=qos)


def open_pair(net: Net, src: str, dst: str, qos: QoS = Q, *, ksid: str = K, t: dt.datetime = NOW,
              peer_qos: QoS | None = None):
    first = net.ac.request(req(src, dst, src, qos, ksid=ksid), t)
    assert first.actions == [] and first.error is None, first
    return net.ac.request(req(src, dst, dst, peer_qos or qos, ksid=ksid), t)


def activate(net: Net, ksid: str = K, t: dt.datetime = NOW):
    out = None
    for node in list(net.ac.session(ksid).awaiting_config):
        out = net.ac.confirmation(ksid, node, t)
        assert out.error is None
    assert net.ac.session(ksid).state is SessionState.ACTIVE
    return out


def kinds(out) -> list[str]:
    return [e.kind for e in out.events]


# ------------------------------------------------------------------ SLA


@pytest.mark.parametrize("asked, counter, problem", [
    (QoS(max_bps=100000), {"Max_bps": 64000}, "Max_bps 100000 exceeds the SLA's 64000"),
    (QoS(max_bps=100000, min_bps=80000), {"Max_bps": 64000, "Min_bps": 64000}, "Min_bps 80000 exceeds Max_bps 64000"),
    (QoS(max_bps=30000, min_bps=40000), {"Min_bps": 30000}, "Min_bps 40000 exceeds Max_bps 30000"),
    (QoS(priority=9), {"Priority": 7}, "Priority 9 exceeds the SLA's 7"),
    (QoS(key_chunk_size=16384), {"Key_chunk_size": 8192}, "exceeds the SLA's bucket of 65536 bits"),
], ids=["max_bps", "min_bps-above-sla", "min-above-max", "priority", "bucket"])
def test_qos_beyond_the_sla_gets_a_counter_proposal(asked, counter, problem):
    net = Net()
    out = net.ac.request(req("KM0", "KM1", "KM0", asked), NOW)
    [reply] = out.actions
    assert reply.node == "KM0" and reply.status is Status.QOS_NOT_MET and problem in reply.reason
    resolved = {"Key_chunk_size": 32, "Max_bps": 64000, "Min_bps": 0, "Jitter": 1000, "Priority": 5,
                "Timeout": 30000, "TTL": 300}
    resolved.update({k: v for k, v in asked.to_etsi().items()})
    resolved.update(counter)
    assert reply.qos.to_etsi() == resolved
    assert net.ac.session(K) is None and out.sessions == []
    [event] = out.events
    assert (event.element, event.kind, event.node, event.ksid) == ("admission_control", "request_rejected", "KM0", K)
    assert event.details["status"] == 7 and event.details["counter_proposal"] == resolved
    # The counter-proposal itself is admissible.
    again = net.ac.request(req("KM0", "KM1", "KM0", reply.qos), NOW)
    assert again.error is None and again.actions == [] and net.ac.session(K).state is SessionState.PENDING


def test_destination_outside_the_sla_is_refused_without_counter_proposal():
    net = Net()
    out = net.ac.request(req("KM2", "KM4", "KM2", QoS()), NOW)
    assert out.actions == [Reply("KM2", K, Status.NO_QKD_CONNECTION, None, None,
                                 "destination KM4 is not allowed by the SLA of 'carol'")]
    # The same SLA field on the peer side: carol at KM3 may not talk to KM4 either.
    assert net.ac.request(req("KM4", "KM3", "KM4", QoS()), NOW).actions == []
    peer = net.ac.request(req("KM4", "KM3", "KM3", QoS()), NOW)
    assert peer.replies[0].status is Status.NO_QKD_CONNECTION and "KM4 is not allowed" in peer.replies[0].reason
    assert net.ac.session(K).state is SessionState.PENDING  # still waiting for an admissible peer


def test_session_quota_of_the_user():
    net = Net()
    assert net.ac.request(req("KM0", "KM1", "KM0", ksid="s1"), NOW).error is None
    assert net.ac.request(req("KM0", "KM5", "KM0", ksid="s2"), NOW).error is None
    third = net.ac.request(req("KM4", "KM1", "KM4", ksid="s3"), NOW)
    assert third.replies[0].status is Status.NO_QKD_CONNECTION
    assert third.replies[0].reason == "user 'alice' already has 2 of 2 sessions" and third.replies[0].qos is None
    assert net.ac.active_sessions_of("alice") == 2
    net.ac.close("s1", "KM0", NOW)
    assert net.ac.request(req("KM4", "KM1", "KM4", ksid="s3"), NOW).actions == []
    # A pair of the same user counts once: alice at both KM0 and KM4.
    assert net.ac.request(req("KM0", "KM4", "KM0", ksid="s2b", user="alice"), NOW).replies[0].status \
        is Status.NO_QKD_CONNECTION


@pytest.mark.parametrize("user, reason", [("nobody", "unknown user 'nobody'"), ("mallory", "user 'mallory' revoked")])
def test_unknown_or_revoked_user_is_refused(user, reason):
    out = Net().ac.request(req("KM0", "KM1", "KM0", user=user), NOW)
    assert [(r.status, r.reason) for r in out.replies] == [(Status.NO_QKD_CONNECTION, reason)]


def test_requests_that_cannot_form_a_session():
    net = Net()
    out = net.ac.request(req("KM0", "KM1", "KM2"), NOW)
    assert out.replies[0].status is Status.NO_QKD_CONNECTION and "not an endpoint" in out.replies[0].reason
    out = net.ac.request(req("KM0", "KM0", "KM0"), NOW)
    assert out.replies[0].status is Status.NO_QKD_CONNECTION and "both applications" in out.replies[0].reason
    assert net.ac.sessions() == []


def test_absent_qos_fields_are_chosen_by_the_system():
    net = Net()
    net.ac.request(req("KM0", "KM1", "KM0", QoS(min_bps=500)), NOW)
    assert net.ac.session(K).qos == QoS(key_chunk_size=32, max_bps=64000, min_bps=500, jitter=1000, priority=5,
                                        timeout=30000, ttl=300)


# ------------------------------------------------------------------ peer wait


@pytest.mark.parametrize("first, second", [("KM0", "KM1"), ("KM1", "KM0")])
def test_pair_completes_in_either_order(first, second):
    net = Net()
    qos = replace_qos(max_bps=30000)
    out = net.ac.request(req("KM0", "KM1", first, qos), NOW)
    assert out.actions == [] and kinds(out) == ["session_pending"]
    assert out.events[0].details["waiting_for"] == second
    [row] = out.sessions
    assert row["state"] is SessionState.PENDING and row["expires_at"] == at(5)
    assert net.reservations.get(K) is None

    out = net.ac.request(req("KM0", "KM1", second, qos), at(1))
    granted = qos
    assert out.configures == [Configure("KM0", K, 3, 15000, 30000, 60.0, None, "KM1"),
                              Configure("KM1", K, 3, 15000, 30000, 60.0, "KM0", None)]
    assert out.replies == [Reply("KM0", K, Status.SUCCESSFUL, granted, 0, "accepted"),
                           Reply("KM1", K, Status.SUCCESSFUL, granted, 0, "accepted")]
    assert kinds(out) == ["session_accepted"] and out.events[0].ts == at(1)
    assert net.ac.session(K).state is SessionState.ACCEPTED
    assert net.reservations.get(K).rate_bps == 30000 and net.residual("L01") == 170000


def test_peer_that_never_arrives_times_out():
    net = Net()
    net.ac.request(req("KM0", "KM1", "KM0", replace_qos(timeout=2000)), NOW)
    assert net.ac.next_deadline() == at(2)
    assert net.ac.tick(at(1.999)).actions == []
    out = net.ac.tick(at(2))
    assert out.actions == [Reply("KM0", K, Status.TIMEOUT, None, None,
                                 "peer did not open the session within the timeout")]
    assert kinds(out) == ["session_terminated", "session_removed"]
    assert out.events[0].details["cause"] == "peer_timeout"
    assert out.sessions[-1]["state"] is SessionState.TERMINATED and out.sessions[-1]["terminated_at"] == at(2)
    assert net.ac.session(K) is None and net.ac.next_deadline() is None
    # The KSID is free again.
    assert net.ac.request(req("KM0", "KM1", "KM1"), at(3)).error is None


def test_ksid_in_use():
    net = Net()
    net.ac.request(req("KM0", "KM1", "KM0"), NOW)
    same = net.ac.request(req("KM0", "KM1", "KM0"), NOW)
    assert same.replies[0].status is Status.KSID_IN_USE and "already open at KM0" in same.replies[0].reason
    other = net.ac.request(req("KM4", "KM5", "KM5"), NOW)
    assert other.replies[0].status is Status.KSID_IN_USE
    intruder = net.ac.request(AdmissionRequest(K, "004", "SAE-KM0", "SAE-KM1", "KM0", "KM1", "KM2", "carol", Q), NOW)
    assert intruder.replies[0].status is Status.NO_QKD_CONNECTION
    assert net.ac.session(K).state is SessionState.PENDING

    net.ac.request(req("KM0", "KM1", "KM1"), NOW)  # pair complete
    for node in ("KM0", "KM1"):
        again = net.ac.request(req("KM0", "KM1", node), NOW)
        assert again.replies[0].status is Status.KSID_IN_USE and again.configures == []
    net.ac.close(K, "KM0", NOW)  # terminated, deletions outstanding: still in use
    assert net.ac.request(req("KM0", "KM1", "KM0"), NOW).replies[0].status is Status.KSID_IN_USE


def test_peers_share_the_intersection_of_their_qos():
    net = Net()
    a = QoS(key_chunk_size=32, max_bps=50000, min_bps=1000, jitter=500, priority=7, timeout=5000, ttl=100)
    b = QoS(key_chunk_size=64, max_bps=40000, min_bps=2000, jitter=800, priority=6, timeout=9000, ttl=50)
    net.ac.request(req("KM0", "KM1", "KM0", a), NOW)
    mismatch = net.ac.request(req("KM0", "KM1", "KM1", b), NOW)
    [reply] = mismatch.actions
    assert reply.status is Status.QOS_NOT_MET and reply.qos.key_chunk_size == 32
    assert net.ac.session(K).state is SessionState.PENDING

    out = net.ac.request(req("KM0", "KM1", "KM1", reply.qos), NOW)
    granted = QoS(key_chunk_size=32, max_bps=40000, min_bps=2000, jitter=500, priority=6, timeout=5000, ttl=50)
    assert {r.qos for r in out.replies} == {granted}
    assert {(c.rate_bps, c.priority, c.bucket_bits, c.inactivity_timeout_s) for c in out.configures} == \
        {(40000, 6, 20000, 50.0)}


def test_peer_leaving_the_qos_to_the_system_gets_the_registered_one():
    net = Net()
    first = replace_qos(key_chunk_size=64, max_bps=50000, priority=6, ttl=90)
    net.ac.request(req("KM0", "KM1", "KM0", first), NOW)
    out = net.ac.request(req("KM0", "KM1", "KM1", QoS()), NOW)
    assert [r.status for r in out.replies] == [Status.SUCCESSFUL] * 2 and out.replies[0].qos == first
    # Carol's SLA (32000 bit/s, priority 3) bounds what her side adopts.
    net.ac.request(req("KM0", "KM2", "KM0", first, ksid=K2), NOW)
    out = net.ac.request(req("KM0", "KM2", "KM2", QoS(), ksid=K2), NOW)
    assert out.replies[0].qos == replace(first, max_bps=32000, priority=3)


def test_peer_minimum_above_the_first_maximum():
    net = Net()
    net.ac.request(req("KM0", "KM1", "KM0", replace_qos(max_bps=10000)), NOW)
    out = net.ac.request(req("KM0", "KM1", "KM1", replace_qos(max_bps=30000, min_bps=20000)), NOW)
    assert out.replies[0].status is Status.QOS_NOT_MET
    assert (out.replies[0].qos.max_bps, out.replies[0].qos.min_bps) == (10000, 10000)


# ------------------------------------------------------------------ routing and configuration


def test_configure_carries_exactly_the_session_configuration_for_every_km_on_the_path():
    assert [f.name for f in fields(Configure)] == ["node", "ksid", "priority", "bucket_bits", "rate_bps",
                                                   "inactivity_timeout_s", "prev_hop", "next_hop"]
    net = Net()
    out = open_pair(net, "KM2", "KM3")
    assert out.configures == [Configure("KM2", K, 3, 10000, 20000, 60.0, None, "KM0"),
                              Configure("KM0", K, 3, 10000, 20000, 60.0, "KM2", "KM3"),
                              Configure("KM3", K, 3, 10000, 20000, 60.0, "KM0", None)]
    assert [(r.node, r.status, r.hops) for r in out.replies] == [("KM2", Status.SUCCESSFUL, 1),
                                                                 ("KM3", Status.SUCCESSFUL, 1)]
    # Configuration first, answers after.
    assert [type(a) for a in out.actions] == [Configure] * 3 + [Reply] * 2
    assert net.reservations.get(K).links == ("L02", "L03")


def test_bucket_holds_at_least_one_chunk_and_at_most_the_sla_bucket():
    net = Net()
    small = open_pair(net, "KM0", "KM1", replace_qos(key_chunk_size=1024, jitter=0), ksid="a")
    assert {c.bucket_bits for c in small.configures} == {8192}
    big = open_pair(net, "KM2", "KM3", replace_qos(max_bps=32000, jitter=60000), ksid="b")
    assert {c.bucket_bits for c in big.configures} == {32768}  # carol's SLA bucket


def test_path_with_enough_residual_is_chosen():
    net = Net(skr={"L03": 20000.0})
    out = open_pair(net, "KM2", "KM3", replace_qos(max_bps=30000))
    assert [c.node for c in out.configures] == ["KM2", "KM6", "KM3"]
    assert net.residual("L26") == net.residual("L36") == 170000 and net.residual("L03") == 20000


def test_infeasible_rate_gets_a_counter_proposal_with_the_best_feasible_rate():
    net = Net(skr={"L01": 30000.0})
    out = open_pair(net, "KM0", "KM1", replace_qos(max_bps=60000, min_bps=40000))
    counter = replace_qos(max_bps=30000, min_bps=30000)
    assert out.actions == [Reply(n, K, Status.QOS_NOT_MET, counter, None,
                                 "no path carries Min_bps 40000; best feasible rate 30000 bit/s")
                           for n in ("KM0", "KM1")]
    assert kinds(out) == ["session_terminated", "session_removed"]
    assert out.events[0].details["counter_proposal"]["Max_bps"] == 30000
    assert net.ac.session(K) is None and net.reservations.get(K) is None and net.residual("L01") == 30000


def test_rate_between_min_and_max_is_granted_at_the_best_feasible_rate():
    net = Net(skr={"L01": 30000.0})
    out = open_pair(net, "KM0", "KM1", replace_qos(max_bps=60000, min_bps=20000))
    assert [r.status for r in out.replies] == [Status.SUCCESSFUL] * 2
    assert out.replies[0].qos == replace_qos(max_bps=30000, min_bps=20000)
    assert {c.rate_bps for c in out.configures} == {30000}
    assert net.residual("L01") == 0


def test_no_path_at_all_is_status_4():
    net = Net()
    assert net.ac.link_down("L01", NOW).actions == []
    out = open_pair(net, "KM0", "KM1")
    assert [(r.status, r.qos) for r in out.replies] == [(Status.NO_QKD_CONNECTION, None)] * 2
    net.ac.link_up("L01")
    assert [r.status for r in open_pair(net, "KM0", "KM1", ksid=K2).replies] == [Status.SUCCESSFUL] * 2


def test_implicit_014_session_does_not_wait_for_a_peer():
    net = Net()
    out = net.ac.request(req("KM2", "KM3", "KM2", interface="014"), NOW)
    assert [c.node for c in out.configures] == ["KM2", "KM0", "KM3"]
    assert out.replies == [Reply("KM2", K, Status.SUCCESSFUL, Q, 1, "accepted")]
    assert kinds(out) == ["session_accepted"] and out.sessions[0]["interface"] == "014"


# ------------------------------------------------------------------ confirmations


def test_confirmations_make_the_session_active():
    net = Net()
    open_pair(net, "KM2", "KM3")
    assert net.ac.confirmation(K, "KM2", at(1)).events == []
    assert net.ac.confirmation(K, "KM2", at(1)).error == f"no configuration of {K} pending at KM2"
    assert net.ac.confirmation(K, "KM5", at(1)).error is not None
    assert net.ac.confirmation("nope", "KM2", at(1)).error == "unknown KSID nope"
    assert net.ac.session(K).state is SessionState.ACCEPTED
    net.ac.confirmation(K, "KM3", at(2))
    out = net.ac.confirmation(K, "KM0", at(3))
    assert kinds(out) == ["session_active"] and out.actions == []
    s = net.ac.session(K)
    assert s.state is SessionState.ACTIVE and s.expires_at == at(63) and s.last_activity == at(3)
    assert out.sessions[0]["state"] is SessionState.ACTIVE


@pytest.mark.parametrize("how", ["timeout", "failure"])
def test_missing_or_failed_configuration_rolls_back(how):
    net = Net()
    open_pair(net, "KM2", "KM3")
    net.ac.confirmation(K, "KM2", at(1))
    if how == "timeout":
        assert net.ac.tick(at(9.9)).actions == []
        out = net.ac.tick(at(10))
        assert out.events[0].details["cause"] == "configuration_timeout"
        assert out.events[0].details["reason"] == "configuration not confirmed by KM0, KM3"
    else:
        out = net.ac.failure(K, "KM0", "RESTCONF 409", at(1))
        assert out.events[0].details["cause"] == "configuration_failed"
    assert out.actions == [Delete("KM2", K), Delete("KM0", K), Delete("KM3", K)]
    assert net.reservations.get(K) is None and net.residual("L02") == net.residual("L03") == 200000
    assert net.ac.session(K).state is SessionState.TERMINATED
    # A configuration confirmed late is covered by the Delete already sent.
    assert net.ac.confirmation(K, "KM3", at(11)).error is not None


# ------------------------------------------------------------------ timers, close


def test_key_request_restarts_the_inactivity_timer():
    net = Net()
    open_pair(net, "KM0", "KM1", replace_qos(ttl=10))
    activate(net)
    assert net.ac.key_request(K, at(8)).sessions[0]["last_activity"] == at(8)
    assert net.ac.session(K).expires_at == at(18) and net.ac.next_deadline() == at(18)
    assert net.ac.tick(at(12)).actions == []
    out = net.ac.tick(at(18))
    assert out.actions == [Delete("KM0", K), Delete("KM1", K)]
    assert out.events[0].details["cause"] == "inactivity_timeout"


def test_key_request_on_sessions_that_are_not_live():
    net = Net()
    assert net.ac.key_request(K, NOW).error == f"no live session {K}"
    net.ac.request(req("KM0", "KM1", "KM0"), NOW)
    assert net.ac.key_request(K, NOW).error == f"session {K} is waiting for the peer"


def test_timer_expiry_deletes_everywhere_releases_and_collects_confirmations():
    net = Net()
    open_pair(net, "KM2", "KM3")
    activate(net)
    out = net.ac.tick(at(60))
    assert out.actions == [Delete("KM2", K), Delete("KM0", K), Delete("KM3", K)]
    assert kinds(out) == ["session_terminated"]
    assert out.sessions[0]["state"] is SessionState.TERMINATED and out.sessions[0]["reservations"] is None
    assert net.reservations.get(K) is None and net.residual("L02") == 200000
    assert net.ac.key_request(K, at(61)).error is not None
    assert net.ac.confirmation(K, "KM2", at(61), deleted=True).events == []
    assert net.ac.confirmation(K, "KM2", at(61), deleted=True).error is not None
    assert net.ac.confirmation(K, "KM0", at(61), deleted=True).events == []
    assert net.ac.next_deadline() == at(70)
    out = net.ac.tick(at(70))
    assert kinds(out) == ["delete_unconfirmed", "session_removed"]
    assert out.events[0].details["nodes"] == ["KM3"]
    assert net.ac.session(K) is None


def test_all_delete_confirmations_remove_the_session():
    net = Net()
    open_pair(net, "KM0", "KM1")
    activate(net)
    net.ac.close(K, "KM1", at(1))
    assert net.ac.confirmation(K, "KM0", at(2), deleted=True).events == []
    out = net.ac.confirmation(K, "KM1", at(2), deleted=True)
    assert kinds(out) == ["session_removed"] and net.ac.session(K) is None


@pytest.mark.parametrize("closer, other", [("KM2", "KM3"), ("KM3", "KM2")])
def test_close_from_either_endpoint(closer, other):
    net = Net()
    open_pair(net, "KM2", "KM3")
    activate(net)
    refused = net.ac.close(K, "KM0", at(1))
    assert refused.error == f"KM0 is not an endpoint of {K}" and kinds(refused) == ["close_refused"]
    out = net.ac.close(K, closer, at(2))
    assert out.actions == [Delete("KM2", K), Delete("KM0", K), Delete("KM3", K)]
    assert out.events[0].details["reason"] == f"closed at {closer}" and out.events[0].node == closer
    assert net.reservations.get(K) is None
    # The peer's own CLOSE finds the session terminating: nothing more to do.
    again = net.ac.close(K, other, at(3))
    assert again.actions == [] and again.events == [] and again.error is None


def test_close_while_waiting_for_the_peer():
    net = Net()
    net.ac.request(req("KM0", "KM1", "KM0"), NOW)
    out = net.ac.close(K, "KM0", at(1))
    assert out.actions == [] and kinds(out) == ["session_terminated", "session_removed"]
    assert net.ac.session(K) is None and net.ac.close(K, "KM1", at(2)).error == f"unknown KSID {K}"


# ------------------------------------------------------------------ link failures


def confirm_steps(net: Net, t: dt.datetime, ksid: str = K) -> list[list]:
    """Confirm whatever admission awaits until nothing is: what each round of confirmations sent."""
    steps = []
    while net.ac.session(ksid).awaiting_config:
        sent = []
        for node in sorted(net.ac.session(ksid).awaiting_config):
            out = net.ac.confirmation(ksid, node, t)
            assert out.error is None, out.error
            sent += out.actions
        steps.append(sent)
    return steps


def hops(route: list[str]) -> dict[str, tuple]:
    return {n: (route[i - 1] if i else None, route[i + 1] if i + 1 < len(route) else None)
            for i, n in enumerate(route)}


def check_every_state(old_route: list[str], steps: list[list], new_route: list[str]) -> None:
    """The key managers' forwarding entries in every state the steps can leave them in, a step's
    configurations applied in any order. Messages start at the source (keys, towards the
    destination) and at the destination (fetches, towards the source); on the nodes they can
    reach: every hop a node names holds the session (no "no active session" answer); a node of the
    old route that switched to its new entry has the whole new route downstream of it; the source
    switches last.
    Deletions go only to nodes nobody names any more."""
    held = before = hops(old_route)
    new = hops(new_route)
    src, dst = new_route[0], new_route[-1]

    def reach(state: dict[str, tuple], node: str, way: int) -> list[str]:
        seen = [node]
        while state[seen[-1]][way] in state and state[seen[-1]][way] not in seen:
            seen.append(state[seen[-1]][way])
        return seen

    def check(state: dict[str, tuple]) -> None:
        for node in set(reach(state, src, 1) + reach(state, dst, 0)):
            for hop in state[node]:
                assert hop is None or hop in state, f"{node} refers to {hop}, which holds nothing: {state}"
            if node in before and before[node] != new.get(node) == state[node]:
                downstream = reach(state, node, 1)
                assert downstream[-1] == dst and all(state[b][0] == a for a, b in zip(downstream, downstream[1:])), \
                    f"the new route downstream of {node} is not complete: {state}"
        if state[src] == new[src] != before[src]:
            assert all(state.get(n) == e for n, e in new.items()), f"the source switched first: {state}"

    check(held)
    for step in steps:
        configures = [a for a in step if isinstance(a, Configure)]
        deletes = [a.node for a in step if isinstance(a, Delete)]
        assert not (configures and deletes), "deletion in the same step as configuration"
        for node in deletes:
            assert all(node not in e for n, e in held.items() if n != node), f"{node} deleted while in use"
        for applied in range(1 << len(configures)):
            state = {n: e for n, e in held.items() if n not in deletes}
            for i, c in enumerate(configures):
                if applied >> i & 1:
                    state[c.node] = (c.prev_hop, c.next_hop)
            check(state)
        held = {n: e for n, e in held.items() if n not in deletes}
        held.update({c.node: (c.prev_hop, c.next_hop) for c in configures})
    assert held == new


def test_link_down_reroutes_in_confirmed_steps_and_keeps_the_ksid():
    net = Net()
    open_pair(net, "KM2", "KM3")
    activate(net)
    out = net.ac.link_down("L02", at(5))
    # The new hop first; nobody sends to it before it confirmed.
    assert out.actions == [Configure("KM6", K, 3, 10000, 20000, 60.0, "KM2", "KM3")]
    assert kinds(out) == ["session_rerouted"]
    details = out.events[0].details
    assert details["old_route"] == ["KM2", "KM0", "KM3"]
    assert (details["configured"], details["deleted"]) == (["KM6", "KM3", "KM2"], ["KM0"])
    s = net.ac.session(K)
    assert s.ksid == K and s.state is SessionState.ACTIVE and s.route == ["KM2", "KM6", "KM3"]
    assert net.reservations.get(K).links == ("L26", "L36")
    assert net.residual("L02") == net.residual("L03") == 200000 and net.residual("L26") == 180000
    assert out.sessions[0]["route"] == ["KM2", "KM6", "KM3"]
    assert out.sessions[0]["reservations"] == {"L26": 20000.0, "L36": 20000.0}
    # A node whose step has not come has nothing to confirm.
    assert net.ac.confirmation(K, "KM2", at(6)).error == f"no configuration of {K} pending at KM2"
    # Then the destination, the source last, and only then the old hop's deletion.
    out = net.ac.confirmation(K, "KM6", at(6))
    assert out.actions == [Configure("KM3", K, 3, 10000, 20000, 60.0, "KM6", None)] and out.events == []
    out = net.ac.confirmation(K, "KM3", at(6))
    assert out.actions == [Configure("KM2", K, 3, 10000, 20000, 60.0, None, "KM6")] and out.events == []
    assert net.ac.next_deadline() == at(16)  # each step has its own confirmation deadline
    out = net.ac.confirmation(K, "KM2", at(7))
    assert out.actions == [Delete("KM0", K)]
    assert kinds(out) == ["session_reconfigured"] and out.events[0].details["route"] == ["KM2", "KM6", "KM3"]
    assert net.ac.confirmation(K, "KM0", at(8), deleted=True).error is None
    assert net.ac.next_deadline() == at(60)  # only the inactivity timer is left


def test_link_down_reconfigures_only_the_changed_hops():
    net = Net()
    open_pair(net, "KM4", "KM1")
    activate(net)
    first = net.ac.link_down("L04", at(1))
    steps = [first.actions] + confirm_steps(net, at(2))
    # KM1 keeps its entry (previous hop KM0) and is not touched.
    assert [[(a.node, a.prev_hop, a.next_hop) for a in step] for step in steps] == [
        [("KM5", "KM4", "KM0")], [("KM0", "KM5", "KM1")], [("KM4", None, "KM5")], []]
    check_every_state(["KM4", "KM0", "KM1"], steps, ["KM4", "KM5", "KM0", "KM1"])


@pytest.mark.parametrize("src, dst, skr, link, old, new", [
    # Source and destination both change; the old hop is deleted.
    ("KM2", "KM3", {}, "L02", ["KM2", "KM0", "KM3"], ["KM2", "KM6", "KM3"]),
    # Two new hops; the source keeps its entry.
    ("KM4", "KM3", {}, "L03", ["KM4", "KM0", "KM3"], ["KM4", "KM0", "KM2", "KM6", "KM3"]),
    # A lower grant on the new path: every node is re-configured, the destination's entry unchanged.
    ("KM4", "KM1", {"L45": 15000.0}, "L04", ["KM4", "KM0", "KM1"], ["KM4", "KM5", "KM0", "KM1"]),
], ids=["old-hop-deleted", "two-new-hops", "new-grant"])
def test_every_step_of_a_reroute_keeps_the_hops_consistent(src, dst, skr, link, old, new):
    net = Net(skr=skr)
    net.ac.request(req(src, dst, src, interface="014"), NOW)  # no peer to wait for
    activate(net)
    assert net.ac.session(K).route == old
    first = net.ac.link_down(link, at(1))
    steps = [first.actions] + confirm_steps(net, at(2))
    assert net.ac.session(K).route == new and net.ac.session(K).state is SessionState.ACTIVE
    check_every_state(old, steps, new)
    configured = [a for step in steps for a in step if isinstance(a, Configure)]
    # New nodes in the first step, then the others from the destination back to the source.
    fresh = [n for n in new if n not in old]
    assert [c.node for c in steps[0]] == fresh
    common = [c.node for c in configured[len(fresh):]]
    assert common == sorted(common, key=new.index, reverse=True)
    assert all(len(step) == 1 for step in steps[1:len(common) + 1])
    if skr:
        assert {c.rate_bps for c in configured} == {15000} and common == ["KM1", "KM0", "KM4"]


def test_the_ordered_steps_are_what_the_check_needs():
    """check_every_state refuses the old way: every configuration and deletion sent at once."""
    old, new = ["KM2", "KM0", "KM3"], ["KM2", "KM6", "KM3"]
    at_once = [[Configure(n, K, 3, 10000, 20000, 60.0, p, x) for n, (p, x) in hops(new).items()]]
    with pytest.raises(AssertionError, match="holds nothing|switched first"):
        check_every_state(old, at_once, new)
    with pytest.raises(AssertionError, match="deletion in the same step"):
        check_every_state(old, [at_once[0] + [Delete("KM0", K)]], new)


def test_a_second_failure_during_a_reroute_waits_for_the_step_in_flight():
    net = Net()
    net.ac.request(req("KM5", "KM3", "KM5", interface="014"), NOW)
    activate(net)
    first = net.ac.link_down("L03", at(1))
    assert [c.node for c in first.configures] == ["KM2", "KM6"]
    # Before KM2 and KM6 confirmed, L05 fails too: a new plan, sent after the step in flight.
    out = net.ac.link_down("L05", at(2))
    assert out.actions == [] and net.ac.session(K).awaiting_config == {"KM2", "KM6"}
    assert net.ac.session(K).route == ["KM5", "KM4", "KM0", "KM2", "KM6", "KM3"]
    assert out.events[0].details["configured"] == ["KM4", "KM3", "KM0", "KM5"]
    steps = [first.configures] + confirm_steps(net, at(3))
    assert [[a.node for a in step] for step in steps] == [["KM2", "KM6"], ["KM4"], ["KM3"], ["KM0"], ["KM5"], []]
    check_every_state(["KM5", "KM0", "KM3"], steps, ["KM5", "KM4", "KM0", "KM2", "KM6", "KM3"])


def test_a_reroute_ending_midway_deletes_the_old_hops_too():
    net = Net()
    open_pair(net, "KM2", "KM3")
    activate(net)
    net.ac.link_down("L02", at(1))
    net.ac.confirmation(K, "KM6", at(2))
    out = net.ac.failure(K, "KM3", "RESTCONF 409", at(3))
    assert out.events[0].details["cause"] == "configuration_failed"
    # KM0 still holds the old route's entry: it is deleted with the rest.
    assert out.actions == [Delete("KM2", K), Delete("KM6", K), Delete("KM3", K), Delete("KM0", K)]
    s = net.ac.session(K)
    assert s.state is SessionState.TERMINATED and s.awaiting_delete == {"KM2", "KM6", "KM3", "KM0"}
    # Nothing staged goes out any more.
    assert net.ac.confirmation(K, "KM2", at(4)).error is not None and s.staged == []


def test_link_down_without_replacement_terminates():
    net = Net()
    open_pair(net, "KM0", "KM1")
    activate(net)
    open_pair(net, "KM4", "KM5", ksid=K2)
    out = net.ac.link_down("L01", at(1))
    assert out.actions == [Delete("KM0", K), Delete("KM1", K)]
    assert out.events[0].details["cause"] == "path_failure"
    assert net.reservations.get(K) is None and net.ac.session(K).state is SessionState.TERMINATED
    assert net.ac.session(K2).state is SessionState.ACCEPTED and net.reservations.get(K2) is not None


def test_unconfirmed_reroute_rolls_back():
    net = Net()
    open_pair(net, "KM2", "KM3")
    activate(net)
    net.ac.link_down("L03", at(1))
    out = net.ac.tick(at(11))
    assert out.events[0].details["cause"] == "configuration_timeout"
    # KM0 of the old route still holds the session: it is deleted too.
    assert out.deletes == [Delete("KM2", K), Delete("KM6", K), Delete("KM3", K), Delete("KM0", K)]
    assert net.reservations.get(K) is None


# ------------------------------------------------------------------ rows, events, values


def test_session_rows_and_events_persist(db_url):  # noqa: F811
    engine = make_engine(db_url)
    upgrade(engine)
    sessions = session_factory(engine)
    net = Net()

    def persist(out):
        with sessions.begin() as db:
            for row in out.sessions:
                existing = db.scalars(select(m.Session).where(m.Session.ksid == row["ksid"])).one_or_none()
                if existing is None:
                    db.add(m.Session(**row))
                else:
                    for key, value in row.items():
                        setattr(existing, key, value)
            db.add_all(out.events)

    persist(net.ac.request(req("KM2", "KM3", "KM2"), NOW))
    persist(net.ac.request(req("KM2", "KM3", "KM3"), at(1)))
    for node in ("KM2", "KM0", "KM3"):
        persist(net.ac.confirmation(K, node, at(2)))
    with sessions() as db:
        row = db.scalars(select(m.Session)).one()
        assert (row.state, row.route, row.rate_bps, row.user) == (SessionState.ACTIVE, ["KM2", "KM0", "KM3"],
                                                                  20000.0, "carol")
        assert row.reservations == {"L02": 20000.0, "L03": 20000.0}
        assert row.qos["Max_bps"] == 20000 and row.inactivity_timeout_s == 60.0
    persist(net.ac.close(K, "KM3", at(3)))
    with sessions() as db:
        row = db.scalars(select(m.Session)).one()
        assert row.state is SessionState.TERMINATED and row.reason == "closed at KM3" and row.reservations is None
        events = db.scalars(select(m.Event).order_by(m.Event.id)).all()
        assert [e.kind for e in events] == ["session_pending", "session_accepted", "session_active",
                                            "session_terminated"]
        assert {e.element for e in events} == {"admission_control"} and {e.ksid for e in events} == {K}
    engine.dispose()


def test_qos_etsi_form():
    qos = QoS.from_etsi({"Key_chunk_size": 32, "Max_bps": 1000, "Min_bps": 10, "Jitter": 5, "Priority": 1,
                         "Timeout": 100, "TTL": 9, "Metadata_mimetype": "application/json"})
    assert qos == QoS(32, 1000, 10, 5, 1, 100, 9) and QoS.from_etsi(qos.to_etsi()) == qos
    assert QoS.from_etsi(None) == QoS() and QoS(max_bps=5).to_etsi() == {"Max_bps": 5}
    with pytest.raises(ValueError, match="unknown QoS member"):
        QoS.from_etsi({"max_bps": 5})
    for bad in (-1, 2 ** 32, True, 1.5, "10"):
        with pytest.raises(ValueError):
            QoS(max_bps=bad)


def test_request_validation():
    with pytest.raises(ValueError, match="interface"):
        req("KM0", "KM1", "KM0", interface="015")
    with pytest.raises(ValueError, match="KSID"):
        req("KM0", "KM1", "KM0", ksid="x" * 37)
    with pytest.raises(ValueError, match="user"):
        req("KM0", "KM1", "KM0", user="")
    with pytest.raises(ValueError):
        AdmissionConfig(confirm_timeout_s=0)
