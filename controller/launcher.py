"""The controller's launcher: the control plane's os-ken apps in one process.

os-ken 4 has no ``osken-manager``; this module does its job for qkdsdn::

    controller = Controller(ControllerOptions(network="examples/paper-poc.yaml", db_url="sqlite:///c.db",
                                              bus_url="mqtt://127.0.0.1:1883", insecure_dev=True))
    controller.start()          # returns once every app runs
    ...
    controller.stop()           # every app stopped, every thread joined, bus and database closed

``start()``:

1. loads the network file into the database (``db.bootstrap.load_network``: idempotent; a
   different network needs ``replace``) and resets what the database says about the
   running network (``controller.topology.reset_runtime_state``: nodes NEW, links PENDING,
   sessions of a previous run terminated and, at start, deleted at their key managers);
2. connects the bus (``qkdsdn.bus.make_bus``, client id ``<network>-controller``, retained
   status on ``status/controller``) and prepares a RESTCONF client per node;
3. installs the shared ``ControllerServices`` on ``ControllerContext`` (os-ken builds contexts
   without arguments) and has an ``os_ken.base.app_manager.AppManager`` load, instantiate and
   start the apps (``APP_MODULES``) on os-ken's native hub (plain threads; no eventlet).

``stop()`` stops the REST API, disconnects the bus (what the apps have not handled stays
unacknowledged in the controller's persistent MQTT session, and the broker keeps queueing for
it), uninstantiates the other apps in ``STOP_ORDER`` (routing last: admission may still ask it),
then closes the RESTCONF sessions and the database engine. ``run()`` is the command form:
start, wait for SIGINT/SIGTERM, stop.
"""
from __future__ import annotations

import datetime as dt
import logging
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from os_ken.base import app_manager
from os_ken.lib import hub

from controller.apps.base import (ACCESS_CONTROL, ADMISSION_CONTROL, MONITORING, REST_API, ROUTING,
                                  SDN_CONTROLLER)
from controller.apps.context import (ControllerConfig, ControllerContext, ControllerServices, RestconfClients,
                                     RestSettings, utcnow)
from db.netfile import Network

log = logging.getLogger("qkdsdn.controller")

APP_MODULES = (
    "controller.apps.routing",
    "controller.apps.monitoring",
    "controller.apps.access_control",
    "controller.apps.admission_control",
    "controller.apps.sdn_controller",
)
REST_MODULE = "controller.apps.rest_api"
STOP_ORDER = (REST_API, SDN_CONTROLLER, ACCESS_CONTROL, ADMISSION_CONTROL, MONITORING, ROUTING)
PROCESS_NAME = "controller"


class LaunchError(RuntimeError):
    """The controller could not start; the message says why (nothing is left running)."""


@dataclass
class ControllerOptions:
    """What ``Controller`` runs.

    ``network``: a parsed ``Network`` or the path of a network file. ``db_url``: SQLAlchemy URL
    (None: ``$QKDSDN_DB``, else ``sqlite:///qkdsdn.db``). ``bus_url``: ``local``, ``embedded``,
    ``mqtt://...`` or ``mqtts://...`` (None: the network file's ``deployment.bus``). ``pki``: the
    directory of ``qkdsdn pki init`` (controller certificate for RESTCONF, the REST API and
    ``mqtts``), or ``insecure_dev`` (loopback, plain HTTP, development identities). ``rest``:
    ``(host, port)`` of the operator API, None for none. ``tokens_file``: the API's bearer
    tokens (``controller.rest.TokenAuth.from_file``).
    """

    network: Network | str | Path
    db_url: Optional[str] = None
    bus_url: Optional[str] = None
    pki: Any = None
    insecure_dev: bool = False
    rest: Optional[tuple[str, int]] = None
    tokens_file: Optional[str] = None
    replace: bool = False
    config: ControllerConfig = field(default_factory=ControllerConfig)
    clock: Callable[[], dt.datetime] = utcnow
    client_id: Optional[str] = None


class Controller:
    """The control plane of one network in this process (module doc). One at a time per process:
    os-ken keeps its apps in a process-wide registry."""

    def __init__(self, options: ControllerOptions):
        if hub.HUB_TYPE != "native":
            raise LaunchError(f"the controller runs on os-ken's native hub; unset OSKEN_HUB_TYPE "
                              f"(it is {hub.HUB_TYPE!r})")
        if options.pki is None and not options.insecure_dev:
            raise LaunchError("the controller needs its certificates (pki) unless it runs with insecure_dev")
        self.options = options
        self.network: Optional[Network] = None
        self.engine = None
        self.bus = None
        self.services: Optional[ControllerServices] = None
        self.manager: Optional[app_manager.AppManager] = None
        self._restconf: Optional[RestconfClients] = None
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self.load_result = None

    # ----------------------------------------------------------------- life cycle

    def start(self) -> "Controller":
        with self._lock:
            if self.manager is not None:
                raise RuntimeError("the controller is already started")
            try:
                self._start()
            except BaseException:
                self._teardown()
                raise
        return self

    def _start(self) -> None:
        from db.bootstrap import load_network
        from db.database import make_engine, session_factory, upgrade
        from db.netfile import load as load_network_file
        from qkdsdn.bus import Topics, make_bus
        from qkdsdn.pki import PkiLayout

        from controller.topology import reset_runtime_state

        opts = self.options
        network = opts.network if isinstance(opts.network, Network) else load_network_file(opts.network)
        self.network = network
        pki = opts.pki if opts.pki is None or isinstance(opts.pki, PkiLayout) else PkiLayout(opts.pki)

        self.engine = make_engine(opts.db_url)
        _tune_sqlite(self.engine)
        upgrade(self.engine)
        factory = session_factory(self.engine)
        with factory.begin() as session:
            self.load_result = load_network(session, network, replace=opts.replace)
            stale = reset_runtime_state(session, opts.clock())
        if stale:
            log.info("%d session(s) of a previous controller run terminated", len(stale))

        topics = Topics(network.name)
        client_id = opts.client_id or f"{network.name}-{PROCESS_NAME}"
        bus_url = opts.bus_url or network.deployment.bus
        tls = None
        if bus_url.startswith("mqtts://"):
            if pki is None:
                raise LaunchError("an mqtts:// bus needs the controller certificate (--pki)")
            cert, key = pki.controller()
            tls = (pki.ca_cert, cert, key)
        self.bus = make_bus(bus_url, client_id, tls=tls, status_topic=topics.status(PROCESS_NAME))

        self._restconf = RestconfClients(network, pki=pki, insecure_dev=opts.insecure_dev,
                                         timeout=opts.config.restconf_timeout_s)
        rest = None
        if opts.rest is not None:
            from qkdsdn.httpserver import TLSConfig

            host, port = opts.rest
            tls_config = None if opts.insecure_dev else TLSConfig.for_controller(pki, require_client_cert=False)
            rest = RestSettings(host=host, port=port, tls=tls_config, insecure_dev=opts.insecure_dev,
                                tokens_file=opts.tokens_file)
        self.services = ControllerServices(
            network=network, topics=topics, bus=self.bus, client_id=client_id, session_factory=factory,
            restconf=self._restconf, config=opts.config, clock=opts.clock, insecure_dev=opts.insecure_dev,
            rest=rest, stale_sessions=tuple(stale))
        ControllerContext.install(self.services)

        manager = app_manager.AppManager()
        self.manager = manager
        manager.load_apps(list(APP_MODULES) + ([REST_MODULE] if rest is not None else []))
        contexts = manager.create_contexts()
        manager.instantiate_apps(**contexts)
        log.info("controller of network %s running: apps %s, bus %s, database %s", network.name,
                 ", ".join(sorted(manager.applications)), bus_url, self.engine.url.render_as_string(
                     hide_password=True))

    def stop(self) -> None:
        """Stop every app and release everything (idempotent)."""
        with self._lock:
            self._teardown()
            self._stopped.set()

    def _teardown(self) -> None:
        manager, self.manager = self.manager, None

        def uninstantiate(name: str) -> None:
            if manager is not None and name in manager.applications:
                try:
                    manager.uninstantiate(name)
                except Exception:  # noqa: BLE001 - the others must stop too
                    log.exception("stopping %s failed", name)

        # No new operator requests, then no new bus messages: the bus disconnects before the
        # apps stop, so that what they did not handle stays unacknowledged in the controller's
        # persistent session (and the broker keeps queueing for it) until the next start.
        uninstantiate(REST_API)
        if self.bus is not None:
            try:
                self.bus.close()
            except Exception:  # noqa: BLE001
                log.exception("closing the bus failed")
        for name in STOP_ORDER:
            uninstantiate(name)
        if manager is not None:
            try:
                manager.close()
            except Exception:  # noqa: BLE001
                log.exception("closing the os-ken app manager failed")
        if self.services is not None:
            ControllerContext.uninstall(self.services)
        if self._restconf is not None:
            self._restconf.close()
            self._restconf = None
        self.bus = None
        if self.engine is not None:
            self.engine.dispose()
            self.engine = None

    def __enter__(self) -> "Controller":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def run(self, on_ready: Callable[["Controller"], None] | None = None) -> None:
        """Start, serve until SIGINT or SIGTERM (or ``stop()`` from another thread), stop."""
        wake = threading.Event()
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, lambda signum, _frame: wake.set())
        try:
            self.start()
            if on_ready is not None:
                on_ready(self)
            while not wake.wait(0.5) and not self._stopped.is_set():
                pass
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # ----------------------------------------------------------------- access

    @property
    def running(self) -> bool:
        return self.manager is not None

    def app(self, name: str) -> Any:
        """A running app by os-ken name (``SDNControllerApp``, ``AdmissionControlApp``, ...)."""
        if self.manager is None:
            raise RuntimeError("the controller is not running")
        return self.manager.applications[name]

    def request(self, dst: str, req: Any, timeout: float | None = None) -> Any:
        """Send an os-ken request (``controller.apps.events``) to app ``dst`` from outside the
        apps, e.g. ``TerminateRequest`` to ``AdmissionControlApp``; returns its result."""
        return self.app(SDN_CONTROLLER).call(dst, req, timeout)

    def health(self, timeout: float = 2.0) -> dict[str, Any]:
        """Each app's own report (``HealthRequest``); an app that does not answer is reported down."""
        from controller.apps.events import HealthRequest

        out: dict[str, Any] = {}
        for name in sorted(self.manager.applications if self.manager is not None else ()):
            try:
                out[name] = {"status": "ok", **self.request(name, HealthRequest(), timeout)}
            except Exception as exc:  # noqa: BLE001
                out[name] = {"status": "down", "error": f"{type(exc).__name__}: {exc}"}
        return out

    @property
    def rest_url(self) -> Optional[str]:
        if self.manager is None or REST_API not in self.manager.applications:
            return None
        return self.manager.applications[REST_API].server.url

    @property
    def bus_url(self) -> Optional[str]:
        bus = self.bus
        return getattr(bus, "url", None) if bus is not None else None


def _tune_sqlite(engine: Any) -> None:
    """An SQLite file shared by the apps' threads (and read by the REST API and other processes):
    write-ahead logging, so that readers never block the writer, and one sync per checkpoint
    rather than per commit (WAL keeps the database consistent through a crash; a power cut may
    lose the last commits, which the control plane re-learns from the nodes)."""
    from sqlalchemy import event

    url = engine.url
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()
