"""Benchmark of the controller: session set-ups and closes per second over the bus.

    python benchmarks/controller_bench.py [--bus local|embedded|mqtt://127.0.0.1:1883] [--sessions 300]
                                          [--clients 4] [--seconds 6] [--budget 80]

Starts the controller in-process (``controller.launcher.Controller``, every os-ken app, insecure_dev,
a throwaway SQLite file) on a copy of examples/paper-poc.yaml in a temporary directory: a unique
network name, free loopback ports, and SLAs raised so that users' session and rate caps never refuse
a session (the benchmark measures the control plane, not the SLA check). Without --bus it runs on
``local`` and ``embedded``, then on Mosquitto at mqtt://127.0.0.1:1883 if something listens there.

The six nodes are emulated in this process (a load generator, not shipped behaviour) by the tests'
``controller_harness.EmulatedNode``: each has its ETSI 015 RESTCONF server (``agents.sdn_agent.NodeState``,
links ACTIVE at 200 kb/s, so discovery makes every link routable) and a key-manager stand-in on the
bus that acknowledges every ``km/<node>/config`` with ok (``reply_message``), as a real agent does,
and sends admission ``open`` and ``close`` requests with ``bus.request`` / ``publish`` on
``admission/request``. No ``authenticate``: that is access control's, and not part of a set-up.

Sessions go round the paper's three pairs (KM0->KM1 and KM4->KM5 adjacent, KM2->KM3 relayed through
KM0), Max_bps 100, with --clients concurrent requesters, up to --sessions per interface or --seconds
of opening, whichever comes first:

- ETSI 014: one ``open`` from the master's key manager (an implicit session); latency from the open
  to its status-0 answer (sent once every key manager on the route confirmed its configuration);
- ETSI 004: both endpoints' key managers send ``open`` for the same KSID at the same time; latency
  from the first open to the later of the two status-0 answers.

Sessions are held while opening, then all closed by --clients closers (``close`` from the source's
key manager); closes/s counts until every key manager that was configured for a session received
its ``deconfigure``. A few warm-up sessions are opened and closed first and not counted.
No new bus is started once --budget seconds have passed, so the default run stays under about
90 s (about 50 s on 2 cores with all three buses). Prints a Markdown table and the machine.
"""
from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path as FsPath

from _common import REPO, machine, on_path, pct

on_path(REPO, REPO / "tests")

import logging  # noqa: E402

PAIRS = (("KM0", "KM1"), ("KM4", "KM5"), ("KM2", "KM3"))
MQTT_DEFAULT = "mqtt://127.0.0.1:1883"
WARMUP = 6

# the tests' emulated nodes and network-file copier (unique name, free loopback ports)
from controller_harness import EmulatedNode, network_file  # noqa: E402


def raise_slas(data: dict) -> None:
    """Users' session and rate caps never refuse a session: the benchmark measures the control plane."""
    for user in data["users"]:
        user["sla"].update(max_sessions=100_000, max_bps=10_000_000, max_priority=7)
        user["sla"].pop("allowed_destinations", None)


class Tracker:
    """Which key managers were configured / deconfigured per KSID, and when each close completed."""

    def __init__(self):
        self.lock = threading.Lock()
        self.configured: dict[str, set[str]] = {}
        self.deconfigured: dict[str, set[str]] = {}
        self.closed_at: dict[str, float] = {}
        self.watch: set[str] = set()
        self.done = threading.Condition(self.lock)

    def config(self, node: str, op: str, ksid: str) -> None:
        with self.lock:
            if op == "configure":
                self.configured.setdefault(ksid, set()).add(node)
            else:
                got = self.deconfigured.setdefault(ksid, set())
                got.add(node)
                if ksid not in self.closed_at and got >= self.configured.get(ksid, set()):
                    self.closed_at[ksid] = time.perf_counter()
                    self.done.notify_all()

    def wait_closed(self, ksids: list[str], timeout: float) -> int:
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                n = sum(k in self.closed_at for k in ksids)
                left = deadline - time.monotonic()
                if n == len(ksids) or left <= 0:
                    return n
                self.done.wait(min(left, 0.2))


class Node(EmulatedNode):
    """One emulated node whose key-manager stand-in tells the tracker of every (de)configuration."""

    def __init__(self, net, name: str, make_bus, tracker: Tracker):
        self.tracker = tracker
        super().__init__(net, name, make_bus)
        self.links_up()

    def on_config(self, op: str, ksid: str, msg: dict) -> None:
        self.tracker.config(self.name, op, ksid)  # confirmed: None

    def open(self, payload: dict, timeout: float = 10.0) -> dict:
        return self.request(payload, timeout)

    def close(self, ksid: str) -> None:
        self.publish({"op": "close", "ksid": ksid, "reason": "benchmark"})


def open_payload(net, ksid: str, node: str, src: str, dst: str, interface: str) -> dict:
    src_sae, dst_sae = f"SAE-{src}", f"SAE-{dst}"
    local = src_sae if node == src else dst_sae
    user = next(a.user for a in net.applications if a.sae_id == local)
    return {"op": "open", "ksid": ksid, "interface": interface, "user": user, "requesting_node": node,
            "local_sae": local, "source_sae": src_sae, "destination_sae": dst_sae,
            "qos": {"Max_bps": 100, "Timeout": 20_000, "TTL": 600}}


def mqtt_reachable(url: str) -> bool:
    host, _, port = url.split("://", 1)[1].partition(":")
    try:
        with socket.create_connection((host, int(port or 1883)), timeout=0.5):
            return True
    except OSError:
        return False


class Run:
    """Controller and emulated nodes on one bus."""

    def __init__(self, bus_url: str, tmp: FsPath):
        from controller.apps.context import ControllerConfig
        from controller.launcher import Controller, ControllerOptions
        from db.netfile import load
        from qkdsdn.bus import LocalBus, MQTTBus, shared_broker

        self.bus_url = bus_url
        self.net = load(network_file(tmp, prefix="bench", edit=raise_slas))
        self.tracker = Tracker()
        self.buses = []
        self.retained = []

        def make_bus(client_id: str, status_topic: str):
            if bus_url == "local":
                bus = LocalBus(client_id, status_topic=status_topic)
            else:
                url = shared_broker().url if bus_url == "embedded" else bus_url
                bus = MQTTBus(url, client_id, status_topic=status_topic, reconnect_delay=(0.1, 1.0))
                if not bus.wait_connected(10):
                    raise RuntimeError(f"no connection to {url}")
            self.buses.append(bus)
            self.retained.append(status_topic)
            return bus

        self.nodes = {n.name: Node(self.net, n.name, make_bus, self.tracker) for n in self.net.nodes}
        config = ControllerConfig(discovery_interval_s=0.5, monitoring_tick_s=0.5, profiles_refresh_s=10.0)
        self.controller = Controller(ControllerOptions(
            network=self.net, db_url=f"sqlite:///{tmp / 'controller.db'}", bus_url=bus_url, insecure_dev=True,
            config=config))

    def start(self) -> None:
        from controller.apps.base import ROUTING

        self.controller.start()
        deadline = time.monotonic() + 20
        while self.controller.health()[ROUTING].get("routable_links") != len(self.net.links):
            if time.monotonic() > deadline:
                raise RuntimeError("links never became routable")
            time.sleep(0.05)

    def stop(self) -> None:
        from qkdsdn.bus import MQTTBus, forget_session

        self.controller.stop()
        for node in self.nodes.values():
            node.stop()
        for bus in self.buses:
            bus.close()
        if self.bus_url.startswith("mqtt"):
            cleaner = MQTTBus(self.bus_url, f"qkdsdn-bench-cleaner-{uuid.uuid4().hex[:8]}")
            if cleaner.wait_connected(5):
                for topic in self.retained + [f"qkdsdn/{self.net.name}/status/controller"]:
                    cleaner.clear_retained(topic)
                cleaner.flush(5)
            cleaner.close()
            for cid in [b.client_id for b in self.buses] + [f"{self.net.name}-controller", cleaner.client_id]:
                try:
                    forget_session(self.bus_url, cid)
                except Exception:  # noqa: BLE001 - best effort
                    pass

    # ----------------------------------------------------------------- one session

    def setup(self, i: int, interface: str, peer_pool: ThreadPoolExecutor | None) -> tuple[str, str, float, bool]:
        src, dst = PAIRS[i % len(PAIRS)]
        ksid = str(uuid.uuid4())
        t = time.perf_counter()
        if interface == "014":
            answers = [self.nodes[src].open(open_payload(self.net, ksid, src, src, dst, "014"))]
        else:
            other = peer_pool.submit(self.nodes[dst].open, open_payload(self.net, ksid, dst, src, dst, "004"))
            answers = [self.nodes[src].open(open_payload(self.net, ksid, src, src, dst, "004")), other.result()]
        latency = time.perf_counter() - t
        ok = all(a.get("ok") and a.get("status") == 0 for a in answers)
        if not ok:
            print(f"  refused {interface} {src}->{dst}: {answers}", file=sys.stderr)
        return ksid, src, latency, ok

    def phase(self, interface: str, sessions: int, clients: int, seconds: float) -> dict:
        # warm-up, not counted
        with ThreadPoolExecutor(1) as peer:
            warm = [self.setup(i, interface, peer) for i in range(WARMUP)]
        for ksid, src, _, _ in warm:
            self.nodes[src].close(ksid)
        self.tracker.wait_closed([w[0] for w in warm], 10)

        counter = iter(range(sessions))
        lock = threading.Lock()
        results: list[tuple[str, str, float, bool]] = []
        stop_at = time.perf_counter() + seconds

        def requester() -> None:
            with ThreadPoolExecutor(1) as peer:
                while time.perf_counter() < stop_at:
                    with lock:
                        i = next(counter, None)
                    if i is None:
                        return
                    r = self.setup(i, interface, peer)
                    with lock:
                        results.append(r)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            for f in [pool.submit(requester) for _ in range(clients)]:
                f.result()
        open_s = time.perf_counter() - t0
        admitted = [r for r in results if r[3]]

        # closes
        todo = iter(admitted)

        def closer() -> None:
            while True:
                with lock:
                    r = next(todo, None)
                if r is None:
                    return
                self.nodes[r[1]].close(r[0])

        t1 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            for f in [pool.submit(closer) for _ in range(clients)]:
                f.result()
        ksids = [r[0] for r in admitted]
        closed = self.tracker.wait_closed(ksids, 10)
        with self.tracker.lock:
            last = max((self.tracker.closed_at[k] for k in ksids if k in self.tracker.closed_at), default=t1)
        close_s = max(last - t1, 1e-9)
        lat = [r[2] * 1e3 for r in admitted]
        return {"interface": interface, "n": len(results), "ok": len(admitted), "open_s": open_s,
                "setups_per_s": len(admitted) / open_s if open_s else float("nan"),
                "p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "mean": statistics.fmean(lat) if lat else float("nan"),
                "closed": closed, "closes_per_s": closed / close_s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bus", action="append",
                    help="local, embedded or mqtt://host:port (repeatable); default: local, embedded, and "
                         f"{MQTT_DEFAULT} if reachable")
    ap.add_argument("--sessions", type=int, default=300, help="sessions per interface and bus (upper bound)")
    ap.add_argument("--clients", type=int, default=4, help="concurrent requesters (and closers)")
    ap.add_argument("--seconds", type=float, default=6.0, help="time bound of each opening phase")
    ap.add_argument("--budget", type=float, default=80.0,
                    help="no new bus is started after this many seconds (the run stays under about 90 s)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)

    buses = args.bus or ["local", "embedded"] + ([MQTT_DEFAULT] if mqtt_reachable(MQTT_DEFAULT) else [])
    if not args.bus and MQTT_DEFAULT not in buses:
        print(f"(no broker at {MQTT_DEFAULT}: Mosquitto skipped)")
    rows = []
    t_start = time.perf_counter()
    for bus_url in buses:
        if time.perf_counter() - t_start > args.budget:
            print(f"(time budget of {args.budget:g} s spent: {bus_url} skipped)")
            continue
        with tempfile.TemporaryDirectory(prefix="qkdsdn-ctlbench-") as tmp:
            run = Run(bus_url, FsPath(tmp))
            try:
                t = time.perf_counter()
                run.start()
                ready_s = time.perf_counter() - t
                for interface in ("014", "004"):
                    row = run.phase(interface, args.sessions, args.clients, args.seconds)
                    row.update(bus=bus_url, ready_s=ready_s)
                    rows.append(row)
            finally:
                run.stop()

    print(f"controller benchmark: paper-poc (6 key managers emulated on the bus), {args.clients} concurrent "
          f"requesters, up to {args.sessions} sessions or {args.seconds:g} s per row, Max_bps 100, SQLite; "
          f"total {time.perf_counter() - t_start:.1f} s")
    print(f"machine: {machine()}")
    print()
    print("| bus | interface | sessions (admitted) | set-ups/s | p50 ms | p99 ms | closes/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        partial = "" if r["closed"] == r["ok"] else f" ({r['closed']} done)"
        print(f"| {r['bus']} | ETSI {r['interface']} | {r['n']} ({r['ok']}) | {r['setups_per_s']:.1f} | "
              f"{r['p50']:.1f} | {r['p99']:.1f} | {r['closes_per_s']:.1f}{partial} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
