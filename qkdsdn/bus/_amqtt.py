"""amqtt glue for `EmbeddedBroker`; imported only when a broker starts.

Written against amqtt 0.12: it reaches two non-public points of amqtt
(listener sockets for the bound port, the listener TLS context), which is
why setup.cfg pins amqtt below 0.13.
"""
from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

from amqtt.broker import Broker
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session


class SessionAuthPlugin(BaseAuthPlugin):
    """Accept every client as a named (non-anonymous) session.

    amqtt's own anonymous plugin marks sessions anonymous, and amqtt then
    neither keeps their persistent session nor queues QoS 1 messages for
    them while they are away, which the bus relies on.  The embedded broker
    listens on loopback (or requires client certificates), so accepting
    every client is the intended policy.
    """

    @dataclass
    class Config:
        pass

    async def authenticate(self, *, session: Session) -> bool:
        session.is_anonymous = False
        return True


class QkdsdnBroker(Broker):
    """amqtt broker whose TLS listener requires a client certificate when a CA is given."""

    @staticmethod
    def _create_ssl_context(listener: Any) -> ssl.SSLContext:
        ctx = Broker._create_ssl_context(listener)
        # amqtt asks for CERT_OPTIONAL; a client without a certificate must not get in.
        if listener.get("cafile"):
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def bound_port(self) -> int:
        try:
            server = self._servers["default"].instance
            return server.sockets[0].getsockname()[1]
        except (AttributeError, KeyError, IndexError) as exc:  # amqtt internals changed
            raise RuntimeError("cannot find the embedded broker's listening port "
                               "(unsupported amqtt version?)") from exc


def broker_config(host: str, port: int, tls: tuple[Any, Any, Any] | None) -> dict[str, Any]:
    listener: dict[str, Any] = {"type": "tcp", "bind": f"{host}:{port}"}
    if tls is not None:
        ca, cert, key = tls
        listener.update({"ssl": True, "certfile": str(cert), "keyfile": str(key)})
        if ca:
            listener["cafile"] = str(ca)
    return {
        "listeners": {"default": listener},
        # Only our plugin: amqtt's defaults add packet logging and $SYS chatter.
        "plugins": {f"{__name__}.SessionAuthPlugin": {}},
    }
