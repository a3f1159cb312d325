"""`lockstep check-db`: connect, report the server, round-trip DDL on a scratch table."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from coordinator.cli.commands import CommandError, stderr_console, stdout_console
from coordinator.cli.dbcheck import DbCheckError, check_db
from coordinator.cli.embedded import EmbeddedPostgresError, configured_dsn, resolve_dsn

if TYPE_CHECKING:
    from coordinator.cli.commands import Subparsers

NAME = "check-db"


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="check that a database accepts the DDL lockstep runs",
        description=(
            "Connect, print the server time and version, then create a scratch table, add and "
            "drop a column, and drop the table. Exits 0 and prints 'All tests passed!' if every "
            "step works, else 1 with the failing step and PostgreSQL's message."
        ),
    )
    parser.add_argument(
        "--dsn",
        default=None,
        help=(
            "libpq connection string or URI (default: $LOCKSTEP_DSN, else a temporary embedded "
            "PostgreSQL server that is removed on exit)"
        ),
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = stdout_console()
    if configured_dsn(args.dsn) is None:
        stderr_console().print("Starting a temporary embedded PostgreSQL server...")
    try:
        with resolve_dsn(args.dsn) as dsn:
            check_db(dsn, out)
    except EmbeddedPostgresError as exc:
        raise CommandError(str(exc), details=exc.details) from exc
    except DbCheckError as exc:
        raise CommandError(str(exc)) from exc
    return 0
