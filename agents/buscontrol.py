"""The key manager's side of the control-plane bus (docs/controller.md, docs/bus.md).

When a controller runs, a key manager reaches access and admission control over the
bus instead of the local control plane (``agents.control.LocalControlPlane``), and the
controller configures it over the bus as well as over RESTCONF. Two parts:

* ``BusControlPlane``: ``agents.control.ControlPlane`` over the bus. ``authenticate``
  and ``admit`` are requests on ``admission/request`` answered on
  ``admission/reply/<node>`` (ops ``authenticate`` and ``open``); ``key_request`` and
  ``closed`` are one-way publishes (ops ``key_request`` and ``close``).
* ``AgentBusLink``: the agent's presence on the bus.

  - ``km/<node>/config``: ``configure`` / ``deconfigure`` messages are applied through
    the agent's one ``agents.sdn_agent.Datastore`` (the one its RESTCONF server
    writes through, with the agent as ``SessionConfigHandler``), so both kinds of
    configuration take the same path and the same lock. Each is answered on
    ``km/<node>/reply`` with ``reply_message``: ``{"msg_id", "ok", "error"?, "node",
    "op", "ksid", "changed"}``. Idempotent per KSID: a ``configure`` whose ``qkd_app``
    and VIRT ``qkd_link`` equal what the datastore holds is acknowledged (``changed``
    false) without touching the key manager; a ``deconfigure`` of a KSID the node
    does not hold is acknowledged too. A ``configure`` of a held KSID with other
    leaves is a re-configuration (e.g. a re-route): the entries are replaced in one
    transaction and the key manager gets the new configuration.
  - ``notifications/<node>``: every ETSI 015 notification of the agent's
    ``NodeState`` (link performance and status, applications new / disconnected /
    QoS update, node status...), RFC 7951 JSON in the RFC 8040 envelope
    ``{"ietf-restconf:notification": {"eventTime": ..., "etsi-qkd-sdn-node:<name>": {...}}}``
    plus the bus's ``msg_id`` (drop it before ``etsi015.codec.decode_notification``).
  - ``events``: every event of the key manager (``KeyManagerAgent.subscribe_events``),
    as recorded (``timestamp``, ``kind``, ``ksid``, ``details``, ``node``, ``element``).
  - Re-synchronisation: when the bus reconnects without its persistent session
    (``session_present`` false: the broker lost it, so configuration messages sent
    meanwhile may be lost), the agent publishes on ``events`` one explicit
    ``{"op": "resync", "kind": "resync", "node", "element": "key_manager",
    "timestamp", "ksid": null, "sessions": [{"ksid", "qkd_app", "qkd_link"}, ...],
    "details": {"reason", "sessions"}}``: every session applied at the node, with
    its ETSI 015 entries in the form of a ``configure`` message. ETSI 015's
    ``sdqkdn_application_new`` carries no ``app_id``, so it cannot name the sessions;
    the controller compares the list with its own view and re-sends ``configure`` /
    ``deconfigure`` where they differ.

Payloads never carry key material: configuration names sessions and neighbours,
events and notifications describe them.
"""
from __future__ import annotations

import copy
import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping

from agents.control import AdmissionRequest, AdmissionResult, AuthResult
from agents.core.session import QoS, QoSError
from agents.sdn_agent import Datastore, DatastoreError
from etsi015 import codec
from etsi015 import model as m
from etsi015.validate import CONTENT_CONFIG, Etsi015ValidationError
from qkdsdn.bus import (CONFIGURE, DECONFIGURE, MSG_ID, Bus, BusError, BusTimeout, Subscription, Topics,
                        reply_message)

if TYPE_CHECKING:
    from agents.service import KeyManagerAgent

log = logging.getLogger("qkdsdn.agent.bus")

__all__ = ["BusControlPlane", "AgentBusLink", "agent_process_name", "agent_client_id", "DEFAULT_REQUEST_TIMEOUT_S",
           "DEFAULT_PEER_WAIT_MS", "NO_QKD_CONNECTION"]

DEFAULT_REQUEST_TIMEOUT_S = 10.0
# The peer wait admission control applies to an OPEN_CONNECT without a QoS Timeout
# (controller.admission.AdmissionConfig.default_timeout_ms); only the request's own
# deadline here depends on it.
DEFAULT_PEER_WAIT_MS = 30_000
NO_QKD_CONNECTION = 4  # ETSI 004 status
_ETSI004_STATUSES = range(0, 9)
APP_ENTRY = f"{m.NODE_MODULE}:qkd_app"
LINK_ENTRY = f"{m.NODE_MODULE}:qkd_link"


def agent_process_name(node: str) -> str:
    """The agent's process name on the bus: its ``status/<process>`` topic."""
    return f"agent-{node}"


def agent_client_id(network: str, node: str) -> str:
    """The agent's MQTT client id: stable across restarts, unique per network and node."""
    return f"{network}-{agent_process_name(node)}"


# --------------------------------------------------------------------------- control plane


class BusControlPlane:
    """``agents.control.ControlPlane`` over the bus (module doc; messages in docs/controller.md).

    ``timeout_s`` bounds an ``authenticate`` request, and is the margin an ``open``
    request gets on top of its QoS ``Timeout`` (for ETSI 004, admission answers only
    when the peer has opened too, or when that Timeout passed). No answer in time:
    authentication fails with "access control unreachable", admission with ETSI 004
    status 4 "admission control unreachable". Safe to call from many threads.
    """

    def __init__(self, bus: Bus, topics: Topics, node: str, *, timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S):
        if not timeout_s > 0:
            raise ValueError("timeout_s must be positive")
        self.bus = bus
        self.topics = topics
        self.node = node
        self.timeout_s = float(timeout_s)
        self._request_topic = topics.admission_request()
        self._reply_topic = topics.admission_reply(node)

    def _request(self, payload: dict, timeout: float) -> dict:
        return self.bus.request(self._request_topic, payload, self._reply_topic, timeout=timeout)

    def _publish(self, payload: dict) -> None:
        try:
            self.bus.publish(self._request_topic, payload)
        except (BusError, OSError) as exc:
            # One-way signals: admission's timers (session TTL, route deletion) end what they miss.
            log.warning("%s: could not tell admission control %s for %s: %s", self.node, payload["op"],
                        payload.get("ksid"), exc)

    # -- access control

    def authenticate(self, sae_id: str, *, fingerprint: str | None, interface: str) -> AuthResult:
        payload = {"op": "authenticate", "node": self.node, "sae_id": sae_id, "fingerprint": fingerprint,
                   "interface": interface}
        try:
            reply = self._request(payload, self.timeout_s)
        except BusTimeout:
            log.warning("%s: no answer from access control for %s within %.1f s", self.node, sae_id, self.timeout_s)
            return AuthResult(False, reason="access control unreachable")
        except (BusError, OSError) as exc:
            log.warning("%s: authentication request for %s failed: %s", self.node, sae_id, exc)
            return AuthResult(False, reason="access control unreachable")
        ok, user = reply.get("ok"), reply.get("user")
        if ok is True and isinstance(user, str) and user:
            return AuthResult(True, user=user)
        if ok is False:
            reason = reply.get("reason") or reply.get("error") or "refused by access control"
            return AuthResult(False, reason=str(reason))
        log.warning("%s: malformed answer from access control: %r", self.node, reply)
        return AuthResult(False, reason="malformed answer from access control")

    # -- admission control

    def admit(self, request: AdmissionRequest) -> AdmissionResult:
        payload = {"op": "open", "node": self.node, **request.to_json()}
        wait_ms = request.qos.get("Timeout") if isinstance(request.qos, Mapping) else None
        if not isinstance(wait_ms, (int, float)) or isinstance(wait_ms, bool) or wait_ms <= 0:
            wait_ms = DEFAULT_PEER_WAIT_MS
        timeout = wait_ms / 1000.0 + self.timeout_s
        try:
            reply = self._request(payload, timeout)
        except BusTimeout:
            log.warning("%s: no admission answer for %s within %.1f s", self.node, request.ksid, timeout)
            return AdmissionResult(NO_QKD_CONNECTION, reason="admission control unreachable")
        except (BusError, OSError) as exc:
            log.warning("%s: admission request for %s failed: %s", self.node, request.ksid, exc)
            return AdmissionResult(NO_QKD_CONNECTION, reason="admission control unreachable")
        if reply.get("ok") is not True:
            error = reply.get("error") or reply.get("reason") or "admission control refused the request"
            return AdmissionResult(NO_QKD_CONNECTION, reason=str(error))
        return self._result(request.ksid, reply)

    def _result(self, ksid: str, reply: dict) -> AdmissionResult:
        try:
            result = AdmissionResult.from_json(reply)
            if result.status not in _ETSI004_STATUSES:
                raise ValueError(f"status {result.status} is no ETSI 004 status")
            if result.hops is not None and (not isinstance(result.hops, int) or isinstance(result.hops, bool)
                                            or result.hops < 0):
                raise ValueError(f"hops {result.hops!r} is not a count")
            QoS.from_json(result.qos or None)  # the key manager parses it (counter-proposal)
        except (ValueError, QoSError) as exc:
            log.warning("%s: malformed admission answer for %s: %s", self.node, ksid, exc)
            return AdmissionResult(NO_QKD_CONNECTION, reason="malformed answer from admission control")
        return result

    # -- session signals

    def key_request(self, ksid: str) -> None:
        self._publish({"op": "key_request", "node": self.node, "ksid": ksid})

    def closed(self, ksid: str, source_sae: str | None, reason: str) -> None:
        self._publish({"op": "close", "node": self.node, "ksid": ksid, "reason": reason})


# --------------------------------------------------------------------------- the agent on the bus


class ConfigMessageError(ValueError):
    """A km/<node>/config message that cannot be applied as it is."""


def _drop_nulls(value: Any) -> Any:
    # RFC 7951 has no bare null: a null leaf means "not set" (as on RESTCONF).
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _entry_document(raw: Any, qualified: str, what: str) -> dict:
    """The resource document of one list entry given as ``{...}`` (the contract) or
    already wrapped as ``{"etsi-qkd-sdn-node:qkd_app": [{...}]}`` / ``{"qkd_app": {...}}``."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigMessageError(f"'{what}' must be a non-empty JSON object")
    short = qualified.split(":", 1)[1]
    if len(raw) == 1 and next(iter(raw)) in (qualified, short):
        return _drop_nulls(raw)
    return {qualified: [_drop_nulls(raw)]}


def _config_entry(obj: Any, encode: Callable[..., dict], qualified: str) -> dict:
    return encode(obj, config_only=True, validate=False)[qualified][0]


def _app_json(app: m.Application) -> dict:
    return _config_entry(app, codec.encode_application, APP_ENTRY)


def _link_json(link: m.Link) -> dict:
    return _config_entry(link, codec.encode_link, LINK_ENTRY)


class AgentBusLink:
    """A key manager agent on the bus (module doc). ``start()`` subscribes and begins
    publishing; ``stop()`` ends both. The bus belongs to the caller (closed by it).

    ``datastore``: the agent's one Datastore (default ``agent.datastore``), the one its
    RESTCONF server writes through."""

    def __init__(self, agent: "KeyManagerAgent", bus: Bus, topics: Topics, *, datastore: Datastore | None = None):
        self.agent = agent
        self.bus = bus
        self.topics = topics
        self.node = agent.name
        store = datastore if datastore is not None else agent.datastore
        if store.state is not agent.node_state or store.handler is not agent:
            raise ValueError("the datastore must be the agent's: over its NodeState, with the agent as handler")
        self.datastore = store
        self.subscription: Subscription | None = None
        self._running = threading.Event()
        self._unsubscribe_state: Callable[[], None] | None = None
        self._events_hooked = False
        self._lock = threading.Lock()
        self.resyncs = 0  # re-announcements made after a lost bus session

    # -- life cycle

    def start(self) -> "AgentBusLink":
        with self._lock:
            if self._running.is_set():
                return self
            # Publishing first: configuration applied at once (messages the broker kept for this
            # session) has its notifications and events go out too.
            self._running.set()
            self._unsubscribe_state = self.agent.node_state.subscribe(self._on_notification)
            if not self._events_hooked:
                # KeyManagerAgent has no unsubscribe for events: the callback checks _running.
                self.agent.subscribe_events(self._on_event)
                self._events_hooked = True
            if self.subscription is None:
                try:
                    self.subscription = self.bus.subscribe(self.topics.km_config(self.node), self._on_config)
                except BaseException:
                    self._running.clear()
                    self._unsubscribe_state()
                    self._unsubscribe_state = None
                    raise
                self.bus.on_reconnect(self._on_reconnect)
        restored = getattr(self.agent, "restored_sessions", 0)
        if restored:
            # Sessions came back from the agent's journal: the controller may have ended some
            # while it was down (or configured others); its answer makes this node hold exactly
            # what it configured here.
            self.resync(f"the agent restarted with {restored} restored session(s)")
        return self

    def stop(self) -> None:
        """Stop applying and publishing. The subscription to ``km/<node>/config`` stays, so
        that the broker keeps queueing configuration for the agent's persistent session
        until the caller closes the bus; what still arrives is refused ("stopping")."""
        with self._lock:
            self._running.clear()
            if self._unsubscribe_state is not None:
                self._unsubscribe_state()
                self._unsubscribe_state = None

    @property
    def running(self) -> bool:
        return self._running.is_set()

    # -- publishing

    def _publish(self, topic: str, payload: dict, what: str) -> None:
        if not self._running.is_set():
            return
        try:
            self.bus.publish(topic, payload)
        except (BusError, OSError, TypeError, ValueError) as exc:  # closed at shutdown; not JSON (NaN...)
            log.warning("%s: %s not published: %s", self.node, what, exc)

    def _on_notification(self, notification: m.Notification, event_time: str) -> None:
        try:
            doc = codec.encode_notification(notification, event_time=event_time)
        except (Etsi015ValidationError, TypeError, ValueError):
            log.exception("%s: notification %s cannot be encoded", self.node, notification.NAME)
            return
        self._publish(self.topics.notifications(self.node), doc, f"notification {notification.NAME}")

    def _on_event(self, record: dict) -> None:
        if not self._running.is_set():
            return
        # The agent's record is shared with its event buffer: publish a JSON copy.
        payload = json.loads(json.dumps(record, default=str))
        payload.pop(MSG_ID, None)
        self._publish(self.topics.events(), payload, f"event {record.get('kind')}")

    # -- re-synchronisation

    def _on_reconnect(self, session_present: bool) -> None:
        if not session_present and self._running.is_set():
            self.resync("the bus session was lost (reconnected without a persistent session)")

    def sessions(self) -> list[dict]:
        """The sessions applied at this node, each as ``{"ksid", "qkd_app", "qkd_link"}``."""
        snapshot = self.agent.node_state.snapshot()
        configured = self.agent.node_state.configured_sessions()
        apps = {a.app_id: a for a in snapshot.applications}
        links = {link.qkdl_id: link for link in snapshot.links}
        out = []
        for ksid in sorted(configured):
            app, link = apps.get(ksid), links.get(configured[ksid].virt_link_id)
            if app is None or link is None:
                continue  # removed since the two reads: the next resync has it right
            link = copy.deepcopy(link)
            link.qkdl_applications = [ksid]
            out.append({"ksid": ksid, "qkd_app": _app_json(app), "qkd_link": _link_json(link)})
        return out

    def resync(self, reason: str) -> str | None:
        """Publish the explicit ``resync`` event (module doc); returns its msg_id."""
        if not self._running.is_set():
            return None
        sessions = self.sessions()
        payload = {"op": "resync", "kind": "resync", "node": self.node, "element": "key_manager",
                   "timestamp": time.time(), "ksid": None, "sessions": sessions,
                   "details": {"reason": reason, "sessions": len(sessions)}}
        log.info("%s: re-announcing %d session(s) to the controller: %s", self.node, len(sessions), reason)
        try:
            msg_id = self.bus.publish(self.topics.events(), payload)
        except (BusError, OSError) as exc:
            log.warning("%s: resync not published: %s", self.node, exc)
            return None
        self.resyncs += 1
        return msg_id

    # -- configuration

    def _on_config(self, topic: str, message: dict) -> None:
        op, ksid = message.get("op"), message.get("ksid")
        extra = {"node": self.node, "op": op if isinstance(op, str) else None,
                 "ksid": ksid if isinstance(ksid, str) else None}
        try:
            if not self._running.is_set():
                raise ConfigMessageError(f"the key manager {self.node} is stopping")
            if op == CONFIGURE:
                changed = self._configure(message)
            elif op == DECONFIGURE:
                changed = self._deconfigure(message)
            else:
                raise ConfigMessageError(f"op must be '{CONFIGURE}' or '{DECONFIGURE}', not {op!r}")
        except ConfigMessageError as exc:
            self._reply(message, False, str(exc), extra)
        except DatastoreError as exc:
            self._reply(message, False, str(exc), extra)
        except Exception:  # noqa: BLE001 — a bug must still answer, not leave the controller waiting
            log.exception("%s: applying %s of %s failed", self.node, op, ksid)
            self._reply(message, False, "internal error of the key manager", extra)
        else:
            self._reply(message, True, None, {**extra, "changed": changed})

    def _reply(self, message: dict, ok: bool, error: str | None, extra: dict) -> None:
        if not ok:
            log.warning("%s: %s of %s refused: %s", self.node, extra.get("op"), extra.get("ksid"), error)
        # Not caught: if the reply cannot be published (BusClosed...) the handler fails, the bus
        # forgets the msg_id, and a redelivered copy is applied again (idempotently) and answered.
        self.bus.publish(self.topics.km_reply(self.node), reply_message(message, ok, error, **extra))

    @staticmethod
    def _ksid(message: dict) -> str:
        ksid = message.get("ksid")
        if not isinstance(ksid, str) or not ksid:
            raise ConfigMessageError("'ksid' must be a non-empty string")
        return ksid

    def _configure(self, message: dict) -> bool:
        ksid = self._ksid(message)
        for name in ("qkd_app", "qkd_link"):
            if name not in message:
                raise ConfigMessageError(f"a configure needs '{name}'")
        try:
            app = codec.decode_application(_entry_document(message["qkd_app"], APP_ENTRY, "qkd_app"),
                                           content=CONTENT_CONFIG)
            link = codec.decode_link(_entry_document(message["qkd_link"], LINK_ENTRY, "qkd_link"),
                                     content=CONTENT_CONFIG)
        except Etsi015ValidationError as exc:
            raise ConfigMessageError(f"invalid ETSI 015 entry: {exc}") from None
        if app.app_id != ksid:
            raise ConfigMessageError(f"qkd_app.app_id {app.app_id!r} differs from ksid {ksid!r}")
        if link.qkdl_type is not m.LinkType.VIRT:
            raise ConfigMessageError("qkd_link must be a VIRT link (the session's forwarding entry)")
        if app.backing_qkdl_id != [link.qkdl_id]:
            raise ConfigMessageError(f"qkd_app.backing_qkdl_id must name exactly the qkd_link {link.qkdl_id}")
        if link.qkdl_applications and link.qkdl_applications != [ksid]:
            raise ConfigMessageError(f"qkd_link.qkdl_applications must be [{ksid!r}]")
        want_app, want_link = _app_json(app), _link_json(link)

        def mutate(links: dict[str, m.Link], apps: dict[str, m.Application]) -> bool:
            old_app, old_link = apps.get(ksid), links.get(link.qkdl_id)
            if (old_app is not None and old_link is not None and _app_json(old_app) == want_app
                    and _link_json(old_link) == want_link):
                return False  # already applied: nothing changes, the key manager is not called
            if old_app is not None:
                # A re-route may bring a new forwarding entry: drop the old one nobody else uses.
                for lid in old_app.backing_qkdl_id:
                    if lid != link.qkdl_id and lid in links and links[lid].is_virtual and not any(
                            lid in a.backing_qkdl_id for aid, a in apps.items() if aid != ksid):
                        del links[lid]
            links[link.qkdl_id] = copy.deepcopy(link)
            apps[ksid] = copy.deepcopy(app)
            return True

        return bool(self.datastore.transact(mutate))

    def _deconfigure(self, message: dict) -> bool:
        ksid = self._ksid(message)

        def mutate(links: dict[str, m.Link], apps: dict[str, m.Application]) -> bool:
            app = apps.pop(ksid, None)
            backing = set(app.backing_qkdl_id) if app is not None else set()
            gone = [lid for lid, link in links.items()
                    if link.is_virtual and (lid in backing or ksid in link.qkdl_applications)
                    and not any(lid in a.backing_qkdl_id for a in apps.values())]
            for lid in gone:
                del links[lid]
            return app is not None or bool(gone)

        return bool(self.datastore.transact(mutate))
