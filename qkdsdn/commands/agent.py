"""qkdsdn agent: run one node's key manager and SDN agent."""
from __future__ import annotations

import argparse
from pathlib import Path

from qkdsdn.commands.common import int_at_least

HELP = "run one node's agent: the virtual key manager (ETSI 004/014) and SDN agent (ETSI 015)"

DESCRIPTION = """\
Run the agent of one node of a network file: the virtual key manager that
applications call (ETSI GS QKD 014 at /api/v1/keys/..., ETSI GS QKD 004 at
/api/v1/qkd004/...), the SDN agent a controller configures (ETSI GS QKD 015
RESTCONF at /restconf/data/etsi-qkd-sdn-node:qkd_node) and the relay channel to
the neighbouring key managers, all on the node's km_address with mutual TLS.
The agent fills a durable key pool per physical link from the link's QKD
device (ETSI 014; the digital twin or hardware) and keeps its key store and
event log in --state-dir.

Until a controller runs, access and admission control are local: every agent
reads the same network file and the key manager of a session's source
application admits it and configures the route through the agents' RESTCONF.
With --bus URL the controller's access and admission control are asked over
the control-plane bus instead, the controller configures the node over it
(km/<node>/config, the same datastore as RESTCONF), and the agent publishes
its ETSI 015 notifications and events there (docs/controller.md).
"""

EPILOG = """\
examples:
  qkdsdn pki init examples/paper-poc.yaml --out pki
  qkdsdn twin examples/paper-poc.yaml --pki pki &
  qkdsdn agent examples/paper-poc.yaml --node KM0 --pki pki --state-dir run/KM0
  qkdsdn agent examples/paper-poc.yaml --node KM0 --pki pki --bus mqtts://broker.example:8883
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("agent", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("network", metavar="NETWORK.yaml", help="network file")
    p.add_argument("--node", required=True, help="the node whose agent this is (e.g. KM2)")
    sec = p.add_mutually_exclusive_group(required=True)
    sec.add_argument("--pki", metavar="DIR", help="certificates from 'qkdsdn pki init' (mutual TLS)")
    sec.add_argument("--insecure-dev", action="store_true",
                     help="development only: plain HTTP on loopback, callers named by the "
                          "X-QKDSDN-Dev-Identity header")
    p.add_argument("--state-dir", metavar="DIR", default=None,
                   help="key store and event log (default: ./qkdsdn-state/NODE)")
    p.add_argument("--bus", metavar="URL", default=None,
                   help="a controller runs: reach it over this control-plane bus (mqtt://HOST:PORT; "
                        "mqtts://HOST:PORT with the node's certificate from --pki; 'embedded' or 'local' "
                        "for a bus inside this process). Default: the local control plane")
    p.add_argument("--max-sae-id-count", type=int_at_least(0), default=16, metavar="N",
                   help="ETSI 014 multicast: at most N additional_slave_SAE_IDs per enc_keys "
                        "(max_SAE_ID_count; 0 turns multicast off; default 16)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(func=cmd_agent)


def cmd_agent(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading
    from pathlib import Path

    from qkdsdn.cli import CommandError
    from qkdsdn.commands.common import load_network

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    network = load_network(args.network)
    try:
        network.node(args.node)
    except KeyError:
        raise CommandError(f"no node '{args.node}' in {args.network} "
                           f"(nodes: {', '.join(n.name for n in network.nodes)})") from None
    from agents.service import KeyManagerAgent

    state = Path(args.state_dir or Path("qkdsdn-state") / args.node)
    bus = _make_bus(args, network) if args.bus else None
    try:
        agent = KeyManagerAgent(network, args.node, state_dir=state, pki=args.pki, insecure_dev=args.insecure_dev,
                                bus=bus, max_sae_id_count=args.max_sae_id_count)
    except (ValueError, OSError) as exc:
        if bus is not None:
            bus.close()
        raise CommandError(str(exc)) from None
    if args.insecure_dev:
        logging.getLogger("qkdsdn.agent").warning(
            "INSECURE DEVELOPMENT MODE: plain HTTP, callers identified by a header; never use this in production")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    agent.start()
    print(f"agent {args.node} serving on {agent.url} (state in {state})", flush=True)
    try:
        stop.wait()
    finally:
        agent.stop()
        if bus is not None:
            bus.close()
    return 0


def _make_bus(args: argparse.Namespace, network):
    """The agent's bus: client id and status topic from agents.buscontrol; for mqtts:// the node's
    certificate and the network's CA from --pki (without --pki: the system CAs, no client certificate)."""
    import logging

    from agents.buscontrol import agent_client_id, agent_process_name
    from qkdsdn.bus import BusError, Topics, make_bus
    from qkdsdn.cli import CommandError

    topics = Topics(network.name)
    tls = None
    if args.bus.startswith("mqtts://") and args.pki:
        from qkdsdn.pki import PkiLayout

        layout = PkiLayout(args.pki)
        cert, key = layout.node(args.node)
        for path in (layout.ca_cert, cert, key):
            if not Path(path).is_file():
                raise CommandError(f"--bus {args.bus}: {path} is missing (run 'qkdsdn pki init')")
        tls = (str(layout.ca_cert), str(cert), str(key))
    try:
        bus = make_bus(args.bus, agent_client_id(network.name, args.node), tls=tls,
                       status_topic=topics.status(agent_process_name(args.node)))
    except (ValueError, OSError, BusError) as exc:
        raise CommandError(f"--bus {args.bus}: {exc}") from None
    if not bus.wait_connected(10.0):
        logging.getLogger("qkdsdn.agent").warning(
            "bus %s not reachable yet: the agent keeps trying in the background", args.bus)
    return bus
