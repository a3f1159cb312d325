"""`lockstep status`: the migration history of a database, newest first.

Every cell comes from the database (names, reasons holding agents' NACK text), so each goes
through `safe`: ``[/]`` or ``ESC[2J`` in a reason is shown as text. ``--json`` prints
``{"waiting_for_a_coordinator": bool, "migrations": [{"name", "status", "started_at",
"finished_at", "schema_restored", "reason"}]}`` (times in ISO 8601). Read-only: it never
writes to the database it reports on.
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
            "running, interrupted), times, and why a migration failed. Read-only. A run shown "
            "'running' while no coordinator holds the migration lock is resumed by the next "
            "coordinator that starts on the database."
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

    async def load() -> tuple[bool, list[HistoryRow]]:
        # Read-only: a status command must never change what it reports on.
        rows = await history.rows(args.limit)
        return (await history.lock_is_free() if rows else True), rows

    try:
        lock_free, rows = trio.run(load)
    except psycopg.Error as exc:
        raise CommandError(f"cannot read the history: {str(exc).strip()}") from exc
    out = Output(json_mode=args.json, verbosity=options.verbosity(args))
    waiting = lock_free and any(row.status == "running" for row in rows)
    out.emit_json(
        {
            "waiting_for_a_coordinator": waiting,
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
    if waiting:
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
            safe(row.name),
            safe(row.status),
            f"{row.started_at:%Y-%m-%d %H:%M:%S}",
            "" if row.finished_at is None else f"{row.finished_at:%Y-%m-%d %H:%M:%S}",
            "" if row.schema_restored is None else str(row.schema_restored).lower(),
            safe(row.reason or ""),
        )
    out.print(table)
    return 0
