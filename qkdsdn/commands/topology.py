"""qkdsdn topology: the operator's view of a network (tables, ETSI 015 documents)."""
from __future__ import annotations

import argparse

from qkdsdn.commands.common import add_db_option

HELP = "show a network's nodes and links, or export a node's ETSI GS QKD 015 document"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "topology", help=HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Read a network either from its YAML file or from the databases (--db) and show it.")
    cmds = p.add_subparsers(dest="topology_command", metavar="ACTION")
    cmds.required = True

    show = cmds.add_parser(
        "show", help="print nodes and links as tables",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print the nodes (qkdn_id, location, key-manager address, status) and the links "
                    "(ends, length, attenuation, key rate, QBER, status, reserved bandwidth, sessions) of "
                    "a network file or of the databases. For emulated links the expected key rate and "
                    "QBER come from the digital twin's physics model until the monitoring element has "
                    "measured them.",
        epilog="examples:\n  qkdsdn topology show examples/paper-poc.yaml\n"
               "  qkdsdn topology show --db sqlite:///qkdsdn.db")
    _source_args(show)
    show.set_defaults(func=cmd_show)

    export = cmds.add_parser(
        "export", help="print a node's ETSI GS QKD 015 qkd_node document (RFC 7951 JSON)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print the etsi-qkd-sdn-node:qkd_node document of one node as its SDN agent serves "
                    "it over RESTCONF: capabilities, applications, interfaces and links, in RFC 7951 "
                    "JSON. The document is validated before it is printed.",
        epilog="example:\n  qkdsdn topology export --node KM2 examples/paper-poc.yaml")
    _source_args(export)
    export.add_argument("--node", required=True, help="node name (e.g. KM2) or qkdn_id")
    export.add_argument("--indent", type=int, default=2, help="JSON indentation (default 2; 0 = compact)")
    export.set_defaults(func=cmd_export)


def _source_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("network", metavar="NETWORK.yaml", nargs="?",
                        help="network file; without it the network is read from the database")
    add_db_option(parser)


def _open(args: argparse.Namespace):
    """Session factory over the chosen source: the databases, or the network file loaded in memory."""
    from qkdsdn.cli import CommandError
    from qkdsdn.commands.common import load_network, open_database

    if args.network and args.db:
        raise CommandError("give either NETWORK.yaml or --db, not both")
    if args.network:
        from sqlalchemy.pool import StaticPool

        from db.bootstrap import load_network as load_into_db
        from db.database import make_engine, session_factory
        from db.models import Base

        network = load_network(args.network)
        engine = make_engine("sqlite://", poolclass=StaticPool)
        Base.metadata.create_all(engine)
        sessions = session_factory(engine)
        with sessions.begin() as session:
            load_into_db(session, network)
        return engine, sessions
    engine, sessions = open_database(args.db, upgrade=False)
    from sqlalchemy import inspect

    if not inspect(engine).has_table("nodes"):
        engine.dispose()
        raise CommandError("the database has no topology yet; run 'qkdsdn db init NETWORK.yaml' first")
    return engine, sessions


def cmd_show(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from db import models as m
    from qkdsdn.console import human_bps, print_table

    engine, sessions = _open(args)
    try:
        with sessions() as session:
            meta = session.scalars(select(m.NetworkMeta)).first()
            nodes = session.scalars(select(m.Node).order_by(m.Node.name)).all()
            links = session.scalars(select(m.Link).order_by(m.Link.kind, m.Link.name)).all()
            title = f"network {meta.name}" if meta else "network"
            print_table(f"{title}: {len(nodes)} nodes", ["node", "qkdn_id", "location", "key manager",
                                                         "status", "interfaces"],
                        [(n.name, n.qkdn_id, n.location, n.km_address, n.status.value, len(n.interfaces))
                         for n in nodes], right={"interfaces"})
            rows = []
            for link in links:
                skr, qber, source = link.skr_bps, link.qber, "measured"
                if skr is None:
                    skr, qber, source = _expected(link)
                rows.append((link.name, link.kind.value, f"{link.src_node.name} → {link.dst_node.name}",
                             _num(link.length_km, "km"), _num(link.channel_att_db, "dB"), _model(link),
                             human_bps(skr), None if qber is None else f"{100 * qber:.2f}%", source,
                             link.status.value, human_bps(link.reserved_bps), link.session_count))
            print_table(f"{len(links)} links", ["link", "type", "master → slave", "length", "loss", "device",
                                                "SKR", "QBER", "source", "status", "reserved", "sessions"],
                        rows, right={"length", "loss", "SKR", "QBER", "reserved", "sessions"})
    finally:
        engine.dispose()
    return 0


def _num(value: float | None, unit: str) -> str | None:
    return None if value is None else f"{value:g} {unit}"


def _model(link) -> str | None:
    dev = link.device or {}
    if dev.get("type") == "twin":
        return f"twin/{dev.get('model')}"
    if dev.get("type") == "etsi014":
        return "ETSI 014 KME"
    return None


def _expected(link) -> tuple[float | None, float | None, str | None]:
    """Expected SKR and QBER of an emulated link from the twin's physics model."""
    dev = link.device or {}
    if dev.get("type") != "twin" or link.length_km is None:
        return None, None, None
    from db.netfile import Device, Link
    from qkdsdn.twin.physics import performance

    fields = {k: v for k, v in dev.items() if k != "type"}
    model_link = Link(name=link.name, qkdl_id=link.qkdl_id, master=link.src_node.name,
                      slave=link.dst_node.name, length_km=link.length_km,
                      attenuation_db_km=link.attenuation_db_km or 0.2, device=Device(**fields))
    perf = performance(model_link)
    return perf.skr_bps, perf.qber, "model"


def cmd_export(args: argparse.Namespace) -> int:
    import json

    from db.export015 import node_document
    from qkdsdn.cli import CommandError

    engine, sessions = _open(args)
    try:
        with sessions() as session:
            try:
                doc = node_document(session, args.node)
            except LookupError as exc:
                raise CommandError(str(exc.args[0])) from None
    finally:
        engine.dispose()
    print(json.dumps(doc, indent=args.indent or None))
    return 0
