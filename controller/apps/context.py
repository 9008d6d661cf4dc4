"""What every control-plane app shares: the configuration, the bus, the database, the clock.

os-ken's ``AppManager`` builds an app's contexts (``_CONTEXTS``) by calling their classes with
no argument. ``controller.launcher`` therefore *installs* a ``ControllerServices`` on
``ControllerContext`` (a class-level registry, one controller per process at a time) before it
instantiates the apps, and uninstalls it after they stopped; ``ControllerContext()`` hands the
installed services to every app.

Also here: ``Store`` (the apps' database writes, and the controller's events on the bus) and
``RestconfClients`` (one RESTCONF client per node, with the controller certificate or the
development identity header).
"""
from __future__ import annotations

import datetime as dt
import logging
import math
import threading
from types import MappingProxyType
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Mapping, Optional, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session as DbSession
from sqlalchemy.orm import sessionmaker

from controller.admission import AdmissionConfig
from controller.bus_adapter import event_payload
from controller.monitoring import MonitoringConfig, StoreSample
from controller.topology import TopologyOutcome
from db import models as dbm
from db.netfile import Network
from qkdsdn.bus import Bus, Topics

log = logging.getLogger("qkdsdn.controller")

DEV_IDENTITY_HEADER = "X-QKDSDN-Dev-Identity"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True)
class ControllerConfig:
    """Timers and knobs of the control plane (the decision classes have their own configs)."""

    discovery_interval_s: float = 5.0  # RESTCONF re-read of every node
    restconf_timeout_s: float = 5.0
    failures_to_down: int = 2  # failed discoveries in a row that take a node down
    admission_tick_max_s: float = 0.5  # admission timers are checked at least this often
    monitoring_tick_s: float = 1.0
    profiles_refresh_s: float = 10.0  # user-profile tables re-read
    handoff_timeout_s: float = 30.0  # a bus message handed to its app
    request_timeout_s: float = 10.0  # an app asking another app
    config_pending_timeout_s: float = 300.0
    routing_qber_threshold: float = 0.11
    routing_unknown_skr_bps: float = math.inf
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)

    def __post_init__(self) -> None:
        if self.discovery_interval_s >= self.monitoring.silence_timeout_s:
            # Each discovery brings a sample of every active link: slower, and links look silent.
            raise ValueError(f"the discovery interval ({self.discovery_interval_s:g} s) must be shorter than the "
                             f"monitoring element's silence timeout ({self.monitoring.silence_timeout_s:g} s)")
        for name in ("discovery_interval_s", "restconf_timeout_s", "admission_tick_max_s", "monitoring_tick_s",
                     "profiles_refresh_s", "handoff_timeout_s", "request_timeout_s", "config_pending_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
                raise ValueError(f"ControllerConfig.{name} must be a positive number")


@dataclass(frozen=True)
class RestSettings:
    """The operator REST API: where, with what TLS, and who may call it."""

    host: str
    port: int
    tls: Any = None  # qkdsdn.httpserver.TLSConfig; None only with insecure_dev on loopback
    insecure_dev: bool = False
    tokens_file: Optional[str] = None


@dataclass
class ControllerServices:
    network: Network
    topics: Topics
    bus: Bus
    client_id: str  # the controller's bus client id
    session_factory: sessionmaker
    restconf: "RestconfClients"
    config: ControllerConfig = field(default_factory=ControllerConfig)
    clock: Callable[[], dt.datetime] = utcnow
    insecure_dev: bool = False
    rest: Optional[RestSettings] = None
    # Sessions the previous controller run left unterminated (topology.reset_runtime_state).
    stale_sessions: Sequence[Any] = ()
    store: "Store" = None  # type: ignore[assignment]  # built in __post_init__

    node_names: frozenset[str] = field(init=False)
    qkdn_ids: Mapping[str, str] = field(init=False)

    def __post_init__(self) -> None:
        if self.store is None:
            self.store = Store(self.session_factory, self.bus, self.topics, self.client_id)
        self.node_names = frozenset(n.name for n in self.network.nodes)
        self.qkdn_ids = MappingProxyType({n.name: n.qkdn_id for n in self.network.nodes})


class ControllerContext:
    """The os-ken context of every controller app: the installed ``ControllerServices``."""

    _installed: ClassVar[Optional[ControllerServices]] = None
    _lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def install(cls, services: ControllerServices) -> None:
        with cls._lock:
            if cls._installed is not None:
                raise RuntimeError("a controller is already running in this process (os-ken apps are process-wide)")
            cls._installed = services

    @classmethod
    def uninstall(cls, services: ControllerServices) -> None:
        with cls._lock:
            if cls._installed is services:
                cls._installed = None

    @classmethod
    def installed(cls) -> Optional[ControllerServices]:
        return cls._installed

    def __init__(self) -> None:
        services = type(self)._installed
        if services is None:
            raise RuntimeError("ControllerContext: controller.launcher installs the services before "
                               "the apps are instantiated")
        self.services = services

    def __getattr__(self, name: str) -> Any:
        # Only called for names not found on the context itself.
        services = self.__dict__.get("services")
        if services is None:
            raise AttributeError(name)
        return getattr(services, name)


# --------------------------------------------------------------------------- RESTCONF


class RestconfClients:
    """A RESTCONF client per node: mutual TLS with the controller certificate, or (development)
    plain HTTP with ``X-QKDSDN-Dev-Identity: controller``. Each client has its own HTTP session;
    the SDN controller app uses one node's client from one thread at a time."""

    def __init__(self, network: Network, *, pki: Any = None, insecure_dev: bool = False, timeout: float = 5.0):
        if pki is None and not insecure_dev:
            raise ValueError("RESTCONF to the nodes needs the controller certificate (pki) unless insecure_dev")
        self.network = network
        self.pki = pki
        self.insecure_dev = insecure_dev
        self.timeout = timeout
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()

    def base_url(self, node: str) -> str:
        address = self.network.node(node).km_address
        return f"{'http' if self.insecure_dev else 'https'}://{address}"

    def client(self, node: str):
        from etsi015.restconf import RestconfClient

        with self._lock:
            found = self._clients.get(node)
            if found is None:
                found = self._clients[node] = RestconfClient(self.base_url(node), session=self._session(),
                                                             timeout=self.timeout)
            return found

    def _session(self):
        if self.insecure_dev:
            import requests

            session = requests.Session()
            session.trust_env = False
            session.headers[DEV_IDENTITY_HEADER] = "controller"
            return session
        from qkdsdn.httpserver import https_session

        cert, key = self.pki.controller()
        return https_session(cert, key, self.pki.ca_cert)

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            c.session.close()


# --------------------------------------------------------------------------- database writes


class Store:
    """The apps' writes to the database, one short transaction each, and the controller's events
    on the bus. Thread-safe (a session per call). A failed write is logged and the decision it
    records stands: the control plane keeps working on a database hiccup."""

    def __init__(self, session_factory: sessionmaker, bus: Bus, topics: Topics, origin: str):
        self.session_factory = session_factory
        self.bus = bus
        self.topics = topics
        self.origin = origin
        self._link_ids: dict[str, int] = {}
        self._ids_lock = threading.Lock()
        self._queued: list[dbm.Event] = []
        self._queue_lock = threading.Lock()

    def _transaction(self, what: str, fn: Callable[[DbSession], Any]) -> bool:
        try:
            with self.session_factory.begin() as session:
                fn(session)
            return True
        except Exception:  # noqa: BLE001 - logged; the caller's decision stands
            log.exception("database write failed (%s)", what)
            return False

    def _ids(self, session: DbSession) -> None:
        with self._ids_lock:
            if not self._link_ids:
                self._link_ids = {name: id_ for name, id_ in session.execute(select(dbm.Link.name, dbm.Link.id))}

    # -- events, sessions, samples

    def record(self, events: Iterable[dbm.Event] = (), sessions: Iterable[Mapping[str, Any]] = (),
               samples: Sequence[StoreSample] = (), *, publish: bool = True) -> None:
        """Session rows (upserted by KSID), link samples and events, in one transaction; then the
        events on the bus (``publish``)."""
        events, sessions = list(events), list(sessions)
        if not events and not sessions and not samples:
            return

        def write(s: DbSession) -> None:
            for row in sessions:
                existing = s.scalar(select(dbm.Session).where(dbm.Session.ksid == row["ksid"]))
                if existing is None:
                    s.add(dbm.Session(**row))
                else:
                    for key, value in row.items():
                        setattr(existing, key, value)
            if samples:
                self._ids(s)
                for sample in samples:
                    link_id = self._link_ids.get(sample.link)
                    if link_id is not None:
                        s.add(dbm.LinkSample(link_id=link_id,
                                             ts=dt.datetime.fromtimestamp(sample.ts, dt.timezone.utc),
                                             skr_bps=sample.skr_bps, qber=sample.qber,
                                             pool_bits_src=sample.pool_bits_src, pool_bits_dst=sample.pool_bits_dst))
            s.add_all(events)

        self._transaction("sessions, samples and events", write)
        if publish:
            self.publish_events(events)

    def queue_events(self, events: Iterable[dbm.Event]) -> None:
        """Events to write with the next ``flush_events`` (the key managers' stream: many small
        rows, written in batches rather than one transaction each)."""
        with self._queue_lock:
            self._queued.extend(events)

    def flush_events(self) -> int:
        """Write the queued events in one transaction; returns how many."""
        with self._queue_lock:
            events, self._queued = self._queued, []
        if events:
            self.record(events, publish=False)
        return len(events)

    def publish_events(self, events: Iterable[dbm.Event]) -> None:
        for event in events:
            try:
                self.bus.publish(self.topics.events(), event_payload(event, self.origin))
            except Exception as exc:  # noqa: BLE001 - the stream is best effort; the DB has the event
                log.debug("event %s not published: %s", event.kind, exc)

    # -- topology

    def topology(self, outcome: TopologyOutcome) -> None:
        if not (outcome.nodes or outcome.interfaces or outcome.links or outcome.events):
            return

        def write(s: DbSession) -> None:
            nodes = {n.name: n for n in s.scalars(select(dbm.Node).where(
                dbm.Node.name.in_({r.name for r in outcome.nodes} | {r.node for r in outcome.interfaces})))}
            for row in outcome.nodes:
                node = nodes[row.name]
                node.status = row.status
                if row.version is not None:
                    node.version = row.version[:64]
                if row.last_seen is not None:
                    node.last_seen = row.last_seen
            for row in outcome.interfaces:
                iface = s.scalar(select(dbm.Interface).where(dbm.Interface.node_id == nodes[row.node].id,
                                                             dbm.Interface.qkdi_id == row.qkdi_id))
                if iface is not None:
                    iface.status = row.status[:16]
            if outcome.links:
                links = {l.name: l for l in s.scalars(select(dbm.Link).where(
                    dbm.Link.name.in_({r.name for r in outcome.links})))}
                for row in outcome.links:
                    link = links[row.name]
                    if row.status is not None:
                        link.status = row.status
                    if row.skr_bps is not None:
                        link.skr_bps = row.skr_bps
                    if row.eskr_bps is not None:
                        link.eskr_bps = row.eskr_bps
                    if row.qber is not None:
                        link.qber = row.qber
            s.add_all(outcome.events)

        self._transaction("topology", write)
        self.publish_events(outcome.events)

    def link_load(self, load: Mapping[str, tuple[float, int]]) -> None:
        """Reserved bit/s and session count of links (routing's reservations)."""
        if not load:
            return

        def write(s: DbSession) -> None:
            for link in s.scalars(select(dbm.Link).where(dbm.Link.name.in_(set(load)))):
                reserved, count = load[link.name]
                link.reserved_bps = max(0.0, float(reserved))
                link.session_count = max(0, int(count))

        self._transaction("link load", write)
