"""The controller's side of the bus contract (docs/controller.md, docs/bus.md), as plain code.

Parsing of what key managers send (``admission/request`` ops, ``km/<node>/reply``, ETSI 015
notifications, retained ``status/<process>``, ``events``), building of what the controller
sends (admission answers, ETSI 015 alarms, the controller's events), and ``AdmissionReplies``:
which open request each admission answer belongs to, and when it may go out. No os_ken, no
I/O, no clock: the app shells call these with the time.

Admission answers (``admission/reply/<node>``), per docs/controller.md:

- ``authenticate`` -> ``{"msg_id", "ok", "user", "reason"}`` (``error`` too when refused);
- ``open`` -> ``{"msg_id", "ok": true, "status", "qos", "hops", "reason"}``. Status 0 means
  *admitted and configured*: admission control decides the route and sends the
  configurations at once, but the answer is held until every key manager on the route has
  confirmed its configuration (the session is ``active``); if the session ends first, the
  held answer becomes a refusal (status 4) with the reason;
- a request that cannot be read at all gets ``{"msg_id", "ok": false, "error"}``.
"""
from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Any, Container, Mapping, Optional, Union

from db import models as dbm
from etsi015 import codec
from etsi015 import model as em
from qkdsdn.bus import MSG_ID, reply_message

from controller.access import AccessDecision, UserProfiles
from controller.access import ELEMENT as ACCESS_ELEMENT
from controller.admission import AdmissionRequest, Outcome, QoS, Reply, Status

# The bus name the controller publishes its own ETSI 015 notifications (alarms) under:
# ``notifications/_controller``. Node names start with a letter or digit, so it never
# collides with a node.
CONTROLLER_NOTIFIER = "_controller"
OPS = ("authenticate", "open", "key_request", "close")
_INTERFACES = ("004", "014")
_OPEN_FIELDS = ("ksid", "interface", "user", "requesting_node", "local_sae", "source_sae", "destination_sae",
                "qos")
# db.models.Event column widths
_WIDTH = {"element": 32, "node": 64, "ksid": 36, "kind": 64}


class BadMessage(ValueError):
    """A bus message that does not follow the contract; the text says why."""


# --------------------------------------------------------------------------- admission requests


@dataclass(frozen=True)
class AuthenticateMsg:
    msg_id: str
    node: str
    sae_id: str
    fingerprint: Optional[str]
    interface: Optional[str]


@dataclass(frozen=True)
class OpenMsg:
    msg_id: str
    node: str
    ksid: str
    interface: str
    user: str
    local_sae: str
    source_sae: str
    destination_sae: str
    qos: Mapping[str, Any]


@dataclass(frozen=True)
class KeyRequestMsg:
    msg_id: str
    node: str
    ksid: str


@dataclass(frozen=True)
class CloseMsg:
    msg_id: str
    node: str
    ksid: str
    reason: str


AdmissionMessage = Union[AuthenticateMsg, OpenMsg, KeyRequestMsg, CloseMsg]


def requester(payload: Mapping[str, Any], nodes: Container[str]) -> Optional[tuple[str, str]]:
    """(node, msg_id) of a request that can be answered: a known node and a msg_id; else None."""
    node, msg_id = payload.get("node"), payload.get(MSG_ID)
    if isinstance(node, str) and node in nodes and isinstance(msg_id, str) and msg_id:
        return node, msg_id
    return None


def _text(payload: Mapping[str, Any], name: str, *, optional: bool = False) -> Optional[str]:
    value = payload.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise BadMessage(f"'{name}' must be a non-empty string")
    return value


def parse_admission_message(payload: Mapping[str, Any], nodes: Container[str]) -> AdmissionMessage:
    """One ``admission/request`` message. Raises BadMessage."""
    who = requester(payload, nodes)
    if who is None:
        raise BadMessage("an admission request needs 'msg_id' and the 'node' of a key manager of the network")
    node, msg_id = who
    op = payload.get("op")
    if op == "authenticate":
        fingerprint = payload.get("fingerprint")
        if fingerprint is not None and not isinstance(fingerprint, str):
            raise BadMessage("'fingerprint' must be a string or null")
        interface = payload.get("interface")
        if interface is not None and interface not in _INTERFACES:
            raise BadMessage(f"'interface' must be one of {_INTERFACES}")
        return AuthenticateMsg(msg_id, node, _text(payload, "sae_id"), fingerprint, interface)  # type: ignore[arg-type]
    if op == "open":
        missing = [k for k in _OPEN_FIELDS if k not in payload]
        if missing:
            raise BadMessage(f"an open request needs {', '.join(missing)}")
        fields = {k: _text(payload, k) for k in _OPEN_FIELDS if k != "qos"}
        if fields["requesting_node"] != node:
            raise BadMessage(f"requesting_node {fields['requesting_node']!r} differs from node {node!r}")
        if fields["interface"] not in _INTERFACES:
            raise BadMessage(f"'interface' must be one of {_INTERFACES}")
        if fields["local_sae"] not in (fields["source_sae"], fields["destination_sae"]):
            raise BadMessage("local_sae must be the source or the destination SAE")
        qos = payload["qos"]
        if qos is None:
            qos = {}
        if not isinstance(qos, Mapping):
            raise BadMessage("'qos' must be an object")
        return OpenMsg(msg_id=msg_id, node=node, ksid=fields["ksid"], interface=fields["interface"],  # type: ignore[arg-type]
                       user=fields["user"], local_sae=fields["local_sae"], source_sae=fields["source_sae"],  # type: ignore[arg-type]
                       destination_sae=fields["destination_sae"], qos=dict(qos))  # type: ignore[arg-type]
    if op == "key_request":
        return KeyRequestMsg(msg_id, node, _text(payload, "ksid"))  # type: ignore[arg-type]
    if op == "close":
        reason = payload.get("reason")
        return CloseMsg(msg_id, node, _text(payload, "ksid"), reason if isinstance(reason, str) else "")  # type: ignore[arg-type]
    raise BadMessage(f"op must be one of {', '.join(OPS)}, not {op!r}")


@dataclass(frozen=True)
class OpenRefusal:
    """An open request admission control never sees: answered at once with this ETSI 004 status."""

    status: Status
    reason: str


def admission_request(msg: OpenMsg, profiles: UserProfiles) -> Union[AdmissionRequest, OpenRefusal]:
    """The ``controller.admission.AdmissionRequest`` of an open message: the endpoints' nodes are
    the SAEs' home nodes in the user profiles. The key manager speaks for its own application
    only, and for the user access control authenticated for it."""
    apps = profiles.applications
    for role, sae in (("source", msg.source_sae), ("destination", msg.destination_sae)):
        if sae not in apps:
            return OpenRefusal(Status.NO_QKD_CONNECTION, f"unknown {role} application {sae!r}")
    local = apps[msg.local_sae]
    if local.node != msg.node:
        return OpenRefusal(Status.NO_QKD_CONNECTION,
                           f"application {msg.local_sae!r} is homed at {local.node}, not at {msg.node}")
    if local.user != msg.user:
        return OpenRefusal(Status.NO_QKD_CONNECTION,
                           f"application {msg.local_sae!r} belongs to {local.user!r}, not to {msg.user!r}")
    try:
        qos = QoS.from_etsi(msg.qos)
        return AdmissionRequest(ksid=msg.ksid, interface=msg.interface, src_sae=msg.source_sae,
                                dst_sae=msg.destination_sae, src_node=apps[msg.source_sae].node,
                                dst_node=apps[msg.destination_sae].node, requesting_node=msg.node,
                                user=msg.user, qos=qos)
    except ValueError as exc:
        return OpenRefusal(Status.NO_QKD_CONNECTION, f"invalid request: {exc}")


# --------------------------------------------------------------------------- answers


def error_answer(msg_id: str, error: str) -> dict:
    return reply_message({MSG_ID: msg_id}, False, error)


def auth_answer(msg_id: str, decision: AccessDecision) -> dict:
    return reply_message({MSG_ID: msg_id}, decision.ok, None if decision.ok else decision.reason,
                         user=decision.user if decision.ok else None, reason=decision.reason)


def open_answer(msg_id: str, status: int, qos: Optional[Mapping[str, Any]], hops: Optional[int], reason: str) -> dict:
    return reply_message({MSG_ID: msg_id}, True, None, status=int(status), qos=dict(qos or {}), hops=hops,
                         reason=reason)


def authenticate_unverified(profiles: UserProfiles, sae_id: str, node: str, now: dt.datetime) -> AccessDecision:
    """Development mode only (``--insecure-dev``, where nothing carries a client certificate):
    the key manager's word for the SAE, checked against the profiles like a verified caller
    (the SAE exists, is homed at the asking node, its user exists and is not revoked)."""
    details: dict[str, Any] = {"sae_id": sae_id, "method": "insecure-dev", "node": node}

    def decide(ok: bool, reason: str, user: Optional[str] = None) -> AccessDecision:
        d = dict(details, reason=reason)
        if user is not None:
            d["user"] = user
        event = dbm.Event(ts=now, element=ACCESS_ELEMENT, node=node, ksid=None,
                          kind="auth_accepted" if ok else "auth_rejected", details=d)
        return AccessDecision(ok, user, sae_id if ok else None, reason, event)

    app = profiles.applications.get(sae_id)
    if app is None:
        return decide(False, f"unknown SAE {sae_id!r}")
    user = profiles.users.get(app.user)
    if user is None:
        return decide(False, f"SAE {sae_id!r} belongs to unknown user {app.user!r}")
    if user.revoked:
        return decide(False, f"user {user.name!r} revoked", user.name)
    if app.node != node:
        return decide(False, f"SAE {sae_id!r} is homed at {app.node!r}, not at the asking key manager {node!r}",
                      user.name)
    return decide(True, "accepted without a credential (insecure development mode)", user.name)


@dataclass(frozen=True)
class Answer:
    """A message for ``admission/reply/<node>``."""

    node: str
    payload: dict


@dataclass(frozen=True)
class OpenKey:
    ksid: str
    node: str
    msg_id: str


class AdmissionReplies:
    """Routes admission control's ``Reply`` actions to the open requests they answer (module doc).

    ``process(outcome, current)`` after every admission call; ``current`` is the open request
    that call handled, if any. Not thread-safe.
    """

    def __init__(self) -> None:
        self._open: dict[tuple[str, str], str] = {}  # (ksid, node) -> msg_id of the waiting open
        self._held: dict[str, dict[str, tuple[str, Reply]]] = {}  # ksid -> node -> (msg_id, reply)

    def waiting(self) -> int:
        """Open requests without their answer yet."""
        return len(self._open)

    def process(self, outcome: Outcome, current: Optional[OpenKey] = None) -> list[Answer]:
        answers: list[Answer] = []
        answered_current = False
        for reply in outcome.replies:
            key = (reply.ksid, reply.node)
            if current is not None and key == (current.ksid, current.node):
                msg_id: Optional[str] = current.msg_id
                answered_current = True
            else:
                msg_id = self._open.get(key)
            if msg_id is None:
                continue  # its request is gone (answered, or the key manager closed it)
            if reply.status is Status.SUCCESSFUL:
                self._open[key] = msg_id
                self._held.setdefault(reply.ksid, {})[reply.node] = (msg_id, reply)
                continue
            answers.append(Answer(reply.node, open_answer(msg_id, reply.status,
                                                          reply.qos.to_etsi() if reply.qos else None,
                                                          reply.hops, reply.reason)))
            if self._open.get(key) == msg_id:
                del self._open[key]
        if current is not None and not answered_current:
            # Waiting for the peer (or a duplicate that changed nothing): answered later.
            self._open.setdefault((current.ksid, current.node), current.msg_id)
        for row in outcome.sessions:
            ksid, state = row["ksid"], row["state"]
            if state is dbm.SessionState.ACTIVE:
                for node, (msg_id, reply) in sorted(self._held.pop(ksid, {}).items()):
                    route = row.get("route") or []
                    hops = max(0, len(route) - 2) if route else reply.hops
                    answers.append(Answer(node, open_answer(msg_id, Status.SUCCESSFUL, row.get("qos"), hops,
                                                            "admitted and configured")))
                    self._open.pop((ksid, node), None)
            elif state is dbm.SessionState.TERMINATED:
                for node, (msg_id, _reply) in sorted(self._held.pop(ksid, {}).items()):
                    answers.append(Answer(node, open_answer(msg_id, Status.NO_QKD_CONNECTION, None, None,
                                                            row.get("reason") or "session terminated")))
                for key in [k for k in self._open if k[0] == ksid]:
                    del self._open[key]
        return answers


# --------------------------------------------------------------------------- key manager replies, status


def km_reply_node(topic: str) -> Optional[str]:
    """The node of a ``.../km/<node>/reply`` topic."""
    parts = topic.split("/")
    return parts[-2] if len(parts) >= 3 and parts[-1] == "reply" and parts[-3] == "km" else None


def last_segment(topic: str) -> str:
    return topic.rsplit("/", 1)[-1]


def parse_status(topic: str, payload: Mapping[str, Any]) -> Optional[tuple[str, str]]:
    """(process, state) of a ``status/<process>`` message, or None if it is not one. The process
    is the topic's: the payload's ``process`` member carries the bus client id, which may differ
    (``<network>-agent-<node>`` on ``status/agent-<node>``)."""
    state = payload.get("state")
    if state not in ("online", "offline"):
        return None
    return last_segment(topic), state


# --------------------------------------------------------------------------- notifications


def parse_notification(payload: Mapping[str, Any]) -> tuple[em.Notification, Optional[str]]:
    """An ETSI 015 notification from a bus payload (bare or RFC 8040 envelope, plus ``msg_id``).
    Raises ``etsi015.Etsi015ValidationError`` (a ValueError) when it is not one."""
    doc = {k: v for k, v in payload.items() if k != MSG_ID}
    return codec.decode_notification(doc)


def alarm_notification(*, qkdl_id: str, severity: str, message: str, notification: str,
                       link_status: Optional[str], now: dt.datetime) -> dict:
    """An ETSI 015 ``alarm`` / ``event`` notification about a link, RFC 8040 envelope."""
    report = em.LinkReport(qkdl_id=qkdl_id, message=message,
                           severity=em.Severity(f"{em.TYPES_MODULE}:{severity}"),
                           qkdl_status=em.LinkStatus(f"{em.TYPES_MODULE}:{link_status}") if link_status else None)
    body = em.Alarm(link=report) if notification == "alarm" else em.Event(link=report)
    return codec.encode_notification(body, event_time=now)


# --------------------------------------------------------------------------- events


def _clip(value: Any, width: int) -> Optional[str]:
    if value is None:
        return None
    text = str(value)
    return text[:width]


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def event_from_bus(payload: Mapping[str, Any], now: dt.datetime) -> Optional[dbm.Event]:
    """A ``db.models.Event`` row from an ``events`` message of a key manager; None for a message
    that is no event (no ``kind``). The key manager's ``timestamp`` (POSIX seconds) is kept
    when it is a plausible wall-clock time, else the time of arrival is used."""
    kind = payload.get("kind")
    if not isinstance(kind, str) or not kind:
        return None
    ts = now
    stamp = payload.get("timestamp")
    if isinstance(stamp, (int, float)) and not isinstance(stamp, bool) and math.isfinite(stamp):
        # Agents may stamp with a monotonic clock: only a time within a day of now is wall-clock.
        if abs(stamp - now.timestamp()) < 86400:
            ts = dt.datetime.fromtimestamp(stamp, dt.timezone.utc)
    details = payload.get("details")
    details = dict(details) if isinstance(details, Mapping) else {}
    for key, value in payload.items():
        if key not in ("kind", "timestamp", "details", "node", "element", "ksid", MSG_ID, "origin"):
            details.setdefault(key, value)
    return dbm.Event(ts=ts, element=_clip(payload.get("element") or "key_manager", _WIDTH["element"]),
                     node=_clip(payload.get("node"), _WIDTH["node"]),
                     ksid=_clip(payload.get("ksid"), _WIDTH["ksid"]), kind=_clip(kind, _WIDTH["kind"]),
                     details=_json_safe(details))


def event_payload(event: dbm.Event, origin: str) -> dict:
    """A controller event for the ``events`` topic (``origin``: the controller's client id, so
    that the controller does not store its own events twice)."""
    ts = event.ts or dt.datetime.now(dt.timezone.utc)
    return {"timestamp": ts.timestamp(), "element": event.element, "node": event.node, "ksid": event.ksid,
            "kind": event.kind, "details": _json_safe(event.details or {}), "origin": origin}
