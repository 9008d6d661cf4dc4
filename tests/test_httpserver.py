"""qkdsdn.httpserver: mutual TLS in front of a WSGI app, the development mode, the life cycle."""
from __future__ import annotations

import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import requests
from flask import Flask, jsonify, request

from db import netfile
from qkdsdn import httpserver as hs
from qkdsdn import pki

REPO = Path(__file__).resolve().parent.parent
# Bounds a broken server's hang; never reached by a working one.
HANG_GUARD = 60


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory):
    """A second, unrelated CA with the same party names."""
    out = tmp_path_factory.mktemp("other-pki")
    pki.init_pki(netfile.load(REPO / "examples" / "paper-poc.yaml"), out)
    return pki.PkiLayout(out)


@pytest.fixture
def app():
    flask_app = Flask("whoami")
    flask_app.calls = 0

    @flask_app.get("/whoami")
    def whoami():
        flask_app.calls += 1
        cert = hs.peer_certificate(request.environ)
        return jsonify(sae_id=hs.peer_sae_id(request.environ), fingerprint=hs.peer_fingerprint(request.environ),
                       kind=pki.certificate_kind(cert) if cert is not None else None, scheme=request.scheme)

    return flask_app


@pytest.fixture
def km0(app, pki_dir):
    """KM0's server, requiring client certificates from the test CA."""
    with hs.HTTPServer(app, "127.0.0.1", 0, tls=hs.TLSConfig.for_node(pki_dir, "KM0"), name="km0") as server:
        yield server


def _client(layout: pki.PkiLayout, sae_id: str | None, ca: pki.PkiLayout | None = None) -> requests.Session:
    cert, key = layout.app(sae_id) if sae_id else (None, None)
    return hs.https_session(cert, key, (ca or layout).ca_cert)


# --------------------------------------------------------------------------- mutual TLS


def test_app_certificate_is_accepted_and_identifies_the_sae(km0, app, pki_dir):
    assert km0.url == f"https://127.0.0.1:{km0.port}" and km0.port > 0
    with _client(pki_dir, "SAE-KM1") as session:
        for _ in range(2):  # the identity holds for every request of a kept-alive connection
            r = session.get(f"{km0.url}/whoami", timeout=HANG_GUARD)
            assert r.status_code == 200
            assert r.json() == {"sae_id": "SAE-KM1", "fingerprint": pki.fingerprint(pki_dir.app("SAE-KM1")[0]),
                                "kind": "application", "scheme": "https"}
    assert app.calls == 2


def test_each_connection_sees_its_own_client(km0, pki_dir):
    with _client(pki_dir, "SAE-KM2") as a, _client(pki_dir, "SAE-KM3") as b:
        for _ in range(3):
            assert a.get(f"{km0.url}/whoami", timeout=HANG_GUARD).json()["sae_id"] == "SAE-KM2"
            assert b.get(f"{km0.url}/whoami", timeout=HANG_GUARD).json()["sae_id"] == "SAE-KM3"
    # A key manager's certificate identifies a node, not an application.
    with hs.https_session(*pki_dir.node("KM1"), pki_dir.ca_cert) as node_client:
        assert node_client.get(f"{km0.url}/whoami", timeout=HANG_GUARD).json()["kind"] == "node"


def test_client_without_certificate_fails_the_handshake(km0, app, pki_dir, caplog):
    caplog.set_level(logging.WARNING, logger="qkdsdn.http")
    with _client(pki_dir, None) as session, pytest.raises(requests.exceptions.ConnectionError):
        session.get(f"{km0.url}/whoami", timeout=HANG_GUARD)
    assert app.calls == 0
    # Also at the TLS level, without requests in between.
    ctx = hs.client_ssl_context(None, None, pki_dir.ca_cert)
    with socket.create_connection(("127.0.0.1", km0.port), timeout=HANG_GUARD) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
                tls.recv(1)  # TLS 1.3 reports the server's refusal on the first read
    assert app.calls == 0
    # The failed handshake is the server's business only; it still serves good clients.
    with _client(pki_dir, "SAE-KM0") as session:
        assert session.get(f"{km0.url}/whoami", timeout=HANG_GUARD).status_code == 200


def test_certificate_from_another_ca_is_refused(km0, app, pki_dir, other_pki):
    # The client trusts our server but presents a certificate from a foreign CA.
    foreign = hs.https_session(*other_pki.app("SAE-KM1"), pki_dir.ca_cert)
    with foreign, pytest.raises(requests.exceptions.ConnectionError):
        foreign.get(f"{km0.url}/whoami", timeout=HANG_GUARD)
    assert app.calls == 0


def test_client_refuses_a_server_from_another_ca(km0, pki_dir, other_pki):
    with _client(pki_dir, "SAE-KM1", ca=other_pki) as session, \
            pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        session.get(f"{km0.url}/whoami", timeout=HANG_GUARD)


def test_optional_client_certificate_still_rejects_foreign_ones(app, pki_dir, other_pki):
    tls = hs.TLSConfig.for_controller(pki_dir, require_client_cert=False)
    with hs.HTTPServer(app, "127.0.0.1", 0, tls=tls, name="optional") as server:
        with _client(pki_dir, None) as anonymous:
            body = anonymous.get(f"{server.url}/whoami", timeout=HANG_GUARD).json()
            assert body["sae_id"] is None and body["fingerprint"] is None
        with _client(pki_dir, "SAE-KM4") as known:
            assert known.get(f"{server.url}/whoami", timeout=HANG_GUARD).json()["sae_id"] == "SAE-KM4"
        foreign = hs.https_session(*other_pki.app("SAE-KM4"), pki_dir.ca_cert)
        with foreign, pytest.raises(requests.exceptions.ConnectionError):
            foreign.get(f"{server.url}/whoami", timeout=HANG_GUARD)


def test_plain_http_to_the_tls_port_gets_a_plain_400(km0, app):
    with requests.Session() as session:
        r = session.get(f"http://127.0.0.1:{km0.port}/whoami", timeout=HANG_GUARD)
    assert r.status_code == 400 and "HTTPS only" in r.text
    assert app.calls == 0


def test_silent_client_does_not_stall_others(app, pki_dir):
    # The handshake runs in a worker: a connection that never speaks must not block accept().
    tls = hs.TLSConfig.for_node(pki_dir, "KM1")
    with hs.HTTPServer(app, "127.0.0.1", 0, tls=tls, name="km1", timeout=10 * HANG_GUARD) as server:
        with socket.create_connection(("127.0.0.1", server.port)):
            with _client(pki_dir, "SAE-KM1") as session:
                assert session.get(f"{server.url}/whoami", timeout=HANG_GUARD).status_code == 200


def test_missing_certificate_files_are_named(app, tmp_path):
    tls = hs.TLSConfig(tmp_path / "nope.pem", tmp_path / "nope.key", tmp_path / "ca.pem")
    server = hs.HTTPServer(app, "127.0.0.1", 0, tls=tls)
    with pytest.raises(FileNotFoundError, match="nope.pem"):
        server.start()
    with pytest.raises(FileNotFoundError, match="CA certificate"):
        hs.https_session(None, None, tmp_path / "ca.pem")
    with pytest.raises(ValueError, match="both cert and key"):
        hs.https_session(tmp_path / "a.pem", None, None)


# --------------------------------------------------------------------------- plain HTTP


def test_plain_http_needs_the_development_flag(app):
    with pytest.raises(ValueError, match="without TLS"):
        hs.HTTPServer(app, "127.0.0.1", 0, tls=None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.1", "192.0.2.10", "example.com", ""])
def test_plain_http_only_on_loopback(app, host):
    # Raised by the constructor, before any socket exists.
    with pytest.raises(ValueError, match="non-loopback"):
        hs.HTTPServer(app, host, 8080, tls=None, insecure_dev=True)


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.9.8.7", True), ("::1", True),
                                            ("localhost", True), ("LOCALHOST", True), ("0.0.0.0", False),
                                            ("128.0.0.1", False), ("localhost.example.com", False)])
def test_is_loopback(host, loopback):
    assert hs.is_loopback(host) is loopback


def test_development_mode_serves_plain_http_with_a_warning(app, caplog):
    caplog.set_level(logging.WARNING, logger="qkdsdn.http")
    with hs.HTTPServer(app, "127.0.0.1", 0, tls=None, insecure_dev=True, name="dev") as server:
        assert server.url == f"http://127.0.0.1:{server.port}"
        with requests.Session() as session:
            body = session.get(f"{server.url}/whoami", timeout=HANG_GUARD).json()
    assert body == {"sae_id": None, "fingerprint": None, "kind": None, "scheme": "http"}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "qkdsdn.http"]
    assert any("PLAIN HTTP" in r.getMessage() and server.url in r.getMessage() for r in warnings)


# --------------------------------------------------------------------------- life cycle


def test_start_stop_leaves_no_thread_running(app, pki_dir):
    before = set(threading.enumerate())
    server = hs.HTTPServer(app, "127.0.0.1", 0, tls=hs.TLSConfig.for_node(pki_dir, "KM2"), threads=4)
    server.start()
    assert server.running
    with pytest.raises(RuntimeError, match="already started"):
        server.start()
    with _client(pki_dir, "SAE-KM2") as session:
        assert session.get(f"{server.url}/whoami", timeout=HANG_GUARD).status_code == 200
    port = server.port
    server.stop()
    server.stop()  # idempotent
    assert not server.running
    assert set(threading.enumerate()) == before
    # The port is released: a new server can bind it again.
    again = hs.HTTPServer(app, "127.0.0.1", port, tls=None, insecure_dev=True)
    with again:
        assert again.port == port
    assert set(threading.enumerate()) == before


def test_stop_with_an_open_keep_alive_connection(app, pki_dir):
    before = set(threading.enumerate())
    server = hs.HTTPServer(app, "127.0.0.1", 0, tls=hs.TLSConfig.for_node(pki_dir, "KM3"), threads=2)
    server.start()
    session = _client(pki_dir, "SAE-KM3")
    assert session.get(f"{server.url}/whoami", timeout=HANG_GUARD).status_code == 200
    server.stop()  # the client still holds its connection open
    session.close()
    assert set(threading.enumerate()) == before


def test_port_in_use_is_reported_in_the_caller(app):
    with hs.HTTPServer(app, "127.0.0.1", 0, tls=None, insecure_dev=True) as first:
        second = hs.HTTPServer(app, "127.0.0.1", first.port, tls=None, insecure_dev=True)
        with pytest.raises(OSError):
            second.start()
        assert not second.running


def test_serve_forever_returns_when_stopped_from_another_thread(app):
    server = hs.HTTPServer(app, "127.0.0.1", 0, tls=None, insecure_dev=True)
    server.start()
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    server.serve_forever()  # returns whether stop() ran before or during the wait
    stopper.join()
    assert not server.running
    server.serve_forever()  # stopped since its last start: nothing to serve, returns at once
    assert not server.running


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_forever_shuts_down_cleanly_on_signal(pki_dir, signum):
    script = textwrap.dedent(f"""
        import logging, sys
        from flask import Flask
        from qkdsdn.httpserver import HTTPServer, TLSConfig
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
        app = Flask("x")
        app.get("/")(lambda: "hello")
        HTTPServer(app, "127.0.0.1", 0, tls=TLSConfig.for_node({str(pki_dir.out_dir)!r}, "KM4"),
                   name="cli").serve_forever()
        print("clean exit", flush=True)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        url = None
        for line in proc.stderr:  # "listening" is logged once the signal handlers are in place
            if "cli listening on" in line:
                url = line.split("listening on ")[1].split()[0]
                break
        assert url, "server did not start"
        with _client(pki_dir, "SAE-KM4") as session:
            assert session.get(f"{url}/", timeout=HANG_GUARD).text == "hello"
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=HANG_GUARD)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "clean exit" in out
    assert f"{signal.Signals(signum).name} received" in err and "cli stopped" in err
