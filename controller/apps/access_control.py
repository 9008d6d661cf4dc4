"""Access control as an os-ken app: answers op ``authenticate`` on ``admission/request``.

Decisions: ``controller.access.AccessControl`` over a ``UserProfiles`` snapshot of the
database, re-read every ``profiles_refresh_s`` and on ``EventProfilesChanged``. The key manager
passes the SHA-256 fingerprint of the application's client certificate; in development mode
(``--insecure-dev``, no certificates anywhere) a request without one is checked by
``controller.bus_adapter.authenticate_unverified``. Every decision is an event in the database.
"""
from __future__ import annotations

from os_ken.controller.handler import set_ev_cls

from controller.access import AccessControl, UserProfiles
from controller.apps.base import ControllerApp
from controller.apps.events import EventProfilesChanged
from controller.bus_adapter import (AuthenticateMsg, BadMessage, auth_answer, authenticate_unverified,
                                    error_answer, parse_admission_message, requester)


class AccessControlApp(ControllerApp):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.access = AccessControl(self._load_profiles())
        self.decisions = {"accepted": 0, "rejected": 0}

    def _load_profiles(self) -> UserProfiles:
        with self.ctx.session_factory() as session:
            return UserProfiles.load(session)

    def on_start(self) -> None:
        self.subscribe(self.ctx.topics.admission_request(), self._on_request)
        self.every("profiles", lambda: self.ctx.config.profiles_refresh_s,
                   lambda: self.send_event(self.name, EventProfilesChanged()))

    def health(self) -> dict:
        return {"decisions": dict(self.decisions)}

    @set_ev_cls(EventProfilesChanged)
    def _profiles_changed(self, ev: EventProfilesChanged) -> None:
        self.access.refresh(self._load_profiles())

    def _on_request(self, topic: str, payload: dict) -> None:
        if payload.get("op") != "authenticate":
            return  # admission control's
        nodes = self.ctx.node_names
        try:
            msg = parse_admission_message(payload, nodes)
        except BadMessage as exc:
            who = requester(payload, nodes)
            self.log.warning("malformed authenticate request: %s", exc)
            if who is not None:
                self.ctx.bus.publish(self.ctx.topics.admission_reply(who[0]), error_answer(who[1], str(exc)))
            return
        assert isinstance(msg, AuthenticateMsg)
        now = self.ctx.clock()
        if msg.fingerprint is None and self.ctx.insecure_dev:
            decision = authenticate_unverified(self.access.profiles, msg.sae_id, msg.node, now)
        else:
            decision = self.access.authenticate(msg.sae_id, cert_fingerprint=msg.fingerprint, node=msg.node,
                                                now=now)
        self.decisions["accepted" if decision.ok else "rejected"] += 1
        self.ctx.store.record([decision.event])
        self.ctx.bus.publish(self.ctx.topics.admission_reply(msg.node), auth_answer(msg.msg_id, decision))
