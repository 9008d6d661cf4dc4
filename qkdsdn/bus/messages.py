"""Topic layout and message shapes of the control-plane bus (docs/bus.md).

Payloads are JSON objects and never carry key material: configuration names
sessions (KSID) and neighbours, replies say ok or why not.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qkdsdn.bus.base import MSG_ID, new_msg_id

ROOT = "qkdsdn"

CONFIGURE = "configure"
DECONFIGURE = "deconfigure"
OPS = (CONFIGURE, DECONFIGURE)

ONLINE = "online"
OFFLINE = "offline"


def _segment(value: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string")
    bad = [c for c in ("/", "+", "#", "\0") if c in value]
    if bad or value.startswith("$"):
        raise ValueError(f"{what} {value!r} may not contain '/', '+', '#', NUL or start with '$'")
    return value


@dataclass(frozen=True)
class Topics:
    """Topic names of one network: ``qkdsdn/<network>/...``."""

    network: str

    def __post_init__(self) -> None:
        _segment(self.network, "network name")

    @property
    def prefix(self) -> str:
        return f"{ROOT}/{self.network}"

    def km_config(self, node: str) -> str:
        """Controller -> one key manager: configure / deconfigure a session."""
        return f"{self.prefix}/km/{_segment(node, 'node')}/config"

    def km_reply(self, node: str) -> str:
        """Key manager -> controller: acknowledgements and confirmations."""
        return f"{self.prefix}/km/{_segment(node, 'node')}/reply"

    def admission_request(self) -> str:
        """Key managers -> admission control."""
        return f"{self.prefix}/admission/request"

    def admission_reply(self, node: str) -> str:
        """Admission control -> one key manager."""
        return f"{self.prefix}/admission/reply/{_segment(node, 'node')}"

    def notifications(self, node: str) -> str:
        """ETSI GS QKD 015 notifications of one node, RFC 7951 JSON."""
        return f"{self.prefix}/notifications/{_segment(node, 'node')}"

    def events(self) -> str:
        """The event stream of every element."""
        return f"{self.prefix}/events"

    def status(self, process: str) -> str:
        """Retained online/offline of one process (Last Will)."""
        return f"{self.prefix}/status/{_segment(process, 'process')}"

    # Filters for the many-to-one listeners.
    def all_km_replies(self) -> str:
        return f"{self.prefix}/km/+/reply"

    def all_notifications(self) -> str:
        return f"{self.prefix}/notifications/+"

    def all_status(self) -> str:
        return f"{self.prefix}/status/+"

    def everything(self) -> str:
        return f"{self.prefix}/#"


def config_message(op: str, ksid: str, *, qkd_app: Mapping[str, Any] | None = None,
                   qkd_link: Mapping[str, Any] | None = None,
                   msg_id: str | None = None) -> dict:
    """A ``km/<node>/config`` payload.

    ``configure`` carries the session's ETSI 015 ``qkd_app`` entry and its
    VIRT ``qkd_link`` entry (RFC 7951 objects); ``deconfigure`` needs only
    the KSID.
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, not {op!r}")
    if not isinstance(ksid, str) or not ksid:
        raise ValueError("ksid must be a non-empty string")
    message: dict[str, Any] = {"op": op, MSG_ID: msg_id or new_msg_id(), "ksid": ksid}
    if op == CONFIGURE and (qkd_app is None or qkd_link is None):
        raise ValueError("configure needs both qkd_app and qkd_link")
    for name, value in (("qkd_app", qkd_app), ("qkd_link", qkd_link)):
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise TypeError(f"{name} must be a JSON object")
        message[name] = dict(value)
    app_id = message.get("qkd_app", {}).get("app_id")
    if app_id is not None and app_id != ksid:
        raise ValueError(f"qkd_app.app_id {app_id!r} differs from ksid {ksid!r}")
    return message


def reply_message(request: Mapping[str, Any], ok: bool, error: str | None = None,
                  **extra: Any) -> dict:
    """The reply to `request`: same ``msg_id``, ``ok``, and ``error`` when not ok."""
    msg_id = request.get(MSG_ID)
    if not isinstance(msg_id, str) or not msg_id:
        raise ValueError("the request has no msg_id to answer")
    if not ok and not error:
        raise ValueError("a negative reply needs an error")
    reserved = {MSG_ID, "ok", "error"} & extra.keys()
    if reserved:
        raise ValueError(f"reserved reply members: {sorted(reserved)}")
    message: dict[str, Any] = {MSG_ID: msg_id, "ok": bool(ok), **extra}
    if error:
        message["error"] = str(error)
    return message


def status_payload(process: str, state: str) -> dict:
    """The retained payload of ``status/<process>``."""
    if state not in (ONLINE, OFFLINE):
        raise ValueError(f"state must be {ONLINE!r} or {OFFLINE!r}")
    return {"process": process, "state": state}
