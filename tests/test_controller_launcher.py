"""controller.launcher and 'qkdsdn controller': start, stop, discovery of real agents, the command."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from sqlalchemy import select

from agent_harness import Network, free_ports
from controller.apps.base import ROUTING, SDN_CONTROLLER
from controller.apps.context import ControllerConfig, ControllerContext
from controller.launcher import APP_MODULES, Controller, ControllerOptions
from db import models as dbm
from db.netfile import load
from dbutil import db_url  # noqa: F401 - fixture
from test_controller_apps import FAST, WAIT, network_file, wait_for

REPO = Path(__file__).resolve().parents[1]


def controller_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t is not threading.main_thread()}


def test_start_and_stop_leave_nothing_behind(tmp_path, db_url):  # noqa: F811
    from os_ken.base import app_manager

    path = network_file(tmp_path)
    net = load(path)
    before = controller_threads()
    for run in range(2):  # a second controller in the same process after the first one stopped
        controller = Controller(ControllerOptions(
            network=path, db_url=db_url, bus_url="local", insecure_dev=True,
            rest=(net.deployment.controller_host, net.deployment.controller_port), config=FAST))
        with controller:
            assert sorted(controller.manager.applications) == [
                "AccessControlApp", "AdmissionControlApp", "MonitoringApp", "RestApiApp", "RoutingApp",
                "SDNControllerApp"]
            health = controller.health()
            assert all(h["status"] == "ok" for h in health.values()), health
            assert requests.get(f"{controller.rest_url}/api/v1/health", timeout=WAIT).json()["checks"][
                "RoutingApp"]["status"] == "ok"
            # No node answers here: every one is down, every link off, in the database too.
            wait_for(lambda: set(controller.health()[SDN_CONTROLLER]["nodes"].values()) == {"down"},
                     "every node down")
            with controller.services.session_factory() as s:
                assert controller.load_result.action == ("created" if run == 0 else "unchanged")
                wait_for(lambda: {st for st in s.scalars(select(dbm.Link.status)
                                                         .execution_options(populate_existing=True))}
                         == {dbm.LinkStatus.OFF}, "every link off in the database")
        assert not controller.running
        assert app_manager.SERVICE_BRICKS == {} and ControllerContext.installed() is None
        left = controller_threads() - before
        assert not left, f"threads left running: {sorted(t.name for t in left)}"
        controller.stop()  # idempotent


def test_a_failed_start_stops_what_it_started(tmp_path):
    from os_ken.base import app_manager

    path = network_file(tmp_path)
    net = load(path)
    before = controller_threads()
    with socket.socket() as taken:
        taken.bind((net.deployment.controller_host, 0))
        taken.listen()
        port = taken.getsockname()[1]
        controller = Controller(ControllerOptions(network=path, db_url=f"sqlite:///{tmp_path / 'c.db'}",
                                                  bus_url="local", insecure_dev=True,
                                                  rest=(net.deployment.controller_host, port), config=FAST))
        with pytest.raises(OSError):
            controller.start()
    assert not controller.running and app_manager.SERVICE_BRICKS == {}
    assert ControllerContext.installed() is None
    assert not controller_threads() - before
    # The bus client id is free again: the next controller of the network starts.
    with Controller(ControllerOptions(network=path, db_url=f"sqlite:///{tmp_path / 'c.db'}", bus_url="local",
                                      insecure_dev=True, config=FAST)) as again:
        assert again.running


def test_a_different_network_needs_replace(tmp_path):
    from db.bootstrap import BootstrapError

    db = f"sqlite:///{tmp_path / 'c.db'}"
    first = tmp_path / "a"
    first.mkdir()
    second = tmp_path / "b"
    second.mkdir()
    with Controller(ControllerOptions(network=network_file(first), db_url=db, bus_url="local", insecure_dev=True,
                                      config=FAST)):
        pass
    other = network_file(second)
    with pytest.raises(BootstrapError):
        Controller(ControllerOptions(network=other, db_url=db, bus_url="local", insecure_dev=True,
                                     config=FAST)).start()
    assert ControllerContext.installed() is None
    with Controller(ControllerOptions(network=other, db_url=db, bus_url="local", insecure_dev=True, replace=True,
                                      config=FAST)) as c:
        assert c.load_result.action == "replaced"


def imported_modules(path: Path) -> set[str]:
    import ast

    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_apps_are_plain_shells():
    """os_ken is imported by the app shells and the launcher only, never by the decision classes;
    nothing under controller/ imports agents."""
    for module in ("access", "admission", "routing", "monitoring", "topology", "bus_adapter"):
        imports = imported_modules(REPO / "controller" / f"{module}.py")
        assert not any(name.split(".")[0] == "os_ken" for name in imports), module
    for path in (REPO / "controller").rglob("*.py"):
        assert not any(name.split(".")[0] == "agents" for name in imported_modules(path)), path
    assert len(APP_MODULES) == 5


def test_rest_api_over_mutual_tls(tmp_path):
    from qkdsdn.httpserver import https_session
    from qkdsdn.pki import PkiLayout, hash_token, init_pki

    path = network_file(tmp_path)
    net = load(path)
    init_pki(net, tmp_path / "pki")
    pki = PkiLayout(tmp_path / "pki")
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"read {hash_token('reader-token-0123456789', iterations=1000)} dashboard\n")
    d = net.deployment
    with Controller(ControllerOptions(network=path, db_url=f"sqlite:///{tmp_path / 'c.db'}", bus_url="local",
                                      pki=pki, rest=(d.controller_host, d.controller_port),
                                      tokens_file=str(tokens), config=FAST)) as controller:
        url = controller.rest_url
        assert url == f"https://{d.controller_host}:{d.controller_port}"
        # An operator certificate is an admin; a bearer token works without a client certificate.
        with https_session(*pki.operator(), pki.ca_cert) as operator:
            nodes = operator.get(f"{url}/api/v1/nodes", timeout=WAIT)
            assert nodes.status_code == 200 and len(nodes.json()["items"]) == len(net.nodes)
        with https_session(None, None, pki.ca_cert) as anonymous:
            assert anonymous.get(f"{url}/api/v1/nodes", timeout=WAIT).status_code == 401
            reader = anonymous.get(f"{url}/metrics", timeout=WAIT,
                                   headers={"Authorization": "Bearer reader-token-0123456789"})
            assert reader.status_code == 200 and "qkdsdn_monitoring_links" in reader.text
        # An application's certificate is no operator's.
        with https_session(*pki.app("SAE-KM2"), pki.ca_cert) as app:
            assert app.get(f"{url}/api/v1/nodes", timeout=WAIT).status_code == 403
        # Plain HTTP reaches no API.
        try:
            plain = requests.get(f"http://{d.controller_host}:{d.controller_port}/api/v1/health", timeout=WAIT)
        except requests.exceptions.ConnectionError:
            pass
        else:
            assert plain.status_code == 400 and "checks" not in plain.text


# --------------------------------------------------------------------------- discovery of real agents


@pytest.mark.parametrize("tls", [False, True], ids=["insecure-dev", "tls"])
def test_discovery_of_running_agents(tmp_path, tls):
    path = network_file(tmp_path)
    with Network(path, tmp_path / "state", tls=tls, nodes=["KM0", "KM1"]) as network:
        controller = Controller(ControllerOptions(
            network=path, db_url=f"sqlite:///{tmp_path / 'c.db'}", bus_url="local", insecure_dev=not tls,
            pki=network.pki, config=FAST))
        with controller:
            factory = controller.services.session_factory

            def nodes():
                with factory() as s:
                    return {n.name: n for n in s.scalars(select(dbm.Node))}

            def links():
                with factory() as s:
                    return {l.name: l for l in s.scalars(select(dbm.Link))}

            wait_for(lambda: all(nodes()[n].status is dbm.NodeStatus.OPERATING for n in ("KM0", "KM1")),
                     "KM0 and KM1 operating")
            found = nodes()
            assert found["KM0"].version.startswith("qkdsdn") and found["KM0"].last_seen is not None
            wait_for(lambda: {nodes()[n].status for n in ("KM2", "KM3", "KM4", "KM5")} == {dbm.NodeStatus.DOWN},
                     "the nodes without an agent down")
            with factory() as s:
                interfaces = s.scalars(select(dbm.Interface).join(dbm.Node).where(dbm.Node.name == "KM0")).all()
                assert {i.status for i in interfaces} == {"ENABLED"} and len(interfaces) == 5
            # The link between the two running agents comes up once key flows on it.
            wait_for(lambda: links()["L01"].status is dbm.LinkStatus.ACTIVE and (links()["L01"].skr_bps or 0) > 0,
                     "L01 active with its key rate", timeout=40)
            assert {l.status for name, l in links().items() if name != "L01"} == {dbm.LinkStatus.OFF}
            wait_for(lambda: controller.health()[ROUTING]["routable_links"] == 1, "L01 routable")
            with factory() as s:
                l01 = s.scalar(select(dbm.Link.id).where(dbm.Link.name == "L01"))
                wait_for(lambda: s.scalar(select(dbm.LinkSample).where(dbm.LinkSample.link_id == l01)),
                         "a sample of L01")

            network.stop_agent("KM1")
            wait_for(lambda: nodes()["KM1"].status is dbm.NodeStatus.DOWN, "KM1 down")
            wait_for(lambda: links()["L01"].status is dbm.LinkStatus.OFF, "L01 off")
            wait_for(lambda: controller.health()[ROUTING]["routable_links"] == 0, "nothing routable")


# --------------------------------------------------------------------------- the command


# The console script's entry point ('python -m qkdsdn.cli' would run a second copy of the module).
CLI = [sys.executable, "-c", "import sys; from qkdsdn.cli import main; sys.exit(main())"]


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_command_help():
    out = run_cli("controller", "--help")
    assert out.returncode == 0
    for words in ("NETWORK.yaml", "--db", "--bus", "--pki", "--insecure-dev", "--rest", "--tokens", "SIGTERM"):
        assert words in out.stdout
    assert "controller" in run_cli("--help").stdout


def test_command_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("network: {name: x}\nnodes: []\nlinks: []\nusers: []\napplications: []\nsurprise: 1\n")
    out = run_cli("controller", str(bad), "--insecure-dev", "--db", f"sqlite:///{tmp_path / 'c.db'}")
    assert out.returncode == 2 and "surprise" in out.stderr
    path = network_file(tmp_path)
    out = run_cli("controller", str(path), "--insecure-dev", "--rest", "nowhere")
    assert out.returncode == 2 and "HOST:PORT" in out.stderr
    out = run_cli("controller", str(path))
    assert out.returncode == 2 and "--pki" in out.stderr
    out = run_cli("controller", str(path), "--insecure-dev", "--discovery-interval", "60")
    assert out.returncode == 2 and "silence timeout" in out.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_command_runs_until_signalled(tmp_path, sig):
    path = network_file(tmp_path)
    port = free_ports(1)[0]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([*CLI, "controller", str(path), "--insecure-dev",
                             "--bus", "local", "--db", f"sqlite:///{tmp_path / 'c.db'}", "--rest",
                             f"127.0.0.1:{port}", "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    try:
        line = proc.stdout.readline()
        assert "running" in line and f"127.0.0.1:{port}" in line, (line, proc.stderr.read() if proc.poll() else "")
        health = requests.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=WAIT)
        assert health.json()["checks"]["SDNControllerApp"]["status"] == "ok"
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))  # nobody listens on the REST port any more
        s.listen()
