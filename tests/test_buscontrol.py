"""The key manager on the control-plane bus (agents/buscontrol.py).

Real agents (KeyManagerAgent, insecure-dev on loopback) on a real bus: the
in-process LocalBus always, the embedded amqtt broker where a broker restart
is needed, and Mosquitto when QKDSDN_TEST_MQTT_URL is set. The controller is
not in this package: the tests play it with a small responder on the bus that
answers access and admission requests the way docs/controller.md says and
configures the key managers through km/<node>/config -- a test double of the
remote party, never shipped. Every wait is a bounded poll for a condition.
"""
from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import networkx as nx
import pytest
import requests

from agent_harness import free_ports, relocate
from agents.buscontrol import BusControlPlane, agent_client_id, agent_process_name
from agents.client import ETSI004Error, KeyManagerClient, QoS
from agents.control import AdmissionRequest
from agents.service import KeyManagerAgent
from db.netfile import load
from etsi015 import codec
from etsi015 import model as m
from etsi015.session import SessionConfig, session_entries as etsi_entries, virt_link_id
from qkdsdn.bus import (MSG_ID, EmbeddedBroker, LocalBus, LocalHub, MQTTBus, Topics, config_message,
                        forget_session, reply_message)

MQTT_URL = os.environ.get("QKDSDN_TEST_MQTT_URL")
NO_MQTT = "QKDSDN_TEST_MQTT_URL is not set: no external MQTT broker to test against"
WAIT = 30.0  # generous bound of every poll

# A chain KM0 - KM1 - KM2 with emulated links: adjacent sessions on L01, relayed ones through KM1.
NETWORK = """\
network: {{name: {name}}}
nodes:
  - {{name: KM0, km_address: "127.0.0.1:1"}}
  - {{name: KM1, km_address: "127.0.0.1:2"}}
  - {{name: KM2, km_address: "127.0.0.1:3"}}
links:
  - {{name: L01, ends: [KM0, KM1], length_km: 10, device: {{model: fixed, skr_bps: 200000, qber: 0.02}}}}
  - {{name: L12, ends: [KM1, KM2], length_km: 10, device: {{model: fixed, skr_bps: 200000, qber: 0.02}}}}
users:
  - name: alice
    sla: {{max_priority: 7, max_bps: 64000, max_sessions: 8, bucket_bits: 65536}}
  - name: mallory
    revoked: true
    sla: {{max_priority: 7, max_bps: 64000, max_sessions: 8, bucket_bits: 65536}}
applications:
  - {{sae_id: SAE-KM0, node: KM0, user: alice, priority: 5}}
  - {{sae_id: SAE-KM1, node: KM1, user: alice, priority: 5}}
  - {{sae_id: SAE-KM2, node: KM2, user: alice, priority: 5}}
  - {{sae_id: SAE-EVE, node: KM1, user: mallory}}
"""


def wait_for(condition, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


# --------------------------------------------------------------------------- environment


class Env:
    """A network file unique to the test, buses on one backend, agents; cleans up after."""

    def __init__(self, kind: str, tmp: Path):
        self.kind = kind
        self.tmp = tmp
        self.run = uuid.uuid4().hex[:10]
        self.name = f"bc{self.run}"  # the network name: the agents' topic prefix
        source = tmp / "chain.yaml"
        source.write_text(NETWORK.format(name=self.name))
        self.path = relocate(source, tmp / "net.yaml")
        self.net = load(self.path)
        self.topics = Topics(self.name)
        self.hub = LocalHub() if kind == "local" else None
        self.broker = EmbeddedBroker().start() if kind == "embedded" else None
        self.url = MQTT_URL if kind == "mosquitto" else (self.broker.url if self.broker else None)
        self.buses: list = []
        self.client_ids: set[str] = set()  # of other processes' buses, to forget on the broker
        self.retained: set[str] = set()
        self.stack = ExitStack()
        self.agents: dict[str, KeyManagerAgent] = {}
        self.twin = None

    def bus(self, client_id: str, **options):
        if self.kind == "local":
            bus = LocalBus(client_id, hub=self.hub, **options)
        else:
            bus = MQTTBus(self.url, client_id, reconnect_delay=(0.1, 1.0), **options)
            assert bus.wait_connected(WAIT), f"{client_id} could not connect to {self.url}"
        self.buses.append(bus)
        if options.get("status_topic"):
            self.retained.add(options["status_topic"])
        return bus

    def qkdn(self, node: str) -> str:
        return self.net.node(node).qkdn_id

    def start_twin(self) -> None:
        from qkdsdn.twin.service import TwinService

        self.twin = TwinService(self.net, insecure_dev=True, admin_port=free_ports(1)[0])
        self.twin.start()
        self.stack.callback(self.twin.stop)

    def start_agent(self, node: str, *, link_workers: bool = True, **kwargs) -> KeyManagerAgent:
        bus = self.bus(agent_client_id(self.name, node),
                       status_topic=self.topics.status(agent_process_name(node)))
        agent = KeyManagerAgent(self.net, node, state_dir=self.tmp / node, insecure_dev=True, bus=bus,
                                link_workers=link_workers, pool_max_bits=2 ** 20, **kwargs)
        agent.start()
        self.agents[node] = agent
        return agent

    def wait_for_pool(self, a: str, b: str, bits: int = 16 * 1024) -> None:
        link = next(link for link in self.net.links if set(link.ends) == {a, b})
        wait_for(lambda: all(self.agents[n].store.available_bits(link.qkdl_id, role) >= bits
                             for n, role in ((link.master, "master"), (link.master, "slave"),
                                             (link.slave, "master"), (link.slave, "slave"))),
                 f"the link-key pool of {link.name}")

    def client(self, sae: str) -> KeyManagerClient:
        app = next(a for a in self.net.applications if a.sae_id == sae)
        return KeyManagerClient(f"http://{self.net.node(app.node).km_address}", dev_sae_id=sae)

    def close(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        self.stack.close()
        for bus in self.buses:
            bus.close()
        if self.kind == "mosquitto":
            # The system broker persists sessions and retained messages: leave none behind.
            cleaner = MQTTBus(self.url, f"{self.name}-cleaner")
            if cleaner.wait_connected(WAIT):
                for topic in self.retained:
                    cleaner.clear_retained(topic)
                cleaner.flush(WAIT)
            cleaner.close()
            for client_id in {b.client_id for b in self.buses} | self.client_ids | {cleaner.client_id}:
                forget_session(self.url, client_id)
        if self.broker is not None:
            self.broker.stop()


def _env(kind: str, tmp_path: Path):
    if kind == "mosquitto" and not MQTT_URL:
        pytest.skip(NO_MQTT)
    env = Env(kind, tmp_path)
    try:
        yield env
    finally:
        env.close()


@pytest.fixture
def local_env(tmp_path):
    yield from _env("local", tmp_path)


@pytest.fixture(params=["local", "mosquitto"])
def env(request, tmp_path):
    yield from _env(request.param, tmp_path)


@pytest.fixture
def embedded_env(tmp_path):
    yield from _env("embedded", tmp_path)


class Recorder:
    """Every message on a topic filter, in arrival order."""

    def __init__(self, bus, topic_filter: str):
        self.messages: list[tuple[str, dict]] = []
        self._lock = threading.Lock()
        bus.subscribe(topic_filter, self._on)

    def _on(self, topic: str, payload: dict) -> None:
        with self._lock:
            self.messages.append((topic, payload))

    def payloads(self, predicate=lambda p: True) -> list[dict]:
        with self._lock:
            return [p for _, p in self.messages if predicate(p)]


# --------------------------------------------------------------------------- configuration messages


def session_entries(env: Env, node: str, ksid: str, route: list[str], *, src_sae: str, dst_sae: str,
                    rate: int = 8000, bucket: int = 8192, ttl: int = 60, priority: int = 3) -> tuple[dict, dict]:
    """The ETSI 015 qkd_app and VIRT qkd_link entries that configure ``node`` on ``route``
    (etsi015.session, as the controller builds them)."""
    i = route.index(node)
    wire = SessionConfig(
        ksid=ksid, priority=priority, bucket_rate_bps=rate, bucket_size_bits=bucket, inactivity_timeout_s=ttl,
        prev_hop=env.qkdn(route[i - 1]) if i > 0 else None,
        next_hop=env.qkdn(route[i + 1]) if i + 1 < len(route) else None,
        source_sae=src_sae, destination_sae=dst_sae, virt_link_id=virt_link_id(ksid),
        source_qkdn_id=env.qkdn(route[0]), destination_qkdn_id=env.qkdn(route[-1]))
    return etsi_entries(wire, env.qkdn(node))


def configure(env: Env, node: str, ksid: str, route: list[str], *, msg_id: str | None = None, **kw) -> dict:
    app, link = session_entries(env, node, ksid, route, **kw)
    return config_message("configure", ksid, qkd_app=app, qkd_link=link, msg_id=msg_id)


class Controller:
    """A test double of the controller's access + admission control on the bus (docs/controller.md):
    authenticates from the network file, refuses a Max_bps beyond the SLA (status 7), pairs ETSI 004
    opens, routes on the chain, configures every key manager on the route over km/<node>/config
    (waiting for each reply) and then answers the opens; a close deconfigures the route."""

    def __init__(self, env: Env, *, answer: bool = True):
        self.env = env
        self.bus = env.bus(f"{env.name}-controller")
        self.answer = answer
        self.requests: list[dict] = []
        self.config_replies: list[tuple[str, dict, dict]] = []  # (node, request, reply)
        self.pending: dict[str, list[dict]] = {}
        self.routes: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        graph = nx.Graph()
        graph.add_edges_from(link.ends for link in env.net.links)
        self.graph = graph
        self.apps = {a.sae_id: a for a in env.net.applications}
        self.users = {u.name: u for u in env.net.users}
        self.bus.subscribe(env.topics.admission_request(), self._on_request)

    def ops(self, op: str) -> list[dict]:
        with self._lock:
            return [r for r in self.requests if r.get("op") == op]

    def _reply(self, request: dict, ok: bool = True, error: str | None = None, **extra) -> None:
        self.bus.publish(self.env.topics.admission_reply(request["node"]),
                         reply_message(request, ok, error, **extra))

    def _on_request(self, topic: str, req: dict) -> None:
        with self._lock:
            self.requests.append(req)
        if not self.answer:
            return
        op = req.get("op")
        if op == "authenticate":
            app = self.apps.get(req["sae_id"])
            user = self.users.get(app.user) if app else None
            if app is None or app.node != req["node"] or user is None:
                self._reply(req, False, "refused", user=None, reason=f"{req['sae_id']} may not use {req['node']}")
            elif user.revoked:
                self._reply(req, False, "refused", user=None, reason=f"user '{user.name}' is revoked")
            else:
                self._reply(req, True, user=user.name, reason="")
        elif op == "open":
            self._open(req)
        elif op == "close":
            self._close(req["ksid"])

    def _open(self, req: dict) -> None:
        ksid = req["ksid"]
        sla = self.users[req["user"]].sla
        if (req["qos"].get("Max_bps") or 0) > sla.max_bps:
            self._reply(req, True, status=7, qos=dict(req["qos"], Max_bps=sla.max_bps), hops=None,
                        reason="the QoS exceeds the user's SLA")
            return
        pair = self.pending.setdefault(ksid, [])
        pair.append(req)
        if req["interface"] == "004" and len(pair) < 2:
            return  # admission answers an ETSI 004 open when the peer has opened too
        del self.pending[ksid]
        src, dst = self.apps[req["source_sae"]].node, self.apps[req["destination_sae"]].node
        route = nx.shortest_path(self.graph, src, dst)
        # The source last: it starts producing keys as soon as it is configured, and a relay message
        # that reaches a key manager before its configuration is refused.
        for node in route[1:] + route[:1]:
            msg = configure(self.env, node, ksid, route, src_sae=req["source_sae"], dst_sae=req["destination_sae"])
            reply = self.bus.request(self.env.topics.km_config(node), msg, self.env.topics.km_reply(node),
                                     timeout=WAIT)
            with self._lock:
                self.config_replies.append((node, msg, reply))
        with self._lock:
            self.routes[ksid] = route
        for r in pair:
            self._reply(r, True, status=0, qos=r["qos"], hops=len(route) - 2, reason="")

    def _close(self, ksid: str) -> None:
        with self._lock:
            route = self.routes.pop(ksid, None)
        for node in route or ():
            msg = config_message("deconfigure", ksid)
            reply = self.bus.request(self.env.topics.km_config(node), msg, self.env.topics.km_reply(node),
                                     timeout=WAIT)
            with self._lock:
                self.config_replies.append((node, msg, reply))


def terminated(agent: KeyManagerAgent, ksid: str) -> bool:
    session = agent.logic.session(ksid)
    return session is None or session.state.value == "terminated"


def configuration_events(agent: KeyManagerAgent, ksid: str) -> int:
    return sum(1 for e in list(agent.events) if e.get("kind") == "configuration" and e.get("ksid") == ksid)


# --------------------------------------------------------------------------- configuration over the bus


def test_configure_and_deconfigure_are_applied_once_and_answered(local_env):
    env = local_env
    agent = env.start_agent("KM0", link_workers=False)
    ctl = env.bus(f"{env.name}-controller")
    replies = Recorder(ctl, env.topics.km_reply("KM0"))
    topic = env.topics.km_config("KM0")
    ksid = str(uuid.uuid4())
    first = configure(env, "KM0", ksid, ["KM0", "KM1"], src_sae="SAE-KM0", dst_sae="SAE-KM1")

    ctl.publish(topic, first)
    wait_for(lambda: len(replies.messages) == 1, "the reply to the configure")
    (topic_seen, reply), = replies.messages
    assert topic_seen == env.topics.km_reply("KM0")
    assert reply == {MSG_ID: first[MSG_ID], "ok": True, "node": "KM0", "op": "configure", "ksid": ksid,
                     "changed": True}
    assert set(agent.node_state.configured_sessions()) == {ksid}
    session = agent.logic.session(ksid)
    assert session is not None and session.config.next_hop == "KM1" and session.config.prev_hop is None
    assert configuration_events(agent, ksid) == 1

    # The same message again (a broker redelivery): dropped by msg_id, no second reply. The marker
    # after it is handled after it (one dispatcher, arrival order), so its reply proves the point.
    ctl.publish(topic, first)
    marker = config_message("deconfigure", str(uuid.uuid4()))
    ctl.publish(topic, marker)
    wait_for(lambda: len(replies.messages) == 2, "the reply to the marker")
    assert replies.messages[1][1][MSG_ID] == marker[MSG_ID]
    assert replies.messages[1][1]["ok"] is True and replies.messages[1][1]["changed"] is False
    assert agent.bus_link.subscription.duplicates == 1

    # The same configuration re-sent by a controller that timed out: a new msg_id, acknowledged,
    # not applied again.
    again = configure(env, "KM0", ksid, ["KM0", "KM1"], src_sae="SAE-KM0", dst_sae="SAE-KM1")
    assert again[MSG_ID] != first[MSG_ID]
    ctl.publish(topic, again)
    wait_for(lambda: len(replies.messages) == 3, "the reply to the re-sent configure")
    assert replies.messages[2][1] == {MSG_ID: again[MSG_ID], "ok": True, "node": "KM0", "op": "configure",
                                      "ksid": ksid, "changed": False}
    assert configuration_events(agent, ksid) == 1

    # A different configuration of the same KSID is a re-configuration: applied.
    faster = configure(env, "KM0", ksid, ["KM0", "KM1"], src_sae="SAE-KM0", dst_sae="SAE-KM1", rate=16000)
    ctl.publish(topic, faster)
    wait_for(lambda: len(replies.messages) == 4, "the reply to the re-configuration")
    assert replies.messages[3][1]["ok"] is True and replies.messages[3][1]["changed"] is True
    assert agent.node_state.configured_sessions()[ksid].bucket_rate_bps == 16000
    assert configuration_events(agent, ksid) == 2

    # Deconfigure: applied once; again (new msg_id) and for an unknown KSID: acknowledged.
    for n, (ksid_, changed) in enumerate(((ksid, True), (ksid, False), (str(uuid.uuid4()), False)), start=5):
        msg = config_message("deconfigure", ksid_)
        ctl.publish(topic, msg)
        wait_for(lambda: len(replies.messages) == n, f"the reply to deconfigure #{n}")
        assert replies.messages[-1][1] == {MSG_ID: msg[MSG_ID], "ok": True, "node": "KM0", "op": "deconfigure",
                                           "ksid": ksid_, "changed": changed}
    assert agent.node_state.configured_sessions() == {}
    assert agent.node_state.snapshot().applications == []
    assert all(link.is_physical for link in agent.node_state.snapshot().links), "the VIRT link went too"
    assert terminated(agent, ksid)


def test_refused_configuration_is_answered_with_the_reason_and_changes_nothing(local_env):
    env = local_env
    agent = env.start_agent("KM0", link_workers=False)
    ctl = env.bus(f"{env.name}-controller")
    replies = Recorder(ctl, env.topics.km_reply("KM0"))
    topic = env.topics.km_config("KM0")
    ksid = str(uuid.uuid4())
    good = configure(env, "KM0", ksid, ["KM0", "KM1"], src_sae="SAE-KM0", dst_sae="SAE-KM1")
    # KM2 is no neighbour of KM0: the key manager refuses it (ConfigRejected through the Datastore).
    not_neighbour = configure(env, "KM0", ksid, ["KM0", "KM2"], src_sae="SAE-KM0", dst_sae="SAE-KM2")
    wrong_id = dict(good, ksid=str(uuid.uuid4()), msg_id=str(uuid.uuid4()))
    bad_leaf = dict(good, msg_id=str(uuid.uuid4()), qkd_app=dict(good["qkd_app"], app_priority="high"))
    missing = {"op": "configure", "ksid": ksid, "qkd_app": good["qkd_app"]}
    unknown_op = {"op": "reboot", "ksid": ksid}
    cases = [(not_neighbour, "not a neighbour"), (wrong_id, "differs from ksid"), (bad_leaf, "app_priority"),
             (missing, "needs 'qkd_link'"), (unknown_op, "op must be")]
    for i, (msg, words) in enumerate(cases, start=1):
        msg_id = ctl.publish(topic, msg)
        wait_for(lambda: len(replies.messages) == i, f"the reply to case {i}")
        reply = replies.messages[-1][1]
        assert reply[MSG_ID] == msg_id and reply["ok"] is False, reply
        assert words in reply["error"], reply
        assert agent.node_state.configured_sessions() == {}
        assert agent.node_state.snapshot().applications == []
        assert agent.logic.session(ksid) is None
    assert agent.bus_link.subscription.failures == 0, "refusals are answers, not handler failures"


def test_bus_and_restconf_share_one_datastore(local_env):
    env = local_env
    agent = env.start_agent("KM0", link_workers=False)
    assert agent.bus_link.datastore is agent.datastore
    ctl = env.bus(f"{env.name}-controller")
    replies = Recorder(ctl, env.topics.km_reply("KM0"))
    topic = env.topics.km_config("KM0")
    ksid = str(uuid.uuid4())
    app, link = session_entries(env, "KM0", ksid, ["KM0", "KM1"], src_sae="SAE-KM0", dst_sae="SAE-KM1")

    # Written by an operator over RESTCONF ...
    http = requests.Session()
    http.headers["X-QKDSDN-Dev-Identity"] = "operator"
    base = f"{agent.url}/restconf/data/etsi-qkd-sdn-node:qkd_node"
    r = http.post(f"{base}/qkd_links", json={"etsi-qkd-sdn-node:qkd_link": [link]})
    assert r.status_code == 201, r.text
    r = http.post(f"{base}/qkd_applications", json={"etsi-qkd-sdn-node:qkd_app": [app]})
    assert r.status_code == 201, r.text
    assert configuration_events(agent, ksid) == 1
    # ... the same configuration from the bus is already there.
    msg = config_message("configure", ksid, qkd_app=app, qkd_link=link)
    ctl.publish(topic, msg)
    wait_for(lambda: len(replies.messages) == 1, "the reply")
    assert replies.messages[0][1]["ok"] is True and replies.messages[0][1]["changed"] is False
    assert configuration_events(agent, ksid) == 1
    # Deleted over the bus: gone from RESTCONF too.
    ctl.publish(topic, config_message("deconfigure", ksid))
    wait_for(lambda: len(replies.messages) == 2, "the reply to the deconfigure")
    assert replies.messages[1][1]["changed"] is True
    assert http.get(f"{base}/qkd_applications/qkd_app={ksid}").status_code == 404
    assert http.get(f"{base}/qkd_links/qkd_link={virt_link_id(ksid)}").status_code == 404
    # RESTCONF writes by other key managers are for the local control plane only.
    peer = requests.Session()
    peer.headers["X-QKDSDN-Dev-Identity"] = "node:KM1"
    assert peer.post(f"{base}/qkd_links", json={"etsi-qkd-sdn-node:qkd_link": [link]}).status_code == 403


# --------------------------------------------------------------------------- notifications, events, resync


def test_notifications_and_events_are_published(local_env):
    env = local_env
    ctl = env.bus(f"{env.name}-controller")
    notes = Recorder(ctl, env.topics.notifications("KM0"))
    events = Recorder(ctl, env.topics.events())
    agent = env.start_agent("KM0", link_workers=False)
    wait_for(lambda: events.payloads(lambda p: p.get("kind") == "agent_started"), "the agent_started event")
    started, = events.payloads(lambda p: p.get("kind") == "agent_started")
    assert started["node"] == "KM0" and started["element"] == "key_manager"

    def decoded():
        out = []
        for p in notes.payloads(lambda p: "marker" not in p):
            doc = {k: v for k, v in p.items() if k != MSG_ID}
            out.append(codec.decode_notification(doc))
        return out

    link = env.net.link("L01")
    agent.node_state.set_link_performance(link.qkdl_id, skr=123456.0, qber=0.021)
    wait_for(lambda: any(isinstance(n, m.LinkPerfUpdate) for n, _ in decoded()), "the link perf notification")
    perf, stamp = next((n, t) for n, t in decoded() if isinstance(n, m.LinkPerfUpdate))
    assert perf.qkdl_id == link.qkdl_id and stamp  # RFC 8040 envelope with its eventTime

    # A configuration over the bus: the application-new notification and the configuration event.
    ksid = str(uuid.uuid4())
    ctl.publish(env.topics.km_config("KM0"),
                configure(env, "KM0", ksid, ["KM0", "KM1"], src_sae="SAE-KM0", dst_sae="SAE-KM1"))
    wait_for(lambda: any(isinstance(n, m.ApplicationNew) for n, _ in decoded()), "the application-new notification")
    new = next(n for n, _ in decoded() if isinstance(n, m.ApplicationNew))
    assert new.server_app_id == "SAE-KM0" and new.client_app_id == ["SAE-KM1"]
    wait_for(lambda: events.payloads(lambda p: p.get("kind") == "configuration" and p.get("ksid") == ksid),
             "the configuration event")
    event, = events.payloads(lambda p: p.get("kind") == "configuration" and p.get("ksid") == ksid)
    assert event["node"] == "KM0" and event["details"]["next_hop"] == "KM1"
    # Every event the agent recorded went out (as JSON, with a msg_id of the bus).
    recorded = [dict(e) for e in list(agent.events)]
    wait_for(lambda: len(events.payloads()) >= len(recorded), "every event on the bus")
    published = [{k: v for k, v in p.items() if k != MSG_ID} for p in events.payloads()]
    assert sorted(map(json.dumps, published[:len(recorded)])) == sorted(json.dumps(e, default=str) for e in recorded)

    # After stop nothing more is published, and configuration is refused.
    agent.stop()
    env.agents.pop("KM0")
    before = len(notes.messages)
    replies = Recorder(ctl, env.topics.km_reply("KM0"))
    msg_id = ctl.publish(env.topics.km_config("KM0"), config_message("deconfigure", ksid))
    wait_for(lambda: replies.messages, "the refusal")
    assert replies.messages[0][1][MSG_ID] == msg_id and replies.messages[0][1]["ok"] is False
    assert "stopping" in replies.messages[0][1]["error"]
    agent.node_state.set_link_performance(link.qkdl_id, skr=1.0, qber=0.2)
    # Notifications are published in the thread that makes the change: one would be ahead of the marker.
    ctl.publish(env.topics.notifications("KM0"), {"marker": True})
    wait_for(lambda: len(notes.messages) > before, "the marker")
    assert [p for _, p in notes.messages[before:]] == [{"marker": True, MSG_ID: notes.messages[before][1][MSG_ID]}]


def test_an_agent_restarted_with_restored_sessions_re_announces_them(embedded_env):
    """The sessions an agent restores from its journal after a restart are re-announced
    (resync), so the controller can end those it ended meanwhile and re-push what is missing."""
    env = embedded_env
    agent = env.start_agent("KM0", link_workers=False)
    ctl = env.bus(f"{env.name}-controller")
    replies = Recorder(ctl, env.topics.km_reply("KM0"))
    events = Recorder(ctl, env.topics.events())
    ksid = str(uuid.uuid4())
    ctl.publish(env.topics.km_config("KM0"),
                configure(env, "KM0", ksid, ["KM0", "KM1"], src_sae="SAE-KM0", dst_sae="SAE-KM1"))
    wait_for(lambda: replies.messages, "the configure reply")
    assert replies.messages[0][1]["ok"] is True and agent.bus_link.resyncs == 0
    agent.stop()
    agent.bus.close()
    again = env.start_agent("KM0", link_workers=False)
    assert again.restored_sessions == 1 and again.bus_link.resyncs == 1
    assert again.logic.session(ksid) is not None
    wait_for(lambda: events.payloads(lambda p: p.get("op") == "resync"), "the resync")
    resync = events.payloads(lambda p: p.get("op") == "resync")[-1]
    assert [s["ksid"] for s in resync["sessions"]] == [ksid]


def test_resync_after_the_broker_lost_the_session(embedded_env):
    env = embedded_env
    agent = env.start_agent("KM0", link_workers=False)
    ctl = env.bus(f"{env.name}-controller")
    replies = Recorder(ctl, env.topics.km_reply("KM0"))
    events = Recorder(ctl, env.topics.events())
    ksid = str(uuid.uuid4())
    msg = configure(env, "KM0", ksid, ["KM0", "KM1"], src_sae="SAE-KM0", dst_sae="SAE-KM1")
    ctl.publish(env.topics.km_config("KM0"), msg)
    wait_for(lambda: replies.messages, "the configure reply")
    assert replies.messages[0][1]["ok"] is True
    assert agent.bus_link.resyncs == 0

    # amqtt keeps sessions in memory: after a restart both clients come back without one.
    port = env.broker.port
    env.broker.stop()
    wait_for(lambda: not agent.bus.connected and not ctl.connected, "the disconnection")
    env.broker.start()
    assert env.broker.port == port
    wait_for(lambda: agent.bus_link.resyncs >= 1, "the agent's resync")
    assert ctl.wait_connected(WAIT)
    # The controller's subscription came back at its own reconnection; the resync may have gone out
    # before it, so the agent is asked again the way it re-announces: publish what it holds.
    wait_for(lambda: ctl.connections >= 2, "the controller's reconnection")
    agent.bus_link.resync("asked by the test")
    wait_for(lambda: events.payloads(lambda p: p.get("op") == "resync"), "a resync event")
    resync = events.payloads(lambda p: p.get("op") == "resync")[-1]
    assert resync["node"] == "KM0" and resync["kind"] == "resync" and resync["ksid"] is None
    assert [s["ksid"] for s in resync["sessions"]] == [ksid]
    session, = resync["sessions"]
    # The entries are those of the configure message: the controller can compare them.
    assert session["qkd_app"] == msg["qkd_app"] and session["qkd_link"] == msg["qkd_link"]
    # And a configure message rebuilt from them is acknowledged as already applied.
    ctl.publish(env.topics.km_config("KM0"),
                config_message("configure", ksid, qkd_app=session["qkd_app"], qkd_link=session["qkd_link"]))
    wait_for(lambda: len(replies.messages) == 2, "the reply to the re-sent configuration")
    assert replies.messages[1][1]["ok"] is True and replies.messages[1][1]["changed"] is False


# --------------------------------------------------------------------------- BusControlPlane


def admission_request(ksid: str, *, interface: str = "004", timeout_ms: int = 5000) -> AdmissionRequest:
    return AdmissionRequest(ksid=ksid, interface=interface, user="alice", requesting_node="KM0",
                            local_sae="SAE-KM0", source_sae="SAE-KM0", destination_sae="SAE-KM1",
                            qos={"Key_chunk_size": 32, "Max_bps": 8000, "Min_bps": None, "Jitter": None,
                                 "Priority": 3, "Timeout": timeout_ms, "TTL": 60, "Metadata_mimetype": None})


def test_bus_control_plane_round_trips(env):
    agent_bus = env.bus(f"{env.name}-km0")
    plane = BusControlPlane(agent_bus, env.topics, "KM0", timeout_s=WAIT)
    admission = env.bus(f"{env.name}-admission")
    seen: list[dict] = []
    answers = {}

    def respond(topic, req):
        seen.append(req)
        answer = answers.get(req.get("op"), {}).get(req.get("ksid") or req.get("sae_id"))
        if answer is not None:
            admission.publish(env.topics.admission_reply(req["node"]), reply_message(req, **answer))

    admission.subscribe(env.topics.admission_request(), respond)
    answers["authenticate"] = {"SAE-KM0": {"ok": True, "user": "alice", "reason": ""},
                               "SAE-EVE": {"ok": False, "error": "refused", "user": None,
                                           "reason": "user 'mallory' is revoked"}}
    accepted = plane.authenticate("SAE-KM0", fingerprint="ab" * 32, interface="004")
    assert accepted.ok and accepted.user == "alice"
    assert seen[-1] == {"op": "authenticate", "node": "KM0", "sae_id": "SAE-KM0", "fingerprint": "ab" * 32,
                        "interface": "004", MSG_ID: seen[-1][MSG_ID]}
    refused = plane.authenticate("SAE-EVE", fingerprint=None, interface="014")
    assert not refused.ok and refused.reason == "user 'mallory' is revoked"

    ok_ksid, counter_ksid, bad_ksid = (str(uuid.uuid4()) for _ in range(3))
    answers["open"] = {
        ok_ksid: {"ok": True, "status": 0, "qos": {"Max_bps": 8000}, "hops": 0, "reason": ""},
        counter_ksid: {"ok": True, "status": 7, "qos": {"Max_bps": 4000}, "hops": None,
                       "reason": "the QoS exceeds the user's SLA"},
        bad_ksid: {"ok": True, "status": "zero"},
    }
    request = admission_request(ok_ksid)
    result = plane.admit(request)
    assert (result.status, result.qos, result.hops) == (0, {"Max_bps": 8000}, 0)
    sent = seen[-1]
    assert sent["op"] == "open" and sent["node"] == "KM0"
    assert {k: v for k, v in sent.items() if k not in ("op", "node", MSG_ID)} == request.to_json()
    result = plane.admit(admission_request(counter_ksid))
    assert (result.status, result.qos, result.reason) == (7, {"Max_bps": 4000}, "the QoS exceeds the user's SLA")
    result = plane.admit(admission_request(bad_ksid))
    assert result.status == 4 and "malformed" in result.reason

    # One-way signals.
    plane.key_request(ok_ksid)
    plane.closed(ok_ksid, "SAE-KM0", "closed")
    wait_for(lambda: [r["op"] for r in seen[-2:]] == ["key_request", "close"], "the one-way signals")
    assert {k: v for k, v in seen[-2].items() if k != MSG_ID} == {"op": "key_request", "node": "KM0",
                                                                  "ksid": ok_ksid}
    assert {k: v for k, v in seen[-1].items() if k != MSG_ID} == {"op": "close", "node": "KM0", "ksid": ok_ksid,
                                                                 "reason": "closed"}


def test_bus_control_plane_without_an_answer(local_env):
    env = local_env
    plane = BusControlPlane(env.bus(f"{env.name}-km0"), env.topics, "KM0", timeout_s=0.2)
    silent = Recorder(env.bus(f"{env.name}-admission"), env.topics.admission_request())
    result = plane.admit(admission_request(str(uuid.uuid4()), timeout_ms=100))
    assert result.status == 4 and result.reason == "admission control unreachable"
    auth = plane.authenticate("SAE-KM0", fingerprint=None, interface="004")
    assert not auth.ok and auth.reason == "access control unreachable"
    wait_for(lambda: [p["op"] for p in silent.payloads()] == ["open", "authenticate"], "the requests")
    # A closed bus: the same answers, and the one-way signals do not raise.
    plane.bus.close()
    assert plane.admit(admission_request(str(uuid.uuid4()))).status == 4
    assert not plane.authenticate("SAE-KM0", fingerprint=None, interface="004").ok
    plane.key_request(str(uuid.uuid4()))
    plane.closed(str(uuid.uuid4()), None, "closed")
    with pytest.raises(ValueError):
        BusControlPlane(plane.bus, env.topics, "KM0", timeout_s=0)


# --------------------------------------------------------------------------- whole flows


def _open_pair(env: Env, ksid: str, src: str, dst: str, qos: QoS):
    a, b = env.client(src), env.client(dst)
    out = {}
    peer = threading.Thread(target=lambda: out.setdefault("b", b.open_connect(src, dst, qos, ksid)))
    peer.start()
    out["a"] = a.open_connect(src, dst, qos, ksid)
    peer.join(WAIT)
    assert not peer.is_alive()
    return a, b, out["a"], out["b"]


def test_etsi004_adjacent_flow_between_two_agents_over_the_bus(env):
    env.start_twin()
    watcher = env.bus(f"{env.name}-watcher")
    everything = Recorder(watcher, env.topics.everything())
    ctl = Controller(env)
    for node in ("KM0", "KM1"):
        env.start_agent(node)
    env.wait_for_pool("KM0", "KM1")
    ksid = str(uuid.uuid4())
    qos = QoS(Key_chunk_size=32, Max_bps=8000, Timeout=20000, TTL=60)

    a, b, ra, rb = _open_pair(env, ksid, "SAE-KM0", "SAE-KM1", qos)
    assert (ra.status, ra.key_stream_id) == (0, ksid), ra
    assert (rb.status, rb.key_stream_id) == (0, ksid), rb
    assert [r["sae_id"] for r in ctl.ops("authenticate")] in (["SAE-KM0", "SAE-KM1"], ["SAE-KM1", "SAE-KM0"])
    assert sorted(r["node"] for r in ctl.ops("open")) == ["KM0", "KM1"]
    # The opens are answered by the key managers as soon as they are configured; the double records
    # the configuration replies right after.
    wait_for(lambda: len(ctl.config_replies) == 2, "the configuration replies")
    assert sorted(node for node, _, reply in ctl.config_replies if reply["ok"]) == ["KM0", "KM1"], \
        ctl.config_replies

    keys = []
    for index in range(3):
        ka = a.get_key(ksid, index, metadata_size=256)
        kb = b.get_key(ksid, index, metadata_size=256)
        assert ka.status == 0 and kb.status == 0, (ka, kb)
        assert ka.key == kb.key and len(ka.key) == 32
        assert ka.metadata["hops"] == 0
        keys.append(ka.key)
    assert len(set(keys)) == 3
    wait_for(lambda: len(ctl.ops("key_request")) >= 3, "key requests signalled to admission")
    assert {r["ksid"] for r in ctl.ops("key_request")} == {ksid}

    # A closes: its key manager tells admission, which deletes the session from the whole route.
    assert a.close(ksid) == 0
    wait_for(lambda: sum(1 for _, msg, reply in ctl.config_replies
                         if msg["op"] == "deconfigure" and reply["ok"]) == 2, "the deconfigurations")
    assert [(r["node"], r["ksid"], r["reason"]) for r in ctl.ops("close")] == [("KM0", ksid, "closed")]
    assert b.get_key(ksid, 3).status == 4, "the session is gone at KM1 too"
    assert b.close(ksid) == 0
    for node in ("KM0", "KM1"):
        agent = env.agents[node]
        assert agent.node_state.configured_sessions() == {}
        assert terminated(agent, ksid)

    # The whole story went over the bus: configuration and key events from both nodes, notifications,
    # and never a byte of key material.
    def kinds(node):
        return {p.get("kind") for t, p in everything.messages if t == env.topics.events() and p.get("node") == node}
    wait_for(lambda: {"configuration", "session_terminated"} <= kinds("KM0") & kinds("KM1"), "the events")
    assert any(t == env.topics.notifications("KM0") for t, _ in everything.messages)
    wire = json.dumps([p for _, p in everything.messages])
    for key in keys:
        assert key.hex() not in wire and base64.b64encode(key).decode() not in wire


def test_etsi004_relayed_flow_over_the_bus(local_env):
    env = local_env
    env.start_twin()
    ctl = Controller(env)
    for node in ("KM0", "KM1", "KM2"):
        env.start_agent(node)
    env.wait_for_pool("KM0", "KM1")
    env.wait_for_pool("KM1", "KM2")
    ksid = str(uuid.uuid4())
    a, b, ra, rb = _open_pair(env, ksid, "SAE-KM0", "SAE-KM2", QoS(Key_chunk_size=32, Timeout=20000, TTL=60))
    assert ra.status == 0 and rb.status == 0, (ra, rb)
    wait_for(lambda: len(ctl.config_replies) == 3, "the configuration replies")
    assert [(node, reply["ok"]) for node, _, reply in ctl.config_replies] == [("KM1", True), ("KM2", True),
                                                                               ("KM0", True)]
    assert env.agents["KM1"].logic.session(ksid).role.value == "intermediate"
    ka = a.get_key(ksid, 0, metadata_size=256)
    kb = b.get_key(ksid, 0, metadata_size=256)
    assert ka.status == 0 and kb.status == 0 and ka.key == kb.key
    assert ka.metadata["hops"] == 1
    assert a.close(ksid) == 0 and b.close(ksid) == 0
    wait_for(lambda: sum(1 for _, msg, reply in ctl.config_replies
                         if msg["op"] == "deconfigure" and reply["ok"]) == 3, "the deconfigurations")


def test_etsi014_flow_over_the_bus(local_env):
    env = local_env
    env.start_twin()
    ctl = Controller(env)
    for node in ("KM0", "KM1"):
        env.start_agent(node)
    env.wait_for_pool("KM0", "KM1")
    master, slave = env.client("SAE-KM0"), env.client("SAE-KM1")
    keys = master.enc_keys("SAE-KM1", number=2, size=256)
    assert len(keys) == 2
    assert [r["interface"] for r in ctl.ops("open")] == ["014"], "no peer to wait for"
    assert slave.dec_keys("SAE-KM0", [k for k, _ in keys]) == keys


def test_refused_authentication_and_admission_reach_the_application(local_env):
    env = local_env
    ctl = Controller(env)
    env.start_agent("KM1", link_workers=False)
    # Access control refuses the revoked user's application: the call is refused, nothing is opened.
    with pytest.raises(ETSI004Error) as refused:
        env.client("SAE-EVE").open_connect("SAE-EVE", "SAE-KM0", QoS(Timeout=5000))
    assert refused.value.status == 403
    assert [r["sae_id"] for r in ctl.ops("authenticate")] == ["SAE-EVE"] and not ctl.ops("open")
    (auth,) = [e for e in list(env.agents["KM1"].events) if e["kind"] == "authentication"]
    assert auth["details"]["result"] == "rejected" and auth["details"]["reason"] == "user 'mallory' is revoked"

    # Admission refuses a QoS beyond the SLA with a counter-proposal (status 7), which the
    # application gets back through the key manager.
    r = env.client("SAE-KM1").open_connect("SAE-KM1", "SAE-KM0", QoS(Max_bps=100_000, Timeout=5000))
    assert r.status == 7 and r.qos is not None and r.qos.Max_bps == 64_000
    assert [q["qos"]["Max_bps"] for q in ctl.ops("open")] == [100_000]


# --------------------------------------------------------------------------- qkdsdn agent --bus


@pytest.fixture(params=["embedded", "mosquitto"])
def mqtt_env(request, tmp_path):
    yield from _env(request.param, tmp_path)


def test_agent_command_runs_on_the_bus(mqtt_env):
    env = mqtt_env
    ctl = env.bus(f"{env.name}-controller")
    status = Recorder(ctl, env.topics.status(agent_process_name("KM0")))
    replies = Recorder(ctl, env.topics.km_reply("KM0"))
    events = Recorder(ctl, env.topics.events())
    # The agent process's broker session and retained status are cleaned up with the test's.
    env.client_ids.add(agent_client_id(env.name, "KM0"))
    env.retained.add(env.topics.status(agent_process_name("KM0")))
    proc = subprocess.Popen([sys.executable, "-m", "qkdsdn.cli", "agent", str(env.path), "--node", "KM0",
                             "--insecure-dev", "--state-dir", str(env.tmp / "KM0"), "--bus", env.url,
                             "--log-level", "ERROR"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: any(p.get("state") == "online" for p in status.payloads()) or proc.poll() is not None,
                 "the agent online on the bus")
        assert proc.poll() is None, proc.communicate()
        # Online comes with the connection; configuration is taken once the agent has started.
        wait_for(lambda: events.payloads(lambda p: p.get("kind") == "agent_started" and p.get("node") == "KM0")
                 or proc.poll() is not None, "the agent_started event")
        assert proc.poll() is None, proc.communicate()
        ksid = str(uuid.uuid4())
        msg = configure(env, "KM0", ksid, ["KM0", "KM1"], src_sae="SAE-KM0", dst_sae="SAE-KM1")
        ctl.publish(env.topics.km_config("KM0"), msg)
        wait_for(lambda: replies.messages, "the agent's reply")
        assert replies.messages[0][1][MSG_ID] == msg[MSG_ID] and replies.messages[0][1]["ok"] is True
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 0, err
        assert f"agent KM0 serving on http://{env.net.node('KM0').km_address}" in out
        wait_for(lambda: status.payloads()[-1].get("state") == "offline", "the agent offline on the bus")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)


def test_agent_command_refuses_a_bad_bus_url(tmp_path):
    source = tmp_path / "chain.yaml"
    source.write_text(NETWORK.format(name="badbus"))
    proc = subprocess.run([sys.executable, "-m", "qkdsdn.cli", "agent", str(source), "--node", "KM0",
                           "--insecure-dev", "--state-dir", str(tmp_path / "KM0"), "--bus", "amqp://127.0.0.1:1"],
                          capture_output=True, text=True, timeout=WAIT)
    assert proc.returncode != 0
    assert "--bus amqp://127.0.0.1:1" in proc.stderr and "expected 'local', 'embedded'" in proc.stderr
