"""ETSI 014 multicast (additional_slave_SAE_IDs) in the key-manager logic, with explicit times.

A multicast enc_keys is one request per member session (master -> each slave, each with its own
route and bucket) for the same indices of the group; the call is answered once every member's
keys reached its slave's key manager, or with the first failure.
"""
from __future__ import annotations

import itertools

import pytest

from agents.core.keymanager import (DeliverKey, KeyManagerLogic, NeedAdmission, NeedAuthentication, ProduceKey,
                                    PurgeKeys, Reject, Reply, Terminate, Wait)
from agents.core.session import SessionConfig, Status
from test_km_core_keymanager import answers, of

A, B, C, D = "sae-A", "sae-B", "sae-C", "sae-D"


def logic(**kw):
    counter = itertools.count(1)
    kw.setdefault("new_ksid", lambda: f"00000000-0000-4000-8000-{next(counter):012d}")
    return KeyManagerLogic("KM1", **kw)


def member_config(ksid, slave, *, size=8192, inactivity=60.0, next_hop="KM2"):
    return SessionConfig(ksid=ksid, priority=0, bucket_rate_bps=1e6, bucket_size_bits=size,
                         inactivity_timeout_s=inactivity, prev_hop=None, next_hop=next_hop, link_prev=None,
                         link_next=f"L-{next_hop}", source_sae=A, destination_sae=slave, interface="014")


def set_up(km, decision, now=0.0, **cfg):
    """Authenticate and configure every member session the decision opened; returns
    {slave: ksid} and every action that came out."""
    members, acts = {}, []
    for auth in of(decision, NeedAuthentication):
        (adm,) = of(km.authenticated(auth.ksid, "alice", now), NeedAdmission)
        members[adm.destination_sae] = auth.ksid
        acts += km.configure(member_config(auth.ksid, adm.destination_sae, **cfg), now)
    return members, acts


def test_multicast_produces_the_same_indices_on_every_member_and_answers_once():
    km = logic()
    d = km.enc_keys(A, B, 2, 256, 0.0, additional_slaves=[C, D])
    assert d.answer is None and of(d, Wait)[-1].call_id == d.call_id
    members, acts = set_up(km, d)
    assert sorted(members) == [B, C, D] and len(set(members.values())) == 3
    produced = of(acts, ProduceKey)
    gids = {p.group for p in produced}
    assert len(gids) == 1 and None not in gids
    (gid,) = gids
    assert gid not in members.values()
    assert sorted((p.ksid, p.index) for p in produced) == sorted((k, i) for k in members.values() for i in (0, 1))
    assert km.group_members(gid) == members
    pending = [(k, i) for k in members.values() for i in (0, 1)]
    for ksid, index in pending[:-1]:
        assert answers(km.key_ready(ksid, index, 0.5), d.call_id) == []
    last = km.key_ready(*pending[-1], 0.6)
    assert answers(last, d.call_id) == [DeliverKey(d.call_id, gid, (0, 1))]
    assert d.call_id not in km.pending_calls()

    # The next call of the same group reuses the member sessions and goes on with the indices.
    d2 = km.enc_keys(A, C, 1, 256, 1.0, additional_slaves=[D, B])  # same slave set, another order
    assert of(d2, NeedAuthentication) == []
    assert sorted((p.ksid, p.index, p.group) for p in of(d2, ProduceKey)) == \
        sorted((k, 2, gid) for k in members.values())


def test_multicast_is_apart_from_the_pairs_unicast_session():
    km = logic()
    uni = km.enc_keys(A, B, 1, 256, 0.0)
    multi = km.enc_keys(A, B, 1, 256, 0.0, additional_slaves=[C])
    uni_ksid = of(uni, NeedAuthentication)[0].ksid
    multi_ksids = {a.ksid for a in of(multi, NeedAuthentication)}
    assert uni_ksid not in multi_ksids and len(multi_ksids) == 2
    assert km.session_for_pair(A, B) == uni_ksid


@pytest.mark.parametrize("extra, message", [
    ([B], "twice"), ([C, C], "twice"), ([A], "master"), ([""], "SAE IDs"), ([7], "SAE IDs"),
    ([f"sae-{i}" for i in range(17)], "max_SAE_ID_count (16)"),
])
def test_multicast_validation_changes_nothing(extra, message):
    km = logic()
    d = km.enc_keys(A, B, 1, 256, 0.0, additional_slaves=extra)
    assert isinstance(d.answer, Reject) and d.answer.http_status == 400 and message in d.answer.message
    assert km.sessions() == [] and km.pending_calls() == []


def test_no_multicast_when_max_additional_slaves_is_zero():
    km = logic(max_additional_slaves=0)
    assert km.enc_keys(A, B, 1, 256, 0.0, additional_slaves=[C]).answer.http_status == 400
    with pytest.raises(ValueError):
        logic(max_additional_slaves=-1)


def test_a_member_refused_by_admission_fails_the_call_once_and_drops_the_rest():
    km = logic()
    d = km.enc_keys(A, B, 1, 256, 0.0, additional_slaves=[C])
    auths = {a.ksid for a in of(d, NeedAuthentication)}
    acts = []
    members = {}
    for ksid in sorted(auths):
        (adm,) = of(km.authenticated(ksid, "alice", 0.0), NeedAdmission)
        members[adm.destination_sae] = ksid
    acts += km.configure(member_config(members[B], B), 0.1)
    refused = km.admission_rejected(members[C], Status.NO_QKD_CONNECTION, 0.2, "no QKD path")
    (reply,) = answers(refused, d.call_id)
    assert reply.status is Status.NO_QKD_CONNECTION and reply.message == "no QKD path"
    # The group's copy of the call's keys, kept for the master, goes.
    (purge,) = [a for a in refused if isinstance(a, PurgeKeys)]
    assert purge.indices == (0,) and purge.ksid not in members.values()
    # B's key arrives later: nothing more is answered for the call.
    assert answers(km.key_ready(members[B], 0, 0.3), d.call_id) == []
    assert km.pending_calls() == []


def test_a_member_without_key_times_the_call_out_once():
    km = logic(etsi014_timeout_s=2.0)
    d = km.enc_keys(A, B, 1, 256, 0.0, additional_slaves=[C])
    members, _ = set_up(km, d)
    km.key_ready(members[B], 0, 0.5)
    timed_out = km.tick(2.0)
    (reply,) = answers(timed_out, d.call_id)
    assert reply.status is Status.TIMEOUT
    assert [a for a in timed_out if isinstance(a, (Reply, Reject, DeliverKey))] == [reply]


def test_a_member_bucket_too_small_fails_at_once():
    km = logic()
    d = km.enc_keys(A, B, 1, 256, 0.0, additional_slaves=[C])
    members, acts = set_up(km, d, size=128)
    (reply,) = answers(acts, d.call_id)
    assert reply.status is Status.INSUFFICIENT_KEY


def test_group_ends_with_its_last_member_and_its_keys_are_purged():
    km = logic()
    d = km.enc_keys(A, B, 1, 256, 0.0, additional_slaves=[C])
    members, acts = set_up(km, d, inactivity=20.0)
    gid = of(acts, ProduceKey)[0].group
    for ksid in members.values():
        km.key_ready(ksid, 0, 0.1)
    ended = km.tick(20.2)
    assert sorted(t.ksid for t in of(ended, Terminate)) == sorted(members.values())
    assert PurgeKeys(gid) in ended and km.group_members(gid) == {}
    d2 = km.enc_keys(A, B, 1, 256, 30.0, additional_slaves=[C])
    members2, acts2 = set_up(km, d2, now=30.0)
    assert {p.group for p in of(acts2, ProduceKey)} != {gid}
    assert [p.index for p in of(acts2, ProduceKey)] == [0, 0]
