"""`lockstep status`: the migration history of a database, newest first."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

import psycopg
import trio
from rich.table import Table

from coordinator.cli.commands import CommandError, stdout_console
from coordinator.history import HistoryRow, PostgresHistory

if TYPE_CHECKING:
    from coordinator.cli.commands import Subparsers

NAME = "status"


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="show the migrations lockstep ran on a database",
        description=(
            "List the rows of lockstep.migrations, newest first: status (completed, failed, "
            "running, interrupted), times, and why a migration failed. Migrations a crashed "
            "coordinator left 'running' are marked 'interrupted' when no coordinator holds the "
            "migration lock."
        ),
    )
    parser.add_argument(
        "--dsn", default=None, help="libpq connection string or URI (default: $LOCKSTEP_DSN)"
    )
    parser.add_argument("--limit", type=int, default=50, help="how many rows (default 50)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    dsn = args.dsn or os.environ.get("LOCKSTEP_DSN")
    if not dsn:
        raise CommandError("status needs a database: pass --dsn or set LOCKSTEP_DSN")
    history = PostgresHistory(dsn)

    async def load() -> tuple[bool, list[HistoryRow]]:
        # Read-only: a status command must never change what it reports on.
        rows = await history.rows(args.limit)
        return (await history.lock_is_free() if rows else True), rows

    try:
        lock_free, rows = trio.run(load)
    except psycopg.Error as exc:
        raise CommandError(f"cannot read the history: {str(exc).strip()}") from exc
    out = stdout_console()
    if lock_free and any(row.status == "running" for row in rows):
        out.print(
            "[yellow]no coordinator is running a migration now:[/] the next coordinator that "
            "starts on this database resumes the runs shown as running"
        )
    if not rows:
        out.print("no migrations recorded yet")
        return 0
    table = Table("name", "status", "started", "finished", "schema restored", "reason")
    for row in rows:
        table.add_row(
            row.name,
            row.status,
            f"{row.started_at:%Y-%m-%d %H:%M:%S}",
            "" if row.finished_at is None else f"{row.finished_at:%Y-%m-%d %H:%M:%S}",
            "" if row.schema_restored is None else str(row.schema_restored).lower(),
            row.reason or "",
        )
    out.print(table)
    return 0
