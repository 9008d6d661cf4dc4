"""The digital twin as a service: every emulated link of a network, served over ETSI 014.

For each link with a ``device`` (links to real ``kme`` hardware are skipped) it
runs one ``KeyEngine`` and two ETSI 014 servers, the master and the slave KME, on
``Network.twin_addresses(link)``. With a PKI folder each KME presents its device
certificate (``devices/<link>-<role>.pem``) and requires a client certificate from
the network's CA; ``insecure_dev`` serves plain HTTP on loopback instead.

An admin API, on 127.0.0.1 only (port ``deployment.twin_base_port - 1`` unless
given), shows and disturbs the links; with TLS it accepts only the operator's
certificate (``operator.pem``):

* ``GET /links`` -> ``{"links": [LinkView...]}``; ``GET /links/<name>`` -> LinkView
* ``POST /links/<name>/fault`` with ``{"action": "cut"}``, ``{"action": "restore"}``
  (clears every disturbance), ``{"action": "eve", "fraction": 0.2}`` or
  ``{"action": "drift", "qber_per_s": 0.001, "max_qber": 0.15}`` -> LinkView
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from db.netfile import Link, Network, split_hostport
from qkdsdn.httpserver import HTTPServer, TLSConfig, peer_certificate
from qkdsdn.twin.engine import KeyEngine
from qkdsdn.twin.kme import create_kme_app

log = logging.getLogger(__name__)

ADMIN_HOST = "127.0.0.1"
FAULT_ACTIONS = ("cut", "restore", "eve", "drift")


def default_admin_port(network: Network) -> int:
    return network.deployment.twin_base_port - 1


def emulated_links(network: Network) -> list[Link]:
    return [link for link in network.links if link.device is not None]


@dataclass
class TwinLink:
    link: Link
    engine: KeyEngine
    master: HTTPServer
    slave: HTTPServer


def link_view(tl: TwinLink) -> dict[str, Any]:
    """JSON view of one emulated link for the admin API (no key material)."""
    st = tl.engine.status()
    return {
        "name": tl.link.name,
        "master": tl.link.master,
        "slave": tl.link.slave,
        "state": st.state,
        "reason": st.reason,
        "qber": st.qber,
        "skr_bps": st.measured_skr_bps,
        "model_skr_bps": st.model_skr_bps,
        "buffer_bits": st.buffer_bits,
        "available_bits": st.available_bits,
        "pending_keys": st.pending_keys,
        "eve_fraction": st.eve_fraction,
        "qber_drift": st.qber_drift,
        "drift_qber_per_s": st.drift_qber_per_s,
        "drift_max_qber": st.drift_max_qber,
        "generated_bits": st.generated_bits,
        "delivered_bits": st.delivered_bits,
        "master_url": tl.master.url,
        "slave_url": tl.slave.url,
    }


class _AdminError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def apply_fault(engine: KeyEngine, body: Any) -> None:
    """Apply one admin fault request; ValueError says what is wrong with it."""
    if not isinstance(body, dict):
        raise ValueError("the fault request must be a JSON object with an 'action'")
    action = body.get("action")
    allowed = {"cut": set(), "restore": set(), "eve": {"fraction"}, "drift": {"qber_per_s", "max_qber"}}
    if action not in allowed:
        raise ValueError(f"action must be one of {', '.join(FAULT_ACTIONS)}, got {action!r}")
    extra = sorted(set(body) - {"action"} - allowed[action])
    if extra:
        raise ValueError(f"unknown item(s) for action '{action}': {', '.join(extra)}")

    def number(name: str, required: bool = True) -> float | None:
        v = body.get(name)
        if v is None and not required:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"'{name}' must be a number, got {v!r}")
        return float(v)

    if action == "cut":
        engine.cut()
    elif action == "restore":
        engine.restore()
    elif action == "eve":
        engine.set_eavesdropper(number("fraction"))
    else:
        engine.set_drift(number("qber_per_s"), number("max_qber", required=False))


def create_admin_app(links: dict[str, TwinLink], *, require_operator: bool) -> Flask:
    """The admin WSGI app; ``require_operator`` admits only the operator's client certificate."""
    app = Flask("qkdsdn-twin-admin")
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024

    def reply(data: Any, status: int = 200) -> Response:
        return Response(json.dumps(data, indent=1), status=status, mimetype="application/json")

    @app.before_request
    def _authorize():
        if not require_operator:
            return None
        from qkdsdn import pki

        cert = peer_certificate(request.environ)
        if cert is None or pki.certificate_kind(cert) != "operator":
            return reply({"message": "the twin's admin API accepts the operator certificate only"}, 403)
        return None

    def find(name: str) -> TwinLink:
        tl = links.get(name)
        if tl is None:
            raise _AdminError(404, f"no emulated link named '{name}' (links: {', '.join(sorted(links))})")
        return tl

    @app.errorhandler(_AdminError)
    def _err(exc: _AdminError):
        return reply({"message": exc.message}, exc.status)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        return reply({"message": f"{exc.code} {exc.name}: {exc.description}"}, exc.code or 500)

    @app.get("/links")
    def all_links():
        return reply({"links": [link_view(tl) for tl in links.values()]})

    @app.get("/links/<name>")
    def one_link(name: str):
        return reply(link_view(find(name)))

    @app.post("/links/<name>/fault")
    def fault(name: str):
        tl = find(name)
        try:
            body = json.loads(request.get_data() or b"null")
        except (ValueError, UnicodeDecodeError):
            raise _AdminError(400, "request body is not valid JSON") from None
        try:
            apply_fault(tl.engine, body)
        except ValueError as exc:
            raise _AdminError(400, str(exc)) from None
        log.warning("twin: fault on link %s: %s", name, json.dumps(body, sort_keys=True))
        return reply(link_view(tl))

    return app


class TwinService:
    """All emulated links of ``network``: engines, KME servers and the admin API.

    ``pki`` is a PKI folder or ``PkiLayout`` (TLS with client certificates);
    without it ``insecure_dev=True`` is required (plain HTTP, loopback only).
    ``ephemeral_ports`` binds every server to a free port instead of the
    addresses of the network file (tests). ``clock`` is shared by all engines.
    """

    def __init__(self, network: Network, *, pki: Any = None, insecure_dev: bool = False,
                 admin_port: int | None = None, ephemeral_ports: bool = False,
                 clock: Callable[[], float] = time.monotonic, threads_per_kme: int = 4,
                 engine_options: dict[str, Any] | None = None):
        if pki is None and not insecure_dev:
            raise ValueError("the twin needs a PKI folder for TLS (qkdsdn pki init), or insecure_dev "
                             "for plain HTTP on loopback during development")
        if pki is not None and insecure_dev:
            raise ValueError("choose either a PKI folder (TLS) or insecure_dev, not both")
        from qkdsdn.pki import PkiLayout

        self.network = network
        self.layout = None if pki is None else (pki if isinstance(pki, PkiLayout) else PkiLayout(pki))
        self.insecure_dev = insecure_dev
        self.links: dict[str, TwinLink] = {}
        emulated = emulated_links(network)
        if not emulated:
            raise ValueError(f"network {network.name} has no emulated link (every link has a real kme)")
        for link in emulated:
            engine = KeyEngine(link, clock=clock, **(engine_options or {}))
            servers = []
            for role, address in zip(("master", "slave"), network.twin_addresses(link)):
                host, port = split_hostport(address)
                tls = None if self.layout is None else TLSConfig.for_device(self.layout, link.name, role)
                app = create_kme_app(engine, role, insecure_dev=insecure_dev)
                servers.append(HTTPServer(app, host, 0 if ephemeral_ports else port, tls=tls,
                                          insecure_dev=insecure_dev, name=f"twin {link.name} {role} KME",
                                          threads=threads_per_kme))
            self.links[link.name] = TwinLink(link, engine, *servers)

        port = 0 if ephemeral_ports else (admin_port if admin_port is not None else default_admin_port(network))
        admin_tls = None
        if self.layout is not None:
            # The admin API has no certificate of its own: it borrows a twin device's server
            # certificate (same process, same trust) and admits the operator only.
            first = emulated[0].name
            admin_tls = TLSConfig.for_device(self.layout, first, "master")
        self.admin = HTTPServer(create_admin_app(self.links, require_operator=admin_tls is not None),
                                ADMIN_HOST, port, tls=admin_tls, insecure_dev=insecure_dev,
                                name="twin admin", threads=2)
        self._started: list[HTTPServer] = []
        self._lock = threading.Lock()

    def servers(self) -> list[HTTPServer]:
        out = [s for tl in self.links.values() for s in (tl.master, tl.slave)]
        return out + [self.admin]

    def engine(self, link: str) -> KeyEngine:
        return self.links[link].engine

    def urls(self, link: str) -> tuple[str, str]:
        tl = self.links[link]
        return tl.master.url, tl.slave.url

    @property
    def admin_url(self) -> str:
        return self.admin.url

    def start(self) -> "TwinService":
        with self._lock:
            try:
                for server in self.servers():
                    server.start()
                    self._started.append(server)
            except BaseException:
                self._stop_started()
                raise
        for name, tl in self.links.items():
            log.info("twin link %s (%s -> %s): master KME %s, slave KME %s", name, tl.link.master,
                     tl.link.slave, tl.master.url, tl.slave.url)
        log.info("twin admin API on %s", self.admin.url)
        return self

    def _stop_started(self) -> None:
        # Stop in parallel: each stop() waits for its worker threads to finish.
        started, self._started = self._started, []
        threads = [threading.Thread(target=s.stop, name=f"stop {s.name}") for s in started]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def stop(self) -> None:
        with self._lock:
            self._stop_started()

    def serve_forever(self) -> None:
        """Serve until SIGINT/SIGTERM, then stop every server."""
        if not self._started:
            self.start()
        try:
            # The admin server's loop waits for the signal; the KME servers run beside it.
            self.admin.serve_forever()
        finally:
            self.stop()

    def __enter__(self) -> "TwinService":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


def admin_client_url(network: Network, layout: Any | None, admin_port: int | None = None) -> str:
    """URL of a running twin's admin API as the CLI reaches it (https when ``layout`` is given)."""
    port = admin_port if admin_port is not None else default_admin_port(network)
    if layout is None:
        return f"http://{ADMIN_HOST}:{port}"
    # The admin server presents the first link's master device certificate; it names
    # 127.0.0.1 only when the twin host is that address, and "localhost" always.
    host = "localhost"
    emulated = emulated_links(network)
    if emulated:
        import ipaddress

        from cryptography import x509

        from qkdsdn.pki import load_certificate

        cert_path, _ = layout.device(emulated[0].name, "master")
        if cert_path.is_file():
            try:
                san = load_certificate(cert_path).extensions.get_extension_for_class(
                    x509.SubjectAlternativeName).value
                if ipaddress.ip_address(ADMIN_HOST) in san.get_values_for_type(x509.IPAddress):
                    host = ADMIN_HOST
            except x509.ExtensionNotFound:
                pass
    return f"https://{host}:{port}"

