"""The monitoring element as an os-ken app (decisions: ``controller.monitoring.MonitoringElement``).

Samples come from the SDN controller (``EventLinkSample``: a link's key rate and QBER reported
by its master end, from discovery and from ``sdqkdn_link_perf_update`` notifications). The
element's actions are carried out in order: ``StoreSample`` -> a ``link_samples`` row;
``LinkMetricsUpdate`` -> routing (``EventLinkMetrics``); ``TakeOutOfRouting`` /
``RestoreToRouting`` -> routing and admission (``EventLinkRouting``: admission moves the
sessions off the link); ``Alarm`` -> an ETSI 015 ``alarm`` / ``event`` notification published
on ``notifications/_controller`` and an event in the database. A link that goes down is
forgotten (its silence is no news) and watched again from its next sample. ``MetricsRequest``
renders the Prometheus text exposition for ``/metrics``.
"""
from __future__ import annotations

from os_ken.controller.handler import set_ev_cls

from controller.apps.base import ControllerApp
from controller.apps.events import (EventLinkMetrics, EventLinkRouting, EventLinkSample, EventLinkState,
                                    EventTick, MetricsRequest)
from controller.bus_adapter import CONTROLLER_NOTIFIER, alarm_notification
from controller.monitoring import (Alarm, LinkMetricsUpdate, MonitoringElement, RestoreToRouting, StoreSample,
                                   TakeOutOfRouting, render_prometheus)
from db import models as dbm

ELEMENT = "monitoring"


class MonitoringApp(ControllerApp):
    _EVENTS = [EventLinkMetrics, EventLinkRouting]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.monitoring = MonitoringElement(self.ctx.config.monitoring)
        self._qkdl = {link.name: link.qkdl_id for link in self.ctx.network.links}
        self._status: dict[str, str] = {}
        self.alarms_published = 0

    def on_start(self) -> None:
        self.every("tick", lambda: self.ctx.config.monitoring_tick_s,
                   lambda: self.send_event(self.name, EventTick(self.ctx.clock())))

    def health(self) -> dict:
        watched = self.monitoring.watched()
        return {"links_watched": len(watched),
                "links_out_of_routing": sum(1 for l in watched if not self.monitoring.in_routing(l)),
                "alarms_published": self.alarms_published}

    @set_ev_cls(EventLinkSample)
    def _sample(self, ev: EventLinkSample) -> None:
        try:
            actions = self.monitoring.sample(ev.link, ev.skr_bps, ev.qber, None, None, ev.ts)
        except ValueError as exc:
            self.log.warning("sample of %s refused: %s", ev.link, exc)
            return
        self._carry_out(actions)

    @set_ev_cls(EventLinkState)
    def _link_state(self, ev: EventLinkState) -> None:
        self._status[ev.link] = ev.status
        if not ev.up:
            self.monitoring.forget(ev.link)

    @set_ev_cls(EventTick)
    def _tick(self, ev: EventTick) -> None:
        self._carry_out(self.monitoring.tick(ev.now.timestamp()))

    @set_ev_cls(MetricsRequest)
    def _metrics(self, req: MetricsRequest) -> None:
        self.respond(req, lambda: render_prometheus(self.monitoring.snapshot(self.ctx.clock().timestamp(),
                                                                             req.load)))

    def _carry_out(self, actions: list) -> None:
        now = self.ctx.clock()
        samples, events = [], []
        for action in actions:
            if isinstance(action, StoreSample):
                samples.append(action)
            elif isinstance(action, LinkMetricsUpdate):
                self.send_event_to_observers(EventLinkMetrics(action.link, action.skr_bps, action.qber))
            elif isinstance(action, TakeOutOfRouting):
                self.send_event_to_observers(EventLinkRouting(action.link, False, action.reason, now))
                events.append(dbm.Event(ts=now, element=ELEMENT, kind="link_out_of_routing",
                                        details={"link": action.link, "reason": action.reason}))
            elif isinstance(action, RestoreToRouting):
                self.send_event_to_observers(EventLinkRouting(action.link, True, "restored", now))
                events.append(dbm.Event(ts=now, element=ELEMENT, kind="link_restored_to_routing",
                                        details={"link": action.link}))
            elif isinstance(action, Alarm):
                events.append(dbm.Event(ts=now, element=ELEMENT, kind=f"alarm_{action.kind}",
                                        details={"link": action.link, "severity": action.severity,
                                                 "message": action.message, "notification": action.notification}))
                self._publish_alarm(action, now)
        self.ctx.store.record(events, samples=samples)

    def _publish_alarm(self, alarm: Alarm, now) -> None:
        qkdl_id = self._qkdl.get(alarm.link)
        if qkdl_id is None:
            return
        try:
            doc = alarm_notification(qkdl_id=qkdl_id, severity=alarm.severity, message=alarm.message,
                                     notification=alarm.notification, link_status=self._status.get(alarm.link),
                                     now=now)
            self.ctx.bus.publish(self.ctx.topics.notifications(CONTROLLER_NOTIFIER), doc)
            self.alarms_published += 1
        except Exception:  # noqa: BLE001 - the alarm is in the database already
            self.log.exception("alarm about %s not published", alarm.link)
