"""Driving `qkdsdn up` as a child process in tests, and checking that nothing is left behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import yaml

from qkdsdn.launch import qkdsdn_argv

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
START_TIMEOUT_S = 120.0


def qkdsdn(*args: str, cwd: Path, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run(qkdsdn_argv(sys.executable, *args), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def renamed_copy(source: Path, out: Path, name: str | None = None) -> Path:
    """A copy of a network file under a unique network name (several runs may share one broker)."""
    data = yaml.safe_load(source.read_text())
    data["network"]["name"] = name or f"{data['network']['name']}-{uuid.uuid4().hex[:8]}"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


class UpProcess:
    """`qkdsdn up ...` in its own session; ``stop`` is the test's safety net (down + kill)."""

    def __init__(self, args: list[str], cwd: Path, run_dir: Path, *, pass_run_dir: bool = True):
        """``pass_run_dir=False``: `up` finds its default run directory (./run/NAME under ``cwd``),
        which must be ``run_dir``."""
        self.cwd, self.run_dir = cwd, run_dir
        self.out_path = cwd / f"up-{uuid.uuid4().hex[:6]}.out"
        self._out = open(self.out_path, "wb")  # noqa: SIM115 — closed in stop()
        argv = qkdsdn_argv(sys.executable, "up", *args)
        if pass_run_dir:
            argv += ["--run-dir", str(run_dir)]
        self.proc = subprocess.Popen(argv, cwd=cwd, stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def state(self) -> dict | None:
        try:
            return json.loads((self.run_dir / "up.json").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def wait_running(self, timeout: float = START_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state()
            if state and state.get("status") == "running":
                return state
            if self.proc.poll() is not None:
                raise AssertionError(f"qkdsdn up exited with {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.1)
        raise AssertionError(f"qkdsdn up not running after {timeout} s:\n{self.output()}")

    def pids(self) -> list[int]:
        state = self.state() or {}
        return [p["pid"] for p in state.get("processes", [])]

    def stop(self) -> None:
        from qkdsdn.launch import RunDir, down

        try:
            if self.proc.poll() is None:
                down(RunDir(self.run_dir), grace_s=10.0)
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
            down(RunDir(self.run_dir), grace_s=5.0)  # anything the launcher left behind
        finally:
            self._out.close()


def alive(pid: int) -> bool:
    from qkdsdn.launch import process_alive

    return process_alive(pid)


def wait_gone(pids: list[int], timeout: float = 30.0) -> list[int]:
    """The pids still alive after waiting up to ``timeout`` for them to end."""
    deadline = time.monotonic() + timeout
    left = [p for p in pids if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if alive(p)]
    return left


def clients(network_file: Path, state: dict):
    """A KeyManagerClient factory for the SAEs of a running network."""
    from agents.client import KeyManagerClient
    from db.netfile import load
    from qkdsdn.pki import PkiLayout

    network = load(network_file)
    apps = {a.sae_id: a for a in network.applications}

    def make(sae: str) -> KeyManagerClient:
        node = network.node(apps[sae].node)
        if state.get("tls"):
            layout = PkiLayout(state["pki"])
            cert, key = layout.app(sae)
            return KeyManagerClient(f"https://{node.km_address}", cert=(str(cert), str(key)), ca=str(layout.ca_cert))
        return KeyManagerClient(f"http://{node.km_address}", dev_sae_id=sae)

    return make


def wait_pools(run_dir: Path, network_file: Path, bits: int = 8 * 1024, timeout: float = 60.0) -> None:
    """Until both ends of every link hold ``bits`` of link key (read from the agents' key stores):
    an intermediate key manager short of link key fails a relayed request instead of queueing it."""
    from db.netfile import load
    from qkdsdn.commands.up import pool_levels

    network = load(network_file)
    deadline = time.monotonic() + timeout
    while True:
        short = []
        for link in network.links:
            for node in link.ends:
                levels = pool_levels(Path(run_dir) / "state" / node, node) or {}
                if sum(levels.get(link.qkdl_id, {}).values()) < bits:
                    short.append(f"{link.name}@{node}")
        if not short:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"link-key pools still short after {timeout} s: {', '.join(short)}")
        time.sleep(0.1)


def exchange_keys(make_client, source: str, destination: str, count: int = 2) -> list[bytes]:
    """OPEN_CONNECT at both ends, ``count`` keys fetched at both ends (asserted identical), CLOSE."""
    from agents.client import QoS

    ksid = str(uuid.uuid4())
    qos = QoS(Key_chunk_size=32, Max_bps=8000, Timeout=20000, TTL=60)
    a, b = make_client(source), make_client(destination)
    results: dict = {}

    def run(name, fn):
        try:
            results[name] = fn()
        except Exception as exc:  # noqa: BLE001 — re-raised below by the assertion
            results[name] = exc

    threads = [threading.Thread(target=run, args=("a", lambda: a.open_connect(source, destination, qos, ksid))),
               threading.Thread(target=run, args=("b", lambda: b.open_connect(source, destination, qos, ksid)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["a"].status == 0 and results["b"].status == 0, results
    keys = []
    for index in range(count):
        ka = a.get_key(ksid, index=index)
        kb = b.get_key(ksid, index=index)
        assert ka.status == 0 and kb.status == 0, (ka.message, kb.message)
        assert ka.key == kb.key and len(ka.key) == 32
        keys.append(ka.key)
    assert a.close(ksid) == 0 and b.close(ksid) == 0
    a.close_session()
    b.close_session()
    return keys
