"""`qkdsdn demo`: the paper's proof of concept end to end, as separate processes.

The demo runs as a child process (as a user runs it); the test reads what it wrote — the
event stream and the figure — and checks the paper's claims: both applications of every
pair got identical keys, the routes (KM2-KM3 relayed through KM0, the others direct), and
per key manager the event order request arrival, authentication, configuration, QKD key
available, (relay received,) key returned. Then that no process is left.
"""
from __future__ import annotations

import json

import pytest

from qkdsdn.launch import controller_available, process_alive
from up_helpers import EXAMPLES, qkdsdn, wait_gone

ROUTES = {("SAE-KM0", "SAE-KM1"): ["KM0", "KM1"], ("SAE-KM4", "SAE-KM5"): ["KM4", "KM5"],
          ("SAE-KM2", "SAE-KM3"): ["KM2", "KM0", "KM3"]}
ENDPOINT_ORDER = ["request_arrival", "authentication", "configuration", "key_available", "key_returned"]


def first(events, ksid, node, kind):
    times = [e["timestamp"] for e in events if e["ksid"] == ksid and e["node"] == node and e["kind"] == kind]
    return min(times) if times else None


def check_demo_output(out_dir, run_dir, stdout: str, keys: int) -> dict:
    assert "every pair got identical keys" in stdout, stdout
    doc = json.loads((out_dir / "events.json").read_text())
    events = doc["events"]
    assert doc["network"] == "paper-poc" and isinstance(doc["clock_offset"], float)
    assert all(e["timestamp"] > 1e9 for e in events)  # one clock (Unix) for every event
    sessions = {(s["source"], s["destination"]): s for s in doc["sessions"]}
    assert set(sessions) == set(ROUTES)
    for pair, route in ROUTES.items():
        s = sessions[pair]
        assert s["route"] == route and s["ok"], s
        ksid = s["ksid"]
        src, dst = route[0], route[-1]
        for node in (src, dst):
            times = [first(events, ksid, node, k) for k in ENDPOINT_ORDER]
            assert None not in times, (pair, node, times)
            assert times == sorted(times), (pair, node, dict(zip(ENDPOINT_ORDER, times)))
        returned = [e for e in events if e["ksid"] == ksid and e["kind"] == "key_returned"]
        assert len(returned) == 2 * keys
        # the destination received the key over the relay channel before it was available there
        assert first(events, ksid, dst, "relay_received") <= first(events, ksid, dst, "key_available")
        for node in route[1:-1]:  # trusted nodes: configured, then forwarded
            assert first(events, ksid, node, "configuration") <= first(events, ksid, node, "relay_forwarded")
        assert not [e for e in events if e["ksid"] == ksid and e["node"] not in route]
        assert f"route {' → '.join(route)}" in stdout
    png = (out_dir / "timeline.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    state = json.loads((run_dir / "up.json").read_text())
    pids = [p["pid"] for p in state["processes"]]
    assert state["status"] == "stopped" and wait_gone(pids, timeout=5) == []
    assert not any(process_alive(p["pid"], p["start_ticks"]) for p in state["processes"])
    return doc


def test_demo_without_controller(tmp_path):
    out, run = tmp_path / "out", tmp_path / "run"
    r = qkdsdn("demo", str(EXAMPLES / "paper-poc.yaml"), "--no-controller", "--free-ports", "--keys", "2",
               "--out", str(out), "--run-dir", str(run), cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = check_demo_output(out, run, r.stdout, keys=2)
    assert len(json.loads((run / "up.json").read_text())["processes"]) == 7  # twin + 6 agents
    # the recorded stream draws again with the timeline command
    fig = tmp_path / "again.png"
    again = qkdsdn("timeline", str(out / "events.json"), "-o", str(fig), cwd=tmp_path)
    assert again.returncode == 0 and "6 key managers, 3 sessions" in again.stdout
    assert len(doc["events"]) > 30


@pytest.mark.skipif(not controller_available(), reason="'qkdsdn controller' is not available in this installation")
def test_demo_with_controller_and_embedded_broker(tmp_path):
    out, run = tmp_path / "out", tmp_path / "run"
    r = qkdsdn("demo", "--free-ports", "--out", str(out), "--run-dir", str(run), cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    check_demo_output(out, run, r.stdout, keys=1)
    names = [p["name"] for p in json.loads((run / "up.json").read_text())["processes"]]
    assert names[:2] == ["broker", "twin"] and names[-1] == "controller"


def test_demo_refuses_unknown_applications(tmp_path):
    r = qkdsdn("demo", str(EXAMPLES / "paper-poc.yaml"), "--no-controller", "--pair", "SAE-KM0:SAE-X",
               cwd=tmp_path)
    assert r.returncode == 2 and "no application SAE-X" in r.stderr
    r = qkdsdn("demo", str(EXAMPLES / "linear-5.yaml"), "--no-controller", cwd=tmp_path)
    assert r.returncode == 2 and "--pair" in r.stderr
    assert not (tmp_path / "run").exists()


def test_demo_finds_the_example_from_the_repository():
    from qkdsdn.commands.demo import default_network

    found = default_network()
    assert found is not None and found.resolve() == (EXAMPLES / "paper-poc.yaml").resolve()
