"""``python -m qkdsdn.bus broker``: run the embedded MQTT broker as a process.

Prints ``listening on mqtt://HOST:PORT`` once it accepts connections (useful
with ``--port 0``) and runs until SIGTERM or SIGINT.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from qkdsdn.bus.base import BusError
from qkdsdn.bus.embedded import EmbeddedBroker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qkdsdn.bus",
                                     description="qkdsdn control-plane bus tools")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    broker = sub.add_parser("broker", help="run the embedded MQTT broker (amqtt)")
    broker.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    broker.add_argument("--port", type=int, default=1883,
                        help="port to listen on, 0 for any free port (default: %(default)s)")
    broker.add_argument("--cert", help="server certificate (PEM): serve mqtts")
    broker.add_argument("--key", help="server private key (PEM)")
    broker.add_argument("--ca", help="CA (PEM) that client certificates must chain to")
    broker.add_argument("--log-level", default="WARNING", help="(default: %(default)s)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if bool(args.cert) != bool(args.key):
        parser.error("--cert and --key go together")
    if args.ca and not args.cert:
        parser.error("--ca needs --cert and --key")
    tls = (args.ca, args.cert, args.key) if args.cert else None

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server = EmbeddedBroker(args.host, args.port, tls=tls)
    try:
        server.start()
    except BusError as exc:
        print(f"qkdsdn.bus: error: {exc}", file=sys.stderr)
        return 2
    print(f"listening on {server.url}", flush=True)
    try:
        while not stop.wait(3600):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
