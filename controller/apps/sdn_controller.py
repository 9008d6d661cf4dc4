"""The SDN controller as an os-ken app: ETSI 015 towards the nodes, the topology DB, configuration.

Decisions: ``controller.topology`` (``TopologyTracker``, ``ConfigTracker``).

- **Discovery**: one hub thread per node reads its ``qkd_node`` over RESTCONF (the controller
  certificate, or the development identity) every ``discovery_interval_s``, and at once when
  the node's agent comes online on the bus or an interface changes. The results go to the
  tracker on the app's event loop (``EventDiscovery``).
- **Bus**: ETSI 015 notifications on ``notifications/+``, agents' retained status on
  ``status/+`` (an agent offline -> its node down at once), key managers' replies on
  ``km/+/reply``, and the ``events`` stream (stored in the database in batches, every
  ``EVENT_FLUSH_S``; a key manager's ``resync`` is answered with the configuration pushes that
  make it match).
- **Out**: topology DB rows, ``EventLinkState`` (routing, admission, monitoring) and
  ``EventLinkSample`` (monitoring) to the other apps.
- **Configuration**: ``EventConfigure`` / ``EventDeconfigure`` from admission control become
  ``configure`` / ``deconfigure`` messages on ``km/<node>/config`` (ETSI 015 ``qkd_app`` + VIRT
  ``qkd_link``, ``etsi015.session``); the key managers' replies go back to admission control as
  ``EventConfigResult``.
"""
from __future__ import annotations

import threading

from os_ken.controller.handler import set_ev_cls

from controller.apps.base import ADMISSION_CONTROL, ControllerApp
from controller.apps.events import (EventConfigResult, EventConfigure, EventDeconfigure, EventDiscovery,
                                    EventLinkSample, EventLinkState, EventTick)
from controller.bus_adapter import (CONTROLLER_NOTIFIER, event_from_bus, km_reply_node, last_segment,
                                    parse_notification, parse_status)
from controller.topology import (ConfigTracker, Push, TopologyConfig, TopologyOutcome, TopologyTracker,
                                 refs_from_network)
from db import models as dbm
from qkdsdn.bus import MSG_ID, config_message, new_msg_id

ELEMENT = "sdn_controller"
EVENT_FLUSH_S = 0.25  # the key managers' events are written in batches this often


class SDNControllerApp(ControllerApp):
    _EVENTS = [EventLinkState, EventLinkSample]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.ctx.config
        nodes, links = refs_from_network(self.ctx.network)
        self.tracker = TopologyTracker(nodes, links, TopologyConfig(failures_to_down=cfg.failures_to_down))
        self.configs = ConfigTracker(self.ctx.qkdn_ids, pending_timeout_s=cfg.config_pending_timeout_s)
        self._wake = {n.name: threading.Event() for n in nodes}
        self.discoveries = {n.name: 0 for n in nodes}

    def on_start(self) -> None:
        topics = self.ctx.topics
        self.subscribe(topics.all_status(), self._on_status)
        self.subscribe(topics.all_notifications(), self._on_notification)
        self.subscribe(topics.all_km_replies(), self._on_km_reply)
        self.subscribe(topics.events(), self._on_event)
        self.ctx.bus.on_reconnect(self._on_reconnect)
        for node in sorted(self._wake):
            self.spawn(f"discover-{node}", self._discovery_loop, node)
        self.every("expire", lambda: 60.0, lambda: self.send_event(self.name, EventTick(self.ctx.clock())))
        self.every("events", lambda: EVENT_FLUSH_S, self.ctx.store.flush_events)

    def on_stop(self) -> None:
        for wake in self._wake.values():
            wake.set()

    def stop(self) -> None:
        super().stop()
        self.ctx.store.flush_events()  # what arrived until the event loop ended

    def health(self) -> dict:
        return {"nodes": {n: self.tracker.liveness(n).value for n in self.tracker.nodes()},
                "links": {l.name: self.tracker.link_status(l.name) for l in self.ctx.network.links},
                "configurations_unanswered": self.configs.pending()}

    # ----------------------------------------------------------------- discovery

    def rediscover(self, node: str) -> None:
        wake = self._wake.get(node)
        if wake is not None:
            wake.set()

    def _discovery_loop(self, node: str) -> None:
        from etsi015.restconf import RestconfError

        client = self.ctx.restconf.client(node)
        wake = self._wake[node]
        while not self.stopping():
            wake.clear()
            try:
                event = EventDiscovery(node, qkd_node=client.get_node())
            except (RestconfError, ValueError, OSError) as exc:
                event = EventDiscovery(node, error=_short_error(exc))
            except Exception as exc:  # noqa: BLE001 - discovery of a node never stops
                self.log.exception("reading %s failed", node)
                event = EventDiscovery(node, error=f"{type(exc).__name__}: {exc}"[:160])
            if self.stopping():
                return
            self.send_event(self.name, event)
            wake.wait(self.ctx.config.discovery_interval_s)

    @set_ev_cls(EventDiscovery)
    def _discovery(self, ev: EventDiscovery) -> None:
        now = self.ctx.clock()
        if ev.qkd_node is not None:
            self.discoveries[ev.node] += 1
            outcome = self.tracker.discovered(ev.node, ev.qkd_node, now)
        else:
            self.log.debug("discovery of %s failed: %s", ev.node, ev.error)
            outcome = self.tracker.unreachable(ev.node, ev.error or "no answer", now)
        self._carry_out(outcome)

    def _carry_out(self, outcome: TopologyOutcome) -> None:
        if not outcome:
            return
        self.ctx.store.topology(outcome)
        for change in outcome.changes:
            self.log.info("link %s: %s (%s)", change.link, change.status, change.reason)
            self.send_event_to_observers(EventLinkState(change.link, change.status, change.up, change.reason,
                                                        self.ctx.clock()))
        for sample in outcome.samples:
            self.send_event_to_observers(EventLinkSample(sample.link, sample.skr_bps, sample.qber, sample.ts))
        for node in outcome.rediscover:
            self.rediscover(node)

    # ----------------------------------------------------------------- bus

    def _on_status(self, topic: str, payload: dict) -> None:
        parsed = parse_status(topic, payload)
        if parsed is not None:
            self._carry_out(self.tracker.bus_status(parsed[0], parsed[1], self.ctx.clock()))

    def _on_notification(self, topic: str, payload: dict) -> None:
        node = last_segment(topic)
        if node == CONTROLLER_NOTIFIER or node not in self.ctx.node_names:
            return
        try:
            notification, _event_time = parse_notification(payload)
        except ValueError as exc:
            self.log.warning("notification from %s dropped: %s", node, exc)
            return
        self._carry_out(self.tracker.notification(node, notification, self.ctx.clock()))

    def _on_event(self, topic: str, payload: dict) -> None:
        if payload.get("origin") == self.ctx.client_id:
            return  # our own, stored already
        now = self.ctx.clock()
        row = event_from_bus(payload, now)
        if row is not None:
            self.ctx.store.queue_events([row])
        node = payload.get("node")
        if payload.get("op") == "resync" and isinstance(node, str) and node in self.ctx.node_names:
            sessions = payload.get("sessions")
            pushes = self.configs.resync(node, sessions if isinstance(sessions, list) else [])
            self.log.info("%s re-announced its sessions: %d push(es) to match", node, len(pushes))
            for push in pushes:
                self._push(push)

    def _on_km_reply(self, topic: str, payload: dict) -> None:
        node = km_reply_node(topic)
        if node is None or node not in self.ctx.node_names:
            return
        result = self.configs.reply(node, payload)
        if result is None:
            self.log.debug("reply %s from %s answers nothing pending", payload.get(MSG_ID), node)
            return
        if not result.ok:
            self.log.warning("%s refused %s of %s: %s", node, result.op, result.ksid, result.error)
            self.ctx.store.record([dbm.Event(ts=self.ctx.clock(), element=ELEMENT, node=node, ksid=result.ksid,
                                             kind="configuration_refused",
                                             details={"op": result.op, "error": result.error})])
        if result.awaited:
            self.send_event(ADMISSION_CONTROL, EventConfigResult(node, result.ksid, result.op, result.ok,
                                                                 result.error))

    def _on_reconnect(self, session_present: bool) -> None:
        if not session_present and not self.stopping():
            # The broker lost our session: what happened meanwhile is read again.
            for node in self._wake:
                self.rediscover(node)

    # ----------------------------------------------------------------- configuration

    @set_ev_cls(EventConfigure)
    def _configure(self, ev: EventConfigure) -> None:
        try:
            push = self.configs.configure(ev.node, ev.config)
        except (ValueError, KeyError) as exc:
            self.send_event(ADMISSION_CONTROL, EventConfigResult(ev.node, ev.ksid, "configure", False,
                                                                 f"not expressible in ETSI 015: {exc}"))
            return
        self._push(push)

    @set_ev_cls(EventDeconfigure)
    def _deconfigure(self, ev: EventDeconfigure) -> None:
        self._push(self.configs.deconfigure(ev.node, ev.ksid, awaited=ev.awaited))

    def _push(self, push: Push) -> None:
        if push.entries is not None:
            message = config_message(push.op, push.ksid, qkd_app=push.entries[0], qkd_link=push.entries[1],
                                     msg_id=new_msg_id())
        else:
            message = config_message(push.op, push.ksid, msg_id=new_msg_id())
        # Registered before publishing: the reply is handled on this thread, after this handler.
        self.configs.sent(message[MSG_ID], push, self.ctx.clock())
        try:
            self.ctx.bus.publish(self.ctx.topics.km_config(push.node), message)
        except Exception as exc:  # noqa: BLE001 - admission control rolls the session back
            self.log.error("%s of %s for %s not published: %s", push.op, push.ksid, push.node, exc)
            self.configs.reply(push.node, {MSG_ID: message[MSG_ID], "ok": False, "error": str(exc)})
            if push.awaited:
                self.send_event(ADMISSION_CONTROL, EventConfigResult(push.node, push.ksid, push.op, False,
                                                                     f"not sent: {exc}"))

    @set_ev_cls(EventTick)
    def _expire(self, ev: EventTick) -> None:
        for push in self.configs.expire(ev.now):
            self.log.info("no reply from %s to %s of %s", push.node, push.op, push.ksid)


def _short_error(exc: BaseException) -> str:
    """A failed read in a few words: the HTTP status or the transport error's kind."""
    status = getattr(exc, "status", None)
    if status is not None:
        detail = getattr(exc, "error_message", None) or getattr(exc, "detail", None) or ""
        return f"HTTP {status}" + (f": {detail}"[:160] if detail else "")
    cause = exc.__cause__ or exc.__context__
    while cause is not None and cause.__cause__ is not None and len(str(cause)) > 160:
        cause = cause.__cause__
    text = f"{type(cause or exc).__name__}: {cause or exc}"
    return text if len(text) <= 160 else text[:157] + "..."
