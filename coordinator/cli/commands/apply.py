"""`lockstep apply PATH...`: run migration files, or directories of them in order, with a fleet.

Starts a coordinator on ``--host``/``--port`` for agents to join, waits for ``--wait-agents``
of them, then runs each migration (skipping names already completed on the database) and
prints what happened: phases, lock retries, backfills, warnings, and on failure the reason.
Stops at the first migration that fails or is rejected by lint; exit 0 only if every migration
completed (or had completed before). With ``--wait-agents 0`` it runs with no fleet only
when ``--allow-no-agents`` says so. ``--json`` prints one object at the end:
``{"ok", "url", "applied", "skipped", "results": [{"name", "status", "reason", "phases",
"schema_restored", "warnings"}], "via_leader"}``.

When a ``lockstep serve`` already leads the database (its fleet is connected there), apply
submits the files to its queue and follows them instead (``via_leader`` names it; results
then carry only name, status and reason). Losing the lead mid-run (a database restart, the
lock session terminated) is not the end: apply takes it again and resumes the run from its
durable state. Ctrl-C or SIGTERM stops it without rolling back; running apply again (or
``lockstep serve``) resumes the migration, ``lockstep abort NAME`` rolls it back.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import trio

from coordinator.cli import config, options, serving
from coordinator.cli.commands import CommandError, stderr_console
from coordinator.cli.commands.lint import lint_file, print_findings
from coordinator.cli.embedded import configured_dsn
from coordinator.cli.files import MigrationFile, MigrationLoadError, load_paths
from coordinator.cli.output import Output, logging_to_stderr, safe
from coordinator.cli.progress import LiveProgress
from coordinator.cli.results import EventPrinter, print_result, result_json
from coordinator.core import Coordinator, open_coordinator
from coordinator.history import SchemaTooNew
from coordinator.leader import Deposed
from coordinator.pg.errors import DatabaseFailed
from coordinator.queue import RunState, SubmitRefused, watch
from coordinator.queue import submit as submit_to_queue
from coordinator.snapshot import read_snapshot
from statemachine.exceptions import AlreadyApplied
from statemachine.gate import MigrationRejected
from statemachine.phases import MigrationStatus
from statemachine.result import MigrationResult

if TYPE_CHECKING:
    from coordinator.cli.commands import Subparsers

NAME = "apply"


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="run a migration file or a directory of them, coordinating the connected agents",
        description=(
            "Start a coordinator, wait for --wait-agents agents, then run the migration file "
            "(or every .sql file of the directory, in natural order), skipping migrations "
            "already completed on the database. Lint errors stop a migration unless --force. "
            "Exits 0 if every migration completed, 1 otherwise."
        ),
    )
    parser.add_argument(
        "paths", type=Path, nargs="+", metavar="PATH", help="migration files or directories"
    )
    options.add_database(parser)
    options.add_output(parser)
    serving.add_serving(parser)
    parser.add_argument(
        "--allow-no-agents",
        action="store_true",
        help="with --wait-agents 0, run even if no agent is connected",
    )
    parser.add_argument(
        "--wait-agents", type=options.count, default=0, metavar="N", help="agents to wait for first"
    )
    parser.add_argument(
        "--wait-timeout",
        type=options.positive,
        default=None,
        help="give up waiting for agents after this many seconds (default: wait forever)",
    )
    parser.add_argument("--force", action="store_true", help="run despite lint errors")
    serving.add_sql_limits(parser)
    serving.add_leases(parser)
    parser.set_defaults(func=run)


@dataclasses.dataclass
class _Report:
    url: str = ""
    applied: int = 0
    skipped: list[str] = dataclasses.field(default_factory=list)
    results: list[MigrationResult] = dataclasses.field(default_factory=list)
    rejected: str | None = None
    #: Set when a ``lockstep serve`` leader ran the files (`_through_leader`).
    via_leader: str | None = None
    remote_failures: list[RunState] = dataclasses.field(default_factory=list)


async def _apply(
    args: argparse.Namespace, dsn: str, files: list[MigrationFile], out: Output
) -> _Report:
    snap = await read_snapshot(dsn, limit=1)
    leader = snap.leader
    if leader is not None and leader.alive and leader.takes_queue:
        return await _through_leader(args, dsn, files, out, leader.holder or "a coordinator")
    progress = LiveProgress(out)
    attempt = 0
    while True:
        with progress:
            try:
                return await _serve_and_run(args, dsn, files, out, _Report(), progress)
            except Deposed as exc:  # LeadershipLost, or a write fenced by a newer epoch
                # The database restarted, or our lock session was ended: whoever leads next
                # resumes the run from its durable state. We try to be that leader again.
                attempt += 1
                if attempt > RELEAD_ATTEMPTS:
                    raise CommandError(
                        f"{exc}; gave up after {RELEAD_ATTEMPTS} tries: the next "
                        "'lockstep apply' or 'lockstep serve' resumes the migration"
                    ) from exc
                out.event(f"[yellow]{safe(exc)}: taking the lead again to resume[/]")
        await trio.sleep(1.0)


#: How often `apply` takes the lead again after losing it mid-run before giving up.
RELEAD_ATTEMPTS = 5


async def _through_leader(
    args: argparse.Namespace, dsn: str, files: list[MigrationFile], out: Output, holder: str
) -> _Report:
    """A ``lockstep serve`` leads this database: queue the files there and follow them (its
    fleet is connected to it, not to us)."""
    report = _Report(via_leader=holder)
    out.event(f"{safe(holder)} leads this database: submitting to its queue")
    submitted = await submit_to_queue(dsn, [f.migration for f in files], force=args.force)

    def changed(state: RunState) -> None:
        if state.status == "running" and state.state:
            out.event(f"{safe(state.name)}: {state.state.upper()}")

    states = await watch(dsn, [s.id for s in submitted], on_change=changed)
    for sub, state in zip(submitted, states, strict=True):
        mine = sub.outcome == "queued"
        if state.status == "completed" and not mine:
            out.event(f"[dim]skipped {safe(state.name)} (completed by the leader)[/]")
            report.skipped.append(state.name)
        elif state.status == "completed":
            out.event(f"[bold green]completed[/] {safe(state.name)} (run by the leader)")
            report.applied += 1
        else:
            out.event(f"[bold red]{safe(state.status)}[/] {safe(state.name)}: {safe(state.reason)}")
            report.remote_failures.append(state)
    return report


async def _serve_and_run(
    args: argparse.Namespace,
    dsn: str,
    files: list[MigrationFile],
    out: Output,
    report: _Report,
    progress: LiveProgress,
) -> _Report:
    retry = serving.retry_policy(args)
    async with open_coordinator(
        dsn,
        host=args.host,
        port=args.port,
        ack_timeout=args.ack_timeout,
        lock_timeout=args.lock_timeout,
        statement_timeout=args.statement_timeout,
        lock_retry=retry,
        token=args.fleet_secret,
        shared_token=args.shared_token,
        ssl_context=args.ssl_context,
        **serving.lease_options(args),  # type: ignore[arg-type]
    ) as coordinator:
        coordinator.subscribe(EventPrinter(out))
        coordinator.subscribe(progress)
        report.url = coordinator.url
        out.event(f"coordinator listening on {safe(coordinator.url)}")
        if args.wait_agents:
            out.event(f"waiting for {args.wait_agents} agent(s)...")
            timeout = math.inf if args.wait_timeout is None else args.wait_timeout
            try:
                await coordinator.wait_for_agents(args.wait_agents, timeout=timeout)
            except trio.TooSlowError:
                raise CommandError(
                    f"only {len(coordinator.agents)} of {args.wait_agents} agent(s) connected "
                    f"within {args.wait_timeout:g} s"
                ) from None
        await _run_all(coordinator, files, args.force, out, report)
        return report


async def _run_all(
    coordinator: Coordinator,
    files: list[MigrationFile],
    force: bool,
    out: Output,
    report: _Report,
) -> None:
    for file in files:
        migration = file.migration
        await coordinator.load_history()
        if migration.name in coordinator.completed_names():
            out.event(f"[dim]skipped {safe(migration.name)} (already completed)[/]")
            report.skipped.append(migration.name)
            continue
        try:
            result = await coordinator.run_migration(migration, force=force)
        except AlreadyApplied:  # another `lockstep apply` completed it meanwhile
            out.event(f"[dim]skipped {safe(migration.name)} (completed by another run)[/]")
            report.skipped.append(migration.name)
            continue
        except MigrationRejected:
            out.event(
                f"[bold red]rejected[/] {safe(migration.name)}: lint found errors "
                "(--force runs it anyway)"
            )
            report.rejected = migration.name
            # Linted again with the file's line numbers, which the coordinator does not know.
            if not out.json_mode:
                errors = [f for f in lint_file(file) if f.severity == "error"]
                print_findings(out.console, file.path, errors)
            return
        report.results.append(result)
        print_result(out, result)
        if result.status is not MigrationStatus.COMPLETED:
            return
        report.applied += 1
    out.event(f"[green]done[/]: {report.applied} applied, {len(report.skipped)} already completed")


def run(args: argparse.Namespace) -> int:
    if args.wait_agents == 0 and not args.allow_no_agents:
        raise config.ConfigError(
            "--wait-agents is 0: pass --wait-agents N to wait for your fleet, or "
            "--allow-no-agents to run with whoever is connected (possibly nobody)"
        )
    args.fleet_secret = options.token(args)
    serving.check_exposure(args, stderr_console())
    serving.check_lease_fits(args, stderr_console())
    dsn = configured_dsn(args.dsn)
    if dsn is None:
        raise CommandError("apply needs a database: pass --dsn or set LOCKSTEP_DSN")
    dsn = options.with_connect_timeout(dsn, args.connect_timeout)
    try:
        files = load_paths(args.paths)
    except MigrationLoadError as exc:
        raise CommandError(str(exc)) from exc
    args.ssl_context = serving.server_tls(args.tls_cert, args.tls_key)
    out = Output(json_mode=args.json, verbosity=options.verbosity(args))
    try:
        with logging_to_stderr(options.verbosity(args)):
            report = trio.run(_apply, args, dsn, files, out)
    except KeyboardInterrupt:
        stderr_console().print(
            "a migration in flight stays durable where it was: run this 'lockstep apply' "
            "again (or 'lockstep serve') to resume it, or 'lockstep abort NAME' to roll it back"
        )
        raise
    except (SubmitRefused, DatabaseFailed, SchemaTooNew) as exc:
        raise CommandError(str(exc)) from exc
    except psycopg.OperationalError as exc:
        raise CommandError(f"cannot reach the database: {str(exc).strip()}") from exc
    except psycopg.Error as exc:
        raise CommandError(f"database error: {str(exc).strip()}") from exc
    except OSError as exc:
        raise CommandError(f"cannot serve on {args.host}:{args.port}: {exc}") from exc
    ok = (
        report.rejected is None
        and not report.remote_failures
        and all(r.status is MigrationStatus.COMPLETED for r in report.results)
    )
    out.emit_json(
        {
            "ok": ok,
            "url": report.url,
            "applied": report.applied,
            "skipped": report.skipped,
            "rejected": report.rejected,
            "results": [result_json(r) for r in report.results]
            + [
                {"name": r.name, "status": r.status, "reason": r.reason}
                for r in report.remote_failures
            ],
            "via_leader": report.via_leader,
        }
    )
    return 0 if ok else 1
