"""`lockstep submit PATH...`: validate migrations and queue them for the serving leader.

Each file is loaded, planned and linted here, before anything is queued: a file that does
not load or parse, or lint errors without ``--force``, queue nothing (exit 1). Then all of
them are queued in one transaction, in the order given (`coordinator.queue.submit`), and
the leader (``lockstep serve``) is woken at once. ``--wait`` follows the runs live and exits
0 only if every one completed. ``--json`` prints ``{"ok", "submitted": [{"name", "id",
"outcome"}], "results": [{"name", "status", "reason"}]}`` (results only with --wait).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import trio

from coordinator.cli import options
from coordinator.cli.commands import CommandError
from coordinator.cli.commands.lint import lint_file, print_findings
from coordinator.cli.embedded import configured_dsn
from coordinator.cli.files import MigrationFile, MigrationLoadError, load_paths
from coordinator.cli.output import Output, safe
from coordinator.history import PostgresHistory, SchemaTooNew
from coordinator.queue import RunState, Submission, SubmitRefused, submit, watch
from coordinator.snapshot import read_snapshot
from statemachine.gate import MigrationRejected, admit
from statemachine.sql import build_plan

if TYPE_CHECKING:
    from coordinator.cli.commands import Subparsers

NAME = "submit"


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="validate migration files and queue them for the serving coordinator",
        description=(
            "Load, plan and lint each migration file (or every .sql file of a directory, in "
            "natural order), then queue them all for the leader run by 'lockstep serve'. "
            "Nothing is queued if one fails. --wait follows the runs and exits 0 only if "
            "every one completed."
        ),
    )
    parser.add_argument(
        "paths", type=Path, nargs="+", metavar="PATH", help="migration files or directories"
    )
    options.add_database(parser)
    options.add_output(parser)
    parser.add_argument("--force", action="store_true", help="queue despite lint errors")
    parser.add_argument("--wait", action="store_true", help="follow the runs until they end")
    parser.add_argument(
        "--wait-timeout",
        type=options.positive,
        default=None,
        help="with --wait, give up after this many seconds (default: wait forever)",
    )
    parser.set_defaults(func=run)


def _validate(files: list[MigrationFile], force: bool, out: Output) -> None:
    """Refuse the whole submit if any file would be refused by the leader's gate
    (`statemachine.gate.admit`: SQL that does not parse, or lint errors without force)."""
    refused = []
    for file in files:
        try:
            admit(build_plan(file.migration), force=force)
        except MigrationRejected as exc:
            refused.append(file.migration.name)
            if not out.json_mode:
                errors = [f for f in lint_file(file) if f.severity == "error"]
                print_findings(out.console, file.path, errors)
                if not errors:
                    out.event(f"{safe(file.path)}: {safe(exc)}")
    if refused:
        raise CommandError(
            f"{', '.join(refused)} would be refused when its turn comes: nothing was queued"
            + ("" if force else " (--force queues migrations with lint errors anyway)")
        )


async def _submit(
    dsn: str, files: list[MigrationFile], args: argparse.Namespace, out: Output
) -> tuple[list[Submission], list[RunState]]:
    history = PostgresHistory(dsn)
    await history.ensure_schema()
    done = await submit(dsn, [f.migration for f in files], force=args.force)
    for s in done:
        out.event(f"{safe(s.outcome)}: {safe(s.name)}")
    if not args.wait:
        snap = await read_snapshot(dsn, limit=1)
        if snap.leader is None or not snap.leader.alive:
            out.event(
                "[yellow]no coordinator leads this database now:[/] the queue runs when "
                "'lockstep serve' (or 'lockstep apply') starts"
            )
        return done, []

    def changed(state: RunState) -> None:
        where = f" in {state.state.upper()}" if state.status == "running" and state.state else ""
        reason = f": {safe(state.reason)}" if state.final and state.reason else ""
        out.event(f"{safe(state.name)}: {safe(state.status)}{where}{reason}")

    ids = [s.id for s in done]
    with trio.move_on_after(args.wait_timeout if args.wait_timeout else float("inf")) as scope:
        results = await watch(dsn, ids, on_change=changed)
    if scope.cancelled_caught:
        raise CommandError(
            f"still not finished after {args.wait_timeout:g} s: 'lockstep status' follows it"
        )
    return done, results


def run(args: argparse.Namespace) -> int:
    dsn = configured_dsn(args.dsn)
    if dsn is None:
        raise CommandError("submit needs a database: pass --dsn or set LOCKSTEP_DSN")
    dsn = options.with_connect_timeout(dsn, args.connect_timeout)
    out = Output(json_mode=args.json, verbosity=options.verbosity(args))
    try:
        files = load_paths(args.paths)
    except MigrationLoadError as exc:
        raise CommandError(str(exc)) from exc
    _validate(files, args.force, out)
    try:
        done, results = trio.run(_submit, dsn, files, args, out)
    except SubmitRefused as exc:
        raise CommandError(str(exc)) from exc
    except SchemaTooNew as exc:
        raise CommandError(str(exc)) from exc
    except psycopg.OperationalError as exc:
        raise CommandError(f"cannot reach the database: {str(exc).strip()}") from exc
    except psycopg.Error as exc:
        raise CommandError(f"database error: {str(exc).strip()}") from exc
    ok = all(r.status == "completed" for r in results) if args.wait else True
    document: dict[str, Any] = {
        "ok": ok,
        "submitted": [{"name": s.name, "id": s.id, "outcome": s.outcome} for s in done],
        "results": [{"name": r.name, "status": r.status, "reason": r.reason} for r in results],
    }
    out.emit_json(document)
    return 0 if ok else 1
