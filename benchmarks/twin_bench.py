"""Benchmark of the digital twin's ETSI 014 key delivery.

    python benchmarks/twin_bench.py [--seconds S]

Starts the twin as its own process (TwinService, mutual TLS with a throw-away PKI,
every server on a free port of 127.0.0.1) and measures, with the ETSI 014 driver as
the client (master enc_keys, then slave dec_keys of the same IDs):

1. throughput: key bits/s one master/slave client pair gets from one fast link
   (10 Gb/s model rate, so key accrual is never the limit), for a few request shapes;
2. idle cost: the twin process's CPU use with 10 links at 1 Mb/s and no client
   (accrual is lazy, so this should be ~0);
3. load: the twin process's CPU use while 10 clients drain 10 links at 1 Mb/s each
   for S seconds (default 10), and the key rate they received against the model.

CPU use is the twin process's utime + stime from /proc/PID/stat over the window,
as a percentage of one core. Total run time stays well under a minute.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import REPO, cpu_seconds, machine, on_path

on_path(REPO)

LINKS_1M = 10
FAST = "FAST"


def network_yaml() -> str:
    nodes = [f"  - {{name: N{i}, km_address: \"127.0.0.1:{18400 + i}\"}}" for i in range(LINKS_1M + 2)]
    # A 2 Mbit device buffer (2 s of key) keeps the backlog from the earlier phases small.
    links = [f"  - {{name: L{i}, ends: [N{i}, N{i + 1}], length_km: 10, "
             f"device: {{model: fixed, skr_bps: 1000000, qber: 0.02, buffer_bits: 2097152}}}}"
             for i in range(LINKS_1M)]
    links.append(f"  - {{name: {FAST}, ends: [N{LINKS_1M}, N{LINKS_1M + 1}], length_km: 1, "
                 "device: {model: fixed, skr_bps: 10000000000, qber: 0.01, buffer_bits: 4294967296}}")
    return "\n".join(["network: {name: twin-bench}", "nodes:", *nodes, "links:", *links,
                      "deployment: {twin_host: 127.0.0.1, twin_base_port: 18500}", ""])


# --------------------------------------------------------------------------- twin process


def serve_child(net_path: str, pki_dir: str) -> None:
    """Runs in the twin process: serve, print the URLs as one JSON line, stop when stdin closes."""
    import logging

    from db import netfile
    from qkdsdn.twin.service import TwinService

    logging.basicConfig(level=logging.WARNING)
    service = TwinService(netfile.load(net_path), pki=pki_dir, ephemeral_ports=True, threads_per_kme=4)
    service.start()
    print(json.dumps({name: service.urls(name) for name in service.links}), flush=True)
    sys.stdin.read()  # the parent closes stdin to stop us
    service.stop()


# --------------------------------------------------------------------------- clients


def drivers(urls, pki, link: str, master: str, slave: str):
    from agents.drivers import ETSI014Device

    m_cert, m_key = pki.node(master)
    s_cert, s_key = pki.node(slave)
    m_url, s_url = urls[link]
    return (ETSI014Device(m_url, slave, str(m_cert), str(m_key), str(pki.ca_cert), timeout=30),
            ETSI014Device(s_url, master, str(s_cert), str(s_key), str(pki.ca_cert), timeout=30))


def throughput(urls, pki, number: int, size: int, seconds: float) -> dict:
    master, slave = drivers(urls, pki, FAST, f"N{LINKS_1M}", f"N{LINKS_1M + 1}")
    with master, slave:
        master.enc_keys(1, size)  # warm up: TLS handshakes, connection pools
        keys = 0
        requests_done = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            got = master.enc_keys(number, size)
            back = slave.dec_keys([k.key_id for k in got])
            if [k.key for k in back] != [k.key for k in got]:
                raise SystemExit("key mismatch between master and slave: the twin is broken")
            keys += len(got)
            requests_done += 2
        elapsed = time.perf_counter() - start
    return {"keys_per_s": keys / elapsed, "bits_per_s": keys * size / elapsed,
            "requests_per_s": requests_done / elapsed}


def drain(master, slave) -> int:
    """Take what the device holds now, in requests of up to 1024 keys; returns the bits taken.

    One bounded pass: what accrues meanwhile waits for the next pass, so a client that
    cannot keep up shows as a delivered rate below the model, never as a hang.
    """
    from agents.drivers import KeysUnavailable

    bits = 0
    available = master.get_status().stored_key_count
    while available > 0:
        n = min(available, 1024)
        try:
            got = master.enc_keys(n, 256)
        except KeysUnavailable:
            break
        slave.dec_keys([k.key_id for k in got])
        bits += 256 * n
        available -= n
    return bits


def drain_loop(urls, pki, i: int, ready: threading.Barrier, stop: threading.Event, totals: list,
               accrued: list, errors: list) -> None:
    try:
        master, slave = drivers(urls, pki, f"L{i}", f"N{i}", f"N{i + 1}")
        with master, slave:
            # The backlog of the earlier phases is not part of the measurement.
            drain(master, slave)
            ready.wait()
            # What accrued while the other links drained is backlog, not window accrual.
            backlog = 256 * master.get_status().stored_key_count
            while not stop.is_set():
                totals[i] += drain(master, slave)
                stop.wait(0.2)  # a key manager tops up its pool periodically, not in a hot loop
            left = 256 * master.get_status().stored_key_count
            accrued[i] = totals[i] - backlog + left
    except Exception as exc:  # noqa: BLE001 - reported by the main thread
        errors.append(f"L{i}: {exc}")
        ready.abort()


def load(urls, pki, pid: int, seconds: float) -> dict:
    stop = threading.Event()
    ready = threading.Barrier(LINKS_1M + 1, timeout=60)
    totals = [0] * LINKS_1M
    accrued = [0] * LINKS_1M
    errors: list[str] = []
    threads = [threading.Thread(target=drain_loop, args=(urls, pki, i, ready, stop, totals, accrued, errors),
                                daemon=True)
               for i in range(LINKS_1M)]
    for t in threads:
        t.start()
    try:
        ready.wait()
    except threading.BrokenBarrierError:
        stop.set()
        raise SystemExit("drain failed: " + "; ".join(errors)) from None
    cpu0, wall0 = cpu_seconds(pid), time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    cpu1, wall1 = cpu_seconds(pid), time.perf_counter()
    if errors:
        raise SystemExit("drain failed: " + "; ".join(errors))
    elapsed = wall1 - wall0
    return {"cpu_percent": 100 * (cpu1 - cpu0) / elapsed, "bits_per_s": sum(totals) / elapsed,
            "accrued_bps": sum(accrued) / elapsed,
            "per_link_min": min(totals) / elapsed, "per_link_max": max(totals) / elapsed,
            "seconds": elapsed}


def idle(pid: int, seconds: float) -> float:
    cpu0, wall0 = cpu_seconds(pid), time.perf_counter()
    time.sleep(seconds)
    return 100 * (cpu_seconds(pid) - cpu0) / (time.perf_counter() - wall0)


# --------------------------------------------------------------------------- main


def human(bps: float) -> str:
    for unit, scale in (("Gb/s", 1e9), ("Mb/s", 1e6), ("kb/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.2f} {unit}"
    return f"{bps:.0f} b/s"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the 10-link load window")
    parser.add_argument("--shape-seconds", type=float, default=2.0, help="length of each throughput run")
    parser.add_argument("--serve-child", nargs=2, metavar=("NET", "PKI"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_child:
        serve_child(*args.serve_child)
        return 0
    if not 1 <= args.seconds <= 30 or not 0.5 <= args.shape_seconds <= 10:
        parser.error("keep the run short: --seconds 1..30, --shape-seconds 0.5..10")

    from db import netfile
    from qkdsdn.pki import PkiLayout, init_pki

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="twin-bench-") as tmp:
        net_path = Path(tmp) / "bench.yaml"
        net_path.write_text(network_yaml())
        init_pki(netfile.load(net_path), Path(tmp) / "pki")
        pki = PkiLayout(Path(tmp) / "pki")
        proc = subprocess.Popen([sys.executable, __file__, "--serve-child", str(net_path), str(pki.out_dir)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
        try:
            line = proc.stdout.readline()
            if not line:
                raise SystemExit("the twin process did not start")
            urls = json.loads(line)
            shapes = [(1, 256), (128, 256), (1024, 256), (128, 8192)]
            results = [(n, s, throughput(urls, pki, n, s, args.shape_seconds)) for n, s in shapes]
            idle_cpu = idle(proc.pid, 2.0)
            loaded = load(urls, pki, proc.pid, args.seconds)
        finally:
            proc.stdin.close()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    print(f"machine: {machine()}")
    print()
    print("1. ETSI 014 throughput over mutual TLS, one link, driver as client (enc_keys + dec_keys)")
    print(f"   {'keys/request':>12}  {'key size':>8}  {'HTTP requests/s':>15}  {'keys/s':>10}  {'key rate':>12}")
    for n, s, r in results:
        print(f"   {n:>12}  {s:>6} b  {r['requests_per_s']:>15.0f}  {r['keys_per_s']:>10.0f}  "
              f"{human(r['bits_per_s']):>12}")
    print()
    print(f"2. twin process CPU, {LINKS_1M} links at 1 Mb/s, no client: {idle_cpu:.1f} % of one core")
    print()
    print(f"3. {LINKS_1M} links at 1 Mb/s drained by {LINKS_1M} key-manager clients for {loaded['seconds']:.1f} s "
          "(256-bit keys, every 0.2 s)")
    print(f"   twin process CPU              {loaded['cpu_percent']:.1f} % of one core")
    print(f"   key taken by the clients      {human(loaded['bits_per_s'])} (incl. the backlog at the start)")
    print(f"   per link                      {human(loaded['per_link_min'])} .. {human(loaded['per_link_max'])}")
    print(f"   key accrued in the window     {human(loaded['accrued_bps'])} (model {human(LINKS_1M * 1e6)}; "
          "taken - backlog + left in buffers)")
    print()
    print(f"total benchmark time {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
