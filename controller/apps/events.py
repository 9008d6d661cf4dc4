"""The os-ken events between the control plane's apps.

(os-ken's ``EventRequestBase`` owns the attributes ``src``, ``dst``, ``sync`` and ``reply_q``:
a request's own fields never use those names.)

Notifications (``EventBase``) go to every app that handles them: the emitting app lists them
in its ``_EVENTS`` and calls ``send_event_to_observers``. Requests (``EventRequestBase``) go to
one app by name and are answered with an ``EventResult`` (``ControllerApp.call`` waits for it,
with a timeout). Payloads are plain values and frozen dataclasses, never shared mutable state.
"""
from __future__ import annotations

import datetime as dt
from typing import Any, Iterable, Mapping, Optional, Sequence

from os_ken.controller.event import EventBase, EventReplyBase, EventRequestBase

from etsi015.session import SessionConfig


# --------------------------------------------------------------------------- request plumbing


class EventResult(EventReplyBase):
    """The answer to any request below: ``result``, or ``error`` (an exception) when it failed."""

    def __init__(self, result: Any = None, error: Optional[BaseException] = None):
        super().__init__(None)
        self.result = result
        self.error = error


class EventBusMessage(EventRequestBase):
    """A bus message handed by the bus's dispatcher thread to the app that subscribed; the
    dispatcher waits for the answer, so the message is acknowledged only once applied."""

    def __init__(self, topic: str, payload: dict):
        super().__init__()
        self.topic = topic
        self.payload = payload


class EventTick(EventBase):
    """An app's own timer fired (sent by its timer thread to itself)."""

    def __init__(self, now: dt.datetime):
        super().__init__()
        self.now = now


# --------------------------------------------------------------------------- topology (SDN controller ->)


class EventLinkState(EventBase):
    """A PHYS link's status changed (ETSI 015 qkdl_status: ACTIVE / PASSIVE / PENDING / OFF)."""

    def __init__(self, link: str, status: str, up: bool, reason: str, at: dt.datetime):
        super().__init__()
        self.link, self.status, self.up, self.reason, self.at = link, status, up, reason, at


class EventLinkSample(EventBase):
    """A measurement of a link (from discovery or a performance notification) for monitoring."""

    def __init__(self, link: str, skr_bps: float, qber: Optional[float], ts: float):
        super().__init__()
        self.link, self.skr_bps, self.qber, self.ts = link, skr_bps, qber, ts


class EventDiscovery(EventBase):
    """SDN controller (to itself): the result of one RESTCONF read of a node's ``qkd_node``."""

    def __init__(self, node: str, qkd_node: Any = None, error: Optional[str] = None):
        super().__init__()
        self.node, self.qkd_node, self.error = node, qkd_node, error


# --------------------------------------------------------------------------- monitoring ->


class EventLinkMetrics(EventBase):
    """The monitoring element's smoothed key rate and latest QBER of a link, for routing."""

    def __init__(self, link: str, skr_bps: float, qber: Optional[float]):
        super().__init__()
        self.link, self.skr_bps, self.qber = link, skr_bps, qber


class EventLinkRouting(EventBase):
    """The monitoring element took a link out of routing, or restored it."""

    def __init__(self, link: str, in_routing: bool, reason: str, at: dt.datetime):
        super().__init__()
        self.link, self.in_routing, self.reason, self.at = link, in_routing, reason, at


# --------------------------------------------------------------------------- admission <-> SDN controller


class EventConfigure(EventBase):
    """Admission control: configure ``config`` at key manager ``node`` (one hop of a route)."""

    def __init__(self, node: str, ksid: str, config: SessionConfig):
        super().__init__()
        self.node, self.ksid, self.config = node, ksid, config


class EventDeconfigure(EventBase):
    """Admission control: delete session ``ksid`` at key manager ``node``. ``awaited``: admission
    waits for the confirmation (False for the clean-up of sessions of a previous run)."""

    def __init__(self, node: str, ksid: str, awaited: bool = True):
        super().__init__()
        self.node, self.ksid, self.awaited = node, ksid, awaited


class EventConfigResult(EventBase):
    """A key manager's answer to a configure / deconfigure (or a push that could not be sent)."""

    def __init__(self, node: str, ksid: str, op: str, ok: bool, error: Optional[str]):
        super().__init__()
        self.node, self.ksid, self.op, self.ok, self.error = node, ksid, op, ok, error


# --------------------------------------------------------------------------- requests


class PathRequest(EventRequestBase):
    """RoutingApp: ``RoutingElement.find_path`` -> ``Path`` or None."""

    def __init__(self, src_node: str, dst_node: str, rate_bps: float, exclude_links: Iterable[str], now: float):
        super().__init__()
        self.src_node, self.dst_node, self.rate_bps, self.now = src_node, dst_node, rate_bps, now
        self.exclude_links = tuple(exclude_links)


class BestRateRequest(EventRequestBase):
    """RoutingApp: ``RoutingElement.best_feasible_rate`` -> float."""

    def __init__(self, src_node: str, dst_node: str, exclude_links: Iterable[str]):
        super().__init__()
        self.src_node, self.dst_node = src_node, dst_node
        self.exclude_links = tuple(exclude_links)


class ReserveRequest(EventRequestBase):
    """RoutingApp: ``Reservations.reserve`` of a route (node names) -> bool."""

    def __init__(self, ksid: str, nodes: Sequence[str], rate_bps: float):
        super().__init__()
        self.ksid, self.nodes, self.rate_bps = ksid, tuple(nodes), rate_bps


class ReleaseRequest(EventRequestBase):
    """RoutingApp: ``Reservations.release`` -> bool (whether anything was held)."""

    def __init__(self, ksid: str):
        super().__init__()
        self.ksid = ksid


class LoadRequest(EventRequestBase):
    """RoutingApp: link name -> (reserved bit/s, sessions), for the metrics."""


class TerminateRequest(EventRequestBase):
    """AdmissionControlApp: end session ``ksid`` (operator) -> (ok: bool, message: str)."""

    def __init__(self, ksid: str, reason: str = "terminated by the operator"):
        super().__init__()
        self.ksid, self.reason = ksid, reason


class MetricsRequest(EventRequestBase):
    """MonitoringApp: the Prometheus text exposition of the links (``load`` from routing)."""

    def __init__(self, load: Mapping[str, tuple[float, int]] | None = None):
        super().__init__()
        self.load = dict(load or {})


class HealthRequest(EventRequestBase):
    """Any app: a dict describing its state (answered from its event loop: it is alive)."""


class EventProfilesChanged(EventBase):
    """The user-profile tables may have changed: access and admission control reload them."""
