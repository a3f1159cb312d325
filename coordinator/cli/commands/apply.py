"""`lockstep apply PATH...`: run migration files, or directories of them in order, with a fleet.

Starts a coordinator on ``--host``/``--port`` for agents to join, waits for ``--wait-agents``
of them, then runs each migration (skipping names already completed on the database) and
prints what happened: phases, lock retries, backfills, warnings, and on failure the reason.
Stops at the first migration that fails or is rejected by lint; exit 0 only if every migration
completed (or had completed before). With ``--wait-agents 0`` it runs with no fleet only
when ``--allow-no-agents`` says so. ``--json`` prints one object at the end:
``{"ok", "url", "applied", "skipped", "results": [{"name", "status", "reason", "phases",
"schema_restored", "warnings"}]}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import trio
from rich.console import Console

from coordinator.cli import config, options
from coordinator.cli.commands import CommandError, stderr_console
from coordinator.cli.commands.lint import lint_file, print_findings
from coordinator.cli.embedded import configured_dsn
from coordinator.cli.files import MigrationFile, MigrationLoadError, load_paths
from coordinator.cli.output import Output, safe
from coordinator.cli.progress import LiveProgress
from coordinator.core import Coordinator, open_coordinator
from coordinator.events import (
    AgentJoined,
    AgentLeft,
    AnswerReceived,
    Event,
    PhaseStarted,
    SqlProgress,
)
from coordinator.pg.attempts import DEFAULT_STATEMENT_TIMEOUT, LockRetry, RetryPolicy
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
    parser.add_argument("--host", default="127.0.0.1", help="address agents connect to")
    parser.add_argument(
        "--port", type=options.port, default=8765, help="port agents connect to (0: any free)"
    )
    options.add_token(parser)
    parser.add_argument(
        "--shared-token",
        action="store_true",
        help="also accept the plain fleet secret as a token (default: per-agent credentials "
        "from 'lockstep agent-token' only)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow serving without a token on a non-loopback address (anyone reaching the "
        "port could veto or stall migrations)",
    )
    parser.add_argument(
        "--allow-no-agents",
        action="store_true",
        help="with --wait-agents 0, run even if no agent is connected",
    )
    parser.add_argument(
        "--tls-cert",
        type=Path,
        default=None,
        metavar="PEM",
        help="serve agents over TLS (wss://) with this certificate chain; needs --tls-key",
    )
    parser.add_argument(
        "--tls-key", type=Path, default=None, metavar="PEM", help="the certificate's private key"
    )
    parser.add_argument(
        "--ack-timeout",
        type=options.positive,
        default=30.0,
        help="seconds agents have to ack a phase",
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
    parser.add_argument(
        "--lock-timeout",
        type=options.positive,
        default=0.5,
        help="seconds a statement waits for a lock",
    )
    parser.add_argument(
        "--statement-timeout",
        type=options.positive,
        default=DEFAULT_STATEMENT_TIMEOUT,
        help="seconds a statement inside a phase transaction may run",
    )
    defaults = RetryPolicy()
    parser.add_argument(
        "--lock-retries",
        type=options.at_least_one,
        default=defaults.max_attempts,
        help="attempts per statement group when its lock is not granted",
    )
    parser.add_argument(
        "--lock-retry-seconds",
        type=options.non_negative,
        default=defaults.max_seconds,
        help="seconds after which no new attempt starts",
    )
    parser.set_defaults(func=run)


class _Printer:
    """Prints the coordinator's events as they happen, one line each (timestamped when piped).

    Every value an agent or the database supplied goes through `safe`: NACK text with
    ``ESC[2J`` or ``[/]`` is shown as data.
    """

    def __init__(self, out: Output) -> None:
        self.out = out

    def __call__(self, event: Event) -> None:
        out = self.out
        if isinstance(event, AgentJoined):
            out.detail(f"[dim]agent {safe(event.agent_id)} joined from {safe(event.remote)}[/]")
        elif isinstance(event, AgentLeft):
            out.event(f"[dim]agent {safe(event.agent_id)} left: {safe(event.reason)}[/]")
        elif isinstance(event, PhaseStarted):
            cohort = ", ".join(event.cohort) or "no agents"
            out.event(
                f"[bold]{event.phase.name}[/] {safe(event.migration)} [dim]({safe(cohort)})[/]"
            )
        elif isinstance(event, AnswerReceived):
            if event.ok:
                out.detail(f"  {safe(event.agent_id)}: ack")
            else:
                out.event(f"  {safe(event.agent_id)}: [red]nack[/]: {safe(event.error or '')}")
        elif isinstance(event, LockRetry):
            out.event(f"  [yellow]{safe(event.message)}[/]")
        elif isinstance(event, SqlProgress):
            out.detail(f"  [dim]{safe(event.message)}[/]")


def print_result(out: Output, result: MigrationResult) -> None:
    seconds = sum(p.duration for p in result.phases)
    path = " -> ".join(result.phase_names)
    if result.status is MigrationStatus.COMPLETED:
        out.event(f"[bold green]completed[/] {safe(result.name)} in {seconds:.1f} s ({path})")
    else:
        restored = {True: "restored", False: "LEFT EXPANDED", None: "untouched"}
        out.event(f"[bold red]failed[/] {safe(result.name)} ({path}): {safe(result.reason or '')}")
        out.event(f"  schema: {restored[result.schema_restored]}")
    if result.lock_retries:
        out.event(f"  lock retries: {result.lock_retries}")
    for b in result.backfills:
        state = "" if b.complete else " [red](stopped)[/]"
        out.event(
            f"  backfill {safe(b.table)}: {b.rows} rows in {b.batches} batches "
            f"({b.seconds:.1f} s){state}"
        )
    for warning in result.warnings:
        out.event(f"  [yellow]warning:[/] {safe(warning)}")


def result_json(result: MigrationResult) -> dict[str, Any]:
    return {
        "name": result.name,
        "status": result.status.value,
        "reason": result.reason,
        "schema_restored": result.schema_restored,
        "phases": [
            {"phase": p.phase.name.lower(), "duration": round(p.duration, 6)} for p in result.phases
        ],
        "lock_retries": result.lock_retries,
        "warnings": list(result.warnings),
    }


@dataclasses.dataclass
class _Report:
    url: str = ""
    applied: int = 0
    skipped: list[str] = dataclasses.field(default_factory=list)
    results: list[MigrationResult] = dataclasses.field(default_factory=list)
    rejected: str | None = None


async def _apply(
    args: argparse.Namespace, dsn: str, files: list[MigrationFile], out: Output
) -> _Report:
    report = _Report()
    progress = LiveProgress(out)
    with progress:
        return await _serve_and_run(args, dsn, files, out, report, progress)


async def _serve_and_run(
    args: argparse.Namespace,
    dsn: str,
    files: list[MigrationFile],
    out: Output,
    report: _Report,
    progress: LiveProgress,
) -> _Report:
    retry = RetryPolicy(max_attempts=args.lock_retries, max_seconds=args.lock_retry_seconds)
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
    ) as coordinator:
        coordinator.subscribe(_Printer(out))
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


def _server_tls(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """The server context for --tls-cert/--tls-key, or None for plain ws://."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise CommandError("--tls-cert and --tls-key go together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise CommandError(f"cannot load the TLS certificate {cert} / key {key}: {exc}") from exc
    return context


def _check_exposure(args: argparse.Namespace, err: Console) -> None:
    """No unauthenticated coordinator on a reachable address without an explicit --insecure."""
    if args.fleet_secret is not None or options.is_loopback(args.host):
        return
    if not args.insecure:
        raise config.ConfigError(
            f"serving on {args.host} without a token lets anyone who reaches the port veto or "
            "stall every migration: set LOCKSTEP_TOKEN or --token-file, or pass --insecure"
        )
    err.print(
        f"[yellow]warning:[/] serving on {safe(args.host)} without authentication (--insecure)"
    )


def run(args: argparse.Namespace) -> int:
    if args.wait_agents == 0 and not args.allow_no_agents:
        raise config.ConfigError(
            "--wait-agents is 0: pass --wait-agents N to wait for your fleet, or "
            "--allow-no-agents to run with whoever is connected (possibly nobody)"
        )
    args.fleet_secret = options.token(args)
    _check_exposure(args, stderr_console())
    dsn = configured_dsn(args.dsn)
    if dsn is None:
        raise CommandError("apply needs a database: pass --dsn or set LOCKSTEP_DSN")
    dsn = options.with_connect_timeout(dsn, args.connect_timeout)
    try:
        files = load_paths(args.paths)
    except MigrationLoadError as exc:
        raise CommandError(str(exc)) from exc
    args.ssl_context = _server_tls(args.tls_cert, args.tls_key)
    out = Output(json_mode=args.json, verbosity=options.verbosity(args))
    try:
        report = trio.run(_apply, args, dsn, files, out)
    except psycopg.OperationalError as exc:
        raise CommandError(f"cannot reach the database: {str(exc).strip()}") from exc
    except psycopg.Error as exc:
        raise CommandError(f"database error: {str(exc).strip()}") from exc
    except OSError as exc:
        raise CommandError(f"cannot serve on {args.host}:{args.port}: {exc}") from exc
    ok = report.rejected is None and all(
        r.status is MigrationStatus.COMPLETED for r in report.results
    )
    out.emit_json(
        {
            "ok": ok,
            "url": report.url,
            "applied": report.applied,
            "skipped": report.skipped,
            "rejected": report.rejected,
            "results": [result_json(r) for r in report.results],
        }
    )
    return 0 if ok else 1
