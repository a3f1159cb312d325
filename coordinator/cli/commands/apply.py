"""`lockstep apply PATH`: run a migration file, or a directory of them in order, with a fleet.

Starts a coordinator on ``--host``/``--port`` for agents to join, waits for ``--wait-agents``
of them, then runs each migration (skipping names already completed on the database) and
prints what happened: phases, lock retries, backfills, warnings, and on failure the reason.
Stops at the first migration that fails or is rejected by lint; exit 0 only if every migration
completed (or had completed before).
"""

from __future__ import annotations

import argparse
import math
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import trio
from rich.console import Console
from rich.markup import escape

from coordinator.cli.commands import CommandError, stdout_console
from coordinator.cli.commands.lint import lint_file, print_findings
from coordinator.cli.embedded import configured_dsn
from coordinator.cli.files import MigrationFile, MigrationLoadError, load_path
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
from statemachine.gate import MigrationRejected
from statemachine.phases import MigrationStatus
from statemachine.result import MigrationResult

if TYPE_CHECKING:
    from coordinator.cli.commands import Subparsers

NAME = "apply"


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


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
    parser.add_argument("path", type=Path, metavar="PATH", help="migration file or directory")
    parser.add_argument(
        "--dsn", default=None, help="libpq connection string or URI (default: $LOCKSTEP_DSN)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address agents connect to")
    parser.add_argument("--port", type=int, default=8765, help="port agents connect to")
    parser.add_argument("--token", default=None, help="token agents must present")
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
        "--ack-timeout", type=_positive, default=30.0, help="seconds agents have to ack a phase"
    )
    parser.add_argument(
        "--wait-agents", type=_count, default=0, metavar="N", help="agents to wait for first"
    )
    parser.add_argument(
        "--wait-timeout",
        type=_positive,
        default=None,
        help="give up waiting for agents after this many seconds (default: wait forever)",
    )
    parser.add_argument("--force", action="store_true", help="run despite lint errors")
    parser.add_argument(
        "--lock-timeout", type=_positive, default=0.5, help="seconds a statement waits for a lock"
    )
    parser.add_argument(
        "--statement-timeout",
        type=_positive,
        default=DEFAULT_STATEMENT_TIMEOUT,
        help="seconds a statement inside a phase transaction may run",
    )
    defaults = RetryPolicy()
    parser.add_argument(
        "--lock-retries",
        type=int,
        default=defaults.max_attempts,
        help="attempts per statement group when its lock is not granted",
    )
    parser.add_argument(
        "--lock-retry-seconds",
        type=float,
        default=defaults.max_seconds,
        help="seconds after which no new attempt starts",
    )
    parser.set_defaults(func=run)


class _Printer:
    """Prints the coordinator's events as they happen."""

    def __init__(self, out: Console) -> None:
        self.out = out

    def __call__(self, event: Event) -> None:
        out = self.out
        if isinstance(event, AgentJoined):
            out.print(f"[dim]agent {escape(event.agent_id)} joined from {escape(event.remote)}[/]")
        elif isinstance(event, AgentLeft):
            out.print(f"[dim]agent {escape(event.agent_id)} left: {escape(event.reason)}[/]")
        elif isinstance(event, PhaseStarted):
            cohort = ", ".join(event.cohort) or "no agents"
            out.print(
                f"[bold]{event.phase.name}[/] {escape(event.migration)} [dim]({escape(cohort)})[/]"
            )
        elif isinstance(event, AnswerReceived):
            answer = "ack" if event.ok else f"[red]nack[/]: {escape(event.error or '')}"
            out.print(f"  {escape(event.agent_id)}: {answer}")
        elif isinstance(event, LockRetry):
            out.print(f"  [yellow]{escape(event.message)}[/]")
        elif isinstance(event, SqlProgress):
            out.print(f"  [dim]{escape(event.message)}[/]")


def print_result(out: Console, result: MigrationResult) -> None:
    seconds = sum(p.duration for p in result.phases)
    path = " -> ".join(result.phase_names)
    if result.status is MigrationStatus.COMPLETED:
        out.print(f"[bold green]completed[/] {escape(result.name)} in {seconds:.1f} s ({path})")
    else:
        restored = {True: "restored", False: "LEFT EXPANDED", None: "untouched"}
        out.print(
            f"[bold red]failed[/] {escape(result.name)} ({path}): {escape(result.reason or '')}"
        )
        out.print(f"  schema: {restored[result.schema_restored]}")
    if result.lock_retries:
        out.print(f"  lock retries: {result.lock_retries}")
    for b in result.backfills:
        state = "" if b.complete else " [red](stopped)[/]"
        out.print(
            f"  backfill {escape(b.table)}: {b.rows} rows in {b.batches} batches "
            f"({b.seconds:.1f} s){state}"
        )
    for warning in result.warnings:
        out.print(f"  [yellow]warning:[/] {escape(warning)}")


async def _apply(
    args: argparse.Namespace, dsn: str, files: list[MigrationFile], out: Console
) -> bool:
    retry = RetryPolicy(max_attempts=args.lock_retries, max_seconds=args.lock_retry_seconds)
    async with open_coordinator(
        dsn,
        host=args.host,
        port=args.port,
        ack_timeout=args.ack_timeout,
        lock_timeout=args.lock_timeout,
        statement_timeout=args.statement_timeout,
        lock_retry=retry,
        token=args.token,
        ssl_context=args.ssl_context,
    ) as coordinator:
        coordinator.subscribe(_Printer(out))
        out.print(f"coordinator listening on {coordinator.url}")
        if args.wait_agents:
            out.print(f"waiting for {args.wait_agents} agent(s)...")
            timeout = math.inf if args.wait_timeout is None else args.wait_timeout
            try:
                await coordinator.wait_for_agents(args.wait_agents, timeout=timeout)
            except trio.TooSlowError:
                raise CommandError(
                    f"only {len(coordinator.agents)} of {args.wait_agents} agent(s) connected "
                    f"within {args.wait_timeout:g} s"
                ) from None
        return await _run_all(coordinator, files, args.force, out)


async def _run_all(
    coordinator: Coordinator, files: list[MigrationFile], force: bool, out: Console
) -> bool:
    applied = skipped = 0
    for file in files:
        migration = file.migration
        await coordinator.load_history()
        if migration.name in coordinator.completed_names():
            out.print(f"[dim]skipped {escape(migration.name)} (already completed)[/]")
            skipped += 1
            continue
        try:
            result = await coordinator.run_migration(migration, force=force)
        except MigrationRejected:
            out.print(
                f"[bold red]rejected[/] {escape(migration.name)}: lint found errors "
                "(--force runs it anyway)"
            )
            # Linted again with the file's line numbers, which the coordinator does not know.
            print_findings(out, file.path, [f for f in lint_file(file) if f.severity == "error"])
            return False
        print_result(out, result)
        if result.status is not MigrationStatus.COMPLETED:
            return False
        applied += 1
    out.print(f"[green]done[/]: {applied} applied, {skipped} already completed")
    return True


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


def run(args: argparse.Namespace) -> int:
    dsn = configured_dsn(args.dsn)
    if dsn is None:
        raise CommandError("apply needs a database: pass --dsn or set LOCKSTEP_DSN")
    try:
        files = load_path(args.path)
    except MigrationLoadError as exc:
        raise CommandError(str(exc)) from exc
    args.ssl_context = _server_tls(args.tls_cert, args.tls_key)
    out = stdout_console()
    try:
        ok = trio.run(_apply, args, dsn, files, out)
    except psycopg.Error as exc:
        raise CommandError(f"database error: {str(exc).strip()}") from exc
    except OSError as exc:
        raise CommandError(f"cannot serve on {args.host}:{args.port}: {exc}") from exc
    return 0 if ok else 1
