"""`lockstep validate PATH...`: do the files still match what the database ran? (read-only)

Flyway's ``validate``: a migration that completed on the database but whose file changed
since (its `coordinator.history.checksum` differs from the one stored in
``lockstep.migrations``) is an error, because ``apply`` would silently skip it and the schema
would not be what the file says. Pending migrations (not run yet) are listed, not errors.
Exits 0 when every completed migration matches, 1 otherwise. Writes nothing, not even
lockstep's schema. ``--json``: ``{"ok", "changed": [names], "pending": [names],
"matching": [names]}``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import trio

from coordinator.cli import options
from coordinator.cli.commands import CommandError
from coordinator.cli.embedded import configured_dsn
from coordinator.cli.files import MigrationLoadError, load_paths
from coordinator.cli.output import Output, safe
from coordinator.history import AppliedMigration, PostgresHistory, checksum

if TYPE_CHECKING:
    from coordinator.cli.commands import Subparsers

NAME = "validate"


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="check that completed migrations still match their files (read-only)",
        description=(
            "Compare each migration file with the checksum lockstep stored when it completed; "
            "a completed migration whose file changed is an error (exit 1)."
        ),
    )
    parser.add_argument(
        "paths", type=Path, nargs="+", metavar="PATH", help="migration files or directories"
    )
    options.add_database(parser)
    options.add_output(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    dsn = configured_dsn(args.dsn)
    if not dsn:
        raise CommandError("validate needs a database: pass --dsn or set LOCKSTEP_DSN")
    try:
        files = load_paths(args.paths)
    except MigrationLoadError as exc:
        raise CommandError(str(exc)) from exc
    history = PostgresHistory(options.with_connect_timeout(dsn, args.connect_timeout))

    async def applied() -> list[AppliedMigration]:
        try:
            return await history.applied()
        except psycopg.errors.UndefinedTable:  # lockstep never ran here: nothing completed
            return []

    try:
        stored = {a.name: a.checksum for a in trio.run(applied)}
    except psycopg.Error as exc:
        raise CommandError(f"cannot read the history: {str(exc).strip()}") from exc
    out = Output(json_mode=args.json, verbosity=options.verbosity(args))
    changed, pending, matching = [], [], []
    for file in files:
        name = file.migration.name
        if name not in stored:
            pending.append(name)
            out.detail(f"pending {safe(name)}")
        elif stored[name] != checksum(file.migration):
            changed.append(name)
            out.event(
                f"[bold red]changed[/] {safe(name)}: {safe(file.path)} differs from the SQL "
                "that completed on the database"
            )
        else:
            matching.append(name)
            out.detail(f"ok {safe(name)}")
    ok = not changed
    out.emit_json({"ok": ok, "changed": changed, "pending": pending, "matching": matching})
    out.event(
        f"{len(matching)} matching, {len(pending)} pending, {len(changed)} changed"
        + ("" if ok else " [bold red](error)[/]")
    )
    return 0 if ok else 1
