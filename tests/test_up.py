"""`qkdsdn up` / `down` / `status` and the process manager behind them (qkdsdn/launch.py).

The launcher tests use tiny Python children; the integration tests run `qkdsdn up` as a
child process on examples/paper-poc.yaml and examples/linear-5.yaml (every listener moved to
free ports), exchange keys through the network, and check that `down`, Ctrl-C and even
`kill -9` of the launcher leave no process behind. Controller-mode runs use the embedded
broker and SQLite, and the real Mosquitto and PostgreSQL when QKDSDN_TEST_MQTT_URL and
QKDSDN_TEST_POSTGRES_URL are set (.ci/run sets both).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import uuid

import pytest
import yaml

from qkdsdn.launch import (AllOf, Launcher, LaunchError, LogLineProbe, ProcessSpec, RunDir, TCPProbe,
                           controller_available, free_ports, listener_conflicts, process_alive,
                           relocate_to_free_ports, UpOptions)
from up_helpers import (EXAMPLES, UpProcess, alive, clients, exchange_keys, qkdsdn, renamed_copy, wait_gone,
                        wait_pools)

PY = sys.executable
MQTT_URL = os.environ.get("QKDSDN_TEST_MQTT_URL")
POSTGRES_URL = os.environ.get("QKDSDN_TEST_POSTGRES_URL")
NO_CONTROLLER = "'qkdsdn controller' is not available in this installation"
needs_controller = pytest.mark.skipif(not controller_available(), reason=NO_CONTROLLER)


def child(code: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(code)]


# =============================================================================================
# the launcher


def test_log_line_readiness_and_clean_stop(tmp_path):
    run = RunDir(tmp_path / "run")
    spec = ProcessSpec("echo", "other", child("""
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        print("listening on mqtt://127.0.0.1:4242", flush=True)
        while True:
            time.sleep(1)
    """), probe=LogLineProbe(r"listening on (?P<url>mqtts?://\S+)"))
    launcher = Launcher(run, grace_s=10)
    try:
        (proc,) = launcher.start([spec])
        assert proc.found["url"] == "mqtt://127.0.0.1:4242" and proc.ready_at is not None
        state = run.read_state()
        assert state["processes"][0]["pid"] == proc.pid and state["launcher_pid"] == os.getpid()
        assert run.live_processes()[0].pid == proc.pid
    finally:
        launcher.stop()
    assert proc.returncode == 0 and not process_alive(proc.pid)
    assert run.read_state()["status"] == "stopped" and run.live_processes() == []


def test_process_that_dies_before_ready_is_reported_with_its_log(tmp_path):
    run = RunDir(tmp_path / "run")
    spec = ProcessSpec("broken", "other", child("""
        import sys
        print("cannot bind 127.0.0.1:1: permission denied", flush=True)
        sys.exit(3)
    """), probe=TCPProbe("127.0.0.1", free_ports(1)[0]))
    with pytest.raises(LaunchError) as info:
        Launcher(run).start([spec])
    assert "broken exited with status 3 before it was ready" in str(info.value)
    assert "permission denied" in str(info.value)


def test_later_groups_wait_and_a_failure_stops_the_earlier_ones(tmp_path):
    run = RunDir(tmp_path / "run")
    first = ProcessSpec("first", "other", child("""
        import time
        print("up", flush=True)
        while True:
            time.sleep(1)
    """), probe=LogLineProbe("^up$"), group=0)
    second = ProcessSpec("second", "other", child("import sys; sys.exit(1)"), probe=LogLineProbe("never"), group=1)
    launcher = Launcher(run, grace_s=10)
    with pytest.raises(LaunchError, match="second exited with status 1"):
        launcher.start([first, second])
    started = {p.name: p for p in launcher.processes}
    assert started["first"].ready_at is not None  # group 0 was ready before group 1 started
    assert not started["first"].alive() and started["first"].returncode == -signal.SIGTERM


def test_not_ready_in_time_names_what_it_waited_for(tmp_path):
    run = RunDir(tmp_path / "run")
    port = free_ports(1)[0]
    spec = ProcessSpec("mute", "other", child("import time; time.sleep(600)"),
                       probe=AllOf([TCPProbe("127.0.0.1", port)]))
    launcher = Launcher(run, ready_timeout_s=0.5, grace_s=10)
    with pytest.raises(LaunchError, match=f"not ready after 0.5 s: mute: TCP 127.0.0.1:{port}"):
        launcher.start([spec])
    assert not launcher.processes[0].alive()


def test_sigterm_then_sigkill_after_the_grace_period_and_the_whole_group(tmp_path):
    run = RunDir(tmp_path / "run")
    pidfile = tmp_path / "grandchild.pid"
    spec = ProcessSpec("stubborn", "other", child(f"""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        grandchild = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
        open({str(pidfile)!r}, "w").write(str(grandchild.pid))
        print("ready", flush=True)
        time.sleep(600)
    """), probe=LogLineProbe("ready"))
    launcher = Launcher(run, grace_s=0.5)
    (proc,) = launcher.start([spec])
    grandchild = int(pidfile.read_text())
    assert alive(grandchild)
    launcher.stop()
    assert proc.returncode == -signal.SIGKILL
    assert wait_gone([grandchild]) == []  # the process group went down with it


def test_children_die_with_a_killed_launcher(tmp_path):
    """kill -9 of the launcher: the kernel's parent-death signal stops its children (Linux)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux-only")
    run_path = tmp_path / "run"
    launcher = subprocess.Popen(child(f"""
        import time
        from qkdsdn.launch import Launcher, LogLineProbe, ProcessSpec, RunDir
        spec = ProcessSpec("sleeper", "other", [{PY!r}, "-c", "print('ok', flush=True); import time; time.sleep(600)"],
                           probe=LogLineProbe("ok"))
        Launcher(RunDir({str(run_path)!r})).start([spec])
        print("started", flush=True)
        time.sleep(600)
    """), stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert launcher.stdout.readline().strip() == "started"
        pid = RunDir(run_path).read_state()["processes"][0]["pid"]
        assert alive(pid)
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=30)
        assert wait_gone([pid]) == []
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
        launcher.stdout.close()


def test_run_dir_lock_is_exclusive_across_processes(tmp_path):
    run = RunDir(tmp_path / "run")
    holder = subprocess.Popen(child(f"""
        import sys, time
        from qkdsdn.launch import RunDir
        assert RunDir({str(run.path)!r}).try_lock()
        print("locked", flush=True)
        sys.stdin.readline()
    """), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run.locked_by_other() and not run.try_lock()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
        holder.stdout.close()
    assert not run.locked_by_other() and run.try_lock()
    run.unlock()


def test_relocation_moves_every_listener_and_refuses_remote_hosts(tmp_path):
    from db.netfile import load

    out = relocate_to_free_ports(EXAMPLES / "paper-poc.yaml", tmp_path / "net.yaml")
    original, moved = load(EXAMPLES / "paper-poc.yaml"), load(out)
    ports = [n.km_port for n in moved.nodes] + [moved.deployment.controller_port]
    for link in moved.links:
        ports += [int(a.rpartition(":")[2]) for a in moved.twin_addresses(link)]
    assert len(set(ports)) == len(ports) == 6 + 1 + 12
    assert not {n.km_port for n in original.nodes} & {n.km_port for n in moved.nodes}
    assert [n.qkdn_id for n in moved.nodes] == [n.qkdn_id for n in original.nodes]
    remote = yaml.safe_load((EXAMPLES / "paper-poc.yaml").read_text())
    remote["nodes"][0]["km_address"] = "10.1.2.3:8400"
    (tmp_path / "remote.yaml").write_text(yaml.safe_dump(remote))
    with pytest.raises(LaunchError, match="10.1.2.3"):
        relocate_to_free_ports(tmp_path / "remote.yaml", tmp_path / "x.yaml")


def test_listener_conflicts_name_the_busy_address(tmp_path):
    import socket

    from db.netfile import load

    net_file = relocate_to_free_ports(EXAMPLES / "paper-poc.yaml", tmp_path / "net.yaml")
    network = load(net_file)
    opts = UpOptions(network_file=net_file, run_dir=tmp_path / "run", controller=False)
    assert listener_conflicts(network, opts) == []
    node = network.node("KM3")
    with socket.socket() as s:
        s.bind((node.km_host, node.km_port))
        s.listen()
        assert listener_conflicts(network, opts) == [f"{node.km_address} (key manager KM3) is in use"]


# =============================================================================================
# qkdsdn up / status / down


def status_json(run_dir, cwd) -> tuple[int, dict]:
    r = qkdsdn("status", "--run-dir", str(run_dir), "--json", cwd=cwd)
    return r.returncode, json.loads(r.stdout)


def test_up_status_second_up_and_down_without_controller(tmp_path):
    net = renamed_copy(EXAMPLES / "paper-poc.yaml", tmp_path / "paper-poc.yaml")
    run_dir = tmp_path / "run"
    up = UpProcess([str(net), "--no-controller", "--free-ports"], tmp_path, run_dir)
    try:
        state = up.wait_running()
        assert state["mode"] == "local" and state["tls"] and (run_dir / "pki" / "ca.pem").is_file()
        names = [p["name"] for p in state["processes"]]
        assert names == ["twin"] + [f"agent-KM{i}" for i in range(6)]
        assert all((run_dir / "logs" / f"{n}.log").is_file() for n in names)
        moved = run_dir / "network.yaml"
        wait_pools(run_dir, moved)
        make = clients(moved, state)
        exchange_keys(make, "SAE-KM2", "SAE-KM3")  # relayed through KM0
        exchange_keys(make, "SAE-KM4", "SAE-KM5")  # adjacent

        rc, status = status_json(run_dir, tmp_path)
        assert rc == 0 and status["running"] and all(p["alive"] for p in status["processes"])
        assert [n["status"] for n in status["nodes"]] == ["OPERATING"] * 6
        links = {link["link"]: link for link in status["links"]}
        assert set(links) == {"L01", "L02", "L03", "L04", "L05", "L45"}
        assert links["L02"]["qber"] == pytest.approx(0.02)
        assert all(v is not None and v > 0 for v in links["L02"]["pool_bits"])
        table = qkdsdn("status", "--run-dir", str(run_dir), cwd=tmp_path)
        assert table.returncode == 0 and "OPERATING" in table.stdout and "L45" in table.stdout

        again = qkdsdn("up", str(net), "--no-controller", "--free-ports", "--run-dir", str(run_dir), cwd=tmp_path)
        assert again.returncode == 2 and "already running" in again.stderr
        assert up.state()["launcher_pid"] == up.proc.pid  # the second up started nothing
        pids = up.pids()

        down = qkdsdn("down", "--run-dir", str(run_dir), cwd=tmp_path)
        assert down.returncode == 0 and "stopped" in down.stdout
        assert up.proc.wait(timeout=60) == 0
        assert wait_gone(pids) == []
        rc, status = status_json(run_dir, tmp_path)
        assert rc == 1 and not status["running"] and not any(p["alive"] for p in status["processes"])
        assert "agent-KM0: stopped" in up.output()
    finally:
        up.stop()


def test_ctrl_c_stops_every_process(tmp_path):
    net = renamed_copy(EXAMPLES / "linear-5.yaml", tmp_path / "linear-5.yaml")
    run_dir = tmp_path / "run"
    up = UpProcess([str(net), "--no-controller", "--free-ports", "--insecure-dev"], tmp_path, run_dir)
    try:
        state = up.wait_running()
        assert not state["tls"] and len(state["processes"]) == 7
        wait_pools(run_dir, run_dir / "network.yaml")
        exchange_keys(clients(run_dir / "network.yaml", state), "SAE-N0", "SAE-N5")  # four trusted nodes
        pids = up.pids()
        os.kill(up.proc.pid, signal.SIGINT)
        assert up.proc.wait(timeout=60) == 0
        assert wait_gone(pids) == []
        assert RunDir(run_dir).read_state()["status"] == "stopped"
    finally:
        up.stop()


def test_a_killed_up_leaves_nothing_and_the_network_starts_again(tmp_path):
    net = renamed_copy(EXAMPLES / "linear-5.yaml", tmp_path / "linear-5.yaml")
    run_dir = tmp_path / "run"
    up = UpProcess([str(net), "--no-controller", "--free-ports", "--insecure-dev"], tmp_path, run_dir)
    try:
        up.wait_running()
        pids = up.pids()
        os.kill(up.proc.pid, signal.SIGKILL)
        up.proc.wait(timeout=30)
        assert wait_gone(pids) == []
        r = qkdsdn("down", "--run-dir", str(run_dir), cwd=tmp_path)
        assert r.returncode == 0 and "is not running" in r.stdout
    finally:
        up.stop()
    second = UpProcess([str(net), "--no-controller", "--free-ports", "--insecure-dev"], tmp_path, run_dir)
    try:
        second.wait_running()
        assert qkdsdn("down", "--run-dir", str(run_dir), cwd=tmp_path).returncode == 0
        assert second.proc.wait(timeout=60) == 0
    finally:
        second.stop()


def test_down_and_status_locate_the_network_by_its_file(tmp_path):
    net = renamed_copy(EXAMPLES / "linear-5.yaml", tmp_path / "linear-5.yaml", name="locate-me")
    up = UpProcess([str(net), "--no-controller", "--free-ports", "--insecure-dev"], tmp_path,
                   tmp_path / "run" / "locate-me", pass_run_dir=False)
    try:
        up.wait_running()
        assert qkdsdn("status", str(net), cwd=tmp_path).returncode == 0
        assert qkdsdn("status", cwd=tmp_path).returncode == 0  # the only running network under ./run
        assert qkdsdn("down", cwd=tmp_path).returncode == 0
        assert up.proc.wait(timeout=60) == 0
        r = qkdsdn("status", cwd=tmp_path)
        assert r.returncode == 2 and "no running network under ./run" in r.stderr
    finally:
        up.stop()


def test_up_refuses_contradicting_options(tmp_path):
    r = qkdsdn("up", str(EXAMPLES / "paper-poc.yaml"), "--no-controller", "--bus", "mqtt://127.0.0.1:1883",
               cwd=tmp_path)
    assert r.returncode == 2 and "--no-controller has neither" in r.stderr
    r = qkdsdn("up", str(EXAMPLES / "paper-poc.yaml"), "--bus", "http://x", cwd=tmp_path)
    assert r.returncode == 2 and ("expected mqtt://" in r.stderr or NO_CONTROLLER in r.stderr)
    assert not (tmp_path / "run").exists()


# =============================================================================================
# controller mode: embedded broker + SQLite, or Mosquitto + PostgreSQL


@pytest.fixture
def pg_schema_url():
    if not POSTGRES_URL:
        pytest.skip("QKDSDN_TEST_POSTGRES_URL is not set: PostgreSQL runs skipped (.ci/run sets it)")
    from sqlalchemy import text

    from db.database import make_engine

    schema = f"qkdsdn_up_{uuid.uuid4().hex[:12]}"
    admin = make_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in POSTGRES_URL else "?"
    try:
        yield f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


PAIRS = {"paper-poc": [("SAE-KM2", "SAE-KM3"), ("SAE-KM0", "SAE-KM1")], "linear-5": [("SAE-N0", "SAE-N5")]}


def run_controller_mode(tmp_path, example: str, extra: list[str]) -> dict:
    net = renamed_copy(EXAMPLES / f"{example}.yaml", tmp_path / f"{example}.yaml")
    run_dir = tmp_path / "run"
    up = UpProcess([str(net), "--free-ports", *extra], tmp_path, run_dir)
    try:
        state = up.wait_running()
        wait_pools(run_dir, run_dir / "network.yaml")
        make = clients(run_dir / "network.yaml", state)
        for src, dst in PAIRS[example]:
            exchange_keys(make, src, dst)
        rc, status = status_json(run_dir, tmp_path)
        assert rc == 0 and all(p["alive"] for p in status["processes"])
        pids = up.pids()
        assert qkdsdn("down", "--run-dir", str(run_dir), cwd=tmp_path).returncode == 0
        assert up.proc.wait(timeout=90) == 0
        assert wait_gone(pids) == []
        return state
    finally:
        up.stop()


@needs_controller
@pytest.mark.parametrize("example", ["paper-poc", "linear-5"])
def test_controller_mode_on_the_embedded_defaults(tmp_path, example):
    state = run_controller_mode(tmp_path, example, [])
    names = [p["name"] for p in state["processes"]]
    assert names[:2] == ["broker", "twin"] and names[-1] == "controller" and len(names) == 3 + 6
    assert state["bus_kind"] == "embedded" and state["db"].startswith("sqlite:///")


@needs_controller
@pytest.mark.skipif(not MQTT_URL, reason="QKDSDN_TEST_MQTT_URL is not set: no Mosquitto to run against")
@pytest.mark.parametrize("example", ["paper-poc", "linear-5"])
def test_controller_mode_on_mosquitto_and_postgresql(tmp_path, example, pg_schema_url):
    state = run_controller_mode(tmp_path, example, ["--bus", MQTT_URL, "--db", pg_schema_url])
    names = [p["name"] for p in state["processes"]]
    assert "broker" not in names and names[0] == "twin" and names[-1] == "controller"
    assert state["bus"] == MQTT_URL and state["bus_kind"] == "external" and state["db"] == pg_schema_url


# =============================================================================================
# docs/deploy.md: the Mosquitto configuration it gives, run as written


def deploy_block(name: str) -> str:
    """The fenced block after ``<!-- deploy-test: NAME -->`` in docs/deploy.md."""
    text = (EXAMPLES.parent / "docs" / "deploy.md").read_text()
    marker = f"<!-- deploy-test: {name} -->"
    assert marker in text, marker
    after = text[text.index(marker) + len(marker):]
    start = after.index("```")
    body_start = after.index("\n", start) + 1
    return after[body_start:after.index("```", body_start)]


@pytest.mark.skipif(shutil.which("mosquitto") is None or shutil.which("openssl") is None,
                    reason="mosquitto or openssl is not installed")
def test_deploy_doc_mosquitto_has_mutual_tls_and_per_node_acl(tmp_path):
    import time

    from db.netfile import load
    from qkdsdn.bus import BusError, make_bus
    from qkdsdn.launch import stop_processes
    from qkdsdn.pki import PkiLayout, init_pki

    init_pki(load(EXAMPLES / "paper-poc.yaml"), tmp_path / "pki")
    layout = PkiLayout(tmp_path / "pki")
    script = deploy_block("broker-cert").replace('SAN="DNS:mqtt.example.net"', 'SAN="IP:127.0.0.1"')
    assert 'SAN="IP:127.0.0.1"' in script
    subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, check=True, capture_output=True)
    port = free_ports(1)[0]
    (tmp_path / "mq").mkdir()
    conf = (deploy_block("mosquitto-conf")
            .replace("/etc/mosquitto/qkdsdn/acl", str(tmp_path / "acl"))
            .replace("/etc/mosquitto/qkdsdn/", str(tmp_path / "pki") + "/")
            .replace("/var/lib/mosquitto/", str(tmp_path / "mq") + "/")
            .replace("listener 8883", f"listener {port} 127.0.0.1"))
    if os.geteuid() == 0:  # mosquitto started by root drops to user "mosquitto", who cannot read tmp_path
        conf = "user root\n" + conf
    (tmp_path / "mosquitto.conf").write_text(conf)
    (tmp_path / "acl").write_text(deploy_block("mosquitto-acl"))
    launcher = Launcher(RunDir(tmp_path / "run"), grace_s=10)
    buses = []
    url = f"mqtts://127.0.0.1:{port}"

    def connect(client_id, party):
        cert, key = party
        bus = make_bus(url, client_id, tls=(str(layout.ca_cert), str(cert), str(key)))
        buses.append(bus)
        assert bus.wait_connected(10), client_id
        return bus

    try:
        launcher.start([ProcessSpec("mosquitto", "broker", ["mosquitto", "-c", str(tmp_path / "mosquitto.conf")],
                                    probe=TCPProbe("127.0.0.1", port))])
        controller = connect("paper-poc-controller", layout.controller())
        km0 = connect("paper-poc-agent-KM0", layout.node("KM0"))
        km1 = connect("paper-poc-agent-KM1", layout.node("KM1"))
        got: dict[str, list] = {"km0": [], "km1": [], "km1-spy": [], "replies": []}
        km0.subscribe("qkdsdn/paper-poc/km/KM0/config", lambda t, p: got["km0"].append(p["n"]))
        km1.subscribe("qkdsdn/paper-poc/km/KM1/config", lambda t, p: got["km1"].append(p["n"]))
        try:  # KM1 may not read KM0's configuration: refused at subscribe, or never delivered
            km1.subscribe("qkdsdn/paper-poc/km/KM0/config", lambda t, p: got["km1-spy"].append(p["n"]))
        except BusError:
            pass
        controller.subscribe("qkdsdn/paper-poc/km/+/reply", lambda t, p: got["replies"].append((t, p["n"])))
        controller.publish("qkdsdn/paper-poc/km/KM0/config", {"n": 1})
        controller.publish("qkdsdn/paper-poc/km/KM1/config", {"n": 2})
        km0.publish("qkdsdn/paper-poc/km/KM1/reply", {"n": 3})  # impersonating KM1: dropped by the broker
        km0.publish("qkdsdn/paper-poc/km/KM0/reply", {"n": 4})
        for bus in (controller, km0):
            assert bus.flush(10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (got["km0"] and got["km1"] and got["replies"]):
            time.sleep(0.05)
        # Each barrier message came after the forbidden one from the same publisher: had the
        # forbidden one been delivered, it would have arrived first.
        assert got["km0"] == [1] and got["km1"] == [2] and got["km1-spy"] == []
        assert got["replies"] == [("qkdsdn/paper-poc/km/KM0/reply", 4)]
        # without a client certificate of the network's CA there is no connection at all
        anonymous = make_bus(url, "paper-poc-nobody", tls=(str(layout.ca_cert), None, None))
        buses.append(anonymous)
        assert not anonymous.wait_connected(3)
    finally:
        for bus in buses:
            bus.close()
        stop_processes(launcher.processes, grace_s=10)
        launcher.stop()
