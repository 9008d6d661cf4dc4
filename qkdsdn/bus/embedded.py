"""The embedded MQTT broker: no system service needed for one-machine runs.

`EmbeddedBroker` runs amqtt (an asyncio MQTT 3.1.1 broker in Python) on an
event loop in a background thread.  It keeps sessions, queued messages and
retained messages in memory only: after a restart clients reconnect with
``session_present`` False and re-synchronise (`Bus.on_reconnect`).  For
production, point the bus at Mosquitto or another broker instead.
"""
from __future__ import annotations

import asyncio
import atexit
import logging
import threading
from typing import Any

from qkdsdn.bus.base import BusError

log = logging.getLogger("qkdsdn.bus.embedded")


class EmbeddedBroker:
    """An MQTT broker in this process.

    ``port=0`` picks a free port at the first `start()`; later starts
    (after `stop()`) bind the same port again, so clients reconnect.
    ``tls=(ca, cert, key)``: serve MQTT over TLS with this certificate and,
    when ``ca`` is given, require client certificates signed by it.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 tls: tuple[Any, Any, Any] | None = None, start_timeout: float = 30.0):
        self.host = host
        self.port = port
        self.tls = tls
        self.start_timeout = start_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        if not self.port:
            raise BusError("the broker has no port before its first start()")
        scheme = "mqtts" if self.tls else "mqtt"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> "EmbeddedBroker":
        """Listen and serve (idempotent); returns self."""
        with self._lock:
            if self._thread is not None:
                return self
            try:
                from qkdsdn.bus import _amqtt
            except ImportError as exc:
                raise BusError("the embedded broker needs the amqtt package "
                               "(pip install 'amqtt>=0.12,<0.13')") from exc
            for name in ("amqtt", "transitions"):
                # amqtt (and its state-machine library) log every connection
                # at INFO; keep service logs readable unless configured.
                if logging.getLogger(name).level == logging.NOTSET:
                    logging.getLogger(name).setLevel(logging.WARNING)
            loop = asyncio.new_event_loop()
            ready = threading.Event()
            outcome: dict[str, Any] = {}

            async def boot() -> None:
                broker = _amqtt.QkdsdnBroker(
                    _amqtt.broker_config(self.host, self.port, self.tls), loop=loop)
                await broker.start()
                outcome["broker"] = broker
                outcome["port"] = broker.bound_port()

            def run() -> None:
                asyncio.set_event_loop(loop)
                try:
                    loop.run_until_complete(boot())
                except BaseException as exc:  # reported to start()
                    outcome["error"] = exc
                    ready.set()
                    _close_loop(loop)
                    return
                ready.set()
                try:
                    loop.run_forever()
                finally:
                    _close_loop(loop)

            thread = threading.Thread(target=run, name=f"mqtt-broker-{self.port}", daemon=True)
            thread.start()
            if not ready.wait(self.start_timeout):
                raise BusError(f"embedded broker did not start within {self.start_timeout} s")
            if "error" in outcome:
                thread.join(self.start_timeout)
                raise BusError(f"embedded broker cannot listen on {self.host}:{self.port}: "
                               f"{outcome['error']}") from outcome["error"]
            self._loop, self._thread, self._broker = loop, thread, outcome["broker"]
            self.port = outcome["port"]
            log.info("embedded MQTT broker listening on %s", self.url)
            return self

    def stop(self, timeout: float = 30.0) -> None:
        """Close every connection and stop listening (idempotent)."""
        with self._lock:
            if self._thread is None:
                return
            loop, thread, broker = self._loop, self._thread, self._broker
            self._loop = self._thread = self._broker = None
            try:
                asyncio.run_coroutine_threadsafe(broker.shutdown(), loop).result(timeout)
            except Exception:
                log.exception("embedded broker shutdown failed")
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            log.info("embedded MQTT broker on %s:%s stopped", self.host, self.port)

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<EmbeddedBroker {self.host}:{self.port} running={self.running}>"


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    # Cancel what amqtt left behind (per-connection tasks) before closing,
    # or asyncio warns about destroyed pending tasks.
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()


_shared: EmbeddedBroker | None = None
_shared_lock = threading.Lock()


def shared_broker() -> EmbeddedBroker:
    """The process-wide broker behind ``make_bus("embedded", ...)``, started on first use."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = EmbeddedBroker().start()
            atexit.register(_shared.stop)
        return _shared
