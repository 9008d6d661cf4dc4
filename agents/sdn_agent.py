"""The SDN agent: the node's ETSI GS QKD 015 RESTCONF server (RFC 8040) over ``etsi015``.

Three parts:

* ``NodeState``: the node's live ``etsi-qkd-sdn-node`` view (``etsi015.model``
  objects behind a lock): identity, capabilities, interfaces and PHYS links from
  the network file, the sessions (``qkd_app``, app_id = KSID) and forwarding
  entries (VIRT ``qkd_link``) that controllers configure, and the live state the
  key manager reports (link status and performance, app status and statistics).
  Changes produce ETSI 015 notifications for ``subscribe``\\ d callbacks.
* ``Datastore``: the configuration writes (create, replace, merge, delete of VIRT
  links and applications), each one a transaction that applies the resulting
  session configurations to the key manager through a ``SessionConfigHandler``
  and commits only if the key manager accepts them.
* ``restconf_blueprint``: the Flask blueprint serving both under
  ``/restconf/data/etsi-qkd-sdn-node:qkd_node``.

A session reaches the key manager as a ``qkd_app`` plus the VIRT ``qkd_link`` it
names in ``backing_qkdl_id`` (the table in ``docs/key-management.md``;
``config_from_etsi`` / ``etsi_from_config``). Whichever of the two arrives last
triggers ``handler.configure``; deleting the app triggers ``handler.deconfigure``.
A VIRT link without its app is a forwarding entry waiting for its session.
PHYS links, interfaces and capabilities come from the network file and are read-only.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Callable, Iterable, Protocol, runtime_checkable
from urllib.parse import quote, unquote

from flask import Blueprint, Response, request

from etsi015 import codec
from etsi015 import model as m
from etsi015 import schema as s
from etsi015.errors import restconf_error
from etsi015.yang_types import format_date_and_time
from etsi015.validate import CONTENT_CONFIG, Etsi015ValidationError
# The session mapping lives in etsi015.session (the controller uses it too); the names
# stay importable from here.
from etsi015.session import (SessionConfig, SessionMappingError, app_path, config_from_etsi,
                             etsi_from_config, link_path)
from etsi015.session import app_issues as _app_issues
from etsi015.session import quote_key as _quote_key

__all__ = [
    "SessionConfig", "SessionConfigHandler", "ConfigRejected", "SessionMappingError",
    "config_from_etsi", "etsi_from_config", "NodeState", "Datastore", "DatastoreError",
    "AuthenticationRequired", "restconf_blueprint", "MEDIA_TYPE", "DATA_ROOT",
    "link_path", "app_path",
]

log = logging.getLogger("qkdsdn.sdn_agent")

MEDIA_TYPE = "application/yang-data+json"
_JSON_TYPES = (MEDIA_TYPE, "application/json")
DATA_ROOT = "/restconf/data"
NODE_RESOURCE = f"{m.NODE_MODULE}:qkd_node"
_ROOT_PATH = f"/{NODE_RESOURCE}"
UINT32_MAX = 0xFFFFFFFF
# RFC 7895 ietf-yang-library revision this server's discovery answers with.
YANG_LIBRARY_VERSION = "2016-06-21"


# --------------------------------------------------------------------------- session configuration


class ConfigRejected(Exception):
    """Raised by a SessionConfigHandler that refuses a configuration.

    ``tag`` is the RFC 8040 error-tag the RESTCONF client gets: ``"invalid-value"``
    (HTTP 400: the configuration itself is wrong) or ``"resource-denied"`` (409:
    the key manager lacks the resources right now).
    """

    _STATUS = {"invalid-value": 400, "resource-denied": 409}

    def __init__(self, message: str, *, tag: str = "invalid-value"):
        if tag not in self._STATUS:
            raise ValueError(f"ConfigRejected tag must be one of {sorted(self._STATUS)}, not {tag!r}")
        super().__init__(message)
        self.message = message
        self.tag = tag

    @property
    def status(self) -> int:
        return self._STATUS[self.tag]


@runtime_checkable
class SessionConfigHandler(Protocol):
    """The key manager's side of session configuration (implemented by agents/service.py).

    Both are called with the Datastore's write lock held, so calls never overlap;
    a handler must not write configuration back through the Datastore. ``configure``
    is also called again with the new configuration when an applied session is
    modified. ``deconfigure`` may name a session the key manager has already ended
    itself (e.g. by inactivity) and must then do nothing. Raise ConfigRejected to refuse.
    """

    def configure(self, config: SessionConfig) -> None: ...

    def deconfigure(self, ksid: str) -> None: ...


# --------------------------------------------------------------------------- errors


class DatastoreError(Exception):
    """A refused RESTCONF operation: HTTP ``status`` and the RFC 8040 error ``document``."""

    def __init__(self, status: int, tag: str, message: str, path: str | None = None, *,
                 document: dict | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.tag = tag
        self.message = message
        self.path = path
        self.headers = dict(headers or {})
        if document is None:
            try:
                document = restconf_error(status, tag, message, path)
            except ValueError:
                # A status RFC 8040 ties to no error-tag (415): same document shape.
                error = {"error-type": "protocol", "error-tag": tag, "error-message": message}
                if path is not None:
                    error["error-path"] = path
                document = {"ietf-restconf:errors": {"error": [error]}}
        self.document = document

    @classmethod
    def invalid(cls, exc: Etsi015ValidationError | SessionMappingError) -> "DatastoreError":
        """400 listing every issue of ``exc`` (each an (error-path, message, ...) tuple)."""
        path, message = exc.issues[0][0], exc.issues[0][1]
        return cls(400, "invalid-value", message, path, document=exc.restconf_errors())


def _not_found(what: str, path: str) -> DatastoreError:
    # RFC 8040 sec. 7: a missing resource is 404 with error-tag invalid-value
    # (data-missing is only ever sent with 409).
    return DatastoreError(404, "invalid-value", f"{what} does not exist", path)


class AuthenticationRequired(Exception):
    """Raised by an ``authorize`` callable when the request carries no usable identity
    (HTTP 401); returning False means authenticated but not allowed (HTTP 403)."""

    def __init__(self, message: str = "authentication required",
                 challenge: str = 'Bearer realm="qkdsdn"'):
        super().__init__(message)
        self.message = message
        self.challenge = challenge


# --------------------------------------------------------------------------- node state


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _uint32(value: float | int | None, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    if value < 0:
        raise ValueError(f"{what} must not be negative, got {value!r}")
    return min(int(round(value)), UINT32_MAX)  # uint32 leaf: saturate, never wrap


def _config_json(link: m.Link) -> dict:
    return codec.encode_link(link, config_only=True, validate=False)


def _app_config_json(app: m.Application) -> dict:
    return codec.encode_application(app, config_only=True, validate=False)


def _marked_change(old: Any, new: Any, threshold: float) -> bool:
    if old is None or new is None:
        return old is not new
    old, new = float(old), float(new)
    if old == 0:
        return new != 0
    return abs(new - old) > threshold * abs(old)


Subscriber = Callable[[m.Notification, str], None]


class NodeState:
    """The live ETSI 015 view of one node; every method is thread-safe.

    Reads return copies. Live updates come from the key manager
    (``set_link_performance``, ``set_link_status``, ``set_interface_status``,
    ``set_node_status``, ``set_app_status``, ``record_consumption``); configuration
    changes come through a ``Datastore``. Notifications are delivered, in the order
    of the changes, to every ``subscribe``\\ d ``callback(notification, event_time)``
    in the thread that made the change, after the state lock is released.

    ``perf_change_threshold``: a link performance update is notified when a metric
    moved by more than this fraction since the last notified value (0: on every
    change). ``stats_window_s`` / ``stats_windows``: length and number of the kept
    ``app_statistics`` windows. ``clock``: returns the current aware datetime.
    """

    def __init__(self, node: m.QkdNode, *, perf_change_threshold: float = 0.05,
                 stats_window_s: int = 60, stats_windows: int = 60,
                 clock: Callable[[], datetime] = _now):
        if node.applications or any(not link.is_physical for link in node.links):
            raise ValueError("a NodeState starts with PHYS links only: sessions and VIRT links "
                             "arrive as configuration")
        codec.encode_node(node)  # refuse an invalid start state now, not at the first GET
        if perf_change_threshold < 0 or stats_window_s < 1 or stats_windows < 1:
            raise ValueError("perf_change_threshold >= 0, stats_window_s >= 1 and "
                             "stats_windows >= 1 are required")
        self._node = copy.deepcopy(node)
        self._phys_ids = frozenset(link.qkdl_id for link in node.links)
        self._perf_threshold = perf_change_threshold
        self._window = stats_window_s
        self._windows = stats_windows
        self._clock = clock
        self._lock = threading.RLock()
        # Serialises configuration transactions, handler calls included, apart from reads
        # and live updates (which only take _lock).
        self._write_lock = threading.Lock()
        self._configured: dict[str, SessionConfig] = {}
        self._perf_notified: dict[str, m.LinkPerformance] = {}
        self._subscribers: list[Subscriber] = []
        self._pending: list[tuple[m.Notification, str]] = []
        self._deliver_lock = threading.Lock()
        self._delivering: int | None = None

    @classmethod
    def from_network(cls, network: Any, node_name: str, *, version: str | None = None,
                     status: m.NodeStatus = m.NodeStatus.NEW,
                     link_status: m.LinkStatus = m.LinkStatus.PENDING, **kwargs: Any) -> "NodeState":
        """The start state of ``node_name`` in a ``db.netfile.Network``: one interface per
        physical link end (qkdi_id = ``network.interface_id``), one PHYS link per physical
        link (TRANSMITTER at the master end, RECEIVER at the slave). The node starts NEW
        and its links PENDING until the key manager reports otherwise."""
        try:
            node = network.node(node_name)
        except KeyError:
            known = ", ".join(n.name for n in network.nodes)
            raise ValueError(f"no node {node_name!r} in network {network.name!r} "
                             f"(nodes: {known})") from None
        ids = {n.name: n.qkdn_id for n in network.nodes}
        interfaces, links = [], []
        for link in network.links_of(node_name):
            local_if = network.interface_id(node_name, link.name)
            is_master = link.master == node_name
            other = link.slave if is_master else link.master
            role = m.QkdRole.TRANSMITTER if is_master else m.QkdRole.RECEIVER
            interfaces.append(m.Interface(
                qkdi_id=local_if, qkdi_model="qkdsdn-twin" if link.device else "etsi014-kme",
                qkdi_type=m.QkdTechnology.DV_QKD,
                qkdi_att_point=m.AttachmentPoint(device=node_name, port=local_if),
                qkdi_capabilities=m.InterfaceCapabilities(
                    role_support=role, wavelength_range=str(link.wavelength_nm)),
                qkdi_status=m.InterfaceStatus.ENABLED))
            links.append(m.Link(
                qkdl_id=link.qkdl_id, qkdl_status=link_status, qkdl_enable=True,
                qkdl_local=m.LinkEnd(qkdn_id=node.qkdn_id, qkdi_id=local_if),
                qkdl_remote=m.LinkEnd(qkdn_id=ids[other],
                                      qkdi_id=network.interface_id(other, link.name)),
                qkdl_type=m.LinkType.PHYS,
                phys_channel_att=Decimal(str(round(link.channel_att_db, 3))),
                phys_wavelength=str(link.wavelength_nm), phys_qkd_role=role))
        return cls(m.QkdNode(
            qkdn_id=node.qkdn_id, qkdn_status=status, qkdn_version=version or _version(),
            qkdn_location_id=node.location or "",
            capabilities=m.Capabilities(link_stats_support=True, application_stats_support=True,
                                        key_relay_mode_enable=True),
            interfaces=interfaces, links=links), **kwargs)

    # -- reads

    @property
    def qkdn_id(self) -> str:
        return self._node.qkdn_id

    def snapshot(self) -> m.QkdNode:
        """A copy of the node; VIRT links list (``qkdl_applications``) the apps they back."""
        with self._lock:
            node = copy.deepcopy(self._node)
        backed: dict[str, list[str]] = {}
        for app in node.applications:
            for lid in app.backing_qkdl_id:
                backed.setdefault(lid, []).append(app.app_id)
        for link in node.links:
            link.qkdl_applications += [a for a in backed.get(link.qkdl_id, ())
                                       if a not in link.qkdl_applications]
        return node

    def document(self, config_only: bool = False) -> dict:
        """``{"etsi-qkd-sdn-node:qkd_node": {...}}`` of the current state (validated)."""
        return codec.encode_node(self.snapshot(), config_only=config_only)

    def link(self, qkdl_id: str) -> m.Link:
        """A copy of one link (KeyError if absent)."""
        return self.snapshot().link(qkdl_id)

    def application(self, app_id: str) -> m.Application:
        """A copy of one application (KeyError if absent)."""
        with self._lock:
            return copy.deepcopy(self._node.application(app_id))

    def configured_sessions(self) -> dict[str, SessionConfig]:
        """KSID -> the configuration applied to the key manager."""
        with self._lock:
            return dict(self._configured)

    # -- notifications

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(notification, event_time)`` for every notification from now on;
        returns a function that unsubscribes. A callback that raises is logged and skipped."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)
        return unsubscribe

    def _emit(self, notification: m.Notification) -> None:
        # Under _lock: queue order is change order.
        self._pending.append((notification, format_date_and_time(self._clock())))

    def _deliver(self) -> None:
        me = threading.get_ident()
        if self._delivering == me:
            return  # a callback changed the state: the running loop below delivers it in order
        with self._deliver_lock:
            self._delivering = me
            try:
                while True:
                    with self._lock:
                        if not self._pending:
                            return
                        batch, self._pending = self._pending, []
                        subscribers = list(self._subscribers)
                    for notification, stamp in batch:
                        for callback in subscribers:
                            try:
                                callback(notification, stamp)
                            except Exception:  # noqa: BLE001 - one subscriber must not stop the others
                                log.exception("notification subscriber %r failed on %s",
                                              callback, notification.NAME)
            finally:
                self._delivering = None

    # -- live updates

    def set_node_status(self, status: m.NodeStatus) -> None:
        if not isinstance(status, m.NodeStatus):
            raise TypeError(f"expected a NodeStatus, got {status!r}")
        with self._lock:
            self._node.qkdn_status = status

    def _find_link(self, qkdl_id: str) -> m.Link:
        try:
            return self._node.link(qkdl_id)
        except KeyError:
            raise KeyError(f"no qkd_link {qkdl_id}") from None

    def set_link_status(self, qkdl_id: str, status: m.LinkStatus, reason: str | None = None) -> None:
        """Record a link's status; going OFF notifies ``sdqkdn_link_down`` with ``reason``."""
        if not isinstance(status, m.LinkStatus):
            raise TypeError(f"expected a LinkStatus, got {status!r}")
        with self._lock:
            link = self._find_link(qkdl_id)
            previous, link.qkdl_status = link.qkdl_status, status
            if status is m.LinkStatus.OFF and previous is not m.LinkStatus.OFF:
                self._emit(m.LinkDown(qkdl_id=qkdl_id, reason=reason))
        self._deliver()

    def set_link_performance(self, qkdl_id: str, skr: float | None = None, eskr: float | None = None,
                             qber: float | Decimal | None = None,
                             expected_consumption: float | None = None) -> None:
        """Record a link's measured performance (bit/s; QBER as a fraction, PHYS links
        only); None leaves a metric unchanged. Notifies ``sdqkdn_link_perf_update`` on
        the first report and whenever a metric moved markedly since the last notice."""
        values = {"skr": _uint32(skr, "skr"), "eskr": _uint32(eskr, "eskr"),
                  "expected_consumption": _uint32(expected_consumption, "expected_consumption")}
        qber_value = None
        if qber is not None:
            if isinstance(qber, bool) or not isinstance(qber, (int, float, Decimal)) or not (
                    0 <= qber <= 1):
                raise ValueError(f"qber must be a fraction between 0 and 1, got {qber!r}")
            qber_value = Decimal(str(qber)).quantize(Decimal("0.001"))
        with self._lock:
            link = self._find_link(qkdl_id)
            if qber_value is not None and not link.is_physical:
                raise ValueError(f"qkd_link {qkdl_id} is not PHYS: QBER exists on PHYS links only")
            perf = link.qkdl_performance
            for name, value in values.items():
                if value is not None:
                    setattr(perf, name, value)
            if qber_value is not None:
                perf.phys_perf = [p for p in perf.phys_perf if p.perf_type is not m.PhysPerfType.QBER]
                perf.phys_perf.append(m.PhysPerf(m.PhysPerfType.QBER, qber_value))
            last = self._perf_notified.get(qkdl_id)
            if last is None or self._perf_moved(last, perf):
                snapshot = copy.deepcopy(perf)
                self._perf_notified[qkdl_id] = snapshot
                self._emit(m.LinkPerfUpdate(qkdl_id=qkdl_id, performance=copy.deepcopy(snapshot)))
        self._deliver()

    def _perf_moved(self, old: m.LinkPerformance, new: m.LinkPerformance) -> bool:
        t = self._perf_threshold
        if any(_marked_change(getattr(old, n), getattr(new, n), t)
               for n in ("skr", "eskr", "expected_consumption")):
            return True
        old_perf = {p.perf_type: p.value for p in old.phys_perf}
        new_perf = {p.perf_type: p.value for p in new.phys_perf}
        return any(_marked_change(old_perf.get(k), new_perf.get(k), t)
                   for k in set(old_perf) | set(new_perf))

    def set_interface_status(self, qkdi_id: int, status: m.InterfaceStatus,
                             reason: str | None = None) -> None:
        """Record an interface's status; leaving ENABLED notifies ``sdqkdn_interface_down``."""
        if not isinstance(status, m.InterfaceStatus):
            raise TypeError(f"expected an InterfaceStatus, got {status!r}")
        with self._lock:
            try:
                iface = self._node.interface(qkdi_id)
            except KeyError:
                raise KeyError(f"no qkd_interface {qkdi_id}") from None
            previous, iface.qkdi_status = iface.qkdi_status, status
            if previous is m.InterfaceStatus.ENABLED and status is not m.InterfaceStatus.ENABLED:
                self._emit(m.InterfaceDown(qkdi_id=qkdi_id, reason=reason))
        self._deliver()

    def set_app_status(self, app_id: str, status: m.AppStatus) -> None:
        """Record a session's status as the key manager sees it (e.g. OUT-OF-TIME after
        inactivity); leaving ON notifies ``sdqkdn_application_disconnected``."""
        if not isinstance(status, m.AppStatus):
            raise TypeError(f"expected an AppStatus, got {status!r}")
        with self._lock:
            try:
                app = self._node.application(app_id)
            except KeyError:
                raise KeyError(f"no qkd_app {app_id}") from None
            previous, app.app_status = app.app_status, status
            if previous is m.AppStatus.ON and status is not m.AppStatus.ON:
                self._emit(m.ApplicationDisconnected(app_id=app_id))
        self._deliver()

    def record_consumption(self, app_id: str, bits: int, at: datetime | None = None) -> None:
        """Add ``bits`` of key delivered to session ``app_id`` to the statistics window
        (aligned to multiples of ``stats_window_s`` since the epoch) that holds ``at``."""
        if isinstance(bits, bool) or not isinstance(bits, int) or bits < 0:
            raise ValueError(f"bits must be a non-negative integer, got {bits!r}")
        at = at or self._clock()
        if at.tzinfo is None:
            raise ValueError("record_consumption needs an aware datetime")
        start_s = math.floor(at.timestamp() / self._window) * self._window
        start = datetime.fromtimestamp(start_s, timezone.utc)
        end = format_date_and_time(start + timedelta(seconds=self._window))
        with self._lock:
            try:
                app = self._node.application(app_id)
            except KeyError:
                raise KeyError(f"no qkd_app {app_id}") from None
            for entry in app.statistics:
                if entry.end_time == end:
                    entry.consumed_bits = min((entry.consumed_bits or 0) + bits, UINT32_MAX)
                    break
            else:
                app.statistics.append(m.AppStatistics(
                    end_time=end, start_time=format_date_and_time(start),
                    consumed_bits=min(bits, UINT32_MAX)))
                app.statistics.sort(key=lambda e: e.end_time)
                del app.statistics[:-self._windows]

    # -- configuration transactions (used by Datastore)

    def _transact(self, handler: SessionConfigHandler,
                  mutate: Callable[[dict[str, m.Link], dict[str, m.Application]], Any]) -> Any:
        """Run ``mutate`` on copies of the links and apps, check the result, apply the
        session changes to ``handler`` and commit; all or nothing."""
        with self._write_lock:
            with self._lock:
                old_links = {l.qkdl_id: copy.deepcopy(l) for l in self._node.links}
                old_apps = {a.app_id: copy.deepcopy(a) for a in self._node.applications}
                configured = dict(self._configured)
            links, apps = copy.deepcopy(old_links), copy.deepcopy(old_apps)
            result = mutate(links, apps)
            self._check(old_links, links, old_apps, apps, configured)
            desired = self._desired(links, apps)
            changes = [(ksid, configured.get(ksid), desired.get(ksid))
                       for ksid in sorted(set(configured) | set(desired))
                       if configured.get(ksid) != desired.get(ksid)]
            # Release before acquire: deconfigured sessions free resources new ones may need.
            changes.sort(key=lambda c: c[2] is not None)
            self._apply(handler, changes)
            with self._lock:
                self._commit(links, apps, desired, changes)
        self._deliver()
        return result

    def _check(self, old_links: dict, links: dict, old_apps: dict, apps: dict,
               configured: dict) -> None:
        for lid in sorted(self._phys_ids):
            if lid not in links:
                raise DatastoreError(403, "access-denied", "PHYS links come from the network "
                                     "file and cannot be deleted", link_path(lid))
            if _config_json(links[lid]) != _config_json(old_links[lid]):
                raise DatastoreError(403, "access-denied", "PHYS links come from the network "
                                     "file and are read-only", link_path(lid))
        for lid, link in links.items():
            if lid in self._phys_ids:
                continue
            if lid in old_links and _config_json(link) == _config_json(old_links[lid]):
                continue
            if link.qkdl_type is m.LinkType.PHYS:
                raise DatastoreError(403, "access-denied", "PHYS links come from the network file; "
                                     "only VIRT links can be written", link_path(lid, "qkdl_type"))
            if link.qkdl_type is not m.LinkType.VIRT:
                raise DatastoreError(400, "invalid-value", f"a writable qkd_link is "
                                     f"{m.LinkType.VIRT.value}", link_path(lid, "qkdl_type"))
            try:
                codec.encode_link(link, config_only=True)
            except Etsi015ValidationError as exc:
                raise DatastoreError.invalid(exc) from None
        for aid, app in apps.items():
            if aid in old_apps and _app_config_json(app) == _app_config_json(old_apps[aid]):
                continue
            try:
                codec.encode_application(app, config_only=True)
            except Etsi015ValidationError as exc:
                raise DatastoreError.invalid(exc) from None
            issues = _app_issues(app)
            for lid in app.backing_qkdl_id:
                if lid in links and not links[lid].is_virtual:
                    issues.append((app_path(aid, "backing_qkdl_id"),
                                   f"qkd_link {lid} is not VIRT: a session is backed by its "
                                   "forwarding entry"))
            if issues:
                raise DatastoreError.invalid(SessionMappingError(issues))
        for lid in sorted(set(old_links) - set(links)):
            users = sorted(aid for aid, app in apps.items()
                           if aid in configured and lid in app.backing_qkdl_id)
            if users:
                raise DatastoreError(409, "in-use", f"qkd_link {lid} is the forwarding entry of "
                                     f"configured session(s) {', '.join(users)}: delete the "
                                     "qkd_app first", link_path(lid))

    def _desired(self, links: dict, apps: dict) -> dict[str, SessionConfig]:
        desired = {}
        for aid, app in apps.items():
            link = links.get(app.backing_qkdl_id[0]) if app.backing_qkdl_id else None
            if link is None or not link.is_virtual or not link.effective("qkdl_enable"):
                continue  # waits for its forwarding entry
            try:
                desired[aid] = config_from_etsi(app, link, self.qkdn_id)
            except SessionMappingError as exc:
                raise DatastoreError.invalid(exc) from None
        return desired

    @staticmethod
    def _apply(handler: SessionConfigHandler, changes: list) -> None:
        done = []
        try:
            for ksid, old, new in changes:
                if new is None:
                    handler.deconfigure(ksid)
                else:
                    handler.configure(new)
                done.append((ksid, old, new))
        except BaseException as exc:
            for ksid, old, new in reversed(done):
                try:
                    if old is None:
                        handler.deconfigure(ksid)
                    else:
                        handler.configure(old)
                except Exception:  # noqa: BLE001 - keep undoing the rest
                    log.exception("could not roll back session %s after a refused change", ksid)
            if isinstance(exc, ConfigRejected):
                ksid = changes[len(done)][0]
                raise DatastoreError(exc.status, exc.tag, f"session {ksid}: {exc.message}",
                                     app_path(ksid)) from exc
            raise

    def _commit(self, links: dict, apps: dict, desired: dict, changes: list) -> None:
        current_links = {l.qkdl_id: l for l in self._node.links}
        current_apps = {a.app_id: a for a in self._node.applications}
        for lid, link in links.items():
            live = current_links.get(lid)
            # Live state may have moved while the handler ran: keep the newest.
            link.qkdl_performance = copy.deepcopy(live.qkdl_performance) if live else m.LinkPerformance()
            if lid in self._phys_ids and live is not None:
                link.qkdl_status = live.qkdl_status
        stamp = format_date_and_time(self._clock())
        changed = {ksid: (old, new) for ksid, old, new in changes}
        for aid, app in apps.items():
            live = current_apps.get(aid)
            app.creation_time = live.creation_time if live else stamp
            app.statistics = copy.deepcopy(live.statistics) if live else []
            app.app_status = live.app_status if live else None
            old, new = changed.get(aid, (None, None))
            if aid in changed:
                if new is not None and old is None:
                    app.app_status = m.AppStatus.ON
                elif new is None and app.app_status is m.AppStatus.ON:
                    app.app_status = m.AppStatus.DISCONNECTED
        order = [l.qkdl_id for l in self._node.links]
        self._node.links = [links[i] for i in order if i in links] + [
            link for i, link in links.items() if i not in current_links]
        order = [a.app_id for a in self._node.applications]
        self._node.applications = [apps[i] for i in order if i in apps] + [
            app for i, app in apps.items() if i not in current_apps]
        self._configured = dict(desired)
        for perf_id in set(self._perf_notified) - set(links):
            del self._perf_notified[perf_id]
        for ksid, old, new in changes:
            app = apps.get(ksid)
            live = current_apps.get(ksid)
            if old is None and app is not None:
                self._emit(m.ApplicationNew.from_application(app))
            elif new is None:
                if live is not None and live.app_status is m.AppStatus.ON:
                    self._emit(m.ApplicationDisconnected(app_id=ksid))
            elif app is not None and live is not None and (
                    app.app_priority != live.app_priority or app.app_qos != live.app_qos):
                self._emit(m.ApplicationQosUpdate(app_id=ksid, app_qos=copy.deepcopy(app.app_qos),
                                                  app_priority=app.app_priority))


def _version() -> str:
    from importlib import metadata
    try:
        return f"qkdsdn {metadata.version('qkdsdn')}"
    except metadata.PackageNotFoundError:
        return "qkdsdn"


# --------------------------------------------------------------------------- datastore


class Datastore:
    """Configuration writes on a NodeState, each applied to ``handler`` as one transaction.

    Used by the RESTCONF blueprint and usable as-is by a bus client. Every method
    raises DatastoreError (with the RFC 8040 status, error-tag and error-path) when
    it refuses, and then nothing has changed.
    """

    def __init__(self, state: NodeState, handler: SessionConfigHandler):
        self.state = state
        self.handler = handler

    def create(self, links: Iterable[m.Link] = (), apps: Iterable[m.Application] = ()) -> None:
        """RFC 8040 POST: every entry is new (409 data-exists otherwise)."""
        links, apps = list(links), list(apps)

        def mutate(cur_links: dict, cur_apps: dict) -> None:
            for link in links:
                if link.qkdl_id in cur_links:
                    raise DatastoreError(409, "data-exists", f"qkd_link {link.qkdl_id} already "
                                         "exists", link_path(link.qkdl_id))
                cur_links[link.qkdl_id] = copy.deepcopy(link)
            for app in apps:
                if app.app_id in cur_apps:
                    raise DatastoreError(409, "data-exists", f"qkd_app {app.app_id} already exists",
                                         app_path(app.app_id))
                cur_apps[app.app_id] = copy.deepcopy(app)
        self.state._transact(self.handler, mutate)

    def put_link(self, link: m.Link) -> bool:
        """Create or replace one link; True when it was created."""
        return self.state._transact(self.handler, _put(link.qkdl_id, link, links=True))

    def put_application(self, app: m.Application) -> bool:
        return self.state._transact(self.handler, _put(app.app_id, app, links=False))

    def merge_link(self, patch: m.Link) -> None:
        """RFC 8040 plain PATCH of one existing link (404 if absent). Leaf-lists merge
        by adding values: to change the hops of an entry, PUT it."""
        self.state._transact(self.handler, _merge_one(patch.qkdl_id, patch, links=True))

    def merge_application(self, patch: m.Application) -> None:
        self.state._transact(self.handler, _merge_one(patch.app_id, patch, links=False))

    def merge_links(self, patches: Iterable[m.Link]) -> None:
        """PATCH of qkd_links: each entry merges into its link or creates it."""
        self.state._transact(self.handler, _merge_many(list(patches), links=True))

    def merge_applications(self, patches: Iterable[m.Application]) -> None:
        self.state._transact(self.handler, _merge_many(list(patches), links=False))

    def replace_links(self, links: Iterable[m.Link]) -> None:
        """PUT of qkd_links: the links become exactly ``links`` (PHYS ones included, unchanged)."""
        self.state._transact(self.handler, _replace(list(links), links=True))

    def replace_applications(self, apps: Iterable[m.Application]) -> None:
        self.state._transact(self.handler, _replace(list(apps), links=False))

    def delete_link(self, qkdl_id: str) -> None:
        self.state._transact(self.handler, _delete(qkdl_id, links=True))

    def delete_application(self, app_id: str) -> None:
        self.state._transact(self.handler, _delete(app_id, links=False))

    def delete_links(self) -> None:
        """DELETE of qkd_links: every link (refused while PHYS links exist)."""
        self.state._transact(self.handler, lambda links, apps: links.clear())

    def delete_applications(self) -> None:
        self.state._transact(self.handler, lambda links, apps: apps.clear())

    def transact(self, mutate: Callable[[dict[str, m.Link], dict[str, m.Application]], Any]) -> Any:
        """Run ``mutate(links, apps)`` as one transaction and return what it returns.

        ``links`` / ``apps`` are copies of the stored entries keyed by ``qkdl_id`` /
        ``app_id``; ``mutate`` changes them in place (or raises DatastoreError to refuse).
        The result is checked and applied like any other write: all or nothing. For
        writers that change several entries at once, such as a bus configuration
        (a ``qkd_app`` and its VIRT ``qkd_link`` together, agents/buscontrol.py)."""
        return self.state._transact(self.handler, mutate)


def _pick(links: bool, cur_links: dict, cur_apps: dict) -> tuple[dict, Callable[[str], str], str]:
    return (cur_links, link_path, "qkd_link") if links else (cur_apps, app_path, "qkd_app")


def _put(key: str, obj: Any, *, links: bool):
    def mutate(cur_links: dict, cur_apps: dict) -> bool:
        table, _, _ = _pick(links, cur_links, cur_apps)
        created = key not in table
        table[key] = copy.deepcopy(obj)
        return created
    return mutate


def _merge_one(key: str, patch: Any, *, links: bool):
    def mutate(cur_links: dict, cur_apps: dict) -> None:
        table, path, what = _pick(links, cur_links, cur_apps)
        if key not in table:
            raise _not_found(f"{what} {key}", path(key))
        table[key] = codec.merge(table[key], patch)
    return mutate


def _merge_many(patches: list, *, links: bool):
    def mutate(cur_links: dict, cur_apps: dict) -> None:
        table, _, _ = _pick(links, cur_links, cur_apps)
        for patch in patches:
            key = patch.qkdl_id if links else patch.app_id
            table[key] = codec.merge(table[key], patch) if key in table else copy.deepcopy(patch)
    return mutate


def _replace(objs: list, *, links: bool):
    def mutate(cur_links: dict, cur_apps: dict) -> None:
        table, _, _ = _pick(links, cur_links, cur_apps)
        table.clear()
        for obj in objs:
            table[obj.qkdl_id if links else obj.app_id] = copy.deepcopy(obj)
    return mutate


def _delete(key: str, *, links: bool):
    def mutate(cur_links: dict, cur_apps: dict) -> None:
        table, path, what = _pick(links, cur_links, cur_apps)
        if key not in table:
            raise _not_found(f"{what} {key}", path(key))
        del table[key]
    return mutate


# --------------------------------------------------------------------------- RESTCONF


@dataclass(frozen=True)
class _Step:
    node: Any  # an etsi015.schema node
    key: str | None = None


class _Target:
    """A resolved RESTCONF data path below qkd_node."""

    def __init__(self, steps: list[_Step]):
        self.steps = steps

    @property
    def last(self) -> _Step:
        return self.steps[-1]

    @property
    def kind(self) -> str:
        if len(self.steps) == 1:
            return "root"
        if len(self.steps) == 2:
            return "container"
        if len(self.steps) == 3 and isinstance(self.last.node, s.ListNode):
            return "entry"
        return "deeper"

    @property
    def name(self) -> str:
        return self.last.node.name

    @property
    def error_path(self) -> str:
        path = ""
        for i, step in enumerate(self.steps):
            path += f"/{NODE_RESOURCE}" if i == 0 else f"/{step.node.name}"
            if step.key is not None:
                path += f"[{step.node.key}={_quote_key(step.key)}]"
        return path


def _resolve(segments: list[str]) -> _Target:
    """RFC 8040 sec. 3.5.3 path segments (still percent-encoded) -> schema steps."""
    first = unquote(segments[0]) if segments else ""
    if first != NODE_RESOURCE:
        raise DatastoreError(404, "invalid-value", f"no data resource {first!r}: this server "
                             f"holds {NODE_RESOURCE} only", f"/{first}" if first else None)
    steps = [_Step(s.QKD_NODE)]
    node: Any = s.QKD_NODE
    for raw in segments[1:]:
        name, eq, raw_key = raw.partition("=")
        name = unquote(name)
        module, colon, local = name.rpartition(":")
        if colon and module != m.NODE_MODULE:
            raise DatastoreError(404, "invalid-value", f"unknown module {module!r}",
                                 _Target(steps).error_path + f"/{name}")
        child = node.child(local) if isinstance(node, (s.Container, s.ListNode)) else None
        if child is None:
            raise DatastoreError(404, "invalid-value", f"{node.name} has no child {local!r}",
                                 _Target(steps).error_path + f"/{local}")
        key = None
        if isinstance(child, s.ListNode):
            if not eq:
                raise DatastoreError(400, "malformed-message", f"list {local} needs a key value "
                                     f"({local}=<{child.key}>)", _Target(steps).error_path + f"/{local}")
            parts = raw_key.split(",")
            if len(parts) != 1:
                raise DatastoreError(400, "malformed-message", f"list {local} has one key, "
                                     f"{len(parts)} given", _Target(steps).error_path + f"/{local}")
            key = unquote(parts[0], errors="strict")
        elif eq:
            raise DatastoreError(400, "malformed-message", f"{local} is not a list: no key value "
                                 "allowed", _Target(steps).error_path + f"/{local}")
        steps.append(_Step(child, key))
        node = child
    return _Target(steps)


def _select(doc: dict, target: _Target) -> dict:
    """The sub-document of ``target`` within a whole-node document (404 if absent)."""
    value: Any = doc[NODE_RESOURCE]
    for step in target.steps[1:]:
        node = step.node
        if not isinstance(value, dict) or node.name not in value:
            if isinstance(node, s.Container) and isinstance(value, dict):
                value = {}  # a non-presence container exists even when empty
                continue
            raise _not_found(node.name, target.error_path)
        value = value[node.name]
        if isinstance(node, s.ListNode):
            for entry in value:
                if str(entry.get(node.key)) == step.key:
                    value = entry
                    break
            else:
                raise _not_found(f"{node.name} {step.key}", target.error_path)
    if len(target.steps) == 1:
        return doc
    last = target.last
    return {f"{m.NODE_MODULE}:{last.node.name}": [value] if isinstance(last.node, s.ListNode)
            else value}


def _drop_nulls(value: Any) -> Any:
    # RFC 7951 has no bare null; TeraFlowSDN sends "virt_prev_hop": null at a route's
    # first node, meaning "not set".
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _no_duplicates(pairs: list) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate member {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_WRITABLE = {"qkd_links": "qkd_link", "qkd_applications": "qkd_app"}
_DECODERS = {"qkd_links": codec.decode_links, "qkd_link": codec.decode_link,
             "qkd_applications": codec.decode_applications, "qkd_app": codec.decode_application}


def restconf_blueprint(state: NodeState, handler: SessionConfigHandler,
                       authorize: Callable[[dict, str, str], bool], *,
                       name: str = "etsi015_restconf", datastore: Datastore | None = None) -> Blueprint:
    """The ETSI 015 RESTCONF server of ``state`` as a Flask blueprint.

    ``authorize(environ, method, path)`` runs before every ``/restconf`` request:
    True lets it through, False answers 403, raising AuthenticationRequired answers
    401. Serves GET on the whole datastore, the node, its four children, list
    entries and anything below them (query ``content=all|config``), writes on
    ``qkd_links`` / ``qkd_applications`` and their entries (POST, PUT, PATCH,
    DELETE), and the RFC 8040 discovery resources (``/.well-known/host-meta``,
    ``/restconf``, ``/restconf/yang-library-version``).

    ``datastore``: the node's Datastore when other writers (the bus) share it; it must
    be over ``state`` with ``handler``. Default: a Datastore of its own.
    """
    if datastore is not None and (datastore.state is not state or datastore.handler is not handler):
        raise ValueError("the datastore must be over the same NodeState and handler as the blueprint")
    bp = Blueprint(name, __name__)
    store = datastore if datastore is not None else Datastore(state, handler)

    def respond(doc: Any, status: int = 200, headers: dict | None = None) -> Response:
        if doc is None:
            response = Response(status=status, headers=headers or {})
            del response.headers["Content-Type"]  # no body, no media type
            return response
        mimetype = request.accept_mimetypes.best_match(_JSON_TYPES) or MEDIA_TYPE
        return Response(json.dumps(doc, ensure_ascii=False), status=status,
                        headers=headers or {}, mimetype=mimetype)

    def fail(exc: DatastoreError) -> Response:
        return Response(json.dumps(exc.document), status=exc.status, headers=exc.headers,
                        mimetype=MEDIA_TYPE)

    def guarded(view: Callable[..., Response]) -> Callable[..., Response]:
        def run(*args: Any, **kwargs: Any) -> Response:
            try:
                try:
                    allowed = authorize(request.environ, request.method, request.path)
                except AuthenticationRequired as exc:
                    raise DatastoreError(401, "access-denied", exc.message,
                                         headers={"WWW-Authenticate": exc.challenge}) from None
                if not allowed:
                    raise DatastoreError(403, "access-denied",
                                         f"{request.method} {request.path} is not allowed for this caller")
                if request.headers.get("Accept") and not request.accept_mimetypes.best_match(_JSON_TYPES):
                    raise DatastoreError(406, "invalid-value",
                                         f"this server answers in {MEDIA_TYPE} or application/json")
                return view(*args, **kwargs)
            except DatastoreError as exc:
                return fail(exc)
            except Exception:  # noqa: BLE001 - an RFC 8040 500 beats an HTML page
                log.exception("RESTCONF %s %s failed", request.method, request.path)
                return fail(DatastoreError(500, "operation-failed", "internal error"))
        run.__name__ = view.__name__
        return run

    # -- discovery (RFC 8040 sec. 3.1, 3.3)

    @bp.route("/.well-known/host-meta", methods=["GET"])
    def host_meta() -> Response:
        xrd = ("<XRD xmlns='http://docs.oasis-open.org/ns/xri/xrd-1.0'>"
               "<Link rel='restconf' href='/restconf'/></XRD>")
        return Response(xrd, content_type="application/xrd+xml")

    @bp.route("/restconf", methods=["GET"])
    @bp.route("/restconf/", methods=["GET"])
    @guarded
    def api_root() -> Response:
        return respond({"ietf-restconf:restconf": {
            "data": {}, "operations": {}, "yang-library-version": YANG_LIBRARY_VERSION}})

    @bp.route("/restconf/yang-library-version", methods=["GET"])
    @guarded
    def yang_library_version() -> Response:
        return respond({"ietf-restconf:yang-library-version": YANG_LIBRARY_VERSION})

    @bp.route("/restconf/operations", methods=["GET"])
    @guarded
    def operations() -> Response:
        return respond({"ietf-restconf:operations": {}})

    # -- data

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

    @bp.route(DATA_ROOT, methods=methods)
    @bp.route(f"{DATA_ROOT}/", methods=methods)
    @bp.route(f"{DATA_ROOT}/<path:subpath>", methods=methods)
    @guarded
    def data(subpath: str = "") -> Response:
        segments = _raw_segments()
        if not segments:
            if request.method in ("GET", "HEAD"):
                return respond(_get_document(None))
            if request.method == "OPTIONS":
                return Response(status=200, headers={"Allow": "GET, HEAD, OPTIONS"})
            if request.method == "POST":
                return write(_Target([_Step(s.QKD_NODE)]), datastore_root=True)
            raise _not_allowed("GET, HEAD, OPTIONS, POST", None)
        target = _resolve(segments)
        allowed = _allowed_methods(target)
        if request.method == "OPTIONS":
            return Response(status=200, headers={"Allow": allowed})
        if request.method not in allowed.split(", "):
            raise _not_allowed(allowed, target.error_path)
        if request.method in ("GET", "HEAD"):
            return respond(_get_document(target))
        return write(target)

    @bp.route("/restconf/<path:other>", methods=methods)
    @guarded
    def unknown(other: str) -> Response:
        raise DatastoreError(404, "invalid-value", f"no RESTCONF resource /restconf/{other}")

    def _get_document(target: _Target | None) -> dict:
        unsupported = [k for k in request.args if k != "content"]
        if unsupported:
            raise DatastoreError(400, "invalid-value", f"query parameter(s) "
                                 f"{', '.join(sorted(unsupported))} not supported")
        content = request.args.get("content", "all")
        if content not in ("all", "config"):
            raise DatastoreError(400, "invalid-value", f"content={content!r} not supported "
                                 "(all, config)")
        doc = state.document(config_only=content == "config")
        return doc if target is None else _select(doc, target)

    def _read_body() -> Any:
        if request.args:
            raise DatastoreError(400, "invalid-value", f"query parameter(s) "
                                 f"{', '.join(sorted(request.args))} not supported on writes")
        if request.mimetype and request.mimetype not in _JSON_TYPES:
            raise DatastoreError(415, "invalid-value", f"Content-Type {request.mimetype!r} is not "
                                 f"supported: send {MEDIA_TYPE}")
        raw = request.get_data()
        if not raw.strip():
            raise DatastoreError(400, "malformed-message", "a request body is required")
        try:
            doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates,
                             parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError) as exc:
            raise DatastoreError(400, "malformed-message", f"body is not UTF-8 JSON: {exc}") from None
        return _drop_nulls(doc)

    def _decode(doc: Any, payload: str, partial: bool = False) -> Any:
        try:
            return _DECODERS[payload](doc, content=CONTENT_CONFIG, partial=partial)
        except Etsi015ValidationError as exc:
            raise DatastoreError.invalid(exc) from None

    def write(target: _Target, datastore_root: bool = False) -> Response:
        if request.method == "DELETE":
            if request.get_data().strip():
                raise DatastoreError(400, "malformed-message", "DELETE takes no body")
            return delete(target)
        doc = _read_body()
        payload = codec.payload_name(doc)
        if request.method == "POST":
            return post(target, doc, payload, datastore_root)
        is_links = target.steps[1].node.name == "qkd_links"
        if target.kind == "container":
            if payload != target.name:
                raise _wrong_payload(doc, target, [target.name])
            if request.method == "PUT":
                value = _decode(doc, payload)
                (store.replace_links if is_links else store.replace_applications)(value)
            else:
                value = _decode(doc, payload, partial=True)
                (store.merge_links if is_links else store.merge_applications)(value)
            return respond(None, 204)
        if payload != target.name:  # an entry
            raise _wrong_payload(doc, target, [target.name])
        value = _decode(doc, payload, partial=request.method == "PATCH")
        key_name = target.last.node.key
        body_key = getattr(value, key_name)
        if body_key != target.last.key:
            # RFC 8040 sec. 4.5: the key in the body must match the one in the URI.
            raise DatastoreError(400, "invalid-value", f"the body's {key_name} {body_key!r} "
                                 f"differs from the URI's {target.last.key!r}",
                                 target.error_path + f"/{key_name}")
        if request.method == "PUT":
            created = store.put_link(value) if is_links else store.put_application(value)
            return respond(None, 201, {"Location": request.base_url}) if created else respond(None, 204)
        (store.merge_link if is_links else store.merge_application)(value)
        return respond(None, 204)

    def post(target: _Target, doc: Any, payload: str | None, datastore_root: bool) -> Response:
        if datastore_root:
            if payload == "qkd_node":
                raise DatastoreError(409, "data-exists", f"{NODE_RESOURCE} exists", _ROOT_PATH)
            raise _wrong_payload(doc, target, [NODE_RESOURCE])
        if target.kind == "root":
            allowed = [*_WRITABLE, *_WRITABLE.values()]
        else:
            # TeraFlowSDN POSTs the wrapper container to itself; RFC 8040 sec. 4.4.1 the entry.
            allowed = [target.name, _WRITABLE[target.name]]
        if payload not in allowed:
            raise _wrong_payload(doc, target, allowed)
        value = _decode(doc, payload)
        entries = value if isinstance(value, list) else [value]
        if not entries:
            raise DatastoreError(400, "malformed-message", f"no entry to create in {payload}",
                                 target.error_path)
        if payload in ("qkd_links", "qkd_link"):
            store.create(links=entries)
            location = _location("qkd_links", "qkd_link", entries[0].qkdl_id)
        else:
            store.create(apps=entries)
            location = _location("qkd_applications", "qkd_app", entries[0].app_id)
        return respond(None, 201, {"Location": location})

    def delete(target: _Target) -> Response:
        is_links = target.steps[1].node.name == "qkd_links"
        if target.kind == "container":
            (store.delete_links if is_links else store.delete_applications)()
        elif is_links:
            store.delete_link(target.last.key)
        else:
            store.delete_application(target.last.key)
        return respond(None, 204)

    def _location(container: str, entry: str, key: str) -> str:
        # Keep whatever prefix the blueprint is mounted under.
        base = request.base_url
        base = base[:base.find(DATA_ROOT) + len(DATA_ROOT)]
        return f"{base}/{NODE_RESOURCE}/{container}/{entry}={quote(key, safe='')}"

    return bp


def _raw_segments() -> list[str]:
    """Segments after /restconf/data, still percent-encoded (RFC 8040 sec. 3.5.3:
    split first, then decode each key, so an encoded '/' or ',' stays inside its key)."""
    raw = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI") or ""
    raw = raw.split("?", 1)[0]
    if "://" in raw:  # absolute-form request target
        raw = "/" + raw.split("://", 1)[1].partition("/")[2]
    if unquote(raw) != request.script_root + request.path:
        raw = request.script_root + quote(request.path)  # no raw form: the decoded path will do
    index = raw.find(DATA_ROOT)
    rest = raw[index + len(DATA_ROOT):] if index >= 0 else ""
    segments = rest.strip("/").split("/") if rest.strip("/") else []
    if any(seg == "" for seg in segments):
        raise DatastoreError(400, "malformed-message", "empty path segment")
    return segments


def _allowed_methods(target: _Target) -> str:
    kind = target.kind
    writable = target.steps[1].node.name in _WRITABLE if len(target.steps) > 1 else False
    if kind == "root":
        return "GET, HEAD, OPTIONS, POST"
    if kind == "container" and writable:
        return "GET, HEAD, OPTIONS, POST, PUT, PATCH, DELETE"
    if kind == "entry" and writable:
        return "GET, HEAD, OPTIONS, PUT, PATCH, DELETE"
    return "GET, HEAD, OPTIONS"


def _not_allowed(allowed: str, path: str | None) -> DatastoreError:
    read_only = allowed == "GET, HEAD, OPTIONS"
    message = (f"{request.method} is not allowed here: this resource is read-only (it comes "
               "from the network file or the devices)" if read_only else
               f"{request.method} is not allowed here (allowed: {allowed})")
    return DatastoreError(405, "operation-not-supported", message, path, headers={"Allow": allowed})


def _wrong_payload(doc: Any, target: _Target, expected: list[str]) -> DatastoreError:
    if not isinstance(doc, dict) or len(doc) != 1:
        return DatastoreError(400, "malformed-message", "the body must be one JSON object with "
                              f"one member: {' or '.join(expected)}", target.error_path)
    (member,) = doc
    return DatastoreError(400, "unknown-element", f"{member!r} cannot be written at "
                          f"{target.error_path}; expected {' or '.join(expected)}",
                          f"{target.error_path}/{member}")
