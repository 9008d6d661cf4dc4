"""Benchmark of the key manager's ETSI 014 interface, next to a no-op on the same HTTPS stack.

    python benchmarks/agent_bench.py [--requests N] [--clients C] [--seconds S]

Everything runs on loopback over mutual TLS with a throw-away PKI, every server its own
process, and every client is a ``requests`` session with the application's certificate
(``qkdsdn.httpserver.https_session``) posting ``{"number": 1, "size": 256}`` to
``/api/v1/keys/<slave>/enc_keys``.

First, alone on the machine, the no-op: the agents' server stack
(``qkdsdn.httpserver.HTTPServer``, 32 threads, the TLS configuration of node KM0: its
certificate, the network CA, client certificate required) serving a Flask view at the
enc_keys path that parses the JSON body and returns a constant key container (one
all-zero 256-bit key). Then the network of examples/paper-poc.yaml moved to free ports
(tests/agent_harness.relocate): the digital twin (``qkdsdn twin serve``, six links of
200 kb/s) and one ``qkdsdn agent`` per node. Once the measured pairs hold 200 keys of link
key, the agents' and twin's CPU use with no client is measured for 2 s (the link-key
pools are still filling: that background work is part of every key-manager figure).

1. latency: sequential enc_keys of one client after a warm-up, up to N calls (default
   300) or 10 s per row, for an adjacent pair (SAE-KM0 -> SAE-KM1: the key is link key of
   L01), a relayed pair (SAE-KM2 -> SAE-KM3, through the trusted node KM0) and the no-op.
   The slave then fetches the last keys of each pair (dec_keys) and they are compared: a
   benchmark of keys that do not match would be meaningless.
2. load: C clients (default 4) call enc_keys in a loop for S seconds (default 8), each for
   its own master/slave pair on its own link direction (SAE-KM0 -> SAE-KM1,
   SAE-KM1 -> SAE-KM0, SAE-KM4 -> SAE-KM5, SAE-KM5 -> SAE-KM4, then the relayed pairs);
   the no-op got the same C clients. Reported: calls/s, key bits/s delivered to the
   masters, latency under load, and the CPU of the server processes (utime + stime from
   /proc/PID/stat; for the key manager the six agents and the twin, background included).

The first enc_keys of a pair opens its implicit session; one refused there is retried (at
most 10 times, counted and printed) before anything is timed.

What bounds the key rate of a pair in this network, printed with the results: each link
makes 200 kb/s of link key and each end owns half (docs/key-management.md); a 256-bit key
costs 256 + 512 link-key bits on every link of its route (docs/relay.md), so one link
direction sustains 100 000 x 256 / 768 = 33.3 kb/s of 256-bit keys once the backlog in
its pool is spent; the user's SLA caps each session's token bucket at 64 kb/s (alice,
bob) or 32 kb/s (carol).

A run takes about 50 s on an idle 2-CPU machine. The key manager's latency rows and load
run shrink (to 2 s at least) when the start-up took so long that they would end the run
after 85 s; the table shows the calls and seconds each row got. The load average before
and after the run is printed: work of other processes skews every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import REPO, cpu_seconds, machine, on_path

on_path(REPO, REPO / "tests")

NODES = ("KM0", "KM1", "KM2", "KM3", "KM4", "KM5")
ADJACENT = ("SAE-KM0", "SAE-KM1")
RELAYED = ("SAE-KM2", "SAE-KM3")
# Load clients: one master/slave pair each, each on its own link direction.
LOAD_PAIRS = [("SAE-KM0", "SAE-KM1"), ("SAE-KM1", "SAE-KM0"), ("SAE-KM4", "SAE-KM5"), ("SAE-KM5", "SAE-KM4"),
              ("SAE-KM2", "SAE-KM3"), ("SAE-KM3", "SAE-KM2")]
KEY_BITS = 256
BODY = {"number": 1, "size": KEY_BITS}
START_TIMEOUT_S = 60.0
LATENCY_MAX_S = 10.0  # a latency row stops after this long, whatever --requests says
BUDGET_S = 85.0  # the key-manager phases shrink (latency rows, load run) to end the run by then
SHUTDOWN_RESERVE_S = 8.0
MIN_STORED_KEYS = 200  # link key the measured pairs hold before timing starts
IDLE_S = 2.0
HTTP_TIMEOUT_S = 30.0
CLI = "import sys; from qkdsdn.cli import main; sys.exit(main())"


# --------------------------------------------------------------------------- no-op server (child process)


def serve_noop(pki_dir: str) -> None:
    """Serve the no-op on a free port of 127.0.0.1; print its URL; stop when stdin closes."""
    import logging

    from flask import Flask, Response, request

    from qkdsdn.httpserver import HTTPServer, TLSConfig

    logging.basicConfig(level=logging.WARNING)
    app = Flask("noop")
    # A constant key container of the size the key manager returns for one 256-bit key.
    # The key is 32 zero bytes: a placeholder, never key material.
    body = json.dumps({"keys": [{"key_ID": "00000000-0000-4000-8000-000000000000",
                                 "key": "A" * 43 + "="}]})

    @app.route("/api/v1/keys/<slave>/enc_keys", methods=["POST"])
    def enc_keys(slave: str) -> Response:
        json.loads(request.data or b"{}")
        return Response(body, mimetype="application/json")

    server = HTTPServer(app, "127.0.0.1", 0, tls=TLSConfig.for_node(pki_dir, "KM0"), name="noop", threads=32)
    server.start()
    print(json.dumps({"url": server.url}), flush=True)
    sys.stdin.read()  # the parent closes stdin to stop us
    server.stop()


# --------------------------------------------------------------------------- processes


class Processes:
    """The child processes this benchmark started; stopped by their own pid, never by name."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], *, stdin: bool = False) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 — closed with the process
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO,
                                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL)
        proc._bench_log = log  # type: ignore[attr-defined]
        self.procs[name] = proc
        return proc

    def wait_line(self, name: str, marker: str, deadline: float) -> str:
        """The first stdout line of ``name`` that contains ``marker``."""
        proc = self.procs[name]
        result: list[str] = []

        def read() -> None:
            for line in proc.stdout:
                if marker in line:
                    result.append(line)
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(max(deadline - time.monotonic(), 0.0))
        if not result:
            self.fail(name, f"did not print {marker!r} in time")
        return result[0]

    def fail(self, name: str, why: str) -> None:
        tail = (self.logs / f"{name}.log").read_text(errors="replace")[-2000:]
        raise SystemExit(f"{name} {why}; the end of its log:\n{tail}")

    def pids(self, names) -> list[int]:
        return [self.procs[n].pid for n in names if n in self.procs]

    def stop(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is None:
                if proc.stdin is not None:
                    proc.stdin.close()  # the no-op stops on EOF
                else:
                    proc.send_signal(signal.SIGTERM)  # twin and agents shut down cleanly on SIGTERM
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc._bench_log.close()  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- clients


@dataclass
class Run:
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    key_bits: int = 0
    last_ids: list[str] = field(default_factory=list)
    last_keys: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


def enc_once(session, url: str, run: Run) -> bool:
    """One enc_keys; records its latency (successful calls only) and its key bits."""
    t0 = time.perf_counter()
    try:
        r = session.post(url, json=BODY, timeout=HTTP_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 — counted, the run goes on
        run.error(type(exc).__name__)
        return False
    elapsed = time.perf_counter() - t0
    if r.status_code != 200:
        try:
            message = r.json().get("message", "")
        except ValueError:
            message = ""
        run.error(f"HTTP {r.status_code} {message}".strip())
        return False
    keys = r.json()["keys"]
    if len(keys) != 1:
        run.error("wrong number of keys")
        return False
    run.latencies.append(elapsed)
    run.key_bits += KEY_BITS
    run.last_ids = (run.last_ids + [keys[0]["key_ID"]])[-8:]
    run.last_keys = (run.last_keys + [keys[0]["key"]])[-8:]
    return True


def warm_up(session, url: str, calls: int = 3, first_tries: int = 10) -> int:
    """TLS handshake, connection pool and (for the key manager) the pair's implicit session.

    The first enc_keys of a new pair sets the session up and may fail (see the report's
    notes); it is retried a bounded number of times. Returns the failed first attempts."""
    run, failed = Run(), 0
    for _ in range(first_tries):
        if enc_once(session, url, run):
            break
        failed += 1
        time.sleep(0.2)
    else:
        raise SystemExit(f"warm-up against {url} failed {first_tries} times: {run.errors}")
    for _ in range(calls):
        enc_once(session, url, run)
    return failed


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def latency(session, url: str, n: int, max_s: float) -> tuple[Run, float]:
    """Up to ``n`` sequential calls, stopping early after ``max_s`` seconds."""
    run = Run()
    t0 = time.perf_counter()
    for _ in range(n):
        enc_once(session, url, run)
        if time.perf_counter() - t0 > max_s:
            break
    return run, time.perf_counter() - t0


def load(sessions_urls: list[tuple[object, str]], seconds: float, pids: list[int]) -> dict:
    runs = [Run() for _ in sessions_urls]
    stop = threading.Event()
    start = threading.Barrier(len(sessions_urls) + 1)

    def loop(i: int) -> None:
        session, url = sessions_urls[i]
        start.wait()
        while not stop.is_set():
            enc_once(session, url, runs[i])

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(len(sessions_urls))]
    for t in threads:
        t.start()
    start.wait()
    cpu0, t0 = cpu_seconds(*pids), time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(HTTP_TIMEOUT_S + 5)
    elapsed = time.perf_counter() - t0
    cpu = cpu_seconds(*pids) - cpu0
    latencies = [x for r in runs for x in r.latencies]
    errors: dict[str, int] = {}
    for r in runs:
        for k, v in r.errors.items():
            errors[k] = errors.get(k, 0) + v
    return {"requests": len(latencies), "seconds": elapsed, "bits": sum(r.key_bits for r in runs),
            "latencies": latencies, "errors": errors, "cpu": cpu,
            "per_client_bps": [r.key_bits / elapsed for r in runs]}


# --------------------------------------------------------------------------- main


def human(bps: float) -> str:
    for unit, scale in (("Mb/s", 1e6), ("kb/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.1f} {unit}"
    return f"{bps:.0f} b/s"


def errors_text(errors: dict[str, int]) -> str:
    return ", ".join(f"{v} x {k}" for k, v in sorted(errors.items())) or "none"


def supply_bound_bps(net, master: str, slave: str) -> float:
    """Sustained 256-bit key rate one pair can get once its pools' backlog is spent: the
    smallest of its user's SLA rate and, on every link of its route, half the link's
    fixed-model key rate x 256 / (256 + 512)."""
    import networkx as nx

    apps = {a.sae_id: a for a in net.applications}
    sla = next(u.sla for u in net.users if u.name == apps[master].user)
    graph = nx.Graph([link.ends for link in net.links])
    route = nx.shortest_path(graph, apps[master].node, apps[slave].node)
    rates = [next(link.device.skr_bps for link in net.links if set(link.ends) == {a, b})
             for a, b in zip(route, route[1:])]
    return min(sla.max_bps, min(r / 2 * KEY_BITS / (KEY_BITS + 512) for r in rates))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300,
                        help="sequential enc_keys per latency row (each row stops after %(const)s s)" % {
                            "const": LATENCY_MAX_S})
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients of the load runs (1..6)")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each load run")
    parser.add_argument("--serve-noop", metavar="PKI", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_noop:
        serve_noop(args.serve_noop)
        return 0
    if not 50 <= args.requests <= 1000 or not 1 <= args.clients <= len(LOAD_PAIRS) or not 2 <= args.seconds <= 15:
        parser.error("keep the run short: --requests 50..1000, --clients 1..6, --seconds 2..15")

    import agent_harness
    from db import netfile
    from qkdsdn.httpserver import https_session
    from qkdsdn.pki import PkiLayout, init_pki

    t_start = time.perf_counter()
    load_before = os.getloadavg()
    pairs = LOAD_PAIRS[:args.clients]
    first_failures: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="agent-bench-") as tmp:
        tmp = Path(tmp)
        net_path = agent_harness.relocate(agent_harness.EXAMPLES / "paper-poc.yaml", tmp / "paper-poc.yaml")
        net = netfile.load(net_path)
        init_pki(net, tmp / "pki")
        pki = PkiLayout(tmp / "pki")
        (tmp / "logs").mkdir()

        def session(sae: str):
            cert, key = pki.app(sae)
            return https_session(cert, key, pki.ca_cert)

        def enc_url(base: str, slave: str) -> str:
            return f"{base}/api/v1/keys/{slave}/enc_keys"

        # The no-op first, on a quiet machine: the cost of the HTTPS stack alone.
        procs = Processes(tmp / "logs")
        try:
            procs.start("noop", [sys.executable, __file__, "--serve-noop", str(pki.out_dir)], stdin=True)
            noop = json.loads(procs.wait_line("noop", '"url"', time.monotonic() + START_TIMEOUT_S))["url"]
            s = session(ADJACENT[0])
            warm_up(s, enc_url(noop, ADJACENT[1]))
            noop_latency = latency(s, enc_url(noop, ADJACENT[1]), args.requests, LATENCY_MAX_S)
            clients = []
            for master, slave in pairs:
                s = session(master)
                warm_up(s, enc_url(noop, slave))
                clients.append((s, enc_url(noop, slave)))
            noop_load = load(clients, args.seconds, procs.pids(("noop",)))
        finally:
            procs.stop()

        # Then the network: the twin and six agents.
        procs = Processes(tmp / "logs")
        try:
            t0 = time.perf_counter()
            deadline = time.monotonic() + START_TIMEOUT_S
            procs.start("twin", [sys.executable, "-c", CLI, "twin", "serve", str(net_path), "--pki", str(pki.out_dir),
                                 "--admin-port", str(agent_harness.free_ports(1)[0]), "--log-level", "warning"])
            procs.wait_line("twin", "serving", deadline)
            for node in NODES:
                procs.start(node, [sys.executable, "-c", CLI, "agent", str(net_path), "--node", node,
                                   "--pki", str(pki.out_dir), "--state-dir", str(tmp / "state" / node),
                                   "--log-level", "ERROR"])
            for node in NODES:
                procs.wait_line(node, "serving on", deadline)
            started_s = time.perf_counter() - t0
            km_pids = procs.pids(("twin", *NODES))
            urls = {a.sae_id: f"https://{net.node(a.node).km_address}" for a in net.applications}

            # Some link key in the pools of the measured pairs before anything is timed.
            for master, slave in [ADJACENT, RELAYED]:
                s = session(master)
                while True:
                    r = s.get(f"{urls[master]}/api/v1/keys/{slave}/status", timeout=HTTP_TIMEOUT_S)
                    if r.status_code == 200 and r.json()["stored_key_count"] >= MIN_STORED_KEYS:
                        break
                    if time.monotonic() > deadline:
                        raise SystemExit(f"the link-key pool of {master} did not fill: {r.status_code} {r.text}")
                    time.sleep(0.2)
            cpu0, w0 = cpu_seconds(*km_pids), time.perf_counter()
            time.sleep(IDLE_S)
            idle_cpu = (cpu_seconds(*km_pids) - cpu0) / (time.perf_counter() - w0)

            def left() -> float:
                return BUDGET_S - SHUTDOWN_RESERVE_S - (time.perf_counter() - t_start)

            # 1. latency
            km_latency = {}
            for i, (master, slave) in enumerate((ADJACENT, RELAYED)):
                s = session(master)
                url = enc_url(urls[master], slave)
                first_failures[f"{master} -> {slave}"] = warm_up(s, url)
                # Time for this row: an equal share of what the budget leaves besides the load run.
                row_s = min(LATENCY_MAX_S, max(2.0, (left() - args.seconds - 4.0) / (2 - i)))
                run, elapsed = latency(s, url, args.requests, row_s)
                check(session(slave), urls[slave], master, run)
                km_latency[(master, slave)] = (run, elapsed)

            # 2. load
            clients = []
            for master, slave in pairs:
                s = session(master)
                if (master, slave) not in km_latency:
                    first_failures[f"{master} -> {slave}"] = warm_up(s, enc_url(urls[master], slave))
                clients.append((s, enc_url(urls[master], slave)))
            km_load = load(clients, min(args.seconds, max(2.0, left())), km_pids)
            bound = sum(supply_bound_bps(net, m, s) for m, s in pairs)
        finally:
            procs.stop()

    print(f"machine: {machine()}; load average {load_before[0]:.1f} before the run, "
          f"{os.getloadavg()[0]:.1f} after (other work on the machine skews every figure)")
    print(f"network: examples/paper-poc.yaml on loopback, mutual TLS, twin and 6 agents each its own process "
          f"(started in {started_s:.1f} s); the no-op ran alone before it")
    print(f"background: with no client, the agents and the twin used {100 * idle_cpu:.0f} % of one core "
          "(link-key pools filling at 200 kb/s per link)")
    print()
    print(f"1. ETSI 014 enc_keys latency, one client, sequential calls of number=1, size={KEY_BITS}")
    print(f"   {'server':<40} {'calls':>5} {'p50 ms':>7} {'p99 ms':>7} {'mean ms':>8} {'calls/s':>8}  errors")
    rows = [(f"key manager, adjacent {ADJACENT[0]} -> {ADJACENT[1]}", *km_latency[ADJACENT]),
            (f"key manager, relayed  {RELAYED[0]} -> {RELAYED[1]}", *km_latency[RELAYED]),
            ("no-op on the same HTTPS stack", *noop_latency)]
    for label, run, elapsed in rows:
        lat = run.latencies
        mean = sum(lat) / len(lat) if lat else float("nan")
        print(f"   {label:<40} {len(lat):>5} {1e3 * percentile(lat, 50):>7.1f} {1e3 * percentile(lat, 99):>7.1f} "
              f"{1e3 * mean:>8.1f} {len(lat) / elapsed:>8.0f}  {errors_text(run.errors)}")
    print()
    print(f"2. load: {args.clients} concurrent clients, each its own pair "
          f"({', '.join(f'{m}->{s}' for m, s in pairs)})")
    print(f"   {'server':<40} {'s':>4} {'calls/s':>8} {'key bits/s':>11} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'server CPU':>11} {'CPU ms/call':>12}  errors")
    for label, r in [("key manager (6 agents + twin)", km_load), ("no-op on the same HTTPS stack", noop_load)]:
        rate = r["requests"] / r["seconds"]
        per_call = 1e3 * r["cpu"] / r["requests"] if r["requests"] else float("nan")
        print(f"   {label:<40} {r['seconds']:>4.0f} {rate:>8.0f} {human(r['bits'] / r['seconds']):>11} "
              f"{1e3 * percentile(r['latencies'], 50):>7.1f} {1e3 * percentile(r['latencies'], 99):>7.1f} "
              f"{100 * r['cpu'] / r['seconds']:>9.0f} % {per_call:>12.1f}  {errors_text(r['errors'])}")
    print(f"   key manager per client: {', '.join(human(b) for b in km_load['per_client_bps'])}")
    print(f"   sustained bound of these pairs once their pools' backlog is spent (link key, SLA): {human(bound)}")
    print("   no-op 'key bits/s' = calls/s x 256; server CPU in % of one core, the key manager's with its background")
    print()
    failed = {k: v for k, v in first_failures.items() if v}
    print("first enc_keys of a new pair refused and retried: "
          + (", ".join(f"{k} {v}x" for k, v in failed.items()) if failed else "never"))
    print(f"total benchmark time {time.perf_counter() - t_start:.1f} s")
    return 0


def check(slave_session, slave_url: str, master: str, run: Run) -> None:
    """The slave gets the same keys for the master's last key IDs (dec_keys)."""
    r = slave_session.post(f"{slave_url}/api/v1/keys/{master}/dec_keys",
                           json={"key_IDs": [{"key_ID": k} for k in run.last_ids]}, timeout=HTTP_TIMEOUT_S)
    if r.status_code != 200:
        raise SystemExit(f"dec_keys at the slave failed: {r.status_code} {r.text}")
    got = {k["key_ID"]: k["key"] for k in r.json()["keys"]}
    if [got.get(k) for k in run.last_ids] != run.last_keys:
        raise SystemExit("the slave's keys differ from the master's: the key manager is broken")


if __name__ == "__main__":
    sys.exit(main())
