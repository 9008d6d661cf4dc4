"""In-process bus: the same semantics as MQTT without a broker.

For single-process runs and for tests of code that uses a bus.  Buses
attached to the same `LocalHub` see each other's messages; the hub keeps
retained messages like a broker.  Payloads still go through JSON, handlers
still run on each bus's dispatcher thread, duplicates are still dropped.

Differences from MQTT, all due to there being no network: a LocalBus is
connected from creation to `close()`, so it never reconnects (on_reconnect
callbacks never run) and has no Last Will (it dies with its process, and
so does everything it could tell).
"""
from __future__ import annotations

import threading
from typing import ClassVar

from qkdsdn.bus.base import Bus, _FilterState, _encode, _noop, _prepare, topic_matches
from qkdsdn.bus.messages import OFFLINE, ONLINE, status_payload


class LocalHub:
    """The in-process broker: attached buses and retained messages."""

    _default: ClassVar["LocalHub | None"] = None
    _default_lock = threading.Lock()

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buses: list[LocalBus] = []
        self._retained: dict[str, bytes] = {}

    @classmethod
    def default(cls) -> "LocalHub":
        """The process-wide hub used by ``make_bus("local", ...)``."""
        with cls._default_lock:
            if cls._default is None:
                cls._default = cls()
            return cls._default

    def retained_topics(self) -> list[str]:
        with self._lock:
            return sorted(self._retained)

    def _attach(self, bus: "LocalBus") -> None:
        with self._lock:
            if any(b.client_id == bus.client_id for b in self._buses):
                raise ValueError(f"client id {bus.client_id!r} is already attached to this hub")
            self._buses.append(bus)

    def _detach(self, bus: "LocalBus") -> None:
        with self._lock:
            if bus in self._buses:
                self._buses.remove(bus)

    def _publish(self, topic: str, data: bytes, retain: bool) -> None:
        with self._lock:
            if retain:
                if data:
                    self._retained[topic] = data
                else:
                    self._retained.pop(topic, None)
            targets = [b for b in self._buses if b._wants(topic)]
        # Outside the lock: delivery only decodes and enqueues, but a
        # request() reply resolves a waiter, which must not hold the hub.
        for bus in targets:
            bus._deliver(topic, data, _noop)

    def _retained_for(self, topic_filter: str) -> list[tuple[str, bytes]]:
        with self._lock:
            return [(t, d) for t, d in self._retained.items() if topic_matches(topic_filter, t)]


class LocalBus(Bus):
    """A bus attached to an in-process `LocalHub`."""

    def __init__(self, client_id: str, *, hub: LocalHub | None = None,
                 status_topic: str | None = None, **options) -> None:
        super().__init__(client_id, **options)
        self.hub = hub if hub is not None else LocalHub.default()
        self.status_topic = status_topic
        self._up = threading.Event()
        self._up.set()
        try:
            self.hub._attach(self)
        except Exception:
            super().close()
            raise
        if status_topic is not None:
            self.publish(status_topic, status_payload(client_id, ONLINE), retain=True)

    @property
    def connected(self) -> bool:
        return not self.closed

    def _connected_event(self) -> threading.Event:
        return self._up

    def _wants(self, topic: str) -> bool:
        return any(topic_matches(f, topic) for f, _ in self._filter_snapshot())

    def _transport_publish(self, topic: str, data: bytes, qos: int, retain: bool) -> None:
        self.hub._publish(topic, data, retain)

    def _transport_subscribe(self, topic_filter: str, state: _FilterState, timeout: float) -> None:
        state.ready.set()
        for topic, data in self.hub._retained_for(topic_filter):
            self._deliver(topic, data, _noop)

    def _transport_unsubscribe(self, topic_filter: str) -> None:
        pass  # the hub asks _wants() at each publish

    def _transport_flush(self, deadline: float) -> bool:
        return True  # the hub delivers synchronously

    def _transport_close(self, timeout: float) -> None:
        if self.status_topic is not None:
            message = _prepare(status_payload(self.client_id, OFFLINE))
            self.hub._publish(self.status_topic, _encode(message), True)
        self.hub._detach(self)
        self._up.clear()

