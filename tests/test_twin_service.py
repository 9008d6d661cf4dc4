"""The twin service (all links, admin API) and the `qkdsdn twin` command, in-process and as a process."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from db import netfile
from qkdsdn.cli import build_parser, main
from qkdsdn.httpserver import https_session
from qkdsdn.twin.service import TwinService, apply_fault

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


@pytest.fixture(scope="module")
def network():
    return netfile.load(EXAMPLES / "paper-poc.yaml")


@pytest.fixture(scope="module")
def twin(network, pki_dir):
    clock = FakeClock()
    service = TwinService(network, pki=pki_dir, ephemeral_ports=True, clock=clock, threads_per_kme=2)
    service.clock = clock
    with service:
        yield service


@pytest.fixture
def operator(pki_dir):
    cert, key = pki_dir.operator()
    with https_session(cert, key, pki_dir.ca_cert) as s:
        yield s


def test_every_emulated_link_served_on_its_own_pair_of_servers(twin, network):
    assert sorted(twin.links) == sorted(link.name for link in network.links)
    urls = [u for name in twin.links for u in twin.urls(name)]
    assert len(set(urls)) == len(urls) and all(u.startswith("https://127.0.0.1:") for u in urls)


def test_admin_lists_links_and_applies_faults(twin, operator):
    twin.clock.t += 2.0
    links = operator.get(f"{twin.admin_url}/links", timeout=5).json()["links"]
    view = {v["name"]: v for v in links}["L01"]
    assert view["state"] == "up" and view["qber"] == pytest.approx(0.02)
    assert view["model_skr_bps"] == pytest.approx(200_000)
    assert view["available_bits"] > 0 and view["buffer_bits"] == 1 << 26

    r = operator.post(f"{twin.admin_url}/links/L01/fault", json={"action": "eve", "fraction": 0.2}, timeout=5)
    assert r.status_code == 200 and r.json()["qber"] == pytest.approx(0.07)
    r = operator.post(f"{twin.admin_url}/links/L01/fault", json={"action": "cut"}, timeout=5)
    assert r.json()["state"] == "cut"
    r = operator.post(f"{twin.admin_url}/links/L01/fault",
                      json={"action": "drift", "qber_per_s": 0.01, "max_qber": 0.2}, timeout=5)
    assert r.json()["drift_qber_per_s"] == 0.01
    r = operator.post(f"{twin.admin_url}/links/L01/fault", json={"action": "restore"}, timeout=5)
    assert r.json()["state"] == "up" and r.json()["eve_fraction"] == 0.0
    assert operator.get(f"{twin.admin_url}/links/L01", timeout=5).json()["qber"] == pytest.approx(0.02)


@pytest.mark.parametrize("body,status,message", [
    ({"action": "melt"}, 400, "action must be one of"),
    ({"action": "eve"}, 400, "'fraction' must be a number"),
    ({"action": "eve", "fraction": 2}, 400, "must lie in [0, 1]"),
    ({"action": "cut", "fraction": 0.1}, 400, "unknown item(s) for action 'cut'"),
    ({"action": "drift", "qber_per_s": "fast"}, 400, "'qber_per_s' must be a number"),
    ([1], 400, "JSON object"),
])
def test_admin_rejects_bad_faults(twin, operator, body, status, message):
    r = operator.post(f"{twin.admin_url}/links/L02/fault", json=body, timeout=5)
    assert r.status_code == status and message in r.json()["message"]
    assert twin.engine("L02").status().state == "up"


def test_admin_unknown_link_and_operator_only(twin, operator, pki_dir):
    r = operator.get(f"{twin.admin_url}/links/L99", timeout=5)
    assert r.status_code == 404 and "L99" in r.json()["message"]
    for cert, key in (pki_dir.node("KM0"), pki_dir.app("SAE-KM0"), pki_dir.controller()):
        with https_session(cert, key, pki_dir.ca_cert) as s:
            r = s.post(f"{twin.admin_url}/links/L02/fault", json={"action": "cut"}, timeout=5)
            assert r.status_code == 403
    assert twin.engine("L02").status().state == "up"


def test_cli_fault_and_status_against_running_twin(twin, pki_dir, capsys):
    base = ["--network", str(EXAMPLES / "paper-poc.yaml"), "--pki", str(pki_dir.out_dir),
            "--admin-port", str(twin.admin.port)]
    assert main(["twin", "fault", "L45", "eve", "0.4", *base]) == 0
    out = capsys.readouterr().out
    assert "L45" in out and "aborted" in out and "12.00 %" in out and "eve 0.4" in out
    assert main(["twin", "fault", "L45", "drift", "0.001", "--max-qber", "0.15", *base]) == 0
    assert "drift 0.001/s max 0.15" in capsys.readouterr().out
    assert main(["twin", "fault", "L45", "restore", *base]) == 0
    assert twin.engine("L45").status().state == "up"
    assert main(["twin", "status", str(EXAMPLES / "paper-poc.yaml"), "--pki", str(pki_dir.out_dir),
                 "--admin-port", str(twin.admin.port)]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("L01", "L02", "L03", "L04", "L05", "L45"))
    # User errors: exit status 2 with a message, no traceback.
    assert main(["twin", "fault", "L99", "cut", *base]) == 2
    assert "no emulated link named 'L99'" in capsys.readouterr().err
    assert main(["twin", "fault", "L45", "eve", *base]) == 2
    assert "needs a VALUE" in capsys.readouterr().err
    assert main(["twin", "fault", "L45", "cut", "--max-qber", "0.2", *base]) == 2
    assert main(["twin", "fault", "L45", "cut", "--network", str(EXAMPLES / "paper-poc.yaml")]) == 2
    assert "--pki" in capsys.readouterr().err


def test_cli_fault_when_no_twin_runs(pki_dir, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = main(["twin", "fault", "L01", "cut", "--network", str(EXAMPLES / "paper-poc.yaml"),
               "--pki", str(pki_dir.out_dir), "--admin-port", str(port)])
    assert rc == 2 and "cannot reach the twin's admin API" in capsys.readouterr().err


def test_apply_fault_drives_the_engine(twin):
    engine = twin.engine("L04")
    apply_fault(engine, {"action": "eve", "fraction": 1.0})
    assert engine.status().qber == pytest.approx(0.27)
    apply_fault(engine, {"action": "restore"})
    assert engine.status().qber == pytest.approx(0.02)


def test_insecure_dev_service_uses_the_dev_header(network):
    clock = FakeClock()
    with TwinService(network, insecure_dev=True, ephemeral_ports=True, clock=clock, threads_per_kme=1) as svc:
        clock.t = 1.0
        master, slave = svc.urls("L05")
        assert master.startswith("http://127.0.0.1:")
        with requests.Session() as s:
            s.trust_env = False
            r = s.get(f"{master}/api/v1/keys/KM5/enc_keys?number=2", headers={"X-Qkdsdn-Dev-SAE-ID": "KM0"},
                      timeout=5)
            assert r.status_code == 200
            ids = [k["key_ID"] for k in r.json()["keys"]]
            assert s.get(f"{master}/api/v1/keys/KM5/status", timeout=5).status_code == 401
            r = s.post(f"{slave}/api/v1/keys/KM0/dec_keys", json={"key_IDs": [{"key_ID": i} for i in ids]},
                       headers={"X-Qkdsdn-Dev-SAE-ID": "KM5"}, timeout=5)
            assert r.status_code == 200 and len(r.json()["keys"]) == 2
            r = s.post(f"{svc.admin_url}/links/L05/fault", json={"action": "cut"}, timeout=5)
            assert r.status_code == 200 and r.json()["state"] == "cut"


def test_service_argument_checks(network, pki_dir):
    with pytest.raises(ValueError, match="PKI folder"):
        TwinService(network)
    with pytest.raises(ValueError, match="not both"):
        TwinService(network, pki=pki_dir, insecure_dev=True)


# ----------------------------------------------------------------------------- CLI


def test_cli_rates_in_process(capsys):
    assert main(["twin", "rates", str(EXAMPLES / "linear-5.yaml")]) == 0
    out = capsys.readouterr().out
    from qkdsdn.twin.physics import rates_table

    table = rates_table(netfile.load(EXAMPLES / "linear-5.yaml"))
    assert "network linear-5" in out and table in out
    assert "N0-N1" in table and "decoy-bb84" in table


def test_cli_plot_in_process(tmp_path, capsys):
    out = tmp_path / "skr.png"
    assert main(["twin", "plot", str(EXAMPLES / "linear-5.yaml"), "-o", str(out), "--max-km", "150"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {out}" in capsys.readouterr().out
    assert main(["twin", "plot", str(EXAMPLES / "linear-5.yaml"), "-o", str(tmp_path / "no" / "x.png")]) == 2


def test_cli_bad_network_file_is_a_user_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("network: {name: x}\nnodes: []\nfoo: 1\n")
    assert main(["twin", "rates", str(bad)]) == 2
    assert "bad.yaml" in capsys.readouterr().err


def test_first_argument_that_is_a_file_means_serve():
    parser = build_parser()
    for argv in (["twin", "net.yaml", "--insecure-dev"], ["twin", "serve", "net.yaml", "--insecure-dev"],
                 ["twin", "--insecure-dev", "net.yaml"]):
        args = parser.parse_args(argv)
        assert args.twin_command == "serve" and args.network == "net.yaml" and args.insecure_dev
    args = parser.parse_args(["twin", "rates", "net.yaml"])
    assert args.twin_command == "rates"
    with pytest.raises(SystemExit):
        parser.parse_args(["twin", "net.yaml", "--pki", "p", "--insecure-dev"])


def _free_port_run(count: int) -> int:
    """A port p such that p .. p+count-1 are free on 127.0.0.1 now."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count >= 65000:
            continue
        socks = []
        try:
            for p in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no run of free ports")


def test_cli_serve_as_a_process(tmp_path):
    # One link: ports admin = base - 1, master = base, slave = base + 1.
    base = _free_port_run(3) + 1
    net = tmp_path / "one.yaml"
    net.write_text(f"""
network: {{name: one}}
nodes:
  - {{name: A, km_address: "127.0.0.1:8600"}}
  - {{name: B, km_address: "127.0.0.1:8601"}}
links:
  - {{name: AB, ends: [A, B], length_km: 5, device: {{model: fixed, skr_bps: 100000, qber: 0.01}}}}
deployment: {{twin_host: 127.0.0.1, twin_base_port: {base}}}
""")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from qkdsdn.cli import main; sys.exit(main())",
                             "twin", str(net), "--insecure-dev", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("serving"):
                break
        banner = "".join(lines)
        assert f"http://127.0.0.1:{base}" in banner and f"http://127.0.0.1:{base + 1}" in banner
        assert f"http://127.0.0.1:{base - 1}" in banner
        with requests.Session() as s:
            s.trust_env = False
            r = s.get(f"http://127.0.0.1:{base}/api/v1/keys/B/status", headers={"X-Qkdsdn-Dev-SAE-ID": "A"},
                      timeout=5)
            assert r.status_code == 200 and r.json()["slave_SAE_ID"] == "B"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
