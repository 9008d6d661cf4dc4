"""The control-plane bus: JSON publish/subscribe between the controller and the agents.

Topic layout and message shapes: `qkdsdn.bus.messages` and docs/bus.md.
Implementations: `MQTTBus` (any MQTT 3.1.1 broker), `LocalBus` (in-process),
and `EmbeddedBroker` (an MQTT broker inside a qkdsdn process).  Build one
with `make_bus`.
"""
from __future__ import annotations

from typing import Any

from qkdsdn.bus.base import (MSG_ID, Bus, BusClosed, BusError, BusTimeout, Deduplicator,
                             Handler, Subscription, new_msg_id, topic_matches,
                             validate_filter, validate_topic)
from qkdsdn.bus.embedded import EmbeddedBroker, shared_broker
from qkdsdn.bus.local import LocalBus, LocalHub
from qkdsdn.bus.messages import (CONFIGURE, DECONFIGURE, OFFLINE, ONLINE, Topics,
                                 config_message, reply_message, status_payload)
from qkdsdn.bus.mqtt import MQTTBus, forget_session, parse_url

__all__ = [
    "MSG_ID", "Bus", "BusClosed", "BusError", "BusTimeout", "Deduplicator", "Handler",
    "Subscription", "new_msg_id", "topic_matches", "validate_filter", "validate_topic",
    "EmbeddedBroker", "shared_broker", "LocalBus", "LocalHub", "MQTTBus", "forget_session",
    "parse_url", "CONFIGURE", "DECONFIGURE", "OFFLINE", "ONLINE", "Topics", "config_message",
    "reply_message", "status_payload", "make_bus",
]


def make_bus(url: str, client_id: str, *, tls: tuple[Any, Any, Any] | None = None,
             ca: Any = None, cert: Any = None, key: Any = None, **options: Any) -> Bus:
    """Build a bus from a URL.

    * ``"local"``: a `LocalBus` on the process-wide `LocalHub`;
    * ``"embedded"``: an `MQTTBus` on this process's embedded broker
      (started on first use, on a free loopback port);
    * ``"mqtt://host:port"``, ``"mqtts://host:port"``: an `MQTTBus`; TLS files
      as ``tls=(ca, cert, key)`` or as ``ca=``, ``cert=``, ``key=``.

    Other keyword options (``status_topic``, ``will``, ``keepalive``...)
    go to the bus constructor.
    """
    if any(x is not None for x in (ca, cert, key)):
        if tls is not None:
            raise ValueError("give TLS files either as tls=(ca, cert, key) or as ca/cert/key")
        tls = (ca, cert, key)
    if url == "local":
        if tls is not None:
            raise ValueError("the local bus has no TLS")
        return LocalBus(client_id, **options)
    if url == "embedded":
        if tls is not None:
            raise ValueError("the embedded broker listens on loopback without TLS; "
                             "start an EmbeddedBroker(tls=...) and use its mqtts:// URL")
        return MQTTBus(shared_broker().url, client_id, **options)
    if url.startswith(("mqtt://", "mqtts://")):
        return MQTTBus(url, client_id, tls=tls, **options)
    raise ValueError(f"bus URL {url!r}: expected 'local', 'embedded', mqtt://... or mqtts://...")
