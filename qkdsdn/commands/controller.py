"""qkdsdn controller: run the control plane (SDN controller, access, admission, routing, monitoring)."""
from __future__ import annotations

import argparse

HELP = "run the control plane: SDN controller (ETSI 015), access and admission control, routing, monitoring"

DESCRIPTION = """\
Run the control plane of a network as os-ken apps in one process: the SDN
controller (discovers every node by reading its ETSI GS QKD 015 qkd_node over
RESTCONF, keeps the topology database in step, configures the key managers),
access control, admission control, the routing element, the monitoring
element, and the operator REST API (with /metrics for Prometheus).

The network file is loaded into the database first (the same file again
changes nothing; a different one needs --replace). Key managers reach the
controller over the bus (--bus): requests on admission/request, configuration
on km/<node>/config, notifications and events (docs/controller.md, docs/bus.md).
Agents join by running 'qkdsdn agent ... --bus URL' with the same bus.

Security: --pki DIR (from 'qkdsdn pki init') gives the controller certificate
for RESTCONF to the nodes, for the REST API (HTTPS; operators present their
certificate or a bearer token from --tokens) and for mqtts:// buses.
--insecure-dev runs plain HTTP on loopback and trusts development identity
headers: never in production.

Stops cleanly on SIGINT or SIGTERM.
"""

EPILOG = """\
examples:
  qkdsdn controller examples/paper-poc.yaml --pki pki --bus mqtt://127.0.0.1:1883
  qkdsdn controller examples/paper-poc.yaml --insecure-dev --bus mqtt://127.0.0.1:1883 \\
      --db sqlite:///run/qkdsdn.db --rest 127.0.0.1:8080 --tokens tokens.txt

token file: one 'ROLE HASH [NAME]' per line, ROLE 'read' or 'admin', HASH from
'qkdsdn db hash-token' (salted PBKDF2; never the token itself).
"""


def register(sub: argparse._SubParsersAction) -> None:
    from qkdsdn.commands.common import add_db_option

    p = sub.add_parser("controller", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("network", metavar="NETWORK.yaml", help="network file")
    add_db_option(p)
    p.add_argument("--bus", metavar="URL",
                   help="control-plane bus: mqtt://HOST:PORT, mqtts://HOST:PORT, 'embedded' (a broker in this "
                        "process) or 'local' (in-process only); default: the network file's deployment.bus")
    sec = p.add_mutually_exclusive_group(required=True)
    sec.add_argument("--pki", metavar="DIR", help="certificates from 'qkdsdn pki init' (controller certificate)")
    sec.add_argument("--insecure-dev", action="store_true",
                     help="development only: plain HTTP on loopback, development identity headers")
    rest = p.add_mutually_exclusive_group()
    rest.add_argument("--rest", metavar="HOST:PORT",
                      help="operator REST API address (default: the network file's deployment.controller)")
    rest.add_argument("--no-rest", action="store_true", help="run without the operator REST API")
    p.add_argument("--tokens", metavar="FILE", help="bearer tokens of the REST API ('ROLE HASH [NAME]' lines)")
    p.add_argument("--replace", action="store_true",
                   help="replace the network the database holds when the file differs from it")
    p.add_argument("--discovery-interval", type=float, default=5.0, metavar="S",
                   help="seconds between RESTCONF reads of every node (default: 5)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(func=cmd_controller)


def cmd_controller(args: argparse.Namespace) -> int:
    import logging

    from qkdsdn.cli import CommandError
    from qkdsdn.commands.common import load_network

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("os_ken", "alembic", "amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(args.log_level)))
    network = load_network(args.network)
    rest = None
    if not args.no_rest:
        from db.netfile import HOSTPORT_RE, split_hostport

        if args.rest is not None:
            if not HOSTPORT_RE.match(args.rest):
                raise CommandError(f"--rest {args.rest!r}: expected HOST:PORT")
            rest = split_hostport(args.rest)
        else:
            rest = (network.deployment.controller_host, network.deployment.controller_port)

    from sqlalchemy.exc import SQLAlchemyError

    from controller.apps.context import ControllerConfig
    from controller.launcher import Controller, ControllerOptions, LaunchError
    from db.bootstrap import BootstrapError

    try:
        config = ControllerConfig(discovery_interval_s=args.discovery_interval)
    except ValueError as exc:
        raise CommandError(f"--discovery-interval: {exc}") from None
    options = ControllerOptions(network=network, db_url=args.db, bus_url=args.bus, pki=args.pki,
                                insecure_dev=args.insecure_dev, rest=rest, tokens_file=args.tokens,
                                replace=args.replace, config=config)
    if args.insecure_dev:
        logging.getLogger("qkdsdn.controller").warning(
            "INSECURE DEVELOPMENT MODE: plain HTTP, callers identified by a header; never use this in production")

    def ready(controller: Controller) -> None:
        where = f", REST API on {controller.rest_url}" if controller.rest_url else ""
        bus = controller.bus_url or options.bus_url or network.deployment.bus
        print(f"controller of {network.name} running (bus {bus}{where})", flush=True)

    try:
        Controller(options).run(on_ready=ready)
    except (LaunchError, BootstrapError) as exc:
        raise CommandError(str(exc)) from None
    except SQLAlchemyError as exc:
        raise CommandError(f"database: {getattr(exc, 'orig', None) or exc}") from None
    except (OSError, ValueError) as exc:
        # Unreadable certificates or token file, a port in use, a bad bus URL...
        raise CommandError(str(exc)) from None
    return 0
