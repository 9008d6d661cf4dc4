"""qkdsdn db: create, migrate and load the topology and user-profile databases."""
from __future__ import annotations

import argparse

from qkdsdn.commands.common import add_db_option

HELP = "create, migrate and load the topology and user-profile databases"

DESCRIPTION = """\
The control plane keeps the network in a database: the topology (nodes,
interfaces, physical and virtual links, link metric samples), the user
profiles (users, SLAs, applications and their credentials), key sessions and
the event stream. The default is an SQLite file (qkdsdn.db); any SQLAlchemy URL
works with --db or $QKDSDN_DB, PostgreSQL included.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("db", help=HELP, description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = p.add_subparsers(dest="db_command", metavar="ACTION")
    cmds.required = True

    init = cmds.add_parser(
        "init", help="load a network file into the databases",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Check NETWORK.yaml and write its nodes, links, users, SLAs and applications into "
                    "the databases in one transaction (migrating the schema first). An invalid file writes "
                    "nothing and every problem is reported with its file, line and key. Loading the same "
                    "network again changes nothing; a different or edited file needs --replace.",
        epilog="example:\n  qkdsdn db init examples/paper-poc.yaml --db sqlite:///qkdsdn.db")
    init.add_argument("network", metavar="NETWORK.yaml", help="network file (see docs/network-file.md)")
    init.add_argument("--replace", action="store_true",
                      help="reload even if the database holds another network (drops its sessions, keeps events)")
    add_db_option(init)
    init.set_defaults(func=cmd_init)

    up = cmds.add_parser("upgrade", help="apply schema migrations (Alembic) to the newest revision",
                         description="Bring the database schema to the newest revision. Safe to run "
                                     "repeatedly; 'db init' runs it too.")
    up.add_argument("--revision", default="head", help="target revision (default: head)")
    add_db_option(up)
    up.set_defaults(func=cmd_upgrade)

    st = cmds.add_parser("status", help="show the schema revision and the loaded network",
                         description="Show the database's schema revision, the newest available one and "
                                     "which network file it was loaded from.")
    add_db_option(st)
    st.set_defaults(func=cmd_status)

    ht = cmds.add_parser(
        "hash-token", help="hash a development access token for a user's token_hash",
        description="Read a token from standard input (or prompt for it) and print its salted "
                    "PBKDF2-SHA256 hash, the form a network file's users[].token_hash takes. "
                    "The token itself is never stored.")
    ht.set_defaults(func=cmd_hash_token)


def cmd_init(args: argparse.Namespace) -> int:
    from db.bootstrap import BootstrapError, load_network as load_into_db
    from qkdsdn.cli import CommandError
    from qkdsdn.commands.common import load_network, open_database

    network = load_network(args.network)
    engine, sessions = open_database(args.db)
    try:
        with sessions.begin() as session:
            result = load_into_db(session, network, replace=args.replace)
    except BootstrapError as exc:
        raise CommandError(str(exc)) from None
    finally:
        engine.dispose()
    verb = {"created": "loaded", "replaced": "reloaded", "unchanged": "already loaded, unchanged:"}[result.action]
    print(f"network '{result.network}' {verb} {result.nodes} nodes, {result.links} links, "
          f"{result.users} users, {result.applications} applications")
    return 0


def cmd_upgrade(args: argparse.Namespace) -> int:
    from db.database import current_revision, upgrade
    from qkdsdn.commands.common import open_database

    engine, _ = open_database(args.db, upgrade=False)
    try:
        before = current_revision(engine)
        upgrade(engine, args.revision)
        after = current_revision(engine)
    finally:
        engine.dispose()
    print(f"schema at revision {after}" + ("" if before == after else f" (was {before or 'empty'})"))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from sqlalchemy import inspect, select

    from db import models as m
    from db.database import current_revision, head_revision
    from qkdsdn.commands.common import open_database

    engine, sessions = open_database(args.db, upgrade=False)
    try:
        current, head = current_revision(engine), head_revision(engine)
        print(f"schema revision: {current or 'none (empty database)'}; newest: {head}")
        if current and inspect(engine).has_table("network_meta"):
            with sessions() as session:
                meta = session.scalars(select(m.NetworkMeta)).first()
                if meta:
                    print(f"network: {meta.name} (from {meta.source}, loaded {meta.loaded_at:%Y-%m-%d %H:%M:%S})")
                else:
                    print("network: none loaded")
    finally:
        engine.dispose()
    return 0


def cmd_hash_token(args: argparse.Namespace) -> int:
    import getpass
    import sys

    from qkdsdn.cli import CommandError
    from qkdsdn.pki import hash_token

    token = getpass.getpass("token: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
    if len(token) < 16:
        raise CommandError("a token needs at least 16 characters")
    print(hash_token(token))
    return 0
