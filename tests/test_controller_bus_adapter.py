"""controller.bus_adapter: the controller's side of the bus contract, as plain functions and classes."""
from __future__ import annotations

import datetime as dt
import uuid

import pytest

from controller.access import ApplicationProfile, SLAProfile, UserProfile, UserProfiles
from controller.admission import AdmissionRequest, Outcome, QoS, Reply, Status
from controller.bus_adapter import (AdmissionReplies, AuthenticateMsg, BadMessage, CloseMsg, KeyRequestMsg,
                                    OpenKey, OpenMsg, OpenRefusal, admission_request, alarm_notification,
                                    auth_answer, authenticate_unverified, event_from_bus, event_payload,
                                    km_reply_node, parse_admission_message, parse_notification, parse_status)
from db import models as dbm
from etsi015 import codec
from etsi015 import model as em

NOW = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.timezone.utc)
NODES = {"KM0", "KM2", "KM3"}
PROFILES = UserProfiles(
    users=[UserProfile("carol", SLAProfile(3, 32000, 2, 32768)), UserProfile("mallory", None, revoked=True)],
    applications=[ApplicationProfile("SAE-KM2", "KM2", "carol"), ApplicationProfile("SAE-KM3", "KM3", "carol"),
                  ApplicationProfile("SAE-M", "KM0", "mallory")])


def open_payload(**kw):
    base = {"op": "open", "msg_id": "m1", "node": "KM2", "ksid": str(uuid.uuid4()), "interface": "004",
            "user": "carol", "requesting_node": "KM2", "local_sae": "SAE-KM2", "source_sae": "SAE-KM2",
            "destination_sae": "SAE-KM3", "qos": {"Max_bps": 1000, "Timeout": 500, "Metadata_mimetype": None}}
    base.update(kw)
    return base


def test_parse_every_op():
    auth = parse_admission_message({"op": "authenticate", "msg_id": "a", "node": "KM2", "sae_id": "SAE-KM2",
                                    "fingerprint": None, "interface": "004"}, NODES)
    assert auth == AuthenticateMsg("a", "KM2", "SAE-KM2", None, "004")
    msg = parse_admission_message(open_payload(), NODES)
    assert isinstance(msg, OpenMsg) and msg.qos["Max_bps"] == 1000
    assert parse_admission_message({"op": "key_request", "msg_id": "k", "node": "KM3", "ksid": "x"}, NODES) \
        == KeyRequestMsg("k", "KM3", "x")
    assert parse_admission_message({"op": "close", "msg_id": "c", "node": "KM3", "ksid": "x", "reason": "bye"},
                                   NODES) == CloseMsg("c", "KM3", "x", "bye")


@pytest.mark.parametrize("payload, words", [
    ({"op": "open", "msg_id": "m", "node": "KM9"}, "node"),
    ({"op": "open", "node": "KM2"}, "msg_id"),
    ({"op": "dance", "msg_id": "m", "node": "KM2"}, "op must be"),
    (open_payload(requesting_node="KM3"), "differs"),
    (open_payload(local_sae="SAE-X"), "local_sae"),
    (open_payload(interface="015"), "interface"),
    (open_payload(qos=[1]), "qos"),
    ({"op": "authenticate", "msg_id": "m", "node": "KM2", "sae_id": ""}, "sae_id"),
    ({"op": "authenticate", "msg_id": "m", "node": "KM2", "sae_id": "S", "fingerprint": 5}, "fingerprint"),
])
def test_malformed_requests(payload, words):
    with pytest.raises(BadMessage, match=words):
        parse_admission_message(payload, NODES)


def test_open_becomes_an_admission_request_with_the_home_nodes():
    req = admission_request(parse_admission_message(open_payload(), NODES), PROFILES)
    assert isinstance(req, AdmissionRequest)
    assert (req.src_node, req.dst_node, req.requesting_node) == ("KM2", "KM3", "KM2")
    assert req.qos == QoS(max_bps=1000, timeout=500)


@pytest.mark.parametrize("changes, words", [
    ({"destination_sae": "SAE-NOPE"}, "unknown destination"),
    ({"node": "KM0", "requesting_node": "KM0"}, "homed at KM2"),
    ({"user": "mallory"}, "belongs to 'carol'"),
    ({"qos": {"Max_bps": -1}}, "invalid request"),
    ({"qos": {"Colour": 1}}, "invalid request"),
])
def test_open_refusals_before_admission(changes, words):
    refusal = admission_request(parse_admission_message(open_payload(**changes), NODES), PROFILES)
    assert isinstance(refusal, OpenRefusal) and refusal.status is Status.NO_QKD_CONNECTION
    assert words in refusal.reason


def test_authentication_answers():
    ok = authenticate_unverified(PROFILES, "SAE-KM2", "KM2", NOW)
    assert ok.ok and ok.user == "carol" and ok.event.kind == "auth_accepted"
    assert ok.event.details["method"] == "insecure-dev"
    assert auth_answer("m", ok) == {"msg_id": "m", "ok": True, "user": "carol", "reason": ok.reason}
    for sae, node, words in (("SAE-KM2", "KM3", "homed"), ("SAE-Z", "KM2", "unknown"), ("SAE-M", "KM0", "revoked")):
        refused = authenticate_unverified(PROFILES, sae, node, NOW)
        assert not refused.ok and words in refused.reason and refused.event.kind == "auth_rejected"
        answer = auth_answer("m", refused)
        assert answer["ok"] is False and answer["user"] is None and answer["error"] == refused.reason


# --------------------------------------------------------------------------- answers


def reply(node, status, ksid="k", qos=None, hops=None, reason="r"):
    return Reply(node=node, ksid=ksid, status=status, qos=qos, hops=hops, reason=reason)


def row(state, ksid="k", **kw):
    return {"ksid": ksid, "state": state, "route": None, "qos": {}, "reason": None, **kw}


def test_a_refusal_goes_to_the_request_that_caused_it():
    r = AdmissionReplies()
    out = r.process(Outcome(actions=[reply("KM2", Status.QOS_NOT_MET, qos=QoS(max_bps=5))]),
                    OpenKey("k", "KM2", "m1"))
    assert [(a.node, a.payload) for a in out] == [("KM2", {"msg_id": "m1", "ok": True, "status": 7,
                                                            "qos": {"Max_bps": 5}, "hops": None, "reason": "r"})]
    assert r.waiting() == 0


def test_success_is_held_until_the_route_is_configured():
    r = AdmissionReplies()
    # KM2 opens: pending (no reply yet); KM3 opens: both accepted.
    assert r.process(Outcome(sessions=[row(dbm.SessionState.PENDING)]), OpenKey("k", "KM2", "m2")) == []
    accepted = Outcome(actions=[reply("KM2", Status.SUCCESSFUL, hops=1), reply("KM3", Status.SUCCESSFUL, hops=1)],
                       sessions=[row(dbm.SessionState.ACCEPTED)])
    assert r.process(accepted, OpenKey("k", "KM3", "m3")) == []
    assert r.waiting() == 2
    active = Outcome(sessions=[row(dbm.SessionState.ACTIVE, route=["KM2", "KM0", "KM3"], qos={"Max_bps": 64})])
    out = r.process(active)
    assert [(a.node, a.payload["msg_id"], a.payload["status"], a.payload["hops"], a.payload["qos"]) for a in out] \
        == [("KM2", "m2", 0, 1, {"Max_bps": 64}), ("KM3", "m3", 0, 1, {"Max_bps": 64})]
    assert r.waiting() == 0


def test_a_held_success_becomes_a_refusal_when_the_session_ends_first():
    r = AdmissionReplies()
    r.process(Outcome(actions=[reply("KM2", Status.SUCCESSFUL)], sessions=[row(dbm.SessionState.ACCEPTED)]),
              OpenKey("k", "KM2", "m2"))
    out = r.process(Outcome(sessions=[row(dbm.SessionState.TERMINATED, reason="configuration failed at KM0")]))
    assert [(a.node, a.payload["status"], a.payload["reason"]) for a in out] == [
        ("KM2", 4, "configuration failed at KM0")]
    assert r.waiting() == 0


def test_a_duplicate_open_is_refused_without_losing_the_waiting_one():
    r = AdmissionReplies()
    r.process(Outcome(), OpenKey("k", "KM2", "first"))
    out = r.process(Outcome(actions=[reply("KM2", Status.KSID_IN_USE)]), OpenKey("k", "KM2", "second"))
    assert [a.payload["msg_id"] for a in out] == ["second"]
    # The peer timeout later answers the first one.
    out = r.process(Outcome(actions=[reply("KM2", Status.TIMEOUT)], sessions=[row(dbm.SessionState.TERMINATED)]))
    assert [(a.payload["msg_id"], a.payload["status"]) for a in out] == [("first", 6)]


# --------------------------------------------------------------------------- other messages


def test_topics_and_status():
    assert km_reply_node("qkdsdn/net/km/KM2/reply") == "KM2"
    assert km_reply_node("qkdsdn/net/km/KM2/config") is None
    assert parse_status("qkdsdn/net/status/agent-KM2", {"process": "agent-KM2", "state": "offline"}) == (
        "agent-KM2", "offline")
    # The payload names the client id; the topic names the process.
    assert parse_status("qkdsdn/net/status/agent-KM2", {"process": "net-agent-KM2", "state": "online"}) == (
        "agent-KM2", "online")
    assert parse_status("qkdsdn/net/status/agent-KM2", {"state": "gone"}) is None


def test_notifications_round_trip():
    link_id = str(uuid.uuid4())
    doc = codec.encode_notification(em.LinkDown(qkdl_id=link_id, reason="cut"), event_time=NOW)
    notification, event_time = parse_notification({**doc, "msg_id": "x"})
    assert isinstance(notification, em.LinkDown) and notification.qkdl_id == link_id
    assert event_time.startswith("2025-03-01T12:00:00")
    with pytest.raises(ValueError):
        parse_notification({"etsi-qkd-sdn-node:nonsense": {}})
    alarm = alarm_notification(qkdl_id=link_id, severity="MAJOR", message="QBER", notification="alarm",
                               link_status="ACTIVE", now=NOW)
    decoded, _ = parse_notification(alarm)
    assert isinstance(decoded, em.Alarm) and decoded.link.severity is em.Severity.MAJOR
    event = alarm_notification(qkdl_id=link_id, severity="MINOR", message="back", notification="event",
                               link_status=None, now=NOW)
    assert isinstance(parse_notification(event)[0], em.Event)


def test_events_from_the_bus():
    ev = event_from_bus({"timestamp": NOW.timestamp() - 5, "kind": "key_delivered", "ksid": "k", "node": "KM2",
                         "element": "key_manager", "details": {"bits": 256}, "from": "operative", "msg_id": "z"},
                        NOW)
    assert (ev.kind, ev.node, ev.ksid, ev.element) == ("key_delivered", "KM2", "k", "key_manager")
    assert ev.ts == NOW - dt.timedelta(seconds=5) and ev.details == {"bits": 256, "from": "operative"}
    # A monotonic-clock stamp is not a wall-clock time: the arrival time is used.
    assert event_from_bus({"timestamp": 1234.5, "kind": "x"}, NOW).ts == NOW
    assert event_from_bus({"kind": ""}, NOW) is None
    long = event_from_bus({"kind": "k" * 100, "details": {"v": float("nan")}}, NOW)
    assert len(long.kind) == 64 and long.details == {"v": None}


def test_event_payload_names_its_origin():
    event = dbm.Event(ts=NOW, element="admission_control", node=None, ksid="k", kind="session_active",
                      details={"route": ["KM2", "KM0"]})
    payload = event_payload(event, "net-controller")
    assert payload == {"timestamp": NOW.timestamp(), "element": "admission_control", "node": None, "ksid": "k",
                       "kind": "session_active", "details": {"route": ["KM2", "KM0"]}, "origin": "net-controller"}
