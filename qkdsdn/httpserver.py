"""The HTTPS server (and client) stack that every qkdsdn interface uses.

ETSI 014 KMEs of the digital twin, the key managers' ETSI 004/014 and relay interfaces,
the agents' RESTCONF servers and the controller's operator API all run a WSGI app behind
``HTTPServer``: cheroot's threaded WSGI server with TLS 1.2+ and, by default, a required
client certificate from the network's CA (``qkdsdn pki init``). The verified client
certificate reaches the app in the WSGI environ (``peer_certificate``, ``peer_sae_id``,
``peer_fingerprint``), which is how ETSI 014 servers learn the caller's SAE ID.

Plain HTTP exists only for development: ``tls=None`` needs ``insecure_dev=True`` and a
loopback host, and logs a warning.

Unlike cheroot's stock adapter, the TLS handshake runs in a worker thread, not in the
accept loop, so one client that connects and stays silent cannot stall every other one.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from cheroot import errors as cheroot_errors
from cheroot import server as cheroot_server
from cheroot import wsgi as cheroot_wsgi
from cheroot.ssl.builtin import BuiltinSSLAdapter
from cryptography import x509

from qkdsdn import pki

log = logging.getLogger("qkdsdn.http")

PEER_CERT_KEY = "qkdsdn.peer_cert"
# TLS 1.2 suites with forward secrecy and AEAD only; TLS 1.3 suites are all of that already.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

# Connections a client session keeps open per server (https_session): the agents' worker threads.
POOL_MAXSIZE = 32
# Idle keep-alive connections a server keeps open, per worker thread (cheroot's default is 10 in all).
KEEP_ALIVE_PER_THREAD = 4

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]


# --------------------------------------------------------------------------- configuration


@dataclass
class TLSConfig:
    """Server side TLS: our certificate and key, and the CA that client certificates must chain to."""

    cert: Path
    key: Path
    ca: Path
    require_client_cert: bool = True

    def __post_init__(self) -> None:
        self.cert, self.key, self.ca = Path(self.cert), Path(self.key), Path(self.ca)

    @classmethod
    def for_node(cls, layout: pki.PkiLayout | str | os.PathLike[str], node: str, **kw: Any) -> "TLSConfig":
        """A key manager's interfaces (ETSI 004/014, relay, RESTCONF)."""
        layout = _layout(layout)
        cert, key = layout.node(node)
        return cls(cert, key, layout.ca_cert, **kw)

    @classmethod
    def for_controller(cls, layout: pki.PkiLayout | str | os.PathLike[str], **kw: Any) -> "TLSConfig":
        """The controller's operator REST API."""
        layout = _layout(layout)
        cert, key = layout.controller()
        return cls(cert, key, layout.ca_cert, **kw)

    @classmethod
    def for_device(cls, layout: pki.PkiLayout | str | os.PathLike[str], link: str, role: str,
                   **kw: Any) -> "TLSConfig":
        """One ETSI 014 KME of an emulated link ("master" or "slave")."""
        layout = _layout(layout)
        cert, key = layout.device(link, role)
        return cls(cert, key, layout.ca_cert, **kw)


def _layout(layout: pki.PkiLayout | str | os.PathLike[str]) -> pki.PkiLayout:
    return layout if isinstance(layout, pki.PkiLayout) else pki.PkiLayout(layout)


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path} (run 'qkdsdn pki init' to issue it)")


def server_ssl_context(tls: TLSConfig) -> ssl.SSLContext:
    """The server SSLContext for ``tls``: TLS >= 1.2, client certificates verified against the CA."""
    _require_file(tls.cert, "TLS certificate")
    _require_file(tls.key, "TLS private key")
    _require_file(tls.ca, "CA certificate")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    ctx.load_verify_locations(cafile=str(tls.ca))
    # OPTIONAL still rejects a certificate that does not chain to the CA; it only admits none.
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_ssl_context(cert: Path | str | None, key: Path | str | None,
                       ca: Path | str | None) -> ssl.SSLContext:
    """A client SSLContext for mutual TLS (for non-requests clients such as MQTT)."""
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca:
        _require_file(Path(ca), "CA certificate")
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs both cert and key")
    if cert is not None:
        _require_file(Path(cert), "client certificate")
        _require_file(Path(key), "client private key")
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def https_session(cert: Path | str | None, key: Path | str | None, ca: Path | str | None):
    """A ``requests.Session`` that presents ``cert``/``key`` and trusts only ``ca``.

    ``ca=None`` falls back to the system trust store (for third-party servers);
    ``cert=key=None`` makes a session without a client certificate.
    """
    import requests  # clients only; servers need not pay for the import
    import requests.adapters

    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs both cert and key")
    session = requests.Session()
    if ca is not None:
        _require_file(Path(ca), "CA certificate")
        session.verify = str(ca)
    else:
        session.verify = True
    if cert is not None:
        _require_file(Path(cert), "client certificate")
        _require_file(Path(key), "client private key")
        session.cert = (str(cert), str(key))
    # Proxies from the environment would break mutual TLS to our own peers.
    session.trust_env = False
    # Keep-alive connections per host: as many as a key manager has threads that may call one
    # peer at once (requests keeps 10 by default and drops the others after use, so every call
    # beyond 10 concurrent ones would pay a new TLS handshake).
    for scheme in ("https://", "http://"):
        session.mount(scheme, requests.adapters.HTTPAdapter(pool_maxsize=POOL_MAXSIZE))
    return session


# --------------------------------------------------------------------------- peer identity


def peer_certificate(environ: dict) -> x509.Certificate | None:
    """The client's verified certificate, or None (no certificate, or plain HTTP)."""
    return environ.get(PEER_CERT_KEY)


def peer_sae_id(environ: dict) -> str | None:
    """The SAE ID in the client's verified certificate (see ``pki.sae_id_from_certificate``)."""
    cert = peer_certificate(environ)
    return pki.sae_id_from_certificate(cert) if cert is not None else None


def peer_fingerprint(environ: dict) -> str | None:
    """SHA-256 fingerprint (lower-case hex) of the client's verified certificate."""
    cert = peer_certificate(environ)
    return pki.certificate_fingerprint(cert) if cert is not None else None


# --------------------------------------------------------------------------- cheroot plumbing


class _MutualTLSAdapter(BuiltinSSLAdapter):
    """cheroot's builtin adapter with our context, the handshake deferred, and the peer certificate."""

    def __init__(self, tls: TLSConfig):
        context = server_ssl_context(tls)  # fails first with a clear message on missing files
        super().__init__(str(tls.cert), str(tls.key), str(tls.ca))
        self.context = context

    def wrap(self, sock: socket.socket):
        # Called in the accept loop: only attach TLS here; _TLSConnection shakes hands in a worker.
        try:
            tls_sock = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except OSError as exc:
            raise cheroot_errors.FatalSSLAlert(*exc.args) from exc
        return tls_sock, {}

    def get_environ(self, sock: ssl.SSLSocket) -> dict:
        env = super().get_environ(sock)
        der = sock.getpeercert(binary_form=True)
        # The ssl module only hands out a certificate that passed verification against the CA.
        env[PEER_CERT_KEY] = x509.load_der_x509_certificate(der) if der else None
        return env


_PLAIN_HTTP_REPLY = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                     b"Content-Length: 62\r\n\r\n"
                     b"This server speaks HTTPS only; use https:// and a client cert.")


class _TLSConnection(cheroot_server.HTTPConnection):
    """A connection that completes its TLS handshake in the worker thread before the first request."""

    _handshaken = False

    def communicate(self) -> bool:
        if not self._handshaken:
            if not self._handshake():
                return False
            self._handshaken = True
            self.ssl_env = self.server.ssl_adapter.get_environ(self.socket)
        return super().communicate()

    def _handshake(self) -> bool:
        peer = f"{getattr(self, 'remote_addr', '?')}:{getattr(self, 'remote_port', '?')}"
        try:
            self.socket.do_handshake()  # bounded by the server's connection timeout
            return True
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError, socket.timeout) as exc:
            log.debug("%s: TLS handshake with %s dropped: %s", self.server.qkdsdn_name, peer, exc)
        except ssl.SSLError as exc:
            if "http request" in str(exc).lower():
                log.info("%s: %s spoke plain HTTP to the HTTPS port", self.server.qkdsdn_name, peer)
                try:
                    # The TLS layer never came up, so write on the bare socket underneath it.
                    socket.socket.sendall(self.socket, _PLAIN_HTTP_REPLY)
                except OSError:
                    pass
            else:
                # Failed client authentication is a security event, not noise.
                log.warning("%s: TLS handshake with %s failed: %s", self.server.qkdsdn_name, peer,
                            exc.reason or exc)
        except OSError as exc:
            log.debug("%s: TLS handshake with %s failed: %s", self.server.qkdsdn_name, peer, exc)
        return False


class _CherootServer(cheroot_wsgi.Server):
    """cheroot's WSGI server, logging through ``logging`` and with a joinable helper thread."""

    qkdsdn_name = "http"

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self._helper_started = threading.Event()
        self._helper_thread: threading.Thread | None = None

    def error_log(self, msg: str = "", level: int = logging.INFO, traceback: bool = False) -> None:
        log.log(level, "%s: %s", self.qkdsdn_name, msg, exc_info=traceback)

    def _serve_unservicable(self) -> None:
        # cheroot starts this thread from serve() and never joins it; remembering it lets
        # HTTPServer.stop() return only once every thread of the server has ended.
        self._helper_thread = threading.current_thread()
        self._helper_started.set()
        super()._serve_unservicable()


_HAS_HELPER_THREAD = hasattr(cheroot_server.HTTPServer, "_serve_unservicable")


# --------------------------------------------------------------------------- server


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class HTTPServer:
    """A WSGI app served over HTTPS with client certificates (or, for development, plain HTTP).

    ``start()`` binds and returns once the socket listens (port 0 picks a free port: see
    ``port`` and ``url``); requests run in a pool of ``threads`` worker threads; ``stop()``
    returns once every thread of the server has ended. ``serve_forever()`` is the CLI form:
    it blocks until SIGINT or SIGTERM and then shuts down cleanly.
    """

    def __init__(self, app: WSGIApp, host: str, port: int, *, tls: TLSConfig | None,
                 insecure_dev: bool = False, name: str = "", threads: int = 16, timeout: float = 10.0):
        if tls is None:
            if not insecure_dev:
                raise ValueError(f"refusing to serve {name or 'HTTP'} on {host}:{port} without TLS: "
                                 "give a TLSConfig (certificates from 'qkdsdn pki init'), or pass "
                                 "insecure_dev=True for plain HTTP on a loopback address during development")
            if not is_loopback(host):
                raise ValueError(f"refusing plain HTTP on non-loopback address {host!r}: the development "
                                 "mode serves 127.0.0.1, ::1 or localhost only; use TLS for anything else")
        if threads < 1:
            raise ValueError("threads must be at least 1")
        self.app = app
        self.host = host
        self.tls = tls
        self.insecure_dev = tls is None
        self.name = name or f"http:{host}:{port}"
        self._requested_port = port
        self._bound_port = 0
        self._threads = threads
        self._timeout = timeout
        self._server: _CherootServer | None = None
        self._stopped = False  # stop() ran after the last start(): serve_forever() has nothing to do
        self._thread: threading.Thread | None = None
        self._listeners: set[threading.Event] = set()  # serve_forever() waiters, woken by stop()
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    # -- addresses

    @property
    def port(self) -> int:
        """The bound port once started (and after stop), else the requested one."""
        return self._bound_port or self._requested_port

    @property
    def url(self) -> str:
        scheme = "http" if self.tls is None else "https"
        host = self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{scheme}://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- life cycle

    def _wsgi(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        # Every app can read the key, whether or not the connection is TLS.
        environ.setdefault(PEER_CERT_KEY, None)
        return self.app(environ, start_response)

    def start(self) -> "HTTPServer":
        with self._lock:
            if self._server is not None:
                raise RuntimeError(f"{self.name} is already started")
            server = _CherootServer((self.host, self._requested_port), self._wsgi, numthreads=self._threads,
                                    max=self._threads, server_name=self.name, timeout=self._timeout)
            server.qkdsdn_name = self.name
            # cheroot answers "Connection: close" once 10 idle keep-alive connections are open, so a
            # busier client (a key manager relaying a batch of keys on several threads) paid a new
            # mutual-TLS handshake for most calls. Keep as many as the server has threads, 4 times over.
            server.keep_alive_conn_limit = KEEP_ALIVE_PER_THREAD * self._threads
            if self.tls is not None:
                server.ssl_adapter = _MutualTLSAdapter(self.tls)
                server.ConnectionClass = _TLSConnection
            server.prepare()  # binds and listens; errors surface here, in the caller's thread
            self._server = server
            self._stopped = False
            self._bound_port = int(server.bind_addr[1])
            self._error = None
            self._thread = threading.Thread(target=self._serve, name=f"{self.name} accept", daemon=True)
            self._thread.start()
        if self.tls is None:
            log.warning("!!! %s serves PLAIN HTTP on %s: no encryption, no client authentication. "
                        "Development only; never let real keys or credentials cross it.", self.name, self.url)
        else:
            log.info("%s listening on %s (TLS >= 1.2, client certificate %s, CA %s)", self.name, self.url,
                     "required" if self.tls.require_client_cert else "optional", self.tls.ca)
        return self

    def _serve(self) -> None:
        try:
            assert self._server is not None
            self._server.serve()
        except BaseException as exc:  # noqa: BLE001 - handed to serve_forever()
            self._error = exc
            log.error("%s: server loop failed: %s", self.name, exc, exc_info=True)
        finally:
            self._wake_listeners()

    def _wake_listeners(self) -> None:
        for event in list(self._listeners):
            event.set()

    def stop(self) -> None:
        """Stop accepting, finish or close open connections, and join every server thread."""
        with self._lock:
            server, thread = self._server, self._thread
            if server is None:
                return
            server.stop()
            if thread is not None:
                thread.join()
            # serve() always starts the helper first, so once it has run the event is coming.
            if _HAS_HELPER_THREAD and thread is not None and server._helper_started.wait(timeout=30):
                if server._helper_thread is not None:
                    server._helper_thread.join()
            self._server = None
            self._thread = None
            self._stopped = True
        self._wake_listeners()
        log.info("%s stopped", self.name)

    def serve_forever(self) -> None:
        """Serve until SIGINT/SIGTERM or ``stop()`` from another thread, then shut down.

        Starts the server unless it runs already; returns at once if it was stopped
        since its last start (the stop is the request to end).
        """
        wake = threading.Event()

        def on_signal(signum: int, _frame: Any) -> None:
            log.info("%s: %s received, shutting down", self.name, signal.Signals(signum).name)
            wake.set()

        previous: dict[int, Any] = {}
        # Handlers go in before start(), so a signal during start-up also shuts down cleanly.
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, on_signal)
        self._listeners.add(wake)
        try:
            with self._lock:
                stopped, server = self._stopped, self._server
            if stopped or (server is not None and not self.running):
                wake.set()  # already stopped, or the serve loop has already ended
            elif server is None:
                self.start()
            wake.wait()
        finally:
            self._listeners.discard(wake)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.stop()
        if self._error is not None:
            raise RuntimeError(f"{self.name} failed: {self._error}") from self._error

    def __enter__(self) -> "HTTPServer":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<HTTPServer {self.name} {self.url} {'running' if self.running else 'stopped'}>"
