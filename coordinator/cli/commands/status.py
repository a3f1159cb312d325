"""`lockstep status`: the migration history of a database, newest first.

Every cell comes from the database (names, reasons holding agents' NACK text), so each goes
through `safe`: ``[/]`` or ``ESC[2J`` in a reason is shown as text. ``--json`` prints
``{"interrupted": [names], "migrations": [{"name", "status", "started_at", "finished_at",
"schema_restored", "reason"}]}`` (times in ISO 8601).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import psycopg
import trio
from rich.table import Table

from coordinator.cli import options
from coordinator.cli.commands import CommandError
from coordinator.cli.embedded import configured_dsn
from coordinator.cli.output import Output, safe
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
    options.add_database(parser)
    options.add_output(parser)
    parser.add_argument(
        "--limit", type=options.at_least_one, default=50, help="how many rows (default 50)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    dsn = configured_dsn(args.dsn)
    if not dsn:
        raise CommandError("status needs a database: pass --dsn or set LOCKSTEP_DSN")
    history = PostgresHistory(options.with_connect_timeout(dsn, args.connect_timeout))

    async def load() -> tuple[list[str], list[HistoryRow]]:
        for attempt in range(3):  # two first runs at once race on CREATE SCHEMA IF NOT EXISTS
            try:
                await history.ensure_schema()
                break
            except psycopg.errors.UniqueViolation:
                if attempt == 2:
                    raise
        interrupted = await history.mark_interrupted()
        return interrupted, await history.rows(args.limit)

    try:
        interrupted, rows = trio.run(load)
    except psycopg.Error as exc:
        raise CommandError(f"cannot read the history: {str(exc).strip()}") from exc
    out = Output(json_mode=args.json, verbosity=options.verbosity(args))
    out.emit_json(
        {
            "interrupted": interrupted,
            "migrations": [
                {
                    "name": row.name,
                    "status": row.status,
                    "started_at": row.started_at.isoformat(),
                    "finished_at": None if row.finished_at is None else row.finished_at.isoformat(),
                    "schema_restored": row.schema_restored,
                    "reason": row.reason,
                }
                for row in rows
            ],
        }
    )
    for name in interrupted:
        out.print(f"[yellow]marked interrupted:[/] {safe(name)}")
    if not rows:
        out.print("no migrations recorded yet")
        return 0
    table = Table("name", "status", "started", "finished", "schema restored", "reason")
    for row in rows:
        table.add_row(
            safe(row.name),
            safe(row.status),
            f"{row.started_at:%Y-%m-%d %H:%M:%S}",
            "" if row.finished_at is None else f"{row.finished_at:%Y-%m-%d %H:%M:%S}",
            "" if row.schema_restored is None else str(row.schema_restored).lower(),
            safe(row.reason or ""),
        )
    out.print(table)
    return 0
