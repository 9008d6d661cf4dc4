"""``ControllerApp``: what every control-plane app shell has in common.

- its context (``ctx``: the installed ``ControllerServices``);
- its threads (os-ken native hub): the event loop that os-ken starts, plus timer and worker
  threads started with ``spawn`` / ``every``; ``stop()`` ends and joins them all;
- bus subscriptions whose messages are handled on the app's event loop, not on the bus's
  dispatcher thread: the dispatcher hands each message over (``EventBusMessage``) and waits
  until the app handled it, so it is acknowledged only once applied (docs/bus.md);
- ``call``: an os-ken ``send_request`` with a timeout (os-ken's own waits forever), and
  ``respond``, which always answers a request, with the result or the exception.

Subclasses override ``on_start`` / ``on_stop`` / ``health`` and declare handlers with
``os_ken.controller.handler.set_ev_cls``. They never decide anything themselves: that is the
job of the plain classes in ``controller/``.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable

from os_ken.base import app_manager
from os_ken.controller.handler import set_ev_cls
from os_ken.lib import hub

from controller.apps.context import ControllerContext
from controller.apps.events import EventBusMessage, EventResult, HealthRequest

CONTEXT = "qkdsdn"
_POLL_S = 0.25  # a waiting request checks this often whether its app still runs

BusHandler = Callable[[str, dict], None]


class AppUnavailable(RuntimeError):
    """The app asked for is not running."""


class RequestTimeout(TimeoutError):
    """An app did not answer a request in time."""


class ControllerApp(app_manager.OSKenApp):
    _CONTEXTS = {CONTEXT: ControllerContext}

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.ctx: ControllerContext = kwargs[CONTEXT]
        self.log = logging.getLogger(f"qkdsdn.controller.{self.name}")
        self._stopping = threading.Event()
        self._subscriptions: list[Any] = []

    # ----------------------------------------------------------------- life cycle

    def start(self) -> None:
        super().start()  # the event loop thread
        self.on_start()

    def stop(self) -> None:
        self._stopping.set()
        for sub in self._subscriptions:
            sub.cancel()
        self._subscriptions.clear()
        try:
            self.on_stop()
        finally:
            super().stop()  # ends the event loop and joins every thread in self.threads

    def on_start(self) -> None:
        """Called once every app exists and this app's event loop runs."""

    def on_stop(self) -> None:
        """Called before the event loop ends: release what ``on_start`` took."""

    def stopping(self) -> bool:
        return self._stopping.is_set()

    def health(self) -> dict:
        """What this app says about itself in the health report."""
        return {}

    # ----------------------------------------------------------------- threads

    def spawn(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """A hub thread that ``stop()`` joins: ``fn`` must return once ``stopping()``."""
        thread = hub.spawn(fn, *args)
        thread.name = f"{self.name}:{name}"
        self.threads.append(thread)
        return thread

    def every(self, name: str, interval: Callable[[], float], action: Callable[[], None]) -> Any:
        """Run ``action`` every ``interval()`` seconds until stopped (exceptions are logged)."""
        def loop() -> None:
            while not self._stopping.wait(max(0.0, interval())):
                try:
                    action()
                except Exception:  # noqa: BLE001 - a timer never dies of one failure
                    self.log.exception("%s failed", name)
        return self.spawn(name, loop)

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when the app is stopping."""
        return self._stopping.wait(seconds)

    # ----------------------------------------------------------------- requests

    def call(self, dst: str, req: Any, timeout: float | None = None) -> Any:
        """Send request ``req`` to app ``dst`` and return its result (raise its error)."""
        if dst not in app_manager.SERVICE_BRICKS:
            raise AppUnavailable(f"{dst} is not running")
        req.dst = dst
        req.sync = True
        req.reply_q = hub.Queue()
        self.send_event(dst, req)
        limit = self.ctx.config.request_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            try:
                reply = req.reply_q.get(timeout=max(0.0, min(_POLL_S, deadline - time.monotonic())))
                break
            except queue.Empty:
                if dst not in app_manager.SERVICE_BRICKS:
                    # Stopped meanwhile: what it had not handled yet is not coming.
                    raise AppUnavailable(f"{dst} stopped before answering {type(req).__name__}") from None
                if time.monotonic() >= deadline:
                    raise RequestTimeout(f"{dst} did not answer {type(req).__name__} within {limit} s") from None
        if reply.error is not None:
            raise reply.error
        return reply.result

    def respond(self, req: Any, fn: Callable[..., Any], *args: Any) -> None:
        """Answer ``req`` with ``fn(*args)``, or with the exception it raised."""
        try:
            reply = EventResult(fn(*args))
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            self.log.debug("%s failed: %s", type(req).__name__, exc, exc_info=True)
            reply = EventResult(error=exc)
        self.reply_to_request(req, reply)

    @set_ev_cls(HealthRequest)
    def _health_request(self, req: HealthRequest) -> None:
        self.respond(req, lambda: {"alive": True, **self.health()})

    # ----------------------------------------------------------------- bus

    def subscribe(self, topic_filter: str, handler: BusHandler) -> None:
        """Handle messages matching ``topic_filter`` with ``handler(topic, payload)`` on this
        app's event loop (module doc)."""
        def hand_over(topic: str, payload: dict) -> None:
            if self._stopping.is_set():
                # The controller disconnects the bus before its apps stop: this is only what was
                # already on its way to the dispatcher.
                self.log.info("%s stopping: message on %s not handled", self.name, topic)
                return
            req = EventBusMessage(topic, payload)
            req.handler = handler
            try:
                self.call(self.name, req, self.ctx.config.handoff_timeout_s)
            except RequestTimeout:
                # Still queued: it will be applied; raising would let a copy apply it twice.
                self.log.error("bus message on %s still waits for %s after %.0f s", topic, self.name,
                               self.ctx.config.handoff_timeout_s)
            except AppUnavailable:
                self.log.info("%s stopped: message on %s not handled", self.name, topic)

        self._subscriptions.append(self.ctx.bus.subscribe(topic_filter, hand_over))

    @set_ev_cls(EventBusMessage)
    def _bus_message(self, req: EventBusMessage) -> None:
        self.respond(req, req.handler, req.topic, req.payload)


# App names (os-ken names an app after its class): the addresses of requests and commands.
SDN_CONTROLLER = "SDNControllerApp"
ACCESS_CONTROL = "AccessControlApp"
ADMISSION_CONTROL = "AdmissionControlApp"
ROUTING = "RoutingApp"
MONITORING = "MonitoringApp"
REST_API = "RestApiApp"
