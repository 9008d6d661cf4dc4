"""The transport-independent part of the control-plane bus.

`Bus` owns everything that must behave the same whatever carries the bytes:
JSON payloads with a ``msg_id``, per-subscription de-duplication, handler
dispatch on a dedicated thread, request/reply correlation, re-synchronisation
hooks.  A transport (MQTT, in-process) only moves bytes and calls `_deliver`.
"""
from __future__ import annotations

import abc
import collections
import copy
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("qkdsdn.bus")

MSG_ID = "msg_id"

Handler = Callable[[str, dict], None]
ReconnectCallback = Callable[[bool], None]
Ack = Callable[[], None]

# MQTT limit on a topic name, in UTF-8 bytes.
_MAX_TOPIC_BYTES = 65535


class BusError(RuntimeError):
    """A bus operation failed."""


class BusClosed(BusError):
    """The bus was closed."""


class BusTimeout(BusError, TimeoutError):
    """A bounded wait (reply, subscription acknowledgement) ran out."""


def new_msg_id() -> str:
    return str(uuid.uuid4())


def _noop() -> None:
    pass


# ---------------------------------------------------------------------------
# Topics
# ---------------------------------------------------------------------------

def validate_topic(topic: str) -> str:
    """Check a topic name for publishing (no wildcards); return it."""
    if not isinstance(topic, str) or not topic:
        raise ValueError("topic must be a non-empty string")
    if "+" in topic or "#" in topic:
        raise ValueError(f"topic {topic!r}: wildcards are only allowed in subscription filters")
    if "\0" in topic:
        raise ValueError(f"topic {topic!r} contains NUL")
    if len(topic.encode("utf-8")) > _MAX_TOPIC_BYTES:
        raise ValueError("topic longer than 65535 bytes")
    return topic


def validate_filter(topic_filter: str) -> str:
    """Check a subscription filter (MQTT 3.1.1 section 4.7); return it."""
    if not isinstance(topic_filter, str) or not topic_filter:
        raise ValueError("topic filter must be a non-empty string")
    if "\0" in topic_filter:
        raise ValueError(f"topic filter {topic_filter!r} contains NUL")
    if len(topic_filter.encode("utf-8")) > _MAX_TOPIC_BYTES:
        raise ValueError("topic filter longer than 65535 bytes")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"topic filter {topic_filter!r}: '#' must be a whole, last level")
        if "+" in level and level != "+":
            raise ValueError(f"topic filter {topic_filter!r}: '+' must be a whole level")
    return topic_filter


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic matching; wildcards in the first level never match ``$`` topics."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for i, f in enumerate(f_levels):
        if f == "#":
            return True
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


# ---------------------------------------------------------------------------
# De-duplication
# ---------------------------------------------------------------------------

class Deduplicator:
    """Bounded LRU of message ids, kept per topic.

    QoS 1 is at-least-once: a broker redelivers a message whose
    acknowledgement was lost.  Remembering the last `capacity` ids per topic
    turns that into exactly-once application for the handler.  Topics are
    bounded too (`max_topics`, least recently used dropped first).
    """

    def __init__(self, capacity: int = 1024, max_topics: int = 4096):
        if capacity < 1 or max_topics < 1:
            raise ValueError("capacity and max_topics must be at least 1")
        self.capacity = capacity
        self.max_topics = max_topics
        self._topics: collections.OrderedDict[str, collections.OrderedDict[str, None]] = (
            collections.OrderedDict())
        self._lock = threading.Lock()

    def first_time(self, topic: str, msg_id: str) -> bool:
        """Record `msg_id` on `topic`; False if it was already recorded."""
        with self._lock:
            ids = self._topics.get(topic)
            if ids is None:
                ids = self._topics[topic] = collections.OrderedDict()
                if len(self._topics) > self.max_topics:
                    self._topics.popitem(last=False)
            else:
                self._topics.move_to_end(topic)
            if msg_id in ids:
                ids.move_to_end(msg_id)
                return False
            ids[msg_id] = None
            if len(ids) > self.capacity:
                ids.popitem(last=False)
            return True

    def forget(self, topic: str, msg_id: str) -> None:
        """Drop a record, so that a later copy is applied (used when a handler failed)."""
        with self._lock:
            ids = self._topics.get(topic)
            if ids is not None:
                ids.pop(msg_id, None)

    def __contains__(self, item: tuple[str, str]) -> bool:
        topic, msg_id = item
        with self._lock:
            ids = self._topics.get(topic)
            return ids is not None and msg_id in ids

    def __len__(self) -> int:
        with self._lock:
            return sum(len(ids) for ids in self._topics.values())


# ---------------------------------------------------------------------------
# Subscriptions and internal records
# ---------------------------------------------------------------------------

class Subscription:
    """One handler on one topic filter; returned by `Bus.subscribe`.

    The counters are written by the bus's dispatcher thread only.
    """

    def __init__(self, bus: "Bus", topic_filter: str, handler: Handler, qos: int,
                 dedup_capacity: int):
        self.bus = bus
        self.topic_filter = topic_filter
        self.handler = handler
        self.qos = qos
        self.active = True
        self.delivered = 0   # handler calls that returned normally
        self.duplicates = 0  # copies dropped because their msg_id was already applied
        self.failures = 0    # handler calls that raised
        self._dedup = Deduplicator(dedup_capacity)

    def cancel(self) -> None:
        """Stop delivering to this handler (idempotent)."""
        self.bus._cancel(self)

    def _handle(self, topic: str, payload: dict) -> None:
        msg_id = payload.get(MSG_ID)
        keyed = isinstance(msg_id, str) and bool(msg_id)
        if keyed and not self._dedup.first_time(topic, msg_id):
            self.duplicates += 1
            log.debug("dropped duplicate %s on %s", msg_id, topic)
            return
        try:
            self.handler(topic, payload)
        except Exception:
            self.failures += 1
            # Not applied: a later copy with the same msg_id may try again.
            if keyed:
                self._dedup.forget(topic, msg_id)
            log.exception("bus handler %r failed on %s (msg_id %s)", self.handler, topic, msg_id)
        else:
            self.delivered += 1

    def __repr__(self) -> str:
        return f"<Subscription {self.topic_filter!r} active={self.active}>"


@dataclass
class _Incoming:
    topic: str
    payload: dict
    ack: Ack
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class _Pending:
    reply_topic: str
    event: threading.Event = field(default_factory=threading.Event)
    reply: dict | None = None


class _FilterState:
    """A topic filter the transport is subscribed to, and whether the broker confirmed it."""

    def __init__(self, qos: int):
        self.qos = qos
        self.ready = threading.Event()
        self.error: str | None = None  # the broker refused it


_STOP = object()
_REEXAMINE = object()


# ---------------------------------------------------------------------------
# The bus
# ---------------------------------------------------------------------------

class Bus(abc.ABC):
    """Publish/subscribe of JSON objects between control-plane processes.

    Every payload is a JSON object with a ``msg_id`` (added when missing).
    Handlers run one at a time, in arrival order, on the bus's dispatcher
    thread (never on the transport's network thread), so a handler may call
    `publish`, `subscribe` and `request`.  A message is acknowledged to the
    broker only after every matching handler has run; a copy whose ``msg_id``
    a subscription already applied on that topic is dropped.

    Messages that arrive before any matching subscription exists (a
    persistent session delivers what was queued while the process was down,
    possibly before it subscribed again) are parked unacknowledged and
    handed over when a matching subscription is made; after `park_timeout`
    seconds (or beyond `park_limit` messages) they are acknowledged and
    dropped with a warning.
    """

    def __init__(self, client_id: str, *, dedup_capacity: int = 1024,
                 park_timeout: float = 60.0, park_limit: int = 10000,
                 subscribe_timeout: float = 10.0):
        if not isinstance(client_id, str) or not client_id:
            raise ValueError("client_id must be a non-empty string")
        self.client_id = client_id
        self.dedup_capacity = dedup_capacity
        self.park_timeout = park_timeout
        self.park_limit = park_limit
        self.subscribe_timeout = subscribe_timeout
        self._lock = threading.RLock()
        self._subs: list[Subscription] = []
        self._filters: dict[str, _FilterState] = {}
        self._reply_filters: set[str] = set()
        self._pending: dict[str, _Pending] = {}
        self._reconnect_callbacks: list[ReconnectCallback] = []
        self._closed = False
        self._parked: collections.deque[_Incoming] = collections.deque()
        self._queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._dispatcher = threading.Thread(
            target=self._dispatch_loop, name=f"bus-dispatch-{client_id}", daemon=True)
        self._dispatcher.start()

    # -- state -----------------------------------------------------------

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """True while the transport can carry messages."""

    def wait_connected(self, timeout: float) -> bool:
        """Block until `connected` (True) or `timeout` seconds pass (False)."""
        return self._connected_event().wait(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- publishing ------------------------------------------------------

    def publish(self, topic: str, payload: Mapping[str, Any], *, qos: int = 1,
                retain: bool = False) -> str:
        """Publish a JSON object; return its ``msg_id`` (added if missing).

        With QoS 1 a message published while disconnected is queued by the
        client and sent after reconnection (within this process's life).
        """
        self._check_open()
        validate_topic(topic)
        _check_qos(qos)
        message = _prepare(payload)
        self._transport_publish(topic, _encode(message), qos, bool(retain))
        return message[MSG_ID]

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until the broker acknowledged every QoS > 0 publish so far.

        True when all are acknowledged, False if `timeout` ran out first
        (for example while disconnected: they stay queued).
        """
        self._check_open()
        return self._transport_flush(time.monotonic() + timeout)

    def clear_retained(self, topic: str) -> None:
        """Remove the retained message of `topic` (an empty retained publish)."""
        self._check_open()
        validate_topic(topic)
        self._transport_publish(topic, b"", 1, True)

    # -- subscribing -----------------------------------------------------

    def subscribe(self, topic_filter: str, handler: Handler, *, qos: int = 1) -> Subscription:
        """Call ``handler(topic, payload)`` for every message matching `topic_filter`.

        Returns once the broker confirmed the subscription (or at once while
        disconnected: it is made on connection).  Retained messages matching
        the filter are delivered after that.
        """
        self._check_open()
        validate_filter(topic_filter)
        _check_qos(qos)
        if not callable(handler):
            raise TypeError("handler must be callable")
        sub = Subscription(self, topic_filter, handler, qos, self.dedup_capacity)
        with self._lock:
            self._subs.append(sub)
        # Parked messages may be waiting for exactly this filter.
        self._queue.put(_REEXAMINE)
        try:
            self._ensure_filter(topic_filter, qos, self.subscribe_timeout)
        except BaseException:
            sub.cancel()
            raise
        return sub

    def _cancel(self, sub: Subscription) -> None:
        with self._lock:
            if not sub.active:
                return
            sub.active = False
            self._subs.remove(sub)
            still_needed = sub.topic_filter in self._reply_filters or any(
                s.topic_filter == sub.topic_filter for s in self._subs)
            if not still_needed:
                self._filters.pop(sub.topic_filter, None)
        if not still_needed and not self._closed:
            self._transport_unsubscribe(sub.topic_filter)

    def _ensure_filter(self, topic_filter: str, qos: int, timeout: float) -> None:
        with self._lock:
            state = self._filters.get(topic_filter)
            fresh = state is None or state.qos < qos
            if fresh:
                state = self._filters[topic_filter] = _FilterState(qos)
        if fresh:
            self._transport_subscribe(topic_filter, state, timeout)
        elif self.connected and not (state.error or state.ready.wait(timeout)):
            raise BusTimeout(f"subscription to {topic_filter!r} not confirmed within {timeout} s")
        if state.error:
            raise BusError(f"broker refused subscription to {topic_filter!r}: {state.error}")

    # -- request / reply -------------------------------------------------

    def request(self, topic: str, payload: Mapping[str, Any], reply_topic: str,
                timeout: float = 10.0) -> dict:
        """Publish `payload` on `topic` and wait for the reply on `reply_topic`.

        The reply is the first message on `reply_topic` whose ``msg_id``
        equals the request's; it is consumed here and not handed to
        subscriptions.  Raises `BusTimeout` after `timeout` seconds.
        """
        self._check_open()
        validate_topic(topic)
        validate_filter(reply_topic)
        deadline = time.monotonic() + timeout
        message = _prepare(payload)
        msg_id = message[MSG_ID]
        pending = _Pending(reply_topic)
        with self._lock:
            if msg_id in self._pending:
                raise ValueError(f"a request with msg_id {msg_id} is already waiting")
            self._pending[msg_id] = pending
            self._reply_filters.add(reply_topic)
        try:
            # Subscribe before publishing, or a quick reply could be missed.
            self._ensure_filter(reply_topic, 1, max(0.0, deadline - time.monotonic()))
            self._transport_publish(topic, _encode(message), 1, False)
            if not pending.event.wait(max(0.0, deadline - time.monotonic())):
                raise BusTimeout(
                    f"no reply to {msg_id} on {reply_topic!r} within {timeout} s")
            if pending.reply is None:
                raise BusClosed("bus closed while waiting for a reply")
            return pending.reply
        finally:
            with self._lock:
                self._pending.pop(msg_id, None)

    # -- reconnection ----------------------------------------------------

    def on_reconnect(self, callback: ReconnectCallback) -> None:
        """Run ``callback(session_present)`` after every re-connection.

        It runs on the dispatcher thread once the subscriptions are
        confirmed again.  ``session_present`` False means the broker lost
        the session: messages published meanwhile may be lost, so state
        should be re-synchronised in full.
        """
        if not callable(callback):
            raise TypeError("callback must be callable")
        with self._lock:
            self._reconnect_callbacks.append(callback)

    def _fire_reconnect(self, session_present: bool) -> None:
        with self._lock:
            callbacks = list(self._reconnect_callbacks)

        def run() -> None:
            for cb in callbacks:
                try:
                    cb(session_present)
                except Exception:
                    log.exception("on_reconnect callback %r failed", cb)

        self._queue.put(run)

    # -- closing ---------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (idempotent).

        Waits up to `timeout` seconds for outstanding QoS 1 publishes.
        Messages received but not yet handled stay unacknowledged, so a
        persistent session gets them again on the next connection.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = list(self._pending.values())
        try:
            self._transport_close(timeout)
        finally:
            for p in pending:
                p.event.set()
            self._queue.put(_STOP)
            if threading.current_thread() is not self._dispatcher:
                self._dispatcher.join(timeout)

    def __enter__(self) -> "Bus":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise BusClosed(f"bus {self.client_id!r} is closed")

    # -- incoming path ---------------------------------------------------

    def _deliver(self, topic: str, data: bytes, ack: Ack) -> None:
        """Called by the transport for every received message (any thread)."""
        if not data:
            ack()  # a cleared retained message: nothing to apply
            return
        try:
            payload = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            log.warning("dropped non-JSON message on %s", topic)
            ack()
            return
        if not isinstance(payload, dict):
            log.warning("dropped message on %s: payload is not a JSON object", topic)
            ack()
            return
        msg_id = payload.get(MSG_ID)
        if isinstance(msg_id, str):
            with self._lock:
                pending = self._pending.get(msg_id)
            # Resolved here, not on the dispatcher: a handler blocked in
            # request() would otherwise wait for itself.
            if pending is not None and topic_matches(pending.reply_topic, topic):
                if not pending.event.is_set():
                    pending.reply = payload
                    pending.event.set()
                ack()
                return
        self._queue.put(_Incoming(topic, payload, ack))

    def _dispatch_loop(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=1.0 if self._parked else None)
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            try:
                if isinstance(item, _Incoming):
                    self._dispatch(item, park=True)
                elif item is _REEXAMINE:
                    self._reexamine_parked()
                elif callable(item):
                    item()
                self._expire_parked()
            except Exception:  # keep the dispatcher alive whatever happens
                log.exception("bus dispatcher error")

    def _dispatch(self, item: _Incoming, *, park: bool) -> bool:
        with self._lock:
            subs = [s for s in self._subs if topic_matches(s.topic_filter, item.topic)]
            is_reply = any(topic_matches(f, item.topic) for f in self._reply_filters)
        if not subs:
            if is_reply:
                log.debug("dropped unmatched reply on %s (late or foreign)", item.topic)
                _safe_ack(item.ack)
                return True
            if park:
                self._parked.append(item)
                while len(self._parked) > self.park_limit:
                    old = self._parked.popleft()
                    log.warning("dropped message on %s: no subscription (park limit)", old.topic)
                    _safe_ack(old.ack)
            return False
        for i, sub in enumerate(subs):
            # Each handler gets its own copy: one may not see another's edits.
            sub._handle(item.topic, item.payload if i == len(subs) - 1 else copy.deepcopy(item.payload))
        _safe_ack(item.ack)
        return True

    def _reexamine_parked(self) -> None:
        kept = collections.deque()
        while self._parked:
            item = self._parked.popleft()
            if not self._dispatch(item, park=False):
                kept.append(item)
        self._parked = kept

    def _expire_parked(self) -> None:
        limit = time.monotonic() - self.park_timeout
        while self._parked and self._parked[0].arrived < limit:
            old = self._parked.popleft()
            log.warning("dropped message on %s: no subscription within %s s",
                        old.topic, self.park_timeout)
            _safe_ack(old.ack)

    # -- transport -------------------------------------------------------

    @abc.abstractmethod
    def _connected_event(self) -> threading.Event:
        """An event set exactly while connected."""

    @abc.abstractmethod
    def _transport_publish(self, topic: str, data: bytes, qos: int, retain: bool) -> None:
        ...

    @abc.abstractmethod
    def _transport_subscribe(self, topic_filter: str, state: _FilterState,
                             timeout: float) -> None:
        """Subscribe; set ``state.ready`` and return when confirmed (bounded by `timeout`).

        While disconnected return at once: the subscription is made on
        connection from ``self._filters``.
        """

    @abc.abstractmethod
    def _transport_unsubscribe(self, topic_filter: str) -> None:
        ...

    @abc.abstractmethod
    def _transport_flush(self, deadline: float) -> bool:
        """Wait until outstanding publishes are acknowledged or `deadline` (monotonic) passes."""

    @abc.abstractmethod
    def _transport_close(self, timeout: float) -> None:
        ...

    def _filter_snapshot(self) -> list[tuple[str, _FilterState]]:
        with self._lock:
            return list(self._filters.items())



def _check_qos(qos: int) -> None:
    if qos not in (0, 1, 2):
        raise ValueError(f"qos must be 0, 1 or 2, not {qos!r}")


def _prepare(payload: Mapping[str, Any]) -> dict:
    if not isinstance(payload, Mapping):
        raise TypeError(f"payload must be a JSON object (dict), not {type(payload).__name__}")
    message = dict(payload)
    msg_id = message.setdefault(MSG_ID, new_msg_id())
    if not isinstance(msg_id, str) or not msg_id:
        raise ValueError("msg_id must be a non-empty string")
    return message


def _encode(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _safe_ack(ack: Ack) -> None:
    try:
        ack()
    except Exception:
        log.exception("acknowledging a message failed")
