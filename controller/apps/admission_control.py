"""Admission control as an os-ken app: ops ``open`` / ``key_request`` / ``close`` on the bus.

Decisions: ``controller.admission.AdmissionControl``. Its routing element and reservation book
are the routing app, reached with requests (``_RoutingProxy``). Every ``Outcome`` is carried
out in order: session rows and events to the database (and the events on the bus), each
``Configure`` / ``Delete`` to the SDN controller app (which maps it to ETSI 015 and pushes it on
``km/<node>/config``), the answers on ``admission/reply/<node>`` through
``controller.bus_adapter.AdmissionReplies`` (a status-0 answer waits until every key manager on
the route confirmed its configuration). The timers (peer wait, configuration and deletion
deadlines, inactivity) run in a ticker thread that wakes the app at the next deadline.

``TerminateRequest`` ends a session for the operator (REST API).
"""
from __future__ import annotations

import datetime as dt
from typing import Any, Iterable, Optional

from os_ken.controller.handler import set_ev_cls

from controller.access import UserProfiles
from controller.admission import AdmissionControl, Configure, Delete, Outcome
from controller.apps.base import ROUTING, SDN_CONTROLLER, ControllerApp
from controller.apps.events import (BestRateRequest, EventConfigResult, EventConfigure, EventDeconfigure,
                                    EventLinkRouting, EventLinkState, EventProfilesChanged, EventTick,
                                    PathRequest, ReleaseRequest, ReserveRequest, TerminateRequest)
from controller.bus_adapter import (AdmissionReplies, BadMessage, CloseMsg, KeyRequestMsg, OpenKey, OpenMsg,
                                    OpenRefusal, admission_request, error_answer, open_answer,
                                    parse_admission_message, requester)
from controller.topology import build_session_config
from db import models as dbm

ELEMENT = "admission_control"


class _RoutingProxy:
    """``controller.admission.Routing`` and ``ReservationBook`` over requests to the routing app."""

    def __init__(self, app: ControllerApp):
        self.app = app

    def find_path(self, src: str, dst: str, rate_bps: float, *, exclude_links: Iterable[str] = (), now: float):
        return self.app.call(ROUTING, PathRequest(src, dst, rate_bps, exclude_links, now))

    def best_feasible_rate(self, src: str, dst: str, *, exclude_links: Iterable[str] = ()) -> float:
        return self.app.call(ROUTING, BestRateRequest(src, dst, exclude_links))

    def reserve(self, ksid: str, path: Any, rate: float) -> bool:
        return self.app.call(ROUTING, ReserveRequest(ksid, path.nodes, rate))

    def release(self, ksid: str) -> bool:
        return self.app.call(ROUTING, ReleaseRequest(ksid))


class AdmissionControlApp(ControllerApp):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.profiles = self._load_profiles()
        proxy = _RoutingProxy(self)
        self.admission = AdmissionControl(self.profiles, proxy, proxy, self.ctx.config.admission)
        self.replies = AdmissionReplies()
        self._deadline: Optional[dt.datetime] = None

    def _load_profiles(self) -> UserProfiles:
        with self.ctx.session_factory() as session:
            return UserProfiles.load(session)

    def on_start(self) -> None:
        for stale in self.ctx.stale_sessions:
            # A previous run's session: its key managers may still hold it (idempotent delete).
            for node in stale.route:
                if node in self.ctx.node_names:
                    self.send_event(SDN_CONTROLLER, EventDeconfigure(node, stale.ksid, awaited=False))
        self.subscribe(self.ctx.topics.admission_request(), self._on_request)
        self.spawn("ticker", self._ticker)
        self.every("profiles", lambda: self.ctx.config.profiles_refresh_s,
                   lambda: self.send_event(self.name, EventProfilesChanged()))

    def health(self) -> dict:
        states: dict[str, int] = {}
        for s in self.admission.sessions():
            states[s.state.value] = states.get(s.state.value, 0) + 1
        return {"sessions": states, "answers_waiting": self.replies.waiting()}

    # ----------------------------------------------------------------- timers

    def _ticker(self) -> None:
        """Wakes the app when the next admission deadline is due (and not already signalled)."""
        limit = self.ctx.config.admission_tick_max_s
        signalled: Optional[dt.datetime] = None
        while True:
            deadline = self._deadline
            wait = limit
            if deadline is not None and deadline != signalled:
                wait = min(limit, max(0.0, (deadline - self.ctx.clock()).total_seconds()) + 0.001)
            if self.wait(wait):
                return
            deadline = self._deadline
            if deadline is not None and deadline != signalled and deadline <= self.ctx.clock():
                signalled = deadline
                self.send_event(self.name, EventTick(self.ctx.clock()))

    @set_ev_cls(EventTick)
    def _tick(self, ev: EventTick) -> None:
        self._carry_out(self.admission.tick(self.ctx.clock()))

    @set_ev_cls(EventProfilesChanged)
    def _profiles_changed(self, ev: EventProfilesChanged) -> None:
        self.profiles = self._load_profiles()
        self.admission.refresh(self.profiles)

    # ----------------------------------------------------------------- bus requests

    def _on_request(self, topic: str, payload: dict) -> None:
        if payload.get("op") == "authenticate":
            return  # access control's
        nodes = self.ctx.node_names
        try:
            msg = parse_admission_message(payload, nodes)
        except BadMessage as exc:
            who = requester(payload, nodes)
            self.log.warning("malformed admission request: %s", exc)
            if who is not None and payload.get("op") == "open":
                self._answer(who[0], error_answer(who[1], str(exc)))
            return
        now = self.ctx.clock()
        if isinstance(msg, OpenMsg):
            self._open(msg, now)
        elif isinstance(msg, KeyRequestMsg):
            self._carry_out(self.admission.key_request(msg.ksid, now))
        elif isinstance(msg, CloseMsg):
            self._carry_out(self.admission.close(msg.ksid, msg.node, now))

    def _open(self, msg: OpenMsg, now: dt.datetime) -> None:
        req = admission_request(msg, self.profiles)
        if isinstance(req, OpenRefusal):
            event = dbm.Event(ts=now, element=ELEMENT, node=msg.node, ksid=msg.ksid[:36], kind="request_rejected",
                              details={"status": int(req.status), "reason": req.reason,
                                       "source_sae": msg.source_sae, "destination_sae": msg.destination_sae})
            self.ctx.store.record([event])
            self._answer(msg.node, open_answer(msg.msg_id, req.status, None, None, req.reason))
            return
        try:
            outcome = self.admission.request(req, now)
        except Exception as exc:  # noqa: BLE001 - the key manager gets an answer whatever happens
            self.log.exception("admission of %s failed", msg.ksid)
            self._answer(msg.node, error_answer(msg.msg_id, f"admission control failed: {exc}"))
            return
        self._carry_out(outcome, OpenKey(msg.ksid, msg.node, msg.msg_id))

    # ----------------------------------------------------------------- from the other apps

    @set_ev_cls(EventConfigResult)
    def _config_result(self, ev: EventConfigResult) -> None:
        now = self.ctx.clock()
        if ev.ok:
            outcome = self.admission.confirmation(ev.ksid, ev.node, now, deleted=ev.op == "deconfigure")
        elif ev.op == "configure":
            outcome = self.admission.failure(ev.ksid, ev.node, ev.error or "refused", now)
        else:
            # A key manager that cannot delete: its deletion deadline gives it up.
            self.log.warning("%s refused to delete %s: %s", ev.node, ev.ksid, ev.error)
            return
        self._carry_out(outcome)

    @set_ev_cls(EventLinkState)
    def _link_state(self, ev: EventLinkState) -> None:
        if ev.up:
            self.admission.link_up(ev.link)
        else:
            self._carry_out(self.admission.link_down(ev.link, self.ctx.clock()))

    @set_ev_cls(EventLinkRouting)
    def _link_routing(self, ev: EventLinkRouting) -> None:
        if ev.in_routing:
            self.admission.link_up(ev.link)
        else:
            self._carry_out(self.admission.link_down(ev.link, self.ctx.clock()))

    @set_ev_cls(TerminateRequest)
    def _terminate(self, req: TerminateRequest) -> None:
        self.respond(req, self.terminate, req.ksid, req.reason)

    def terminate(self, ksid: str, reason: str) -> tuple[bool, str]:
        """End session ``ksid`` as if an endpoint closed it (AdmissionControl's only way to end a
        session on request); a still pending session is closed at the endpoint that has not
        opened it, so the one that did gets its answer."""
        s = self.admission.session(ksid)
        if s is None or s.state is dbm.SessionState.TERMINATED:
            return False, f"no live session {ksid}"
        closer = next((n for n in (s.dst_node, s.src_node) if n not in s.requests), s.src_node)
        now = self.ctx.clock()
        outcome = self.admission.close(ksid, closer, now)
        outcome.events.insert(0, dbm.Event(ts=now, element=ELEMENT, ksid=ksid, kind="operator_terminated",
                                           details={"reason": reason, "state": s.state.value}))
        self._carry_out(outcome)
        return True, "terminated"

    # ----------------------------------------------------------------- carrying out

    def _answer(self, node: str, payload: dict) -> None:
        try:
            self.ctx.bus.publish(self.ctx.topics.admission_reply(node), payload)
        except Exception:  # noqa: BLE001 - the key manager's request times out
            self.log.exception("answer to %s not published", node)

    def _carry_out(self, outcome: Outcome, current: Optional[OpenKey] = None) -> None:
        if outcome.error:
            self.log.debug("admission: %s", outcome.error)
        self.ctx.store.record(outcome.events, outcome.sessions)
        failures: list[tuple[str, str, str]] = []
        for action in outcome.actions:
            if isinstance(action, Configure):
                s = self.admission.session(action.ksid)
                try:
                    config = build_session_config(
                        ksid=action.ksid, priority=action.priority, bucket_bits=action.bucket_bits,
                        rate_bps=action.rate_bps, inactivity_timeout_s=action.inactivity_timeout_s,
                        prev_hop=action.prev_hop, next_hop=action.next_hop, src_sae=s.src_sae, dst_sae=s.dst_sae,
                        src_node=s.src_node, dst_node=s.dst_node, qkdn_ids=self.ctx.qkdn_ids)
                except (KeyError, AttributeError, ValueError) as exc:
                    failures.append((action.ksid, action.node, f"no configuration for {action.node}: {exc}"))
                    continue
                self.send_event(SDN_CONTROLLER, EventConfigure(action.node, action.ksid, config))
            elif isinstance(action, Delete):
                self.send_event(SDN_CONTROLLER, EventDeconfigure(action.node, action.ksid))
        for answer in self.replies.process(outcome, current):
            self._answer(answer.node, answer.payload)
        for ksid, node, reason in failures:
            self._carry_out(self.admission.failure(ksid, node, reason, self.ctx.clock()))
        self._deadline = self.admission.next_deadline()
