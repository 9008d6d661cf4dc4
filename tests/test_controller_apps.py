"""The control plane's os-ken apps, started by controller.launcher, against real RESTCONF and a real bus.

The nodes are controller_harness's emulated nodes: ETSI 015 RESTCONF servers (``agents.sdn_agent``:
NodeState + restconf_blueprint on qkdsdn.httpserver) with a bus presence of their own: their
notifications are published on ``notifications/<node>``, their status is retained on
``status/agent-<node>``, and a small responder answers ``km/<node>/config`` the way a key manager
does (here it also decodes and checks every configuration with ``etsi015.session``). The key
managers' requests are made the way a key manager makes them: ``bus.request`` on
``admission/request``. Buses: the in-process ``local`` bus, the embedded MQTT broker, and a real
broker (Mosquitto) when QKDSDN_TEST_MQTT_URL is set.
"""
from __future__ import annotations

import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from sqlalchemy import select

from controller.apps.base import ADMISSION_CONTROL, ROUTING, SDN_CONTROLLER
from controller.apps.context import ControllerConfig
from controller.apps.events import TerminateRequest
from controller.launcher import Controller, ControllerOptions
from controller_harness import EmulatedNode, network_file
from db import models as dbm
from db.netfile import load
from etsi015 import model as em
from etsi015.session import session_from_entries
from qkdsdn.bus import LocalBus, MQTTBus, Topics, forget_session, shared_broker
MQTT_URL = os.environ.get("QKDSDN_TEST_MQTT_URL")
NO_MQTT = "QKDSDN_TEST_MQTT_URL is not set: no external MQTT broker to test against"
WAIT = 20.0
FAST = ControllerConfig(discovery_interval_s=0.2, restconf_timeout_s=2.0, failures_to_down=1,
                        monitoring_tick_s=0.2, profiles_refresh_s=0.5)


def wait_for(condition, what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


class BusKind:
    """Buses of one kind for the fake nodes and the controller; cleans up after (Mosquitto keeps
    sessions and retained messages)."""

    def __init__(self, kind: str):
        self.kind = kind
        self.buses: list = []
        self.retained: set[str] = set()
        self.controller_url = {"local": "local", "embedded": "embedded", "mosquitto": MQTT_URL}[kind]

    def bus(self, client_id: str, status_topic: str | None = None):
        if self.kind == "local":
            bus = LocalBus(client_id, status_topic=status_topic)
        else:
            url = shared_broker().url if self.kind == "embedded" else MQTT_URL
            bus = MQTTBus(url, client_id, status_topic=status_topic, reconnect_delay=(0.1, 1.0))
            assert bus.wait_connected(WAIT)
        self.buses.append(bus)
        if status_topic:
            self.retained.add(status_topic)
        return bus

    def close(self, extra_clients=(), extra_retained=()) -> None:
        for bus in self.buses:
            bus.close()
        if self.kind == "mosquitto":
            cleaner = MQTTBus(MQTT_URL, f"qkdsdn-test-cleaner-{uuid.uuid4().hex[:8]}")
            if cleaner.wait_connected(WAIT):
                for topic in self.retained | set(extra_retained):
                    cleaner.clear_retained(topic)
                cleaner.flush(WAIT)
            cleaner.close()
            for client_id in {b.client_id for b in self.buses} | set(extra_clients) | {cleaner.client_id}:
                forget_session(MQTT_URL, client_id)


class FakeNode(EmulatedNode):
    """An emulated node whose key-manager stand-in decodes, checks and records every configuration,
    and refuses it when told to."""

    def __init__(self, net, name: str, buses: BusKind, journal: list | None = None):
        # Shared by the rig's nodes: (node, "received" | "replied", op, ksid) in the order it happened.
        self.journal = journal if journal is not None else []
        self.configs: list[tuple] = []
        self.refuse: str | None = None
        self.lock = threading.Lock()
        super().__init__(net, name, buses.bus)

    def on_config(self, op: str, ksid: str, msg: dict) -> str | None:
        config = session_from_entries(msg["qkd_app"], msg["qkd_link"], self.qkdn_id) if op == "configure" else None
        with self.lock:
            self.configs.append((op, ksid, config))
            refuse = self.refuse if op == "configure" else None
        self.journal.append((self.name, "received", op, ksid))
        self.journal.append((self.name, "replied", op, ksid))  # before the controller can see it
        return refuse

    def received(self, ksid: str, op: str | None = None) -> list:
        with self.lock:
            return [c for c in self.configs if c[1] == ksid and (op is None or c[0] == op)]


class Rig:
    """A controller and fake nodes on one bus kind."""

    def __init__(self, tmp_path: Path, kind: str, *, rest: bool = False, tokens_file: str | None = None,
                 db_url: str | None = None):
        self.path = network_file(tmp_path)
        self.net = load(self.path)
        self.buses = BusKind(kind)
        self.journal: list[tuple] = []
        self.nodes = {n.name: FakeNode(self.net, n.name, self.buses, self.journal) for n in self.net.nodes}
        for node in self.nodes.values():
            node.links_up()
        d = self.net.deployment
        self.controller = Controller(ControllerOptions(
            network=self.net, db_url=db_url or f"sqlite:///{tmp_path / 'controller.db'}",
            bus_url=self.buses.controller_url, insecure_dev=True,
            rest=(d.controller_host, d.controller_port) if rest else None, tokens_file=tokens_file, config=FAST))
        self.topics = Topics(self.net.name)

    def start(self) -> "Rig":
        self.controller.start()
        # Every link ACTIVE and carrying the reported rate in routing.
        wait_for(lambda: self.controller.health()[ROUTING]["routable_links"] == len(self.net.links),
                 "every link routable")
        return self

    def db(self):
        return self.controller.services.session_factory()

    def session_row(self, ksid: str):
        with self.db() as s:
            return s.scalar(select(dbm.Session).where(dbm.Session.ksid == ksid))

    def close(self) -> None:
        self.controller.stop()
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(FakeNode.stop, self.nodes.values()))
        self.buses.close(extra_clients=[f"{self.net.name}-controller"],
                         extra_retained=[self.topics.status("controller")])


def _rig(tmp_path, kind, **kw):
    if kind == "mosquitto" and not MQTT_URL:
        pytest.skip(NO_MQTT)
    rig = Rig(tmp_path, kind, **kw)
    try:
        yield rig.start()
    finally:
        rig.close()


@pytest.fixture(params=["local", "embedded", "mosquitto"])
def rig(request, tmp_path):
    yield from _rig(tmp_path, request.param)


@pytest.fixture
def local_rig(tmp_path):
    yield from _rig(tmp_path, "local")


def open_request(ksid: str, node: str, local: str, qos: dict | None = None, interface: str = "004",
                 user: str = "carol", src: str = "SAE-KM2", dst: str = "SAE-KM3") -> dict:
    return {"op": "open", "ksid": ksid, "interface": interface, "user": user, "requesting_node": node,
            "local_sae": local, "source_sae": src, "destination_sae": dst,
            "qos": qos if qos is not None else {"Max_bps": 8000, "Timeout": 10_000, "TTL": 60}}


def open_relayed(rig: Rig, ksid: str) -> tuple[dict, dict]:
    """KM2 and KM3 open the same KSID (ETSI 004): a route through KM0."""
    km2, km3 = rig.nodes["KM2"], rig.nodes["KM3"]
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(km2.request, open_request(ksid, "KM2", "SAE-KM2"))
        # KM2's request waits for its peer; its pending session is in the database first.
        wait_for(lambda: rig.session_row(ksid) is not None, "the pending session")
        assert rig.session_row(ksid).state is dbm.SessionState.PENDING and not first.done()
        second = pool.submit(km3.request, open_request(ksid, "KM3", "SAE-KM3"))
        return first.result(WAIT), second.result(WAIT)


# --------------------------------------------------------------------------- admission over the bus


def test_relayed_session_is_admitted_configured_and_closed_over_the_bus(rig):
    km0, km2, km3 = (rig.nodes[n] for n in ("KM0", "KM2", "KM3"))
    auth = km2.request({"op": "authenticate", "sae_id": "SAE-KM2", "fingerprint": None, "interface": "004"})
    assert auth["ok"] is True and auth["user"] == "carol"

    ksid = str(uuid.uuid4())
    a2, a3 = open_relayed(rig, ksid)
    for answer in (a2, a3):
        assert answer["ok"] is True and answer["status"] == 0 and answer["hops"] == 1, answer["reason"]
        assert answer["qos"]["Max_bps"] == 8000
    # Answered only once every key manager on the route confirmed its configuration.
    ids = {n: rig.net.node(n).qkdn_id for n in ("KM0", "KM2", "KM3")}
    (_, _, c2), = km2.received(ksid)
    (_, _, c0), = km0.received(ksid)
    (_, _, c3), = km3.received(ksid)
    assert (c2.prev_hop, c2.next_hop) == (None, ids["KM0"])
    assert (c0.prev_hop, c0.next_hop) == (ids["KM2"], ids["KM3"])
    assert (c3.prev_hop, c3.next_hop) == (ids["KM0"], None)
    for c in (c0, c2, c3):
        assert (c.source_qkdn_id, c.destination_qkdn_id) == (ids["KM2"], ids["KM3"])
        assert (c.source_sae, c.destination_sae, c.bucket_rate_bps, c.inactivity_timeout_s) == (
            "SAE-KM2", "SAE-KM3", 8000, 60)
    assert not any(rig.nodes[n].received(ksid) for n in ("KM1", "KM4", "KM5"))

    row = rig.session_row(ksid)
    assert row.state is dbm.SessionState.ACTIVE and row.route == ["KM2", "KM0", "KM3"]
    assert row.reservations == {"L02": 8000.0, "L03": 8000.0} and row.user == "carol"
    with rig.db() as s:
        links = {l.name: l for l in s.scalars(select(dbm.Link))}
        assert (links["L02"].reserved_bps, links["L02"].session_count) == (8000.0, 1)
        kinds = [e.kind for e in s.scalars(select(dbm.Event).where(dbm.Event.ksid == ksid).order_by(dbm.Event.id))]
        assert kinds[:3] == ["session_pending", "session_accepted", "session_active"]
        assert s.scalar(select(dbm.Event).where(dbm.Event.kind == "auth_accepted")) is not None

    km2.publish({"op": "key_request", "ksid": ksid})
    km3.publish({"op": "close", "ksid": ksid, "reason": "done"})
    for node in (km0, km2, km3):
        wait_for(lambda node=node: node.received(ksid, "deconfigure"), f"deletion at {node.name}")
    wait_for(lambda: rig.session_row(ksid).state is dbm.SessionState.TERMINATED, "the terminated session")
    with rig.db() as s:
        wait_for(lambda: s.scalar(select(dbm.Link.reserved_bps).where(dbm.Link.name == "L02")
                                  .execution_options(populate_existing=True)) == 0.0, "the released bandwidth")


def test_refusals_are_answered_at_once(local_rig):
    km2 = local_rig.nodes["KM2"]
    # Beyond carol's SLA (32000 bit/s, priority 3): status 7 and the counter-proposal.
    answer = km2.request(open_request(str(uuid.uuid4()), "KM2", "SAE-KM2",
                                      qos={"Max_bps": 50_000, "Priority": 5, "Timeout": 5000}))
    assert answer["status"] == 7 and answer["qos"]["Max_bps"] == 32000 and answer["qos"]["Priority"] == 3
    answer = km2.request(open_request(str(uuid.uuid4()), "KM2", "SAE-KM2", dst="SAE-NOWHERE"))
    assert answer["status"] == 4 and "unknown destination" in answer["reason"]
    # KM2 cannot speak for KM3's application.
    answer = km2.request(open_request(str(uuid.uuid4()), "KM2", "SAE-KM3"))
    assert answer["status"] == 4 and "homed at KM3" in answer["reason"]
    # Not a request at all.
    answer = km2.request({"op": "open", "ksid": "x"})
    assert answer["ok"] is False and "open request needs" in answer["error"]
    answer = km2.request({"op": "authenticate", "sae_id": "SAE-KM3", "fingerprint": None})
    assert answer["ok"] is False and "homed" in answer["reason"] and answer["user"] is None


def test_the_peer_never_opens(local_rig):
    ksid = str(uuid.uuid4())
    answer = local_rig.nodes["KM2"].request(open_request(ksid, "KM2", "SAE-KM2",
                                                         qos={"Max_bps": 1000, "Timeout": 200}))
    assert answer["status"] == 6
    assert local_rig.session_row(ksid).state is dbm.SessionState.TERMINATED


def test_a_key_manager_refusing_its_configuration_rolls_the_session_back(local_rig):
    km0, km4, km5 = (local_rig.nodes[n] for n in ("KM0", "KM4", "KM5"))
    km5.refuse = "no room for another session"
    ksid = str(uuid.uuid4())
    # ETSI 014: an implicit session, admitted on the master's request alone (KM4 -> KM5, adjacent).
    answer = km4.request(open_request(ksid, "KM4", "SAE-KM4", interface="014", user="alice", src="SAE-KM4",
                                      dst="SAE-KM5"))
    assert answer["status"] == 4 and "no room for another session" in answer["reason"]
    assert local_rig.session_row(ksid).state is dbm.SessionState.TERMINATED
    # What was configured is deleted again; KM0 was never on the route.
    wait_for(lambda: km4.received(ksid, "deconfigure"), "the roll-back at KM4")
    assert [c[0] for c in km5.received(ksid)][0] == "configure" and not km0.received(ksid)


def test_a_link_going_down_ends_the_sessions_it_carried(local_rig):
    rig = local_rig
    ksid = str(uuid.uuid4())
    a2, _ = open_relayed(rig, ksid)
    assert a2["status"] == 0
    l03 = rig.net.link("L03").qkdl_id
    # KM3's end reports the link down (sdqkdn_link_down on the bus): KM3 has no other link.
    rig.nodes["KM3"].state.set_link_status(l03, em.LinkStatus.OFF, "fibre cut")
    wait_for(lambda: rig.session_row(ksid).state is dbm.SessionState.TERMINATED, "the session's end")
    assert "L03" in rig.session_row(ksid).reason
    for n in ("KM2", "KM0", "KM3"):
        wait_for(lambda n=n: rig.nodes[n].received(ksid, "deconfigure"), f"deletion at {n}")
    with rig.db() as s:
        assert s.scalar(select(dbm.Link.status).where(dbm.Link.name == "L03")) is dbm.LinkStatus.OFF
        event = s.scalar(select(dbm.Event).where(dbm.Event.kind == "link_down"))
        # Told by the notification or read by the next discovery, whichever came first.
        assert event.details["link"] == "L03" and "KM3 reports" in event.details["reason"]
    assert rig.controller.health()[ROUTING]["routable_links"] == len(rig.net.links) - 1


def test_a_session_is_moved_off_a_failed_link_when_another_path_exists(local_rig):
    rig = local_rig
    ksid = str(uuid.uuid4())
    km4, km5 = rig.nodes["KM4"], rig.nodes["KM5"]
    answer = km4.request(open_request(ksid, "KM4", "SAE-KM4", interface="014", user="alice", src="SAE-KM4",
                                      dst="SAE-KM5"))
    assert answer["status"] == 0 and answer["hops"] == 0
    set_up = len(rig.journal)
    km4.state.set_link_status(rig.net.link("L45").qkdl_id, em.LinkStatus.OFF, "maintenance")
    # Make before break: KM0 is configured, KM4 and KM5 re-configured with their new hops.
    wait_for(lambda: rig.session_row(ksid).route == ["KM4", "KM0", "KM5"], "the new route")
    wait_for(lambda: rig.nodes["KM0"].received(ksid, "configure"), "the new hop configured")
    ids = {n: rig.net.node(n).qkdn_id for n in ("KM0", "KM4", "KM5")}
    wait_for(lambda: len(km4.received(ksid, "configure")) == 2, "KM4 re-configured")
    assert km4.received(ksid, "configure")[-1][2].next_hop == ids["KM0"]
    wait_for(lambda: rig.session_row(ksid).state is dbm.SessionState.ACTIVE, "the session active again")
    # On the wire, one step after the other: each goes out only once the one before was answered.
    # The new hop KM0, then the destination KM5, the source KM4 last (it sends keys at once).
    wait_for(lambda: ("KM4", "replied", "configure", ksid) in rig.journal[set_up:], "KM4's answer")
    rerouted = [(node, what) for node, what, op, k in rig.journal[set_up:] if k == ksid and op == "configure"]
    assert rerouted == [("KM0", "received"), ("KM0", "replied"), ("KM5", "received"), ("KM5", "replied"),
                        ("KM4", "received"), ("KM4", "replied")]


def test_an_agent_going_offline_takes_its_node_down_at_once(local_rig):
    rig = local_rig
    rig.nodes["KM1"].bus.close()  # retained offline status, as its Last Will would say
    with rig.db() as s:
        wait_for(lambda: s.scalar(select(dbm.Node.status).where(dbm.Node.name == "KM1")
                                  .execution_options(populate_existing=True)) is dbm.NodeStatus.DOWN,
                 "KM1 down")
        wait_for(lambda: s.scalar(select(dbm.Link.status).where(dbm.Link.name == "L01")
                                  .execution_options(populate_existing=True)) is dbm.LinkStatus.OFF, "L01 off")
    assert rig.controller.health()[SDN_CONTROLLER]["nodes"]["KM1"] == "down"


def test_monitoring_samples_and_alarms(local_rig):
    rig = local_rig
    l45 = rig.net.link("L45").qkdl_id
    subscriber = rig.buses.bus(f"{rig.net.name}-watcher")
    alarms: list = []
    subscriber.subscribe(rig.topics.notifications("_controller"), lambda topic, payload: alarms.append(payload))
    # KM4 (L45's master) reports a QBER above the threshold: out of routing at once, MAJOR alarm.
    rig.nodes["KM4"].state.set_link_performance(l45, skr=150_000, qber=0.2)
    wait_for(lambda: alarms, "an ETSI 015 alarm")
    from controller.bus_adapter import parse_notification

    alarm, _ = parse_notification(alarms[0])
    assert isinstance(alarm, em.Alarm) and alarm.link.qkdl_id == l45 and alarm.link.severity is em.Severity.MAJOR
    wait_for(lambda: rig.controller.health()[ROUTING]["routable_links"] == len(rig.net.links) - 1,
             "L45 out of routing")
    with rig.db() as s:
        link_id = s.scalar(select(dbm.Link.id).where(dbm.Link.name == "L45"))
        qbers = s.scalars(select(dbm.LinkSample.qber).where(dbm.LinkSample.link_id == link_id)).all()
        assert 0.2 in qbers and 0.02 in qbers
        assert s.scalar(select(dbm.Event).where(dbm.Event.kind == "alarm_qber_exceeded")) is not None


def test_operator_terminates_a_session(local_rig):
    rig = local_rig
    ksid = str(uuid.uuid4())
    open_relayed(rig, ksid)
    assert rig.controller.request(ADMISSION_CONTROL, TerminateRequest(ksid)) == (True, "terminated")
    wait_for(lambda: rig.session_row(ksid).state is dbm.SessionState.TERMINATED, "the terminated session")
    for n in ("KM2", "KM0", "KM3"):
        wait_for(lambda n=n: rig.nodes[n].received(ksid, "deconfigure"), f"deletion at {n}")
    ok, message = rig.controller.request(ADMISSION_CONTROL, TerminateRequest(ksid))
    assert not ok and "no live session" in message
    with rig.db() as s:
        assert s.scalar(select(dbm.Event).where(dbm.Event.ksid == ksid,
                                                dbm.Event.kind == "operator_terminated")) is not None


def test_agents_events_are_stored_and_a_resync_is_answered(local_rig):
    rig = local_rig
    ksid = str(uuid.uuid4())
    open_relayed(rig, ksid)
    km0 = rig.nodes["KM0"]
    km0.bus.publish(rig.topics.events(), {"timestamp": time.time(), "kind": "key_relayed", "ksid": ksid,
                                          "node": "KM0", "element": "key_manager", "details": {"bits": 256}})
    # KM0 lost its bus session and holds nothing any more: the controller configures it again.
    stray = str(uuid.uuid4())
    km0.bus.publish(rig.topics.events(), {"op": "resync", "kind": "resync", "node": "KM0",
                                          "element": "key_manager", "timestamp": time.time(), "ksid": None,
                                          "sessions": [{"ksid": stray, "qkd_app": {}, "qkd_link": {}}],
                                          "details": {"reason": "test", "sessions": 1}})
    wait_for(lambda: len(km0.received(ksid, "configure")) == 2, "the configuration sent again")
    wait_for(lambda: km0.received(stray, "deconfigure"), "the stray session deleted")
    with rig.db() as s:
        wait_for(lambda: s.scalar(select(dbm.Event).where(dbm.Event.kind == "key_relayed")), "the stored event")
        stored = s.scalar(select(dbm.Event).where(dbm.Event.kind == "key_relayed"))
        assert (stored.node, stored.ksid, stored.details) == ("KM0", ksid, {"bits": 256})
    # The controller's own events on the bus are not stored twice.
    with rig.db() as s:
        assert s.query(dbm.Event).filter_by(ksid=ksid, kind="session_active").count() == 1


# --------------------------------------------------------------------------- the REST API


def test_rest_api_is_served_with_the_apps_behind_it(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    from qkdsdn.pki import hash_token

    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"admin {hash_token('admin-token-0123456789', iterations=1000)} ops\n")
    rig = Rig(tmp_path, "local", rest=True, tokens_file=str(tokens))
    try:
        rig.start()
        url = rig.controller.rest_url
        health = requests.get(f"{url}/api/v1/health", timeout=WAIT)
        assert health.status_code == 200, health.text
        checks = health.json()["checks"]
        assert checks["AdmissionControlApp"]["status"] == "ok" and checks["bus"]["status"] == "ok"
        assert requests.get(f"{url}/metrics", timeout=WAIT).status_code == 401
        auth = {"Authorization": "Bearer admin-token-0123456789"}
        metrics = requests.get(f"{url}/metrics", headers=auth, timeout=WAIT)
        assert metrics.status_code == 200
        families = {f.name: f for f in text_string_to_metric_families(metrics.text)}
        skr = {s.labels["link"]: s.value for s in families["qkdsdn_link_skr_bps"].samples}
        assert skr["L02"] == 200_000.0

        ksid = str(uuid.uuid4())
        open_relayed(rig, ksid)
        reserved = requests.get(f"{url}/metrics", headers=auth, timeout=WAIT).text
        assert 'qkdsdn_link_reserved_bps{link="L02"} 8000.0' in reserved
        deleted = requests.delete(f"{url}/api/v1/sessions/{ksid}", headers=auth, timeout=WAIT)
        assert deleted.status_code in (200, 202), deleted.text
        wait_for(lambda: rig.session_row(ksid).state is dbm.SessionState.TERMINATED, "the terminated session")
        wait_for(lambda: rig.nodes["KM0"].received(ksid, "deconfigure"), "deletion at KM0")
    finally:
        rig.close()
