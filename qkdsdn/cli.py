"""The `qkdsdn` command line.

Each subcommand lives in its own module under ``qkdsdn.commands`` exposing
``register(subparsers)``; the module is imported only to build the parser, and
heavy imports happen inside the command handlers so ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from qkdsdn import __version__

# Order is the order shown in --help.
COMMAND_MODULES = (
    "qkdsdn.commands.db",
    "qkdsdn.commands.topology",
    "qkdsdn.commands.pki",
    "qkdsdn.commands.twin",
    "qkdsdn.commands.agent",
    "qkdsdn.commands.controller",
    "qkdsdn.commands.up",
    "qkdsdn.commands.demo",
    "qkdsdn.commands.timeline",
)

DESCRIPTION = """\
qkdsdn turns a set of QKD links into a key-delivery network: a control plane
(SDN controller, access control, admission control, routing, monitoring) that
configures a virtual key manager on every node, which hands symmetric keys to
applications through ETSI GS QKD 004 and 014. Nodes are configured over
ETSI GS QKD 015 (RESTCONF). A network is described by one YAML file
(see docs/network-file.md and examples/).
"""

EPILOG = """\
typical first steps:
  qkdsdn db init examples/paper-poc.yaml        load a network into the database
  qkdsdn topology show examples/paper-poc.yaml  nodes and links as tables
  qkdsdn pki init examples/paper-poc.yaml --out pki
                                                issue the CA and all certificates
run 'qkdsdn COMMAND --help' for each command's options.
"""


class CommandError(Exception):
    """A user-facing failure: printed without a traceback, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qkdsdn",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"qkdsdn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except CommandError as exc:
        print(f"qkdsdn: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
