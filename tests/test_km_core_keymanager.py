"""KeyManagerLogic: the decisions of one key manager, driven with explicit times.

The fake shell here is just the test: it feeds the logic's answers back (authentication,
configuration, key ready, material) and checks the actions that come out.
"""
from __future__ import annotations

import itertools
import json

import pytest

from agents.core.keymanager import (KEYS_NOT_FOUND, METADATA_MAX_SIZE, SIZE_NOT_MULTIPLE_OF_8, AnswerPeer,
                                    DeliverKey, EmitEvent, FetchFromSource, KeyManagerLogic, NeedAdmission,
                                    NeedAuthentication, ProduceKey, PurgeKeys, Reject, Reply, SignalKeyRequest,
                                    Terminate, Wait, key_id_for, metadata_json)
from agents.core.session import ConfigError, InvalidTransition, QoS, SessionConfig, SessionState, Status

A, B, C = "sae-A", "sae-B", "sae-C"
K1 = "11111111-1111-4111-8111-111111111111"
K2 = "22222222-2222-4222-8222-222222222222"
K3 = "33333333-3333-4333-8333-333333333333"
CHUNK_BITS = 256  # default Key_chunk_size 32 bytes


def of(actions, kind):
    if hasattr(actions, "actions"):
        actions = actions.actions
    return [a for a in actions if isinstance(a, kind)]


def answers(actions, call_id):
    return [a for a in actions if isinstance(a, (Reply, Reject, DeliverKey)) and a.call_id == call_id]


def events(actions):
    return [a.event for a in of(actions, EmitEvent)]


def logic(**kw):
    counter = itertools.count(1)
    kw.setdefault("new_ksid", lambda: f"00000000-0000-4000-8000-{next(counter):012d}")
    return KeyManagerLogic("KM2", **kw)


def config(ksid=K1, role="source", *, priority=3, rate=1000.0, size=4096, inactivity=60.0, source=A,
           destination=B, interface="004", **kw):
    hops = {"source": (None, "KM0", None, "L-20"), "destination": ("KM0", None, "L-02", None),
            "intermediate": ("KM1", "KM3", "L-12", "L-23")}[role]
    base = dict(ksid=ksid, priority=priority, bucket_rate_bps=rate, bucket_size_bits=size,
                inactivity_timeout_s=inactivity, prev_hop=hops[0], next_hop=hops[1], link_prev=hops[2],
                link_next=hops[3], source_sae=source, destination_sae=destination, interface=interface)
    base.update(kw)
    return SessionConfig(**base)


def open_session(km, ksid=K1, *, now=0.0, qos=None, caller=A, source=A, destination=B, **cfg):
    """OPEN_CONNECT through authentication and configuration; returns the OPEN_CONNECT reply."""
    d = km.open_connect(source, destination, qos, ksid, caller, now)
    km.authenticated(ksid, "user-" + caller, now)
    role = "source" if caller == source else "destination"
    acts = km.configure(config(ksid, role, source=source, destination=destination, **cfg), now)
    (reply,) = answers(acts, d.call_id)
    assert reply.status is Status.SUCCESSFUL
    return reply


# ---------------------------------------------------------------------------------------------
# OPEN_CONNECT

def test_open_connect_sequence():
    km = logic()
    d = km.open_connect(A, B, QoS(Key_chunk_size=64, Timeout=5000), None, A, now=1.0)
    assert d.answer is None
    (auth,) = of(d, NeedAuthentication)
    ksid = auth.ksid
    assert ksid == "00000000-0000-4000-8000-000000000001"  # null KSID: the key manager makes one
    assert (auth.sae, auth.interface) == (A, "004")
    assert of(d, Wait) == [Wait(d.call_id, 6.0, "authentication")]
    assert km.session(ksid).state is SessionState.AUTHENTICATING

    acts = km.authenticated(ksid, "alice", 1.5)
    (adm,) = of(acts, NeedAdmission)
    assert (adm.user, adm.source_sae, adm.destination_sae, adm.qos.Key_chunk_size) == ("alice", A, B, 64)

    acts = km.configure(config(ksid, rate=2048.0, priority=4), 2.0)
    (reply,) = answers(acts, d.call_id)
    assert (reply.status, reply.ksid) == (Status.SUCCESSFUL, ksid)
    assert (reply.qos.Max_bps, reply.qos.Priority, reply.qos.Key_chunk_size) == (2048, 4, 64)
    assert km.session(ksid).state is SessionState.OPERATIVE
    assert km.forwarding.role(ksid) == "source"
    kinds = [(e.kind, e.to_state) for e in events(d.actions) + events(acts)]
    assert kinds[0] == ("request_arrival", None)
    assert ("state_change", "authenticating") in kinds and ("state_change", "operative") in kinds


def test_open_connect_nil_ksid_and_invalid_ksid():
    km = logic()
    d = km.open_connect(A, B, None, "00000000-0000-0000-0000-000000000000", A, 0.0)
    assert of(d, NeedAuthentication)[0].ksid == "00000000-0000-4000-8000-000000000001"
    bad = km.open_connect(A, B, None, "ksid-7", A, 0.0)
    assert isinstance(bad.answer, Reject) and bad.answer.http_status == 400


def test_caller_must_be_an_endpoint():
    d = logic().open_connect(A, B, None, K1, C, 0.0)
    assert isinstance(d.answer, Reject) and d.answer.http_status == 403


def test_ksid_in_use_by_another_application():
    km = logic()
    open_session(km, K1)
    assert km.open_connect(C, B, None, K1, C, 1.0).answer.status is Status.KSID_IN_USE
    # The peer application opens the KSID at its own key manager; here it is taken.
    assert km.open_connect(A, B, None, K1, B, 1.0).answer.status is Status.KSID_IN_USE
    # A KSID this node relays for others.
    km.configure(config(K2, "intermediate", source=None, destination=None), 1.0)
    assert km.open_connect(A, B, None, K2, A, 1.0).answer.status is Status.KSID_IN_USE


def test_reopen_by_the_same_application_returns_the_assigned_qos():
    km = logic()
    first = open_session(km, K1, rate=512.0)
    again = km.open_connect(A, B, QoS(Max_bps=99), K1, A, 5.0).answer
    assert again.status is Status.SUCCESSFUL and again.qos == first.qos and again.qos.Max_bps == 512


def test_predefined_ksid_configured_before_the_application_opens():
    km = logic()
    km.configure(config(K1, "destination"), 0.0)
    reply = km.open_connect(A, B, None, K1, B, 1.0).answer
    assert reply.status is Status.SUCCESSFUL and reply.qos.Max_bps == 1000


@pytest.mark.parametrize("qos,field,proposed", [
    (QoS(Metadata_mimetype="application/xml"), "Metadata_mimetype", "application/json"),
    (QoS(Min_bps=500, Max_bps=100), "Min_bps", 100),
    (QoS(Key_chunk_size=0), "Key_chunk_size", 32),
    (QoS(Key_chunk_size=8193), "Key_chunk_size", 8192),
])
def test_qos_counter_proposal(qos, field, proposed):
    reply = logic().open_connect(A, B, qos, K1, A, 0.0).answer
    assert reply.status is Status.QOS_NOT_MET and getattr(reply.qos, field) == proposed


def test_admission_counter_proposal_and_rejections():
    km = logic()
    d = km.open_connect(A, B, QoS(Max_bps=10_000), K1, A, 0.0)
    km.authenticated(K1, "alice", 0.1)
    acts = km.admission_rejected(K1, Status.QOS_NOT_MET, 0.2, "exceeds SLA", counter_qos=QoS(Max_bps=1000))
    (reply,) = answers(acts, d.call_id)
    assert (reply.status, reply.qos.Max_bps) == (Status.QOS_NOT_MET, 1000)
    assert of(acts, Terminate) == [Terminate(K1, "exceeds SLA", False)]
    assert km.session(K1) is None  # no key was made: the KSID is free again
    d = km.open_connect(A, B, None, K1, A, 1.0)
    acts = km.authentication_failed(K1, "unknown certificate", 1.1)
    (reject,) = answers(acts, d.call_id)
    assert (reject.http_status, km.session(K1)) == (403, None)


def test_open_connect_timeout_peer_not_connected_then_connected():
    km = logic()
    d = km.open_connect(A, B, QoS(Timeout=2000), K1, A, 0.0)
    km.authenticated(K1, "alice", 0.5)
    assert km.next_deadline() == 2.0
    assert answers(km.tick(1.99), d.call_id) == []
    (reply,) = answers(km.tick(2.0), d.call_id)
    assert reply.status is Status.PEER_NOT_CONNECTED and reply.ksid == K1
    assert km.session(K1).state is SessionState.USER_ACCEPTED
    g = km.get_key(K1, None, A, 3.0, have_key=False)
    assert g.answer.status is Status.PEER_NOT_YET_CONNECTED
    km.configure(config(K1), 4.0)  # the peer came: the session is ready for GET_KEY
    assert km.session(K1).state is SessionState.OPERATIVE


def test_open_connect_timeout_while_authenticating():
    km = logic()
    d = km.open_connect(A, B, QoS(Timeout=1000), K1, A, 0.0)
    (reply,) = answers(km.tick(1.0), d.call_id)
    assert reply.status is Status.TIMEOUT
    assert km.session(K1) is None
    assert km.authenticated(K1, "alice", 1.5) == []  # a late answer changes nothing


def test_setup_timeout_ends_a_session_whose_peer_never_comes():
    km = logic(setup_timeout_s=100.0)
    km.open_connect(A, B, QoS(Timeout=1000), K1, A, 0.0)
    km.authenticated(K1, "alice", 0.0)
    km.tick(1.0)
    acts = km.tick(100.0)
    assert of(acts, Terminate) == [Terminate(K1, "setup_timeout", True)]
    assert km.session(K1) is None


# ---------------------------------------------------------------------------------------------
# GET_KEY

def test_get_key_with_key_at_hand_and_index_allocation():
    km = logic()
    open_session(km)
    d = km.get_key(K1, None, A, 1.0, have_key=True)
    assert d.answer == DeliverKey(d.call_id, K1, (0,))
    assert of(d, SignalKeyRequest) == [SignalKeyRequest(K1)]
    d = km.get_key(K1, None, A, 1.1, have_key=lambda i: i == 1)
    assert d.answer.indices == (1,)
    d = km.get_key(K1, 7, A, 1.2, have_key=True)
    assert d.answer.indices == (7,)
    assert km.get_key(K1, None, A, 1.3, have_key=True).answer.indices == (8,)
    assert km.session(K1).state is SessionState.OPERATIVE


def test_source_produces_the_key_and_delivers_when_ready():
    km = logic()
    open_session(km)
    d = km.get_key(K1, None, A, 1.0, have_key=False)
    assert d.answer is None
    assert of(d, ProduceKey) == [ProduceKey(K1, 0, CHUNK_BITS, "L-20", "KM0")]
    assert of(d, Wait) == [Wait(d.call_id, 11.0, "key")]
    assert km.session(K1).state is SessionState.KEY_EXCHANGING
    acts = km.key_ready(K1, 0, 1.5)
    assert answers(acts, d.call_id) == [DeliverKey(d.call_id, K1, (0,))]
    assert km.session(K1).state is SessionState.OPERATIVE
    assert [e.kind for e in events(acts)][:1] == ["key_available"]


def test_two_calls_for_one_index_share_one_production():
    km = logic()
    open_session(km)
    d1 = km.get_key(K1, 0, A, 1.0, have_key=False)
    d2 = km.get_key(K1, 0, A, 1.0, have_key=False)
    assert len(of(d1, ProduceKey)) == 1 and of(d2, ProduceKey) == []
    acts = km.key_ready(K1, 0, 2.0)
    assert {a.call_id for a in of(acts, DeliverKey)} == {d1.call_id, d2.call_id}


def test_get_key_timeout():
    km = logic()
    open_session(km, qos=QoS(Timeout=3000))
    d = km.get_key(K1, None, A, 10.0, have_key=False)
    assert km.next_deadline() == 13.0
    assert answers(km.tick(12.99), d.call_id) == []
    (reply,) = answers(km.tick(13.0), d.call_id)
    assert (reply.status, reply.index) == (Status.TIMEOUT, 0)
    assert km.session(K1).state is SessionState.OPERATIVE
    # the index was never handed out: the next call gets it again
    assert km.get_key(K1, None, A, 14.0, have_key=True).answer.indices == (0,)
    assert km.key_ready(K1, 0, 20.0)[0].event.kind == "key_available"  # late key: stored, nobody waits


def test_timeout_zero_means_no_waiting():
    km = logic()
    open_session(km, qos=QoS(Timeout=0))
    d = km.get_key(K1, None, A, 1.0, have_key=False)
    assert d.answer.status is Status.INSUFFICIENT_KEY
    assert of(d, ProduceKey)  # the key is still made, for the next call


def test_metadata_buffer_too_small():
    km = logic()
    open_session(km)
    d = km.get_key(K1, 0, A, 1.0, have_key=True, metadata_size=METADATA_MAX_SIZE - 1)
    assert (d.answer.status, d.answer.metadata_size) == (Status.METADATA_SIZE_INSUFFICIENT, METADATA_MAX_SIZE)
    assert isinstance(km.get_key(K1, 0, A, 1.0, have_key=True, metadata_size=METADATA_MAX_SIZE).answer, DeliverKey)
    assert isinstance(km.get_key(K1, 1, A, 1.0, have_key=True, metadata_size=0).answer, DeliverKey)
    assert len(metadata_json(2**32 - 1, 2**32 - 1)) == METADATA_MAX_SIZE
    km2 = logic()
    open_session(km2, qos=QoS(Metadata_mimetype=""))  # no metadata wanted: no size check
    assert isinstance(km2.get_key(K1, 0, A, 1.0, have_key=True, metadata_size=3).answer, DeliverKey)


def test_unknown_ksid_or_another_applications_session():
    km = logic()
    open_session(km)
    assert km.get_key(K2, None, A, 1.0, have_key=True).answer.status is Status.NO_QKD_CONNECTION
    assert km.get_key(K1, None, C, 1.0, have_key=True).answer.status is Status.NO_QKD_CONNECTION
    assert km.get_key("nope", None, A, 1.0, have_key=True).answer.http_status == 400
    assert km.get_key(K1, -1, A, 1.0, have_key=True).answer.http_status == 400


# ---------------------------------------------------------------------------------------------
# Token bucket in the key manager

def test_bucket_shapes_requests_within_the_timeout():
    km = logic()
    open_session(km, rate=256.0, size=512, qos=QoS(Timeout=10_000))
    assert isinstance(km.get_key(K1, None, A, 0.0, have_key=True).answer, DeliverKey)
    assert isinstance(km.get_key(K1, None, A, 0.0, have_key=True).answer, DeliverKey)
    d = km.get_key(K1, None, A, 0.0, have_key=True)
    assert of(d, Wait) == [Wait(d.call_id, 10.0, "rate")] and d.answer is None
    d2 = km.get_key(K1, None, A, 0.0, have_key=True)  # behind the first waiter
    assert km.next_deadline() == pytest.approx(1.0)
    assert km.tick(0.5) == []
    acts = km.tick(1.0)
    assert answers(acts, d.call_id) == [DeliverKey(d.call_id, K1, (2,))] and answers(acts, d2.call_id) == []
    assert answers(km.tick(2.0), d2.call_id) == [DeliverKey(d2.call_id, K1, (3,))]


def test_bucket_refuses_what_the_timeout_cannot_absorb():
    km = logic()
    open_session(km, rate=256.0, size=256, qos=QoS(Timeout=500))
    assert isinstance(km.get_key(K1, None, A, 0.0, have_key=True).answer, DeliverKey)
    reply = km.get_key(K1, None, A, 0.1, have_key=True).answer
    assert reply.status is Status.INSUFFICIENT_KEY and reply.retry_after == pytest.approx(0.9)
    assert km.session(K1).state is SessionState.OPERATIVE


def test_chunk_larger_than_the_bucket():
    km = logic()
    open_session(km, size=128)
    assert km.get_key(K1, None, A, 0.0, have_key=True).answer.status is Status.INSUFFICIENT_KEY


def test_greedy_application_gets_at_most_rate_times_time_plus_size():
    rate, size = 1024.0, 1024
    km = logic()
    open_session(km, rate=rate, size=size, qos=QoS(Timeout=0))
    delivered = 0
    for step in range(0, 400):
        now = step * 0.05
        acts = list(km.tick(now))
        for _ in range(5):  # five calls per step, far above the rate
            acts += km.get_key(K1, None, A, now, have_key=True).actions
        delivered += len(of(acts, DeliverKey))
        assert delivered * CHUNK_BITS <= rate * now + size + 1e-6
    assert delivered * CHUNK_BITS > rate * now + size - 2 * CHUNK_BITS


# ---------------------------------------------------------------------------------------------
# Priority queues for key material

def two_sessions_on_one_pool(km, low=1, high=5):
    open_session(km, K1, priority=low)
    open_session(km, K2, priority=high)


def test_priority_order_under_scarcity():
    km = logic()
    two_sessions_on_one_pool(km)
    low0 = km.get_key(K1, None, A, 1.0, have_key=False)
    assert of(low0, ProduceKey)
    km.key_material_short(K1, 0, 256, 1.0)  # pool empty: it waits
    high0 = km.get_key(K2, None, A, 1.1, have_key=False)
    assert of(high0, ProduceKey) == []  # queued behind nobody but the queue: no overtaking
    low1 = km.get_key(K1, None, A, 1.2, have_key=False)
    high1 = km.get_key(K2, None, A, 1.3, have_key=False)
    assert [e.request_id for e in km.queue("L-20")] == [f"{K2}/0", f"{K2}/1", f"{K1}/0", f"{K1}/1"]

    served = of(km.material_available("L-20", 300, 2.0), ProduceKey)
    assert [(p.ksid, p.index) for p in served] == [(K2, 0)]
    served = of(km.material_available("L-20", 10_000, 3.0), ProduceKey)
    assert [(p.ksid, p.index) for p in served] == [(K2, 1), (K1, 0), (K1, 1)]
    for call, ksid, index in [(high0, K2, 0), (high1, K2, 1), (low0, K1, 0), (low1, K1, 1)]:
        assert answers(km.key_ready(ksid, index, 4.0), call.call_id)


def test_material_that_went_elsewhere_requeues_at_the_same_place():
    km = logic()
    two_sessions_on_one_pool(km)
    km.get_key(K2, None, A, 1.0, have_key=False)
    km.key_material_short(K2, 0, 256, 1.0)
    km.get_key(K2, None, A, 1.1, have_key=False)
    (first,) = of(km.material_available("L-20", 256, 2.0), ProduceKey)
    assert (first.ksid, first.index) == (K2, 0)
    # relay traffic took the material first; the relay needs 256 + 256 tag bits
    km.key_material_short(K2, 0, 512, 2.1)
    assert [(e.request_id, e.bits) for e in km.queue("L-20")] == [(f"{K2}/0", 512), (f"{K2}/1", 256)]
    assert of(km.material_available("L-20", 300, 3.0), ProduceKey) == []  # the head blocks (strict priority)


def test_queued_request_expires_at_its_deadline():
    km = logic()
    open_session(km, qos=QoS(Timeout=2000))
    d = km.get_key(K1, None, A, 1.0, have_key=False)
    km.key_material_short(K1, 0, 256, 1.0)
    assert answers(km.tick(2.99), d.call_id) == []
    (reply,) = answers(km.tick(3.0), d.call_id)
    assert reply.status is Status.TIMEOUT
    assert len(km.queue("L-20")) == 0
    assert km.next_deadline() == 63.0  # only the inactivity timer is left


def test_an_expired_waiter_does_not_hold_back_a_new_request():
    km = logic()
    open_session(km, K1, qos=QoS(Timeout=1000))
    open_session(km, K2, priority=1)
    stale = km.get_key(K1, None, A, 1.0, have_key=False)
    km.key_material_short(K1, 0, 256, 1.0)
    d = km.get_key(K2, None, A, 2.5, have_key=False)  # K1's request expired at 2.0, no tick since
    assert of(d, ProduceKey) == [ProduceKey(K2, 0, CHUNK_BITS, "L-20", "KM0")]
    assert answers(d.actions, stale.call_id)[0].status is Status.TIMEOUT


def test_full_queue_refuses_or_drops_lower_priority():
    km = logic(queue_max_len=1)
    open_session(km, K1, priority=1)
    open_session(km, K2, priority=1)
    open_session(km, K3, priority=9)
    d1 = km.get_key(K1, None, A, 1.0, have_key=False)
    km.key_material_short(K1, 0, 256, 1.0)
    d2 = km.get_key(K2, None, A, 1.1, have_key=False)  # same priority: no room
    assert d2.answer.status is Status.INSUFFICIENT_KEY
    d3 = km.get_key(K3, None, A, 1.2, have_key=False)  # higher: takes the place of K1's
    assert d3.answer is None
    acts = d3.actions
    (dropped,) = answers(acts, d1.call_id)
    assert dropped.status is Status.INSUFFICIENT_KEY


# ---------------------------------------------------------------------------------------------
# Destination and relay

def test_destination_fetches_from_the_source():
    km = logic()
    open_session(km, caller=B)
    d = km.get_key(K1, 4, B, 1.0, have_key=False)
    assert of(d, FetchFromSource) == [FetchFromSource(K1, 4, CHUNK_BITS, "KM0")]
    assert answers(km.key_ready(K1, 4, 1.3), d.call_id) == [DeliverKey(d.call_id, K1, (4,))]
    d = km.get_key(K1, 5, B, 2.0, have_key=False)
    (reply,) = answers(km.key_failed(K1, 5, 2.2, Status.NO_QKD_CONNECTION, "relay failed"), d.call_id)
    assert reply.status is Status.NO_QKD_CONNECTION


def test_source_answers_the_peer_kms_requests():
    km = logic()
    open_session(km)
    acts = km.peer_key_request(K1, 3, 1.0)
    assert of(acts, ProduceKey) == [ProduceKey(K1, 3, CHUNK_BITS, "L-20", "KM0")]
    assert km.key_failed(K1, 3, 1.5, Status.INSUFFICIENT_KEY) == [AnswerPeer(K1, 3, Status.INSUFFICIENT_KEY)]
    assert km.peer_key_request(K2, 0, 1.0) == [AnswerPeer(K2, 0, Status.NO_QKD_CONNECTION)]
    # a peer request that expires in the queue is answered too
    km.peer_key_request(K1, 4, 2.0)
    km.key_material_short(K1, 4, 256, 2.0)
    assert AnswerPeer(K1, 4, Status.TIMEOUT) in km.tick(12.0)


def test_intermediate_routes_relay_messages_and_forgets_on_deletion():
    km = logic()
    acts = km.configure(config(K1, "intermediate", source=None, destination=None), 0.0)
    assert of(acts, Reply) == [] and km.forwarding.role(K1) == "intermediate"
    fwd = km.route_relay(K1, "KM1", 1.0)
    assert (fwd.accept, fwd.node, fwd.link_id) == (True, "KM3", "L-23")
    back = km.route_relay(K1, "KM3", 1.0)
    assert (back.node, back.link_id) == (("KM1"), "L-12")
    assert not km.route_relay(K1, "KM9", 1.0).accept
    assert not km.route_relay(K2, "KM1", 1.0).accept
    acts = km.deconfigure(K1, 2.0)
    assert of(acts, Terminate) == [Terminate(K1, "deconfigured", False)] and of(acts, PurgeKeys) == []
    assert km.session(K1) is None and K1 not in km.forwarding


def test_relay_ends_at_the_destination():
    km = logic()
    km.configure(config(K1, "destination"), 0.0)
    assert km.route_relay(K1, "KM0", 1.0).local


def test_reroute_replaces_the_entry_and_moves_waiting_requests():
    km = logic()
    open_session(km)
    km.get_key(K1, None, A, 1.0, have_key=False)
    km.key_material_short(K1, 0, 256, 1.0)
    km.configure(config(K1, next_hop="KM5", link_next="L-25"), 2.0)
    assert km.forwarding.get(K1).next_hop == "KM5"
    assert len(km.queue("L-20")) == 0 and len(km.queue("L-25")) == 1
    (p,) = of(km.material_available("L-25", 256, 3.0), ProduceKey)
    assert (p.pool, p.next_hop) == ("L-25", "KM5")
    with pytest.raises(ConfigError):
        km.configure(config(K1, "destination"), 4.0)
    assert km.forwarding.get(K1).next_hop == "KM5"


def test_configure_during_authentication_is_refused():
    km = logic()
    km.open_connect(A, B, None, K1, A, 0.0)
    with pytest.raises(InvalidTransition):
        km.configure(config(K1), 0.1)
    assert K1 not in km.forwarding


# ---------------------------------------------------------------------------------------------
# CLOSE, deletion, retention, inactivity

def test_close_keeps_unused_keys_until_the_peer_closes():
    km = logic()
    open_session(km)
    waiting = km.get_key(K1, None, A, 1.0, have_key=False)
    d = km.close(K1, A, 2.0)
    assert d.answer == Reply(d.call_id, Status.SUCCESSFUL, ksid=K1)
    (failed,) = answers(d.actions, waiting.call_id)
    assert failed.status is Status.NO_QKD_CONNECTION
    assert of(d, Terminate) == [Terminate(K1, "closed", True)]
    assert of(d, PurgeKeys) == []
    assert km.session(K1).state is SessionState.TERMINATED and K1 not in km.forwarding
    assert km.get_key(K1, 0, A, 3.0, have_key=True).answer.status is Status.NO_QKD_CONNECTION
    assert km.open_connect(A, B, None, K1, A, 3.0).answer.status is Status.KSID_IN_USE
    assert km.close(K1, A, 3.5).answer.status is Status.SUCCESSFUL  # idempotent
    assert of(km.peer_closed(K1, 4.0), PurgeKeys) == [PurgeKeys(K1)]
    assert km.session(K1) is None


def test_close_then_ttl_purges():
    km = logic()
    open_session(km, qos=QoS(TTL=30))
    km.close(K1, A, 10.0)
    assert km.next_deadline() == 40.0
    assert of(km.tick(39.9), PurgeKeys) == []
    assert of(km.tick(40.0), PurgeKeys) == [PurgeKeys(K1)]
    assert km.session(K1) is None


def test_peer_close_first_keys_made_stay_deliverable():
    km = logic()
    open_session(km, caller=B)
    acts = km.deconfigure(K1, 5.0, peer_closed=True)
    assert of(acts, Terminate) == [Terminate(K1, "deconfigured", False)] and of(acts, PurgeKeys) == []
    assert isinstance(km.get_key(K1, 3, B, 6.0, have_key=True).answer, DeliverKey)
    assert km.get_key(K1, 4, B, 6.0, have_key=False).answer.status is Status.NO_QKD_CONNECTION
    d = km.close(K1, B, 7.0)
    assert of(d, PurgeKeys) == [PurgeKeys(K1)] and of(d, Terminate) == []


def test_close_of_unknown_or_foreign_session():
    km = logic()
    open_session(km)
    assert km.close(K2, A, 1.0).answer.status is Status.NO_QKD_CONNECTION
    assert km.close(K1, C, 1.0).answer.status is Status.NO_QKD_CONNECTION
    assert km.session(K1).is_live


def test_inactivity_ends_the_session_and_tells_admission():
    km = logic()
    open_session(km, inactivity=30.0, now=0.0)
    km.get_key(K1, None, A, 10.0, have_key=True)
    assert km.next_deadline() == 40.0
    assert of(km.tick(39.0), Terminate) == []
    acts = km.tick(40.0)
    assert of(acts, Terminate) == [Terminate(K1, "inactivity", True)]
    assert km.session(K1).state is SessionState.TERMINATED


# ---------------------------------------------------------------------------------------------
# ETSI 014

def test_enc_keys_opens_an_implicit_session_and_dec_keys_at_the_slave():
    master = logic()
    d = master.enc_keys(A, B, 2, 256, now=0.0)
    (auth,) = of(d, NeedAuthentication)
    ksid = auth.ksid
    assert auth.interface == "014" and master.session_for_pair(A, B) == ksid
    (adm,) = of(master.authenticated(ksid, "alice", 0.1), NeedAdmission)
    assert adm.interface == "014"
    acts = master.configure(config(ksid, interface="014"), 0.2)
    assert [(p.index, p.bits) for p in of(acts, ProduceKey)] == [(0, 256), (1, 256)]
    assert answers(master.key_ready(ksid, 0, 0.3), d.call_id) == []
    assert answers(master.key_ready(ksid, 1, 0.4), d.call_id) == [DeliverKey(d.call_id, ksid, (0, 1))]
    # the pair's next enc_keys uses the same session
    d2 = master.enc_keys(A, B, 1, 512, now=1.0)
    assert of(d2, NeedAuthentication) == [] and of(d2, ProduceKey) == [ProduceKey(ksid, 2, 512, "L-20", "KM0")]

    slave = logic()
    slave.configure(config(ksid, "destination", interface="014"), 0.2)
    ok = slave.dec_keys(B, ksid, [0, 1], 0.5, have_keys=True)
    assert ok.answer == DeliverKey(ok.call_id, ksid, (0, 1))
    assert slave.dec_keys(C, ksid, [0], 0.5, have_keys=True).answer.http_status == 401
    missing = slave.dec_keys(B, ksid, [9], 0.5, have_keys=False).answer
    assert (missing.http_status, missing.message) == (400, KEYS_NOT_FOUND)
    assert key_id_for(ksid, 1) == key_id_for(ksid.upper().lower(), 1) != key_id_for(ksid, 0)


def test_implicit_session_ends_by_inactivity_and_a_new_one_follows():
    km = logic()
    d = km.enc_keys(A, B, 1, 256, 0.0)
    ksid = of(d, NeedAuthentication)[0].ksid
    km.authenticated(ksid, "alice", 0.0)
    km.configure(config(ksid, interface="014", inactivity=20.0), 0.0)
    km.key_ready(ksid, 0, 0.1)
    assert of(km.tick(20.1), Terminate) == [Terminate(ksid, "inactivity", True)]
    assert km.session_for_pair(A, B) is None
    d = km.enc_keys(A, B, 1, 256, 21.0)
    assert of(d, NeedAuthentication)[0].ksid != ksid


def test_enc_keys_validation():
    km = logic(max_keys_per_request=4)
    assert km.enc_keys(A, B, 1, 100, 0.0).answer.message == SIZE_NOT_MULTIPLE_OF_8
    assert km.enc_keys(A, B, 5, 256, 0.0).answer.http_status == 400
    assert km.enc_keys(A, A, 1, 256, 0.0).answer.http_status == 400


def test_enc_keys_timeout_and_burst_limit():
    km = logic(etsi014_timeout_s=2.0)
    d = km.enc_keys(A, B, 1, 256, 0.0)
    ksid = of(d, NeedAuthentication)[0].ksid
    km.authenticated(ksid, "alice", 0.0)
    km.configure(config(ksid, interface="014", size=1024), 0.0)
    (reply,) = answers(km.tick(2.0), d.call_id)
    assert reply.status is Status.TIMEOUT
    assert km.enc_keys(A, B, 4, 512, 3.0).answer.status is Status.INSUFFICIENT_KEY  # 2048 > bucket


# ---------------------------------------------------------------------------------------------

def test_every_004_status_is_reachable():
    seen = set()
    km = logic()
    km.open_connect(A, B, QoS(Timeout=1000), K1, A, 0.0)
    km.authenticated(K1, "alice", 0.0)
    seen |= {r.status for r in of(km.tick(1.0), Reply)}  # 1
    seen.add(km.get_key(K1, None, A, 1.0, have_key=False).answer.status)  # 3
    seen |= {r.status for r in of(km.configure(config(K1, size=256, rate=1.0, inactivity=1000.0), 1.0), Reply)}  # none left waiting
    seen.add(km.open_connect(A, B, None, K1, A, 1.0).answer.status)  # 0
    seen.add(km.open_connect(C, B, None, K1, C, 1.0).answer.status)  # 5
    seen.add(km.open_connect(A, B, QoS(Metadata_mimetype="text/csv"), K2, A, 1.0).answer.status)  # 7
    seen.add(km.get_key(K1, 0, A, 1.0, have_key=True, metadata_size=1).answer.status)  # 8
    assert isinstance(km.get_key(K1, 0, A, 1.0, have_key=True).answer, DeliverKey)
    seen.add(km.get_key(K1, 1, A, 1.0, have_key=True).answer.status)  # 2: rate
    seen.add(km.get_key(K2, 1, A, 1.0, have_key=True).answer.status)  # 4
    w = km.get_key(K1, 1, A, 300.0, have_key=False)
    seen |= {r.status for r in answers(km.tick(310.0), w.call_id)}  # 6
    assert seen == set(Status)


def test_events_are_json_and_hold_no_key_material():
    km = logic()
    acts = list(km.open_connect(A, B, None, K1, A, 0.0).actions)
    acts += km.authenticated(K1, "alice", 0.0)
    acts += km.configure(config(K1), 0.0)
    acts += km.get_key(K1, None, A, 1.0, have_key=False).actions
    acts += km.key_ready(K1, 0, 1.1)
    acts += km.close(K1, A, 2.0).actions
    stream = [e.to_json() for e in events(acts)]
    text = json.dumps(stream)
    assert "key_available" in text and "key_returned" in text and '"terminated"' in text
    assert all(set(e) == {"timestamp", "kind", "ksid", "from", "to", "details"} for e in stream)


def test_ksids_from_the_wire_are_matched_case_insensitively():
    km = logic()
    kx = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee"
    km.configure(config(kx.upper(), "intermediate", source=None, destination=None), 0.0)
    assert km.route_relay(kx.upper(), "KM1", 1.0).accept
    assert of(km.deconfigure(kx.upper(), 2.0), Terminate) == [Terminate(kx, "deconfigured", False)]
    assert km.session(kx) is None
