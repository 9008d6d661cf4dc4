"""The control-plane bus (qkdsdn.bus).

Behaviour tests run on every backend: the in-process LocalBus, the embedded
amqtt broker, and a real MQTT broker (Mosquitto) when QKDSDN_TEST_MQTT_URL
is set.  Transport-failure tests (reconnection, redelivery, Last Will) run
on the MQTT backends.  Waits are bounded polls for a condition.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from qkdsdn.bus import (MSG_ID, BusClosed, BusTimeout, Deduplicator, EmbeddedBroker, LocalBus,
                        LocalHub, MQTTBus, Topics, config_message, forget_session, make_bus,
                        parse_url, reply_message, shared_broker, status_payload, topic_matches,
                        validate_filter, validate_topic)

REPO = Path(__file__).resolve().parent.parent
MQTT_URL = os.environ.get("QKDSDN_TEST_MQTT_URL")
NO_MQTT = "QKDSDN_TEST_MQTT_URL is not set: no external MQTT broker to test against"
WAIT = 20.0  # generous bound of every poll
AMQTT_NO_REDELIVERY = (
    "amqtt 0.12 drops an unacknowledged outgoing QoS 1 message when the connection "
    "is lost (or after 5 s without PUBACK) instead of resending it on session resumption "
    "(MQTT-4.4.0-1); see docs/bus.md")


def wait_for(condition, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def sever(bus: MQTTBus) -> None:
    """Kill the client's TCP connection under paho, as a network failure would."""
    bus._client.socket().shutdown(socket.SHUT_RDWR)


class Env:
    """Buses on one backend, with ids and topics unique to the test; cleans up after."""

    def __init__(self, kind: str):
        self.kind = kind
        self.run = uuid.uuid4().hex[:10]
        self.topics = Topics(f"t{self.run}")
        self.hub = LocalHub() if kind == "local" else None
        self.broker = EmbeddedBroker().start() if kind == "embedded" else None
        self.url = MQTT_URL if kind == "mosquitto" else (self.broker.url if self.broker else None)
        self.buses: list = []
        self.retained: set[str] = set()

    def bus(self, name: str, **options):
        client_id = f"qkdsdn-test-{self.run}-{name}"
        if self.kind == "local":
            bus = LocalBus(client_id, hub=self.hub, **options)
        else:
            bus = MQTTBus(self.url, client_id, reconnect_delay=(0.1, 1.0), **options)
            assert bus.wait_connected(WAIT), f"{name} could not connect to {self.url}"
        self.buses.append(bus)
        if options.get("status_topic"):
            self.retained.add(options["status_topic"])
        return bus

    def topic(self, *levels: str) -> str:
        return "/".join([self.topics.prefix, *levels])

    def close(self) -> None:
        for bus in self.buses:
            bus.close()
        if self.kind == "mosquitto":
            # The system broker persists sessions and retained messages: leave none behind.
            if self.retained:
                cleaner = MQTTBus(self.url, f"qkdsdn-test-{self.run}-cleaner")
                if cleaner.wait_connected(WAIT):
                    for topic in self.retained:
                        cleaner.clear_retained(topic)
                    cleaner.flush(WAIT)
                cleaner.close()
                self.buses.append(cleaner)
            for client_id in {b.client_id for b in self.buses}:
                forget_session(self.url, client_id)
        if self.broker is not None:
            self.broker.stop()


def _env(kind: str):
    if kind == "mosquitto" and not MQTT_URL:
        pytest.skip(NO_MQTT)
    env = Env(kind)
    try:
        yield env
    finally:
        env.close()


@pytest.fixture(params=["local", "embedded", "mosquitto"])
def env(request):
    yield from _env(request.param)


@pytest.fixture(params=["embedded", "mosquitto"])
def mqtt_env(request):
    yield from _env(request.param)


@pytest.fixture
def embedded_env():
    yield from _env("embedded")


# ---------------------------------------------------------------------------
# Pure parts
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("topic_filter, topic, expected", [
    ("a/b", "a/b", True),
    ("a/b", "a/c", False),
    ("a/+/c", "a/b/c", True),
    ("a/+/c", "a/b/d/c", False),
    ("a/+", "a", False),
    ("a/#", "a", True),
    ("a/#", "a/b/c", True),
    ("#", "a/b", True),
    ("+/+", "a/b", True),
    ("+", "$SYS", False),
    ("#", "$SYS/x", False),
    ("$SYS/#", "$SYS/x", True),
    ("a/b", "a/b/c", False),
    ("a//b", "a//b", True),
    ("a/+/b", "a//b", True),
])
def test_topic_matching(topic_filter, topic, expected):
    assert topic_matches(topic_filter, topic) is expected


@pytest.mark.parametrize("bad", ["", "a/#/b", "a/b#", "a+/b", "a/\0"])
def test_invalid_filters_rejected(bad):
    with pytest.raises(ValueError):
        validate_filter(bad)


@pytest.mark.parametrize("bad", ["", "a/+", "a/#", "a\0"])
def test_invalid_topics_rejected(bad):
    with pytest.raises(ValueError):
        validate_topic(bad)


def test_deduplicator_per_topic_bounded_lru():
    d = Deduplicator(capacity=2)
    assert d.first_time("t1", "m1")
    assert not d.first_time("t1", "m1")
    assert d.first_time("t2", "m1"), "msg ids are scoped per topic"
    assert d.first_time("t1", "m2")
    assert not d.first_time("t1", "m1")  # refreshes m1: m2 is now the oldest
    assert d.first_time("t1", "m3")      # evicts m2
    assert ("t1", "m1") in d and ("t1", "m3") in d and ("t1", "m2") not in d
    assert d.first_time("t1", "m2")
    d.forget("t1", "m2")
    assert d.first_time("t1", "m2")
    assert len(d) == 3


def test_deduplicator_bounds_topics():
    d = Deduplicator(capacity=4, max_topics=2)
    d.first_time("a", "x")
    d.first_time("b", "x")
    d.first_time("c", "x")  # evicts topic a
    assert d.first_time("a", "x")
    assert not d.first_time("c", "x")


def test_topic_layout():
    t = Topics("poc")
    assert t.km_config("KM2") == "qkdsdn/poc/km/KM2/config"
    assert t.km_reply("KM2") == "qkdsdn/poc/km/KM2/reply"
    assert t.admission_request() == "qkdsdn/poc/admission/request"
    assert t.admission_reply("KM0") == "qkdsdn/poc/admission/reply/KM0"
    assert t.notifications("KM1") == "qkdsdn/poc/notifications/KM1"
    assert t.events() == "qkdsdn/poc/events"
    assert t.status("controller") == "qkdsdn/poc/status/controller"
    assert topic_matches(t.all_km_replies(), t.km_reply("KM5"))
    assert topic_matches(t.all_status(), t.status("agent-KM1"))
    assert topic_matches(t.everything(), t.events())
    assert not topic_matches(t.all_km_replies(), t.km_config("KM5"))
    for bad in ("", "a/b", "x+", "#", "$sys"):
        with pytest.raises(ValueError):
            Topics(bad)
    with pytest.raises(ValueError):
        t.km_config("KM/1")


def test_config_and_reply_messages():
    app = {"app_id": "ksid-1", "app_priority": 3}
    link = {"qkdl_id": "vl-1", "virt_prev_hop": "n0"}
    m = config_message("configure", "ksid-1", qkd_app=app, qkd_link=link)
    assert m["op"] == "configure" and m["ksid"] == "ksid-1" and m[MSG_ID]
    assert m["qkd_app"] == app and m["qkd_link"] == link
    d = config_message("deconfigure", "ksid-1")
    assert set(d) == {"op", MSG_ID, "ksid"}
    with pytest.raises(ValueError):
        config_message("configure", "ksid-1", qkd_app=app)  # no qkd_link
    with pytest.raises(ValueError):
        config_message("start", "ksid-1")
    with pytest.raises(ValueError):
        config_message("configure", "ksid-2", qkd_app=app, qkd_link=link)  # app_id mismatch
    assert reply_message(m, True) == {MSG_ID: m[MSG_ID], "ok": True}
    assert reply_message(m, False, "no route") == {MSG_ID: m[MSG_ID], "ok": False,
                                                   "error": "no route"}
    with pytest.raises(ValueError):
        reply_message(m, False)
    with pytest.raises(ValueError):
        reply_message({}, True)


def test_parse_url_and_make_bus_arguments():
    a = parse_url("mqtts://user:p%40ss@broker.example:8884")
    assert (a.scheme, a.host, a.port, a.username, a.password, a.tls) == (
        "mqtts", "broker.example", 8884, "user", "p@ss", True)
    assert parse_url("mqtt://127.0.0.1").port == 1883
    assert parse_url("mqtts://127.0.0.1").port == 8883
    for bad in ("http://x", "mqtt://", "mqtt://h:1/path", "mqtt://h:99999"):
        with pytest.raises(ValueError):
            parse_url(bad)
    with pytest.raises(ValueError):
        make_bus("ftp://x", "c")
    with pytest.raises(ValueError):
        make_bus("local", "c", ca="ca.pem")
    with pytest.raises(ValueError):
        make_bus("mqtt://127.0.0.1:1", "c", tls=("ca", None, None))  # TLS files on plain mqtt


# ---------------------------------------------------------------------------
# Semantics shared by every backend
# ---------------------------------------------------------------------------

def test_publish_subscribe_json_round_trip(env):
    sub_bus, pub_bus = env.bus("sub"), env.bus("pub")
    got = []
    sub_bus.subscribe(env.topic("km", "+", "config"), lambda t, p: got.append((t, p)))
    payload = {"op": "configure", "ksid": "k-1",
               "qkd_app": {"app_id": "k-1", "app_qos": {"max_bandwidth": 2048, "ttl": 30}},
               "qkd_link": {"virt_next_hop": None, "list": [1, 2.5, "x", True]}}
    msg_id = pub_bus.publish(env.topic("km", "KM1", "config"), payload)
    pub_bus.publish(env.topic("km", "KM1", "other"), {"not": "matched"})
    qos0 = pub_bus.publish(env.topic("km", "KM2", "config"), {"n": 0}, qos=0)
    wait_for(lambda: len(got) == 2, "two messages")
    assert got[0] == (env.topic("km", "KM1", "config"), {**payload, MSG_ID: msg_id})
    assert got[1] == (env.topic("km", "KM2", "config"), {"n": 0, MSG_ID: qos0})
    assert MSG_ID not in payload, "publish must not modify the caller's dict"


def test_every_matching_subscription_gets_its_own_copy(env):
    bus = env.bus("a")
    first, second = [], []

    def mutate(t, p):
        p["seen_by"] = "first"
        first.append(p)

    bus.subscribe(env.topic("events"), mutate)
    bus.subscribe(env.topic("#"), lambda t, p: second.append(p))
    env.bus("b").publish(env.topic("events"), {"n": 1})
    wait_for(lambda: first and second, "both handlers")
    assert first[0]["seen_by"] == "first" and "seen_by" not in second[0]


def test_same_msg_id_is_applied_once(env):
    """A QoS 1 redelivery carries the msg_id already applied: the handler runs once."""
    sub_bus, pub_bus = env.bus("sub"), env.bus("pub")
    topic = env.topic("km", "KM3", "config")
    got = []
    sub = sub_bus.subscribe(topic, lambda t, p: got.append(p["n"]))
    pub_bus.publish(topic, {"n": 1, MSG_ID: "m-1"})
    pub_bus.publish(topic, {"n": 1, MSG_ID: "m-1"})
    pub_bus.publish(topic, {"n": 2, MSG_ID: "m-2"})
    wait_for(lambda: sub.delivered + sub.duplicates == 3, "three copies handled")
    assert got == [1, 2]
    assert (sub.delivered, sub.duplicates) == (2, 1)


def test_duplicates_are_scoped_per_topic(env):
    sub_bus, pub_bus = env.bus("sub"), env.bus("pub")
    got = []
    sub_bus.subscribe(env.topic("km", "+", "config"), lambda t, p: got.append(t))
    pub_bus.publish(env.topic("km", "KM1", "config"), {MSG_ID: "same"})
    pub_bus.publish(env.topic("km", "KM2", "config"), {MSG_ID: "same"})
    wait_for(lambda: len(got) == 2, "one message per topic")


def test_failing_handler_is_isolated_and_may_retry(env):
    bus, pub = env.bus("sub"), env.bus("pub")
    got = []

    def handler(t, p):
        if p["n"] == 1 and not got:
            got.append("failed")
            raise RuntimeError("boom")
        got.append(p["n"])

    sub = bus.subscribe(env.topic("x"), handler)
    pub.publish(env.topic("x"), {"n": 1, MSG_ID: "m-1"})
    pub.publish(env.topic("x"), {"n": 2})
    # The failed message was not applied: the same msg_id is accepted again.
    pub.publish(env.topic("x"), {"n": 1, MSG_ID: "m-1"})
    wait_for(lambda: len(got) == 3, "all handled")
    assert got == ["failed", 2, 1]
    assert (sub.failures, sub.delivered, sub.duplicates) == (1, 2, 0)


def test_cancelled_subscription_gets_nothing_more(env):
    bus, pub = env.bus("sub"), env.bus("pub")
    cancelled, kept = [], []
    sub = bus.subscribe(env.topic("a"), lambda t, p: cancelled.append(p["n"]))
    bus.subscribe(env.topic("b"), lambda t, p: kept.append(p["n"]))
    pub.publish(env.topic("a"), {"n": 1})
    wait_for(lambda: cancelled == [1], "first message")
    sub.cancel()
    sub.cancel()  # idempotent
    pub.publish(env.topic("a"), {"n": 2})
    pub.publish(env.topic("b"), {"n": 3})
    wait_for(lambda: kept == [3], "marker on the other topic")
    assert cancelled == [1]


def test_retained_message_reaches_late_subscriber_and_can_be_cleared(env):
    pub = env.bus("pub")
    topic = env.topic("status", "agent-KM1")
    env.retained.add(topic)
    msg_id = pub.publish(topic, {"state": "online"}, retain=True)
    pub.flush(WAIT)
    late, later = [], []
    env.bus("late").subscribe(topic, lambda t, p: late.append(p))
    wait_for(lambda: late, "retained message")
    assert late == [{"state": "online", MSG_ID: msg_id}]
    pub.clear_retained(topic)
    pub.flush(WAIT)
    env.bus("later").subscribe(topic, lambda t, p: later.append(p["state"]))
    pub.publish(topic, {"state": "marker"})
    wait_for(lambda: later, "marker")
    assert later == ["marker"], "a cleared retained message must not be delivered"


def test_request_reply_correlation(env):
    requester, responder = env.bus("controller"), env.bus("km")
    req_topic, reply_topic = env.topic("km", "KM1", "config"), env.topic("km", "KM1", "reply")
    seen = []
    responder.subscribe(req_topic, lambda t, p: (seen.append(p), responder.publish(
        reply_topic, reply_message(p, True, ksid=p["ksid"]))))
    reply = requester.request(req_topic, config_message("deconfigure", "k-9"), reply_topic,
                              timeout=WAIT)
    assert reply == {MSG_ID: seen[0][MSG_ID], "ok": True, "ksid": "k-9"}


def test_concurrent_requests_each_get_their_own_reply(env):
    requester, responder = env.bus("controller"), env.bus("km")
    req_topic, reply_topic = env.topic("admission", "request"), env.topic("admission", "reply", "KM1")
    batch, lock = [], threading.Lock()

    def answer_in_reverse(t, p):
        with lock:
            batch.append(p)
            if len(batch) < 3:
                return
            todo = list(reversed(batch))
        for req in todo:
            responder.publish(reply_topic, reply_message(req, True, n=req["n"]))

    responder.subscribe(req_topic, answer_in_reverse)
    results = {}

    def ask(n):
        results[n] = requester.request(req_topic, {"n": n}, reply_topic, timeout=WAIT)

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(WAIT * 2)
    assert {n: r["n"] for n, r in results.items()} == {0: 0, 1: 1, 2: 2}


def test_request_times_out_and_late_reply_is_harmless(env):
    requester, responder = env.bus("controller"), env.bus("km")
    req_topic, reply_topic = env.topic("km", "KM2", "config"), env.topic("km", "KM2", "reply")
    held = []
    responder.subscribe(req_topic, lambda t, p: held.append(p))
    with pytest.raises(BusTimeout):
        requester.request(req_topic, {"n": 1}, reply_topic, timeout=0.5)
    wait_for(lambda: held, "the request")
    responder.publish(reply_topic, reply_message(held[0], True))  # too late
    responder.flush(WAIT)
    # The bus still correlates the next request correctly.
    answered = threading.Event()

    def answer(t, p):
        if p["n"] == 2:
            responder.publish(reply_topic, reply_message(p, False, "no capacity"))
            answered.set()

    responder.subscribe(req_topic, answer)
    reply = requester.request(req_topic, {"n": 2}, reply_topic, timeout=WAIT)
    assert reply["ok"] is False and reply["error"] == "no capacity"
    assert reply[MSG_ID] == held[1][MSG_ID]


def test_reply_consumed_by_request_is_not_dispatched(env):
    requester, responder = env.bus("controller"), env.bus("km")
    req_topic, reply_topic = env.topic("km", "KM4", "config"), env.topic("km", "KM4", "reply")
    others = []
    requester.subscribe(reply_topic, lambda t, p: others.append(p.get("marker")))
    responder.subscribe(req_topic, lambda t, p: responder.publish(reply_topic, reply_message(p, True)))
    assert requester.request(req_topic, {"n": 1}, reply_topic, timeout=WAIT)["ok"] is True
    responder.publish(reply_topic, {"marker": "unsolicited"})
    wait_for(lambda: others, "unsolicited message")
    assert others == ["unsolicited"]


def test_request_from_inside_a_handler(env):
    """Handlers run off the network thread, so they can wait for replies."""
    controller, km, admission = env.bus("controller"), env.bus("km"), env.bus("admission")
    admission.subscribe(env.topic("admission", "request"), lambda t, p: admission.publish(
        env.topic("admission", "reply", "KM1"), reply_message(p, True, route=["KM1", "KM0"])))
    outcome = []

    def on_config(t, p):
        reply = km.request(env.topic("admission", "request"), {"ksid": p["ksid"]},
                           env.topic("admission", "reply", "KM1"), timeout=WAIT)
        outcome.append(reply["route"])

    km.subscribe(env.topic("km", "KM1", "config"), on_config)
    controller.publish(env.topic("km", "KM1", "config"), {"ksid": "k-1"})
    wait_for(lambda: outcome, "nested request")
    assert outcome == [["KM1", "KM0"]]


def test_status_topic_online_then_offline_on_close(env):
    watcher = env.bus("watcher")
    status = env.topics.status("agent-KM1")
    states = []
    watcher.subscribe(status, lambda t, p: states.append((p["process"], p["state"])))
    km = env.bus("km", status_topic=status)
    wait_for(lambda: states, "online")
    km.close()
    wait_for(lambda: len(states) == 2, "offline")
    assert states == [(km.client_id, "online"), (km.client_id, "offline")]


def test_closed_bus_refuses_work(env):
    bus = env.bus("a")
    bus.close()
    bus.close()
    assert not bus.connected
    with pytest.raises(BusClosed):
        bus.publish(env.topic("x"), {})
    with pytest.raises(BusClosed):
        bus.subscribe(env.topic("x"), lambda t, p: None)
    with pytest.raises(BusClosed):
        bus.request(env.topic("x"), {}, env.topic("y"), timeout=1)


def test_payload_must_be_a_json_object(env):
    bus = env.bus("a")
    with pytest.raises(TypeError):
        bus.publish(env.topic("x"), ["not", "an", "object"])
    with pytest.raises(TypeError):
        bus.publish(env.topic("x"), {"key": b"\x00raw bytes"})
    with pytest.raises(ValueError):
        bus.publish(env.topic("x"), {"x": float("nan")})
    with pytest.raises(ValueError):
        bus.publish(env.topic("+"), {})


def test_local_hub_isolation_and_unique_ids():
    hub_a, hub_b = LocalHub(), LocalHub()
    with LocalBus("x", hub=hub_a) as a, LocalBus("y", hub=hub_b) as b, \
            LocalBus("z", hub=hub_a) as c:
        got = []
        b.subscribe("t", lambda t, p: got.append(("b", p["n"])))
        c.subscribe("t", lambda t, p: got.append(("c", p["n"])))
        a.publish("t", {"n": 1})
        wait_for(lambda: got, "delivery on the same hub")
        b.publish("t", {"n": 2})  # b's own hub: it receives it, c does not
        wait_for(lambda: len(got) == 2, "delivery on the other hub")
        assert got == [("c", 1), ("b", 2)]
        with pytest.raises(ValueError):
            LocalBus("x", hub=hub_a)


def test_on_message_parse_errors_are_dropped(env):
    """Non-JSON or non-object payloads from foreign publishers do not reach handlers."""
    bus = env.bus("a")
    got = []
    bus.subscribe(env.topic("x"), lambda t, p: got.append(p["n"]))
    raw_topic = env.topic("x")
    if env.kind == "local":
        env.hub._publish(raw_topic, b"not json", False)
        env.hub._publish(raw_topic, b"[1, 2]", False)
    else:
        other = env.bus("raw")
        other._transport_publish(raw_topic, b"not json", 1, False)
        other._transport_publish(raw_topic, b"[1, 2]", 1, False)
    env.bus("pub").publish(raw_topic, {"n": 1})
    wait_for(lambda: got, "the valid message")
    assert got == [1]


# ---------------------------------------------------------------------------
# MQTT: sessions, reconnection, redelivery, Last Will
# ---------------------------------------------------------------------------

def test_messages_queued_while_away_are_delivered_after_reconnect(mqtt_env):
    """Persistent session: QoS 1 messages published while the client is gone wait for it."""
    topic = mqtt_env.topics.km_config("KM1")
    km = mqtt_env.bus("km")
    first = []
    km.subscribe(topic, lambda t, p: first.append(p["n"]))
    km.close()
    pub = mqtt_env.bus("controller")
    pub.publish(topic, {"n": 1})
    pub.publish(topic, {"n": 2})
    assert pub.flush(WAIT)
    # Same client id: the broker hands over what it kept.  They may arrive
    # before the new subscribe(): the bus parks them until then.
    km2 = mqtt_env.bus("km")
    got = []
    km2.subscribe(topic, lambda t, p: got.append(p["n"]))
    wait_for(lambda: got == [1, 2], "queued messages")
    assert first == []


def test_reconnects_resubscribes_and_runs_hook_after_connection_loss(mqtt_env):
    km, pub = mqtt_env.bus("km"), mqtt_env.bus("controller")
    topic = mqtt_env.topics.km_config("KM1")
    got, hooks = [], []
    km.subscribe(topic, lambda t, p: got.append(p["n"]))
    km.on_reconnect(hooks.append)
    sever(km)
    wait_for(lambda: hooks, "the on_reconnect hook")
    assert hooks == [True], "the broker kept the persistent session"
    assert km.connected and km.connections == 2
    pub.publish(topic, {"n": 1})
    wait_for(lambda: got == [1], "delivery after reconnection")


def test_redelivery_after_lost_acknowledgement_is_applied_once(mqtt_env, request):
    """The connection dies after the handler got a message but before its PUBACK:
    the broker redelivers it on reconnection and the bus drops the copy."""
    if mqtt_env.kind == "embedded":
        # Strict: if amqtt starts redelivering, this XPASSes and fails the run.
        request.applymarker(pytest.mark.xfail(reason=AMQTT_NO_REDELIVERY, strict=True))
    km, pub = mqtt_env.bus("km"), mqtt_env.bus("controller")
    topic = mqtt_env.topics.km_config("KM2")
    calls, gate = [], threading.Event()

    def slow_handler(t, p):
        calls.append(p["n"])
        gate.wait(WAIT)

    sub = km.subscribe(topic, slow_handler)
    pub.publish(topic, {"n": 7})
    wait_for(lambda: calls == [7], "the handler to start")
    sever(km)  # the acknowledgement is sent only when the handler returns
    wait_for(lambda: km.connections == 2 and km.connected, "reconnection")
    gate.set()
    wait_for(lambda: sub.duplicates == 1, "the redelivered copy")
    assert calls == [7] and sub.delivered == 1


def test_reconnects_after_embedded_broker_restart(embedded_env):
    km, pub = embedded_env.bus("km"), embedded_env.bus("controller")
    topic = embedded_env.topics.km_config("KM1")
    got, hooks = [], []
    km.subscribe(topic, lambda t, p: got.append(p["n"]))
    km.on_reconnect(hooks.append)
    broker = embedded_env.broker
    port = broker.port
    broker.stop()
    wait_for(lambda: not km.connected and not pub.connected, "disconnection")
    broker.start()
    assert broker.port == port
    wait_for(lambda: hooks, "the on_reconnect hook")
    # amqtt keeps sessions in memory: a restarted broker has none, so the
    # bus must have subscribed again for this to arrive.
    assert hooks == [False]
    assert pub.wait_connected(WAIT)
    pub.publish(topic, {"n": 1})
    wait_for(lambda: got == [1], "delivery after the restart")


def test_publish_while_disconnected_is_sent_after_reconnect(embedded_env):
    km = embedded_env.bus("km")
    topic = embedded_env.topics.status("agent-KM1")
    broker = embedded_env.broker
    broker.stop()
    wait_for(lambda: not km.connected, "disconnection")
    msg_id = km.publish(topic, {"state": "online"}, retain=True)  # queued by the client
    assert not km.flush(0.1), "nothing can be acknowledged while the broker is down"
    broker.start()
    assert km.flush(WAIT), "the queued publish was sent and acknowledged after reconnection"
    got = []
    embedded_env.bus("late").subscribe(topic, lambda t, p: got.append(p))
    wait_for(lambda: got, "the retained message")
    assert got == [{"state": "online", MSG_ID: msg_id}]


_DYING_CLIENT = """
import sys, time
from qkdsdn.bus import MQTTBus
bus = MQTTBus(sys.argv[1], sys.argv[2], status_topic=sys.argv[3])
if not bus.wait_connected(30):
    sys.exit(3)
print("up", flush=True)
time.sleep(600)
"""


def test_last_will_marks_a_killed_process_offline(mqtt_env):
    status = mqtt_env.topics.status("agent-KM3")
    mqtt_env.retained.add(status)
    client_id = f"qkdsdn-test-{mqtt_env.run}-dying"
    watcher = mqtt_env.bus("watcher")
    states = []
    watcher.subscribe(status, lambda t, p: states.append((p["process"], p["state"])))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _DYING_CLIENT, mqtt_env.url, client_id, status],
                            stdout=subprocess.PIPE, env=env)
    try:
        wait_for(lambda: states, "online status")
        proc.send_signal(signal.SIGKILL)  # no DISCONNECT: the broker publishes the Will
        proc.wait(WAIT)
        wait_for(lambda: len(states) == 2, "the Last Will")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
        proc.stdout.close()
        if mqtt_env.kind == "mosquitto":
            forget_session(mqtt_env.url, client_id)
    assert states == [(client_id, "online"), (client_id, "offline")]
    retained = []
    mqtt_env.bus("late").subscribe(status, lambda t, p: retained.append(p["state"]))
    wait_for(lambda: retained, "the retained status")
    assert retained == ["offline"]


def test_will_is_fresh_for_each_connection(mqtt_env):
    """Each connection's Will carries a new msg_id, so a second failure is not a duplicate."""
    status = mqtt_env.topics.status("agent-KM4")
    mqtt_env.retained.add(status)
    watcher = mqtt_env.bus("watcher")
    states = []
    watcher.subscribe(status, lambda t, p: states.append(p["state"]))
    km = mqtt_env.bus("km", status_topic=status)
    wait_for(lambda: states == ["online"], "online")
    sever(km)
    wait_for(lambda: states == ["online", "offline", "online"], "first failure and return")
    sever(km)
    wait_for(lambda: states == ["online", "offline", "online", "offline", "online"],
             "second failure and return")


# ---------------------------------------------------------------------------
# Embedded broker: TLS, subprocess, make_bus
# ---------------------------------------------------------------------------

def _issue_certs(folder: Path) -> dict[str, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem, key, cert):
        (folder / f"{stem}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        (folder / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("test CA")).issuer_name(name("test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                         critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    write("ca", ca_key, ca)
    for stem, server in (("broker", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(stem)).issuer_name(ca.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       ca_key.public_key()), critical=False)
                   .add_extension(x509.ExtendedKeyUsage(
                       [x509.ExtendedKeyUsageOID.SERVER_AUTH if server
                        else x509.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        write(stem, key, builder.sign(ca_key, hashes.SHA256()))
    return {stem: folder / f"{stem}.pem" for stem in ("ca", "broker", "client")} | {
        f"{stem}_key": folder / f"{stem}.key" for stem in ("broker", "client")}


def test_mqtts_with_client_certificates(tmp_path):
    files = _issue_certs(tmp_path)
    client_tls = (files["ca"], files["client"], files["client_key"])
    with EmbeddedBroker(tls=(files["ca"], files["broker"], files["broker_key"])) as broker:
        assert broker.url.startswith("mqtts://127.0.0.1:")
        a = make_bus(broker.url, "tls-a", ca=files["ca"], cert=files["client"],
                     key=files["client_key"])
        b = MQTTBus(broker.url, "tls-b", tls=client_tls)
        try:
            assert a.wait_connected(WAIT) and b.wait_connected(WAIT)
            got = []
            a.subscribe("qkdsdn/tls/events", lambda t, p: got.append(p["n"]))
            b.publish("qkdsdn/tls/events", {"n": 1})
            wait_for(lambda: got == [1], "delivery over TLS")
        finally:
            a.close()
            b.close()

        # Without a client certificate the broker ends the handshake.
        ctx = ssl.create_default_context(cafile=str(files["ca"]))
        with socket.create_connection(("127.0.0.1", broker.port), timeout=WAIT) as raw:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls_sock:
                    tls_sock.sendall(b"\x10\x00")
                    if tls_sock.recv(1) == b"":  # TLS 1.3: refusal surfaces on first read
                        raise ConnectionError("closed by the broker")


def test_broker_restart_keeps_its_port_and_port_zero_picks_a_free_one():
    broker = EmbeddedBroker(port=0)
    with pytest.raises(Exception):
        broker.url  # no port before the first start
    broker.start()
    try:
        port = broker.port
        assert port > 0 and broker.running
        broker.stop()
        assert not broker.running
        broker.start()
        assert broker.port == port
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT):
            pass
    finally:
        broker.stop()


def test_broker_port_in_use_is_reported():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(Exception, match="cannot listen"):
            EmbeddedBroker(port=port).start()


def test_broker_as_a_subprocess():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "qkdsdn.bus", "broker", "--port", "0"],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], WAIT)
        assert ready, "the broker did not report its address"
        line = proc.stdout.readline().strip()
        assert line.startswith("listening on mqtt://127.0.0.1:")
        url = line.split()[-1]
        with MQTTBus(url, "sp-a") as a, MQTTBus(url, "sp-b") as b:
            assert a.wait_connected(WAIT) and b.wait_connected(WAIT)
            got = []
            a.subscribe("qkdsdn/sp/events", lambda t, p: got.append(p["n"]))
            # The subscription is live once the broker acknowledged it; until then a
            # publish may pass it by, so publish again until one arrives (bounded).
            deadline = time.monotonic() + WAIT
            while not got and time.monotonic() < deadline:
                b.publish("qkdsdn/sp/events", {"n": 5})
                wait_until = time.monotonic() + 0.5
                while not got and time.monotonic() < wait_until:
                    time.sleep(0.02)
            assert got and set(got) == {5}, "no delivery through the subprocess broker"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
        proc.stdout.close()


def test_make_bus_local_and_embedded():
    run = uuid.uuid4().hex[:8]
    local_a, local_b = make_bus("local", f"la-{run}"), make_bus("local", f"lb-{run}")
    emb_a, emb_b = make_bus("embedded", f"ea-{run}"), make_bus("embedded", f"eb-{run}")
    try:
        assert isinstance(local_a, LocalBus) and local_a.hub is LocalHub.default()
        assert isinstance(emb_a, MQTTBus) and emb_a.url == shared_broker().url
        for a, b in ((local_a, local_b), (emb_a, emb_b)):
            assert a.wait_connected(WAIT) and b.wait_connected(WAIT)
            got = []
            a.subscribe(f"qkdsdn/mk{run}/events", lambda t, p: got.append(p["n"]))
            b.publish(f"qkdsdn/mk{run}/events", {"n": 3})
            wait_for(lambda: got == [3], "delivery")
    finally:
        for bus in (local_a, local_b, emb_a, emb_b):
            bus.close()


def test_status_payload_states():
    assert status_payload("agent-KM0", "online") == {"process": "agent-KM0", "state": "online"}
    with pytest.raises(ValueError):
        status_payload("agent-KM0", "sleeping")
