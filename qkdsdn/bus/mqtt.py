"""MQTT transport of the bus (paho-mqtt 2.x, MQTT 3.1.1).

Reliability comes from four MQTT features used together:

* QoS 1 with a persistent session (clean_session False, stable client id):
  the broker queues messages for a disconnected client and redelivers the
  ones it sent but never saw acknowledged;
* manual acknowledgement: a message is acknowledged only after the handlers
  ran, so a crash between receipt and handling means redelivery, not loss;
* the per-subscription `Deduplicator` of `Bus`: a redelivered copy of an
  applied message is dropped, so handlers apply it exactly once;
* automatic reconnection with exponential backoff, re-subscription on every
  connection (the broker may have lost the session) and the `on_reconnect`
  hook for re-synchronisation.
"""
from __future__ import annotations

import functools
import logging
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from qkdsdn.bus.base import (MSG_ID, Bus, BusError, BusTimeout, _encode, _FilterState,
                             _prepare, new_msg_id, validate_topic)
from qkdsdn.bus.messages import OFFLINE, ONLINE, status_payload

log = logging.getLogger("qkdsdn.bus.mqtt")

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}

Path = str | PathLike[str]
TLSFiles = tuple[Path | None, Path | None, Path | None]


@dataclass(frozen=True)
class BrokerAddress:
    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @property
    def tls(self) -> bool:
        return self.scheme == "mqtts"


def parse_url(url: str) -> BrokerAddress:
    """``mqtt://[user[:password]@]host[:port]`` or ``mqtts://...``."""
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS:
        raise ValueError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise ValueError(f"broker URL {url!r} has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"broker URL {url!r}: no path, query or fragment allowed")
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError as exc:
        raise ValueError(f"broker URL {url!r}: {exc}") from None
    return BrokerAddress(parts.scheme, parts.hostname, port,
                         unquote(parts.username) if parts.username is not None else None,
                         unquote(parts.password) if parts.password is not None else None)


def tls_context(tls: TLSFiles | None) -> ssl.SSLContext:
    """Client TLS context: trust `ca` (or the system store) and present `cert`/`key`."""
    if tls is None:
        return ssl.create_default_context()
    ca, cert, key = tls
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    if cert:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    elif key:
        raise ValueError("tls: a key without a certificate")
    return ctx


def _make_client(client_id: str, clean_session: bool, address: BrokerAddress,
                 tls: TLSFiles | None, manual_ack: bool) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         clean_session=clean_session, protocol=MQTTProtocolVersion.MQTTv311,
                         manual_ack=manual_ack)
    if address.username is not None:
        client.username_pw_set(address.username, address.password)
    if address.tls:
        client.tls_set_context(tls_context(tls))
    elif tls is not None:
        raise ValueError("TLS files given for a plain mqtt:// URL; use mqtts://")
    return client


def _guarded(callback):
    """paho re-raises callback exceptions in its network thread, which kills
    the loop (and so reconnection): log them instead."""

    @functools.wraps(callback)
    def wrapper(self, *args: Any) -> None:
        try:
            callback(self, *args)
        except Exception:
            log.exception("%s: error in %s", self.client_id, callback.__name__)

    return wrapper


class MQTTBus(Bus):
    """A bus client of an MQTT broker.

    ``url`` is ``mqtt://host:port`` or ``mqtts://host:port`` (then ``tls`` =
    ``(ca, cert, key)`` files: the CA that signed the broker's certificate
    and this client's certificate and key).  ``client_id`` must be stable
    across restarts of the same process and unique on the broker: it names
    the persistent session.

    ``will`` = ``(topic, payload)`` is published by the broker, retained,
    if this client vanishes without disconnecting.  ``status_topic`` is the
    usual use of it: ``{"state": "online"}`` retained on every connection,
    ``{"state": "offline"}`` on `close()` and as Last Will.

    Connection happens in the background and is retried for ever with
    exponential backoff between ``reconnect_delay`` = (min, max) seconds;
    use `wait_connected` to block until connected.
    """

    def __init__(self, url: str, client_id: str, *, tls: TLSFiles | None = None,
                 will: tuple[str, Mapping[str, Any]] | None = None,
                 status_topic: str | None = None, keepalive: int = 30,
                 reconnect_delay: tuple[float, float] = (0.5, 15.0), **options: Any):
        self.address = parse_url(url)
        if will is not None and status_topic is not None:
            raise ValueError("give either will or status_topic: a client has one Last Will")
        if status_topic is not None:
            will = (status_topic, status_payload(client_id, OFFLINE))
        if will is not None:
            validate_topic(will[0])
            _prepare(will[1])  # fail now, not at connection time
        self.url = url
        self.status_topic = status_topic
        self._will = will
        self._up = threading.Event()
        self._sub_cond = threading.Condition()
        self._sub_waits: dict[int, _FilterState] = {}
        self._resub_mids: set[int] = set()
        self._hook_pending = False
        self._session_present = False
        self.connections = 0  # successful connections so far (1 + reconnections)
        self._unsubscribe_later: set[str] = set()
        # QoS > 0 publishes not yet acknowledged by the broker, by packet id.
        # paho's MQTTMessageInfo cannot tell (is_published() raises for a
        # message queued while disconnected), so on_publish keeps this.
        self._pub_cond = threading.Condition()
        self._unacked: set[int] = set()
        self._early_acks: set[int] = set()
        client = _make_client(client_id, False, self.address, tls, manual_ack=True)
        super().__init__(client_id, **options)
        self._client = client
        client.reconnect_delay_set(*reconnect_delay)
        client.on_pre_connect = self._on_pre_connect
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.connect_async(self.address.host, self.address.port, keepalive)
        client.loop_start()

    # -- state -----------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._up.is_set()

    def _connected_event(self) -> threading.Event:
        return self._up

    def __repr__(self) -> str:
        return (f"<MQTTBus {self.client_id!r} {self.address.scheme}://{self.address.host}:"
                f"{self.address.port} connected={self.connected}>")

    # -- paho callbacks (network thread) ---------------------------------

    @_guarded
    def _on_pre_connect(self, client: mqtt.Client, userdata: Any) -> None:
        if self._will is not None:
            # A fresh msg_id per connection: receivers de-duplicate by msg_id,
            # and a second death must not look like a copy of the first.
            topic, payload = self._will
            message = _prepare({**payload, MSG_ID: new_msg_id()})
            client.will_set(topic, _encode(message), qos=1, retain=True)

    @_guarded
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any,
                    reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.error("%s: broker %s:%s refused the connection: %s", self.client_id,
                      self.address.host, self.address.port, reason_code)
            return
        # Set "up" and take the snapshot under the bus lock: a concurrent
        # subscribe() either is in the snapshot or sees "up" and sends itself.
        with self._lock:
            self._up.set()
            filters = self._filter_snapshot()
        reconnect = self.connections > 0
        self.connections += 1
        log.info("%s: connected to %s:%s (session present: %s)", self.client_id,
                 self.address.host, self.address.port, flags.session_present)
        if self.status_topic is not None:
            message = _prepare(status_payload(self.client_id, ONLINE))
            self._transport_publish(self.status_topic, _encode(message), 1, True)
        with self._sub_cond:
            for topic_filter in self._unsubscribe_later - {f for f, _ in filters}:
                client.unsubscribe(topic_filter)
            self._unsubscribe_later.clear()
            self._resub_mids.clear()
            for topic_filter, state in filters:
                rc, mid = client.subscribe(topic_filter, state.qos)
                if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                    self._sub_waits[mid] = state
                    self._resub_mids.add(mid)
            self._session_present = bool(flags.session_present)
            self._hook_pending = reconnect
            self._maybe_fire_reconnect()

    def _maybe_fire_reconnect(self) -> None:
        # Caller holds _sub_cond.  The hook waits for the re-subscriptions,
        # so that what it publishes can already be answered.
        if self._hook_pending and not self._resub_mids:
            self._hook_pending = False
            self._fire_reconnect(self._session_present)

    @_guarded
    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                      reason_codes: list[Any], properties: Any) -> None:
        with self._sub_cond:
            state = self._sub_waits.pop(mid, None)
            if state is not None:
                refused = [rc for rc in reason_codes if rc.is_failure]
                if refused:
                    state.error = str(refused[0])
                else:
                    state.ready.set()
            self._resub_mids.discard(mid)
            self._maybe_fire_reconnect()
            self._sub_cond.notify_all()

    @_guarded
    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any,
                       reason_code: Any, properties: Any) -> None:
        with self._sub_cond:
            self._up.clear()
            for _, state in self._filter_snapshot():
                state.ready.clear()
            self._sub_waits.clear()
            self._resub_mids.clear()
            self._hook_pending = False
            self._sub_cond.notify_all()
        with self._pub_cond:
            self._pub_cond.notify_all()
        if not self.closed:
            log.warning("%s: disconnected from %s:%s (%s); reconnecting", self.client_id,
                        self.address.host, self.address.port, reason_code)

    @_guarded
    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.qos > 0:
            mid, qos = msg.mid, msg.qos

            def ack() -> None:
                client.ack(mid, qos)
        else:
            def ack() -> None:
                pass
        self._deliver(msg.topic, msg.payload, ack)

    @_guarded
    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int,
                    reason_code: Any, properties: Any) -> None:
        # Called with paho's message lock held: never call paho under _pub_cond.
        with self._pub_cond:
            if mid in self._unacked:
                self._unacked.discard(mid)
            else:
                self._early_acks.add(mid)  # acknowledged before publish() returned
            self._pub_cond.notify_all()

    # -- transport -------------------------------------------------------

    def _transport_publish(self, topic: str, data: bytes, qos: int, retain: bool) -> None:
        info = self._client.publish(topic, data, qos=qos, retain=retain)
        # NO_CONN: QoS > 0 is queued by paho and sent on reconnection.
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise BusError(f"publish on {topic!r} failed: {mqtt.error_string(info.rc)}")
        if qos > 0:
            with self._pub_cond:
                if info.mid in self._early_acks:
                    self._early_acks.discard(info.mid)
                else:
                    self._unacked.add(info.mid)

    def _transport_subscribe(self, topic_filter: str, state: _FilterState, timeout: float) -> None:
        if not self._up.is_set():
            return
        deadline = time.monotonic() + timeout
        with self._sub_cond:
            rc, mid = self._client.subscribe(topic_filter, state.qos)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                return  # lost the connection: subscribed again on connection
            self._sub_waits[mid] = state
            while not (state.ready.is_set() or state.error or not self._up.is_set()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BusTimeout(f"subscription to {topic_filter!r} not confirmed "
                                     f"within {timeout} s")
                self._sub_cond.wait(remaining)

    def _transport_unsubscribe(self, topic_filter: str) -> None:
        rc, _ = self._client.unsubscribe(topic_filter)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            # The persistent session would keep delivering: unsubscribe on connection.
            with self._sub_cond:
                self._unsubscribe_later.add(topic_filter)

    def _transport_flush(self, deadline: float) -> bool:
        with self._pub_cond:
            while self._unacked:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._pub_cond.wait(remaining)
            return True

    def _transport_close(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if self._up.is_set():
            if self.status_topic is not None:
                # A clean DISCONNECT discards the Will: say "offline" ourselves.
                message = _prepare(status_payload(self.client_id, OFFLINE))
                self._transport_publish(self.status_topic, _encode(message), 1, True)
            if not self._transport_flush(deadline):
                log.warning("%s: closing with %d unacknowledged publishes", self.client_id,
                            len(self._unacked))
        self._client.disconnect()
        self._client.loop_stop()
        self._up.clear()

def forget_session(url: str, client_id: str, *, tls: TLSFiles | None = None,
                   timeout: float = 10.0) -> None:
    """Discard the broker's persistent session of `client_id` (queued messages, subscriptions).

    For a process that is gone for good: connecting once with a clean
    session makes the broker drop what it kept for it.
    """
    address = parse_url(url)
    client = _make_client(client_id, True, address, tls, manual_ack=False)
    done = threading.Event()
    failure: list[str] = []

    def on_connect(c: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            failure.append(str(rc))
        done.set()

    client.on_connect = on_connect
    try:
        client.connect(address.host, address.port, keepalive=max(5, int(timeout)))
    except OSError as exc:
        raise BusError(f"cannot reach broker {address.host}:{address.port}: {exc}") from exc
    client.loop_start()
    try:
        if not done.wait(timeout):
            raise BusTimeout(f"broker did not answer within {timeout} s")
        if failure:
            raise BusError(f"broker refused the connection: {failure[0]}")
    finally:
        client.disconnect()
        client.loop_stop()

