"""Helpers shared by subcommands."""
from __future__ import annotations

import argparse


def int_at_least(minimum: int):
    """An argparse type: an integer of at least ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value
    return parse


def add_db_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db", metavar="URL",
        help="SQLAlchemy database URL (default: $QKDSDN_DB, else sqlite:///qkdsdn.db in the current "
             "directory); e.g. postgresql+psycopg://qkdsdn@db.example.net/qkdsdn")


def load_network(path: str):
    """Parse a network file; configuration errors become CommandError (file:line: key: message)."""
    from db.netfile import NetworkFileError, load
    from qkdsdn.cli import CommandError

    try:
        return load(path)
    except NetworkFileError as exc:
        count = len(exc.problems)
        raise CommandError(f"{count} problem{'s' if count != 1 else ''} in the network file:\n{exc}") from None


def open_database(url: str | None, *, upgrade: bool = True):
    """Engine and session factory for --db, with the schema migrated to the newest revision."""
    from sqlalchemy.exc import OperationalError

    from db.database import database_url, make_engine, session_factory
    from db.database import upgrade as do_upgrade
    from qkdsdn.cli import CommandError

    engine = make_engine(url)
    try:
        if upgrade:
            do_upgrade(engine)
        else:
            engine.connect().close()
    except OperationalError as exc:
        raise CommandError(f"cannot use database {_safe_url(database_url(url))}: {exc.orig}") from None
    return engine, session_factory(engine)


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
