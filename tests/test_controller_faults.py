"""Faults in the whole chain: digital twin, real agents on the bus, the controller's apps.

- A fibre cut at the twin: the master key manager reads its device's status, reports the link
  OFF (``sdqkdn_link_down``); the controller's topology takes the link down and admission control
  moves the session to a replacement path (new hops configured first, then the obsolete ones
  deleted). The session keeps its KSID and both ends keep receiving identical keys.
- An eavesdropper on a link: the QBER the device reports reaches the monitoring element, which
  raises an ETSI 015 alarm (on ``notifications/_controller`` and in the database) and takes the
  link out of routing; once the eavesdropper is gone, healthy samples bring it back.
- 50 concurrent ETSI 014 set-ups on a network whose links cannot carry them all: no link's
  reservations exceed its key rate; the refused set-ups ended with ETSI status 7 or 4.

Buses: the in-process ``local`` bus, and a real broker (Mosquitto) when QKDSDN_TEST_MQTT_URL is set.
"""
from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import yaml
from sqlalchemy import select

from agent_harness import free_ports
from controller.apps.base import ROUTING, SDN_CONTROLLER
from controller.apps.context import ControllerConfig
from controller.bus_adapter import CONTROLLER_NOTIFIER
from controller.launcher import Controller, ControllerOptions
from controller.monitoring import MonitoringConfig
from db import models as dbm
from db.netfile import load
from etsi015 import codec
from etsi015 import model as em
from qkdsdn.bus import Topics
from test_controller_apps import FAST, MQTT_URL, NO_MQTT, WAIT, BusKind, network_file, wait_for

BUSES = ["local", "mosquitto"]


class Chain:
    """Twin + agents of ``nodes`` on one kind of bus + the controller, in this process."""

    def __init__(self, kind: str, path, tmp_path, nodes, *, config=FAST, pool_max_bits: int = 2 ** 20):
        self.kind, self.path, self.tmp_path, self.nodes = kind, path, tmp_path, nodes
        self.config, self.pool_max_bits = config, pool_max_bits
        self.net = load(path)
        self.topics = Topics(self.net.name)
        self.buses = BusKind(kind)
        self.agents = {}
        self.twin = None
        self.controller = None

    def __enter__(self) -> "Chain":
        from agents.service import KeyManagerAgent
        from qkdsdn.twin.service import TwinService

        try:
            self.twin = TwinService(self.net, pki=None, insecure_dev=True, admin_port=free_ports(1)[0]).start()
            for name in self.nodes:
                bus = self.buses.bus(f"{self.net.name}-agent-{name}",
                                     status_topic=self.topics.status(f"agent-{name}"))
                self.agents[name] = KeyManagerAgent(self.net, name, state_dir=self.tmp_path / name,
                                                    insecure_dev=True, pool_max_bits=self.pool_max_bits,
                                                    bus=bus).start()
            self.controller = Controller(ControllerOptions(
                network=self.net, db_url=f"sqlite:///{self.tmp_path / 'c.db'}", bus_url=self.buses.controller_url,
                insecure_dev=True, config=self.config))
            self.controller.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.controller is not None:
            self.controller.stop()
        for agent in self.agents.values():
            agent.stop()
        if self.twin is not None:
            self.twin.stop()
        self.buses.close(extra_clients=[f"{self.net.name}-controller"],
                         extra_retained=[self.topics.status("controller")])

    def client(self, sae: str):
        from agents.client import KeyManagerClient

        app = next(a for a in self.net.applications if a.sae_id == sae)
        return KeyManagerClient(f"http://{self.net.node(app.node).km_address}", dev_sae_id=sae, timeout=WAIT)

    def fault(self, link: str, **body) -> dict:
        """The twin's admin API, as the operator's CLI calls it."""
        resp = requests.post(f"{self.twin.admin_url}/links/{link}/fault", json=body, timeout=WAIT)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def routing(self):
        return self.controller.app(ROUTING).routing

    def link_status(self, link: str) -> str:
        return self.controller.health()[SDN_CONTROLLER]["links"][link]

    def session_row(self, ksid: str):
        with self.controller.services.session_factory() as s:
            return s.scalar(select(dbm.Session).where(dbm.Session.ksid == ksid))

    def events(self, kind: str) -> list:
        with self.controller.services.session_factory() as s:
            return list(s.scalars(select(dbm.Event).where(dbm.Event.kind == kind)))

    def db_links(self) -> dict:
        with self.controller.services.session_factory() as s:
            return {l.name: l for l in s.scalars(select(dbm.Link).where(dbm.Link.kind == dbm.LinkKind.PHYS))}


def need_broker(kind: str) -> None:
    if kind == "mosquitto" and not MQTT_URL:
        pytest.skip(NO_MQTT)


@pytest.fixture(params=BUSES)
def outer(request, tmp_path):
    """paper-poc with the agents of KM0, KM4 and KM5: L04, L05 and L45 carry key."""
    need_broker(request.param)
    with Chain(request.param, network_file(tmp_path), tmp_path, ("KM0", "KM4", "KM5")) as chain:
        wait_for(lambda: chain.controller.health()[ROUTING]["routable_links"] == 3, "L04, L05 and L45 routable",
                 timeout=60)
        yield chain


def open_both(chain: Chain, src: str, dst: str, qos, ksid: str) -> list:
    a, b = chain.client(src), chain.client(dst)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(a.open_connect, src, dst, qos, ksid)
        wait_for(lambda: chain.session_row(ksid) is not None, "the pending session")
        second = pool.submit(b.open_connect, src, dst, qos, ksid)
        return [first.result(WAIT), second.result(WAIT)]


def test_session_survives_a_cut_link_over_a_new_route(outer):
    from agents.core.session import QoS

    chain = outer
    ksid = str(uuid.uuid4())
    opened = open_both(chain, "SAE-KM4", "SAE-KM5", QoS(Key_chunk_size=32, Max_bps=8000, Timeout=15_000, TTL=60),
                       ksid)
    assert [o.status for o in opened] == [0, 0], [o.message for o in opened]
    wait_for(lambda: chain.session_row(ksid).state is dbm.SessionState.ACTIVE, "the active session")
    assert chain.session_row(ksid).route == ["KM4", "KM5"]
    km4, km5 = chain.client("SAE-KM4"), chain.client("SAE-KM5")
    before = []
    for index in range(3):
        k4, k5 = km4.get_key(ksid, timeout=WAIT), km5.get_key(ksid, timeout=WAIT)
        assert (k4.status, k5.status, k4.index, k5.index) == (0, 0, index, index)
        assert k4.key == k5.key and len(k4.key) == 32
        before.append(k4.key)

    assert chain.fault("L45", action="cut")["state"] == "cut"
    # The master key manager (KM4) sees the cut in its device's status and reports the link OFF.
    wait_for(lambda: chain.link_status("L45") == "OFF", "L45 down at the controller")
    wait_for(lambda: chain.session_row(ksid).route == ["KM4", "KM0", "KM5"], "the session re-routed")
    # Every key manager on the new route confirmed its configuration (the route in the DB is
    # written when admission control decides it, before that).
    wait_for(lambda: [e for e in chain.events("session_reconfigured") if e.ksid == ksid],
             "the re-routed session confirmed")
    assert chain.session_row(ksid).state is dbm.SessionState.ACTIVE
    rerouted = chain.events("session_rerouted")
    assert [(e.ksid, e.details["link"], e.details["route"]) for e in rerouted] == \
        [(ksid, "L45", ["KM4", "KM0", "KM5"])]
    assert chain.controller.health()[ROUTING]["routable_links"] == 2

    # Same KSID, both ends keep receiving identical keys, now relayed through KM0.
    after = []
    for _ in range(3):
        k4, k5 = km4.get_key(ksid, timeout=WAIT), km5.get_key(ksid, timeout=WAIT)
        assert (k4.status, k5.status) == (0, 0)
        assert k4.index == k5.index and k4.index >= 3
        assert k4.key == k5.key and len(k4.key) == 32
        after.append(k4.key)
    assert not set(before) & set(after)
    assert chain.session_row(ksid).state is dbm.SessionState.ACTIVE
    assert km4.close(ksid) == 0
    km5.close(ksid)
    wait_for(lambda: chain.session_row(ksid).state is dbm.SessionState.TERMINATED, "the closed session")


def test_keys_keep_flowing_while_a_reroute_waits_for_its_new_hop(outer):
    """The re-route's first step configures only the new hop (KM0); until it confirmed, KM4 and KM5
    keep their old entries, so keys still flow over what L45's pools hold and nobody sends to a
    key manager that does not know the session (which would end it: "no active session", 409).
    KM0 holds its configuration until the test has taken keys; configured all at once, KM4 would
    relay through KM0 by then."""
    from agents.core.session import QoS

    chain = outer
    ksid = str(uuid.uuid4())
    opened = open_both(chain, "SAE-KM4", "SAE-KM5", QoS(Key_chunk_size=32, Max_bps=8000, Timeout=15_000, TTL=60),
                       ksid)
    assert [o.status for o in opened] == [0, 0], [o.message for o in opened]
    wait_for(lambda: chain.session_row(ksid).state is dbm.SessionState.ACTIVE, "the active session")
    km4, km5 = chain.client("SAE-KM4"), chain.client("SAE-KM5")
    k4, k5 = km4.get_key(ksid, timeout=WAIT), km5.get_key(ksid, timeout=WAIT)
    assert (k4.status, k5.status, k4.key) == (0, 0, k5.key)

    km0 = chain.agents["KM0"]
    entered, release = threading.Event(), threading.Event()
    configure = km0.configure

    def held_configure(config):
        if config.ksid == ksid:
            entered.set()
            release.wait(WAIT)
        configure(config)

    km0.configure = held_configure  # the datastore calls its handler's configure
    try:
        assert chain.fault("L45", action="cut")["state"] == "cut"
        wait_for(entered.is_set, "KM0 receiving the new route's configuration")
        # Re-routing, KM0 not configured yet: KM4 and KM5 still on L45.
        for _ in range(3):
            k4, k5 = km4.get_key(ksid, timeout=WAIT), km5.get_key(ksid, timeout=WAIT)
            assert (k4.status, k5.status) == (0, 0), (k4, k5)
            assert k4.index == k5.index and k4.key == k5.key
    finally:
        release.set()
    wait_for(lambda: [e for e in chain.events("session_reconfigured") if e.ksid == ksid],
             "the re-routed session confirmed")
    assert chain.session_row(ksid).route == ["KM4", "KM0", "KM5"]
    for _ in range(2):
        k4, k5 = km4.get_key(ksid, timeout=WAIT), km5.get_key(ksid, timeout=WAIT)
        assert (k4.status, k5.status) == (0, 0) and k4.key == k5.key
    assert chain.session_row(ksid).state is dbm.SessionState.ACTIVE
    assert not [e for e in chain.events("session_terminated") if e.ksid == ksid]
    assert km4.close(ksid) == 0


def test_qber_alarm_takes_a_link_out_of_routing_and_back(outer):
    chain = outer
    alarms, lock = [], threading.Lock()

    def on_alarm(topic, payload):
        doc = {k: v for k, v in payload.items() if k != "msg_id"}
        notification, _ = codec.decode_notification(doc)
        with lock:
            alarms.append(notification)

    watcher = chain.buses.bus(f"{chain.net.name}-watcher-{uuid.uuid4().hex[:6]}")
    watcher.subscribe(chain.topics.notifications(CONTROLLER_NOTIFIER), on_alarm)
    qkdl = chain.net.link("L04").qkdl_id
    routing = chain.routing()
    assert routing.routable("L04")

    # Intercept-resend on half the pulses: QBER 0.02 + 0.5 / 4 = 0.145 > 0.11.
    view = chain.fault("L04", action="eve", fraction=0.5)
    assert view["qber"] > 0.11
    wait_for(lambda: chain.events("alarm_qber_exceeded"), "the QBER alarm in the database")
    [event] = chain.events("alarm_qber_exceeded")
    assert event.details["link"] == "L04" and event.details["severity"] == "MAJOR"
    assert chain.events("link_out_of_routing")[0].details["link"] == "L04"
    wait_for(lambda: not routing.routable("L04"), "L04 out of routing")
    assert routing.routable("L05") and routing.routable("L45")
    assert chain.controller.health()[ROUTING]["routable_links"] == 2

    def alarm_about_l04():
        with lock:
            return [n for n in alarms if isinstance(n, em.Alarm) and n.link is not None
                    and n.link.qkdl_id == qkdl]
    [alarm] = wait_for(alarm_about_l04, "the ETSI 015 alarm on the bus")
    assert str(alarm.link.severity.value).endswith("MAJOR")
    # A session KM4 -> KM5 can no longer be relayed through KM0 over L04.
    path = routing.find_path("KM4", "KM5", 1000, exclude_links=("L45",), now=time.time())
    assert path is None

    chain.fault("L04", action="restore")
    wait_for(lambda: routing.routable("L04"), "L04 back in routing after healthy samples")
    restored = wait_for(lambda: chain.events("alarm_link_restored"), "the restore event in the database")
    assert [e.details["link"] for e in restored] == ["L04"]
    assert [e.details["link"] for e in chain.events("link_restored_to_routing")] == ["L04"]
    assert list(routing.find_path("KM4", "KM5", 1000, exclude_links=("L45",), now=time.time()).nodes) == ["KM4", "KM0", "KM5"]
    wait_for(lambda: chain.controller.health()[ROUTING]["routable_links"] == 3, "three routable links again")


# --------------------------------------------------------------------------- reservations

SESSIONS = 50
RATE = 1000  # bit/s, the SLA's Max_bps: each ETSI 014 session asks for it


def small_network(tmp_path):
    """A triangle: B-C carries 12 kbit/s, B-A and A-C 4 kbit/s; 50 applications at B each ask
    key for the one at C (ETSI 014, up to 1000 bit/s each): about 16 fit."""
    ports = iter(free_ports(3 + 6))
    links = [("LBC", "B", "C", 12_000), ("LBA", "B", "A", 4_000), ("LAC", "A", "C", 4_000)]
    data = {
        "network": {"name": f"res-{uuid.uuid4().hex[:8]}"},
        "nodes": [{"name": n, "km_address": f"127.0.0.1:{next(ports)}"} for n in ("A", "B", "C")],
        "links": [{"name": name, "ends": [a, b], "length_km": 10,
                   "device": {"model": "fixed", "skr_bps": skr, "qber": 0.02,
                              "master_address": f"127.0.0.1:{next(ports)}",
                              "slave_address": f"127.0.0.1:{next(ports)}"}}
                  for name, a, b, skr in links],
        "users": [{"name": "many", "sla": {"max_priority": 7, "max_bps": RATE, "max_sessions": SESSIONS + 10,
                                           "bucket_bits": 8192}}],
        "applications": [{"sae_id": f"SAE-B{i:02d}", "node": "B", "user": "many", "priority": 5}
                         for i in range(SESSIONS)] + [{"sae_id": "SAE-C", "node": "C", "user": "many",
                                                       "priority": 5}],
    }
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("kind", BUSES)
def test_reservations_never_exceed_a_links_key_rate(kind, tmp_path):
    from agents.client import ETSI014Error

    need_broker(kind)
    # A slow EWMA: the key rate routing sees moves little while the set-ups run.
    config = ControllerConfig(**{**FAST.__dict__,
                                 "monitoring": MonitoringConfig(skr_time_constant_s=120.0)})
    with Chain(kind, small_network(tmp_path), tmp_path, ("A", "B", "C"), config=config,
               pool_max_bits=2 ** 24) as chain:
        routing = chain.routing()
        names = ("LBC", "LBA", "LAC")
        wait_for(lambda: chain.controller.health()[ROUTING]["routable_links"] == 3, "three routable links",
                 timeout=60)
        wait_for(lambda: all(routing.link(n).skr_bps for n in names), "measured key rates at routing")
        capacity_before = {n: routing.capacity_bps(n) for n in names}

        def setup(i: int):
            try:
                keys = chain.client(f"SAE-B{i:02d}").enc_keys("SAE-C", number=1, size=256)
                return ("ok", keys)
            except ETSI014Error as exc:
                return ("refused", exc)

        with ThreadPoolExecutor(SESSIONS) as pool:
            results = list(pool.map(setup, range(SESSIONS), timeout=60))
        capacity_after = {n: routing.capacity_bps(n) for n in names}

        ok = [r for r in results if r[0] == "ok"]
        refused = [r for r in results if r[0] == "refused"]
        assert ok and refused, (len(ok), len(refused))
        # The controller's DB: every link's reservations within its key rate.
        db_links = chain.db_links()
        for n in names:
            reserved = routing.link(n).reserved_bps
            assert reserved == pytest.approx(db_links[n].reserved_bps)
            # The capacity is the monitored (smoothed) key rate, which moves slowly while the
            # set-ups run: every reservation was made within the value of that moment, which
            # may lie a little above both ends of the run (1 % of the rate's own noise).
            assert reserved <= 1.01 * max(capacity_before[n], capacity_after[n]), (n, reserved, capacity_before,
                                                                                  capacity_after)
        with chain.controller.services.session_factory() as s:
            rows = list(s.scalars(select(dbm.Session).where(dbm.Session.interface == "014")))
        assert len(rows) == SESSIONS
        live = [r for r in rows if r.state in (dbm.SessionState.ACCEPTED, dbm.SessionState.ACTIVE)]
        ended = [r for r in rows if r.state is dbm.SessionState.TERMINATED]
        assert len(live) == len(ok) and len(ended) == len(refused)
        # Each live session's reservation is on the links of its route; they add up per link.
        for n in names:
            assert db_links[n].reserved_bps == pytest.approx(
                sum(r.rate_bps for r in live if n in link_names(chain.net, r.route)))
        # Refused set-ups: ETSI 004 status 7 (a lower rate fits) or 4 (no path left).
        terminated = {e.ksid: e.details for e in chain.events("session_terminated")
                      if e.element == "admission_control"}
        assert {r.ksid for r in ended} <= set(terminated)
        assert {terminated[r.ksid]["status"] for r in ended} <= {4, 7}
        # The network was filled: the sessions hold (nearly) the most B -> C can carry.
        def max_flow(cap):
            return cap["LBC"] + min(cap["LBA"], cap["LAC"])
        assert sum(r.rate_bps for r in live) >= 0.9 * min(max_flow(capacity_before), max_flow(capacity_after))
        assert all(db_links[n].session_count >= 1 for n in names)


def link_names(net, route) -> set[str]:
    hops = {frozenset(pair) for pair in zip(route, route[1:])}
    return {l.name for l in net.links if frozenset(l.ends) in hops}
