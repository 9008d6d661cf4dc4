"""KMSession state machine (every legal and illegal transition, timers), QoS, Status, KSIDs."""
from __future__ import annotations

import json

import pytest

from agents.core.session import (DEFAULT_QOS, ConfigError, InvalidKSID, InvalidTransition, KMSession, QoS,
                                 QoSError, SessionConfig, SessionState, Status, normalize_ksid)

KSID = "6f1c2d3e-4a5b-4c6d-8e7f-0123456789ab"
A, B = "sae-A", "sae-B"
S = SessionState


def config(role="source", **kw):
    hops = {"source": (None, "KM0"), "destination": ("KM0", None), "intermediate": ("KM2", "KM3")}[role]
    base = dict(ksid=KSID, priority=3, bucket_rate_bps=1000.0, bucket_size_bits=4096, inactivity_timeout_s=5.0,
                prev_hop=hops[0], next_hop=hops[1], source_sae=A, destination_sae=B)
    base.update(kw)
    return SessionConfig(**base)


def new_session(now=0.0, **kw):
    return KMSession(KSID, "004", A, B, A, B, "source", QoS(Key_chunk_size=32), now, **kw)


def session_in(state: SessionState, now=0.0) -> KMSession:
    s = new_session(now)
    if state is S.AUTHENTICATING:
        return s
    if state is S.TERMINATED:
        s.close(now, "test")
        return s
    s.authenticated("alice", now)
    if state is S.USER_ACCEPTED:
        return s
    s.configured(config(), now)
    if state is S.KEY_EXCHANGING:
        s.key_request_started(now)
    return s


# event name -> (call, states where legal, state after)
EVENTS = {
    "authenticated": (lambda s, t: s.authenticated("alice", t), {S.AUTHENTICATING: S.USER_ACCEPTED}),
    "rejected": (lambda s, t: s.rejected("sla", t), {S.AUTHENTICATING: S.TERMINATED, S.USER_ACCEPTED: S.TERMINATED}),
    "configured": (lambda s, t: s.configured(config(), t),
                   {S.USER_ACCEPTED: S.OPERATIVE, S.OPERATIVE: S.OPERATIVE, S.KEY_EXCHANGING: S.KEY_EXCHANGING}),
    "key_request_started": (lambda s, t: s.key_request_started(t),
                            {S.OPERATIVE: S.KEY_EXCHANGING, S.KEY_EXCHANGING: S.KEY_EXCHANGING}),
    "key_request_done": (lambda s, t: s.key_request_done(t), {S.KEY_EXCHANGING: S.OPERATIVE}),
    "close": (lambda s, t: s.close(t, "closed"),
              {S.AUTHENTICATING: S.TERMINATED, S.USER_ACCEPTED: S.TERMINATED, S.OPERATIVE: S.TERMINATED,
               S.KEY_EXCHANGING: S.TERMINATED}),
    "activity": (lambda s, t: s.activity(t), {S.OPERATIVE: S.OPERATIVE, S.KEY_EXCHANGING: S.KEY_EXCHANGING}),
}
CASES = [(name, state) for name in EVENTS for state in S]


@pytest.mark.parametrize("name,state", CASES, ids=[f"{n}-{s.value}" for n, s in CASES])
def test_every_transition(name, state):
    call, legal = EVENTS[name]
    s = session_in(state)
    if state in legal:
        events = call(s, 1.0)
        assert s.state is legal[state]
        for e in events or []:
            assert e.ksid == KSID and e.timestamp == 1.0
    else:
        with pytest.raises(InvalidTransition) as exc:
            call(s, 1.0)
        assert exc.value.state is state and exc.value.event == name
        assert s.state is state


def test_happy_path_events():
    s = new_session(0.0)
    assert s.state is S.AUTHENTICATING
    (e1,) = s.authenticated("alice", 1.0)
    (e2,) = s.configured(config(), 2.0)
    (e3,) = s.key_request_started(3.0)
    (e4,) = s.key_request_done(4.0)
    (e5,) = s.close(5.0, "closed")
    assert [(e.kind, e.from_state, e.to_state) for e in (e1, e2, e3, e4, e5)] == [
        ("state_change", "authenticating", "user_accepted"),
        ("state_change", "user_accepted", "operative"),
        ("state_change", "operative", "key_exchanging"),
        ("state_change", "key_exchanging", "operative"),
        ("state_change", "operative", "terminated"),
    ]
    assert e1.details["user"] == "alice" and e2.details["priority"] == 3 and e5.details["reason"] == "closed"
    assert s.user == "alice" and s.end_reason == "closed" and s.terminated_at == 5.0
    json.dumps([e.to_json() for e in (e1, e2, e3, e4, e5)])


def test_reconfiguration_keeps_the_state_and_says_so():
    s = session_in(S.KEY_EXCHANGING)
    (e,) = s.configured(config(next_hop="KM5", bucket_rate_bps=10.0), 2.0)
    assert (e.kind, s.state) == ("reconfigured", S.KEY_EXCHANGING)
    assert s.config.next_hop == "KM5"


def test_parallel_requests_stay_key_exchanging_until_the_last_is_done():
    s = session_in(S.OPERATIVE)
    s.key_request_started(1.0)
    assert s.key_request_started(1.0) == []
    assert s.in_flight == 2
    assert s.key_request_done(2.0) == [] and s.state is S.KEY_EXCHANGING
    s.key_request_done(3.0)
    assert s.state is S.OPERATIVE and s.in_flight == 0


def test_inactivity_timer_runs_only_while_operative():
    s = new_session(0.0)
    s.authenticated("alice", 0.0)
    s.configured(config(inactivity_timeout_s=5.0), 10.0)
    assert s.inactivity_deadline == 15.0
    assert s.tick(14.99) == []
    s.key_request_started(12.0)
    assert s.inactivity_deadline is None
    assert s.tick(100.0) == [] and s.state is S.KEY_EXCHANGING
    s.key_request_done(101.0)
    assert s.tick(105.99) == []
    s.activity(103.0)  # a relay passing through restarts it
    assert s.tick(107.99) == []
    (e,) = s.tick(108.0)
    assert s.state is S.TERMINATED and e.details["reason"] == "inactivity"
    assert s.tick(500.0) == []


def test_setup_timeout():
    s = new_session(0.0, setup_timeout_s=30.0)
    assert s.tick(29.0) == []
    s.authenticated("alice", 1.0)
    (e,) = s.tick(30.0)
    assert (e.from_state, e.to_state, e.details["reason"]) == ("user_accepted", "terminated", "setup_timeout")


def test_configuration_must_fit_the_session():
    s = session_in(S.USER_ACCEPTED)
    with pytest.raises(ConfigError):
        s.configured(config("destination"), 1.0)  # this node is the source
    with pytest.raises(ConfigError):
        s.configured(config(destination_sae="sae-Mallory"), 1.0)
    with pytest.raises(ConfigError):
        s.configured(config(ksid="6f1c2d3e-4a5b-4c6d-8e7f-000000000000"), 1.0)
    with pytest.raises(ConfigError):
        s.configured(config(interface="014"), 1.0)
    assert s.state is S.USER_ACCEPTED and s.config is None


def test_sessions_from_configuration_start_operative():
    mid, events = KMSession.from_config(config("intermediate", source_sae=None, destination_sae=None), 7.0)
    assert mid.state is S.OPERATIVE and mid.role == "intermediate" and mid.local_sae is None
    assert (events[0].from_state, events[0].to_state) == (None, "operative")
    slave, _ = KMSession.from_config(config("destination", interface="014"), 7.0)
    assert (slave.local_sae, slave.peer_sae, slave.interface) == (B, A, "014")
    with pytest.raises(ConfigError):
        KMSession.from_config(config("destination", source_sae=None), 7.0)


def test_implicit_014_session():
    s = KMSession.implicit_014(KSID, A, B, QoS(), 0.0)
    assert (s.interface, s.role, s.local_sae, s.source_sae, s.state) == ("014", "source", A, A, S.AUTHENTICATING)


def test_constructor_checks_roles():
    with pytest.raises(ValueError):
        KMSession(KSID, "004", B, A, A, B, "source", QoS(), 0.0)  # local SAE is not the source
    with pytest.raises(ValueError):
        KMSession(KSID, "004", A, B, A, B, "intermediate", QoS(), 0.0)
    with pytest.raises(ValueError):
        KMSession(KSID, "016", A, B, A, B, "source", QoS(), 0.0)
    assert "sae-A" in repr(new_session())


def test_qos_json_round_trip_and_validation():
    q = QoS(Key_chunk_size=32, Max_bps=1000, Min_bps=10, Jitter=5, Priority=2, Timeout=1500, TTL=60,
            Metadata_mimetype="application/json")
    assert QoS.from_json(json.loads(json.dumps(q.to_json()))) == q
    assert QoS.from_json(None) == QoS()
    assert QoS.from_json({"Timeout": None}).Timeout is None
    assert q.chunk_bits == 256 and q.timeout_s == 1.5 and q.wants_metadata
    for bad in ({"Key_chunk_size": -1}, {"Max_bps": 2**32}, {"Priority": True}, {"Timeout": "5"},
                {"Metadata_mimetype": "x" * 256}, {"key_chunk_size": 1}, [1]):
        with pytest.raises(QoSError):
            QoS.from_json(bad)
    filled = QoS(Timeout=50).with_defaults(DEFAULT_QOS)
    assert filled.Timeout == 50 and filled.Key_chunk_size == DEFAULT_QOS.Key_chunk_size
    assert filled.Max_bps is None  # NULL stays for the system to choose


def test_status_codes_and_meanings():
    assert [int(s) for s in Status] == list(range(9))
    assert Status.KSID_IN_USE == 5 and "already in use" in Status.KSID_IN_USE.meaning
    assert "TIMEOUT" in Status(6).meaning and "counter proposal" in Status(7).meaning
    assert all(s.meaning for s in Status)


def test_ksid_normalisation():
    assert normalize_ksid(KSID.upper()) == KSID
    assert normalize_ksid(None) is None and normalize_ksid("") is None
    assert normalize_ksid("00000000-0000-0000-0000-000000000000") is None
    for bad in ("not-a-uuid", "{" + KSID + "}", KSID.replace("-", ""), 42):
        with pytest.raises(InvalidKSID):
            normalize_ksid(bad)
