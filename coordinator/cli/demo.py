"""`lockstep demo`: one migration on a live fleet, narrated, with the evidence printed at the end.

The demo is the product's proof in a few seconds: it creates `users`, starts a coordinator and
N agents whose apps keep querying `users` (see `coordinator.cli.demo_app`), runs `add_user_email`
while they do, and shows every phase and every ack as the coordinator reports it. It then
prints the final columns and each app's query counts, and checks that the scenario showed what
it promises, so the exit status means something (0: it did, 1: it did not):

- ``success``: COMPLETED, the new columns exist, every app switched and no query failed.
- ``timeout``: one agent never acks ANNOUNCE; ROLLBACK names it and the columns are unchanged.
- ``sql-error``: EXECUTE's second statement fails; ROLLBACK shows PostgreSQL's message and the
  first statement left nothing behind.

Output is plain lines (grep-able in CI logs); on a terminal a live table of the fleet's acks
and query counters is drawn below them while the apps run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import random
import time
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
import trio
from psycopg.conninfo import conninfo_to_dict
from rich import box
from rich.console import Console, RenderableType
from rich.live import Live
from rich.table import Table

from agent import MigrationInfo, open_agent
from coordinator.cli.demo_app import MIGRATION_NAME, AppStats, run_app
from coordinator.cli.output import safe
from coordinator.core import Coordinator, open_coordinator
from coordinator.events import (
    AgentJoined,
    AgentLeft,
    AnswerReceived,
    Event,
    MigrationFinished,
    PhaseStarted,
    SqlProgress,
)
from statemachine.exceptions import LockstepError
from statemachine.failure import FailureKind
from statemachine.ledger import AckOutcome
from statemachine.migration import Migration
from statemachine.phases import MigrationStatus, Phase
from statemachine.result import MigrationResult

__all__ = [
    "DEFAULT_ACK_TIMEOUT",
    "MAX_AGENTS",
    "MISSING_TABLE",
    "NEW_COLUMNS",
    "ORIGINAL_COLUMNS",
    "SCENARIOS",
    "TIMEOUT_SCENARIO_ACK_TIMEOUT",
    "DemoSetupError",
    "agent_ids",
    "check_outcome",
    "default_ack_timeout",
    "demo_migration",
    "run_demo",
]

SCENARIOS = ("success", "timeout", "sql-error")
DEFAULT_ACK_TIMEOUT = 30.0
#: The timeout scenario waits for an agent that never answers: keep that wait short.
TIMEOUT_SCENARIO_ACK_TIMEOUT = 3.0
MAX_AGENTS = 20  # each app holds a connection and a worker thread
SEED_ROWS = 20
ORIGINAL_COLUMNS = ("id", "name", "created_at")
NEW_COLUMNS = (*ORIGINAL_COLUMNS, "email", "email_verified")
#: The table the sql-error scenario's second statement names; it must not exist.
MISSING_TABLE = "lockstep_demo_missing"

_CONNECT_TIMEOUT = 10
_JOIN_TIMEOUT = 10.0

RESET_SQL = """
DROP TABLE IF EXISTS users CASCADE;
DROP SCHEMA IF EXISTS lockstep CASCADE;
CREATE TABLE users (id SERIAL PRIMARY KEY, name TEXT, created_at TIMESTAMP);
"""
SEED_SQL = """
INSERT INTO users (name, created_at)
SELECT 'user-' || i, now() - make_interval(days => i) FROM generate_series(1, %s) AS i
"""
COLUMNS_SQL = """
SELECT attname FROM pg_attribute
WHERE attrelid = 'users'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum
"""


class DemoSetupError(LockstepError):
    """Raised by the demo when it cannot prepare its database (unreachable, no privileges...)."""


# ---------------------------------------------------------------------------- the scenario


def demo_migration(scenario: str) -> Migration:
    """`add_user_email`, as the scenario needs it (the sql-error one has a broken statement)."""
    _check_scenario(scenario)
    second = "ALTER TABLE users ADD COLUMN email_verified BOOLEAN DEFAULT FALSE"
    if scenario == "sql-error":
        second = f"ALTER TABLE {MISSING_TABLE} ADD COLUMN email_verified BOOLEAN DEFAULT FALSE"
    return Migration(
        MIGRATION_NAME,
        ["ALTER TABLE users ADD COLUMN email TEXT", second],
        rollback_sql=[
            "ALTER TABLE users DROP COLUMN IF EXISTS email_verified",
            "ALTER TABLE users DROP COLUMN IF EXISTS email",
        ],
    )


def default_ack_timeout(scenario: str) -> float:
    _check_scenario(scenario)
    return TIMEOUT_SCENARIO_ACK_TIMEOUT if scenario == "timeout" else DEFAULT_ACK_TIMEOUT


def agent_ids(count: int) -> list[str]:
    return [f"app-{i}" for i in range(1, count + 1)]


def _check_scenario(scenario: str) -> None:
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")


def check_outcome(
    scenario: str,
    result: MigrationResult,
    *,
    columns_before: Sequence[str],
    columns_after: Sequence[str],
    stats: Sequence[AppStats],
    silent_agent: str | None = None,
) -> list[str]:
    """What the run failed to demonstrate; empty when the scenario showed what it promises."""
    _check_scenario(scenario)
    problems = []
    for s in stats:
        if s.failed:
            problems.append(f"{s.agent_id}: {s.failed} failed queries ({'; '.join(s.errors)})")
        if not s.reads or not s.writes:
            problems.append(f"{s.agent_id} ran no reads or no writes")
    if scenario == "success":
        if result.status is not MigrationStatus.COMPLETED:
            problems.append(f"expected COMPLETED, got {result.status.name}: {result.reason}")
        if tuple(columns_after) != NEW_COLUMNS:
            problems.append(f"expected columns {', '.join(NEW_COLUMNS)}")
        problems += [
            f"{s.agent_id} never used the new query set" for s in stats if not s.new_queries
        ]
        return problems
    if result.status is not MigrationStatus.FAILED or Phase.ROLLBACK not in _phases(result):
        problems.append(f"expected ROLLBACK then FAILED, got {result.status.name}")
    if tuple(columns_after) != tuple(columns_before):
        problems.append("the users columns changed although the migration rolled back")
    problems += [f"{s.agent_id} switched to the new query set" for s in stats if s.new_queries]
    failure = result.failure
    if scenario == "timeout":
        if failure is None or failure.kind is not FailureKind.TIMEOUT:
            problems.append(f"expected an ack timeout, got: {result.reason}")
        elif failure.agents != (silent_agent,) or failure.phase is not Phase.ANNOUNCE:
            problems.append(f"expected {silent_agent} to time out in ANNOUNCE: {result.reason}")
    else:
        if failure is None or failure.kind is not FailureKind.SQL_ERROR:
            problems.append(f"expected a failed statement, got: {result.reason}")
        elif MISSING_TABLE not in (failure.statement or "") or MISSING_TABLE not in failure.message:
            problems.append(f"expected the statement on {MISSING_TABLE} to fail: {result.reason}")
    return problems


def _phases(result: MigrationResult) -> list[Phase]:
    return [p.phase for p in result.phases]


# --------------------------------------------------------------------------- the database


@dataclasses.dataclass(frozen=True)
class _Database:
    description: str
    columns: tuple[str, ...]
    dropped: tuple[str, ...]


def _connect(dsn: str, **kwargs: Any) -> psycopg.Connection[Any]:
    params = {}
    with contextlib.suppress(psycopg.Error):
        params = conninfo_to_dict(dsn)
    if "connect_timeout" not in params and not os.environ.get("PGCONNECT_TIMEOUT"):
        kwargs.setdefault("connect_timeout", _CONNECT_TIMEOUT)
    return psycopg.connect(dsn, **kwargs)


def _read_columns(conn: psycopg.Connection[Any]) -> tuple[str, ...]:
    return tuple(str(name) for (name,) in conn.execute(COLUMNS_SQL).fetchall())


def _prepare(dsn: str, scenario: str) -> _Database:
    """Drop what an earlier demo left, create and fill `users`; say what was there."""
    try:
        with _connect(dsn) as conn:
            info = conn.info
            host = info.host if not info.host.startswith("/") else f"socket {info.host}"
            version = conn.execute("SHOW server_version").fetchone()
            description = (
                f"PostgreSQL {version[0] if version else '?'}, database {info.dbname} on {host}"
            )
            with conn.transaction():
                found = conn.execute(
                    "SELECT to_regclass('users') IS NOT NULL, "
                    "to_regnamespace('lockstep') IS NOT NULL, to_regclass(%s) IS NOT NULL",
                    (MISSING_TABLE,),
                ).fetchone()
                assert found is not None
                if scenario == "sql-error" and found[2]:
                    raise DemoSetupError(
                        f"the sql-error scenario needs table {MISSING_TABLE} to be absent, but "
                        "this database has one"
                    )
                conn.execute(RESET_SQL)
                conn.execute(SEED_SQL, (SEED_ROWS,))
            columns = _read_columns(conn)
    except psycopg.Error as exc:
        raise DemoSetupError(f"cannot prepare the demo database: {_one_line(exc)}") from exc
    dropped = tuple(
        name
        for name, there in zip(("table users", "schema lockstep"), found[:2], strict=True)
        if there
    )
    return _Database(description, columns, dropped)


def _columns(dsn: str) -> tuple[str, ...]:
    with _connect(dsn) as conn:
        return _read_columns(conn)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# ------------------------------------------------------------------------------- the view


@dataclasses.dataclass(frozen=True)
class _Glyphs:
    phase: str
    ack: str
    nack: str
    late: str
    joined: str
    left: str
    done: str

    @classmethod
    def for_console(cls, console: Console) -> _Glyphs:
        if console.encoding.lower().replace("-", "").startswith("utf"):
            return cls("▶", "✓", "✗", "·", "+", "-", "■")
        return cls(">", "ok", "x", ".", "+", "-", "#")


class DemoView:
    """Turns coordinator events into lines, and keeps what the live fleet table shows.

    `on_event` is a coordinator subscriber: it runs inline in the coordinator's task, so it only
    prints and updates a few dicts.
    """

    _HOOK_OUTCOME = {
        Phase.ANNOUNCE: "ready for the change",
        Phase.APPLY: "switched to the new query set",
        Phase.CONFIRM: "done",
        Phase.ROLLBACK: "back on the old query set",
    }

    def __init__(self, console: Console, migration: Migration, stats: Sequence[AppStats]) -> None:
        self.console = console
        self.migration = migration
        self.stats = list(stats)
        self.glyphs = _Glyphs.for_console(console)
        self.started = time.monotonic()
        self.phase_started: dict[Phase, float] = {}
        self.cohorts: dict[Phase, tuple[str, ...]] = {}
        self.answers: dict[Phase, dict[str, str]] = {}
        self.current: Phase | None = None

    def _elapsed(self) -> str:
        return f"{time.monotonic() - self.started:6.2f}s"

    def say(self, text: str) -> None:
        """Print one line stamped with the time since the fleet started."""
        self.console.print(f"[dim]{self._elapsed()}[/] {text}")

    def on_event(self, event: Event) -> None:
        g = self.glyphs
        if isinstance(event, AgentJoined):
            self.say(f"{g.joined} agent [bold]{safe(event.agent_id)}[/] connected")
        elif isinstance(event, AgentLeft):
            self.say(f"{g.left} agent {safe(event.agent_id)} left: {safe(event.reason)}")
        elif isinstance(event, PhaseStarted):
            self._phase_started(event)
        elif isinstance(event, AnswerReceived):
            self._answer(event)
        elif isinstance(event, SqlProgress):
            self.say(f"    {safe(event.message)}")
        elif isinstance(event, MigrationFinished):
            if self.current is not None:
                self._phase_ended(self.current, None)
            self.current = None
            if event.status is MigrationStatus.COMPLETED:
                self.say(f"[bold green]{g.done} {safe(event.migration)} COMPLETED[/]")
            else:
                self.say(
                    f"[bold red]{g.done} {safe(event.migration)} {event.status.name}:[/] "
                    f"{safe(event.reason or '')}"
                )

    def _phase_started(self, event: PhaseStarted) -> None:
        g = self.glyphs
        previous = self.current
        if previous is not None:
            self._phase_ended(previous, event.phase)
        self.current = event.phase
        self.phase_started[event.phase] = time.monotonic()
        self.cohorts[event.phase] = event.cohort
        self.answers.setdefault(event.phase, {})
        colour = "red" if event.phase is Phase.ROLLBACK else "cyan"
        title = f"[bold {colour}]{g.phase} {event.phase.name}[/]"
        if event.ack_required:
            cohort = ", ".join(event.cohort) or "nobody connected"
            self.say(f"{title} waiting for acks from {safe(cohort)}")
        elif event.phase is Phase.EXECUTE:
            self.say(f"{title} expand SQL in one transaction, old queries still running:")
            for statement in self.migration.sql:
                self.say(f"    {safe(statement)}")
        else:
            self.say(title)

    def _phase_ended(self, phase: Phase, following: Phase | None) -> None:
        """Say how a phase ended, which no event states on its own.

        `following` is the next phase, None when the migration finished.
        """
        if phase is Phase.EXECUTE and following is not Phase.ROLLBACK:
            self.say("    EXECUTE committed: the new columns exist")
        elif phase is Phase.EXECUTE:
            self.say("    EXECUTE failed: its transaction rolled back, nothing was changed")
        elif phase in self.cohorts:
            answered = self.answers.get(phase, {})
            missing = [a for a in self.cohorts[phase] if a not in answered]
            if missing:
                then = " (the rollback goes on without it)" if phase is Phase.ROLLBACK else ""
                self.say(
                    f"    [red]no {phase.name} ack from {safe(', '.join(missing))} "
                    f"before the ack timeout{then}[/]"
                )

    def _answer(self, event: AnswerReceived) -> None:
        g = self.glyphs
        since = time.monotonic() - self.phase_started.get(event.phase, self.started)
        timing = f"[dim]after {since * 1000:.0f} ms[/]"
        who = f"[bold]{safe(event.agent_id)}[/]"
        if event.outcome is not AckOutcome.RECORDED:
            kind = "ack" if event.ok else "nack"
            self.say(
                f"    {g.late} {who} {kind} for {event.phase.name} ignored "
                f"({event.outcome.value}) {timing}"
            )
            return
        self.answers.setdefault(event.phase, {})[event.agent_id] = "ack" if event.ok else "nack"
        if event.ok:
            note = self._HOOK_OUTCOME.get(event.phase, "")
            self.say(
                f"    [green]{g.ack}[/] {who} acked {event.phase.name} {timing} [dim]{note}[/]"
            )
        else:
            self.say(
                f"    [red]{g.nack}[/] {who} NACKed {event.phase.name}: "
                f"{safe(event.error or '')} {timing}"
            )

    # ---------------------------------------------------------------- live fleet table
    def fleet_table(self) -> RenderableType:
        """The fleet right now; called by rich's refresh thread, so it only reads."""
        phases = [p for p in Phase if self.cohorts.get(p)]
        table = Table(box=box.SIMPLE, title="fleet (live)", title_justify="left")
        table.add_column("agent")
        table.add_column("queries")
        for name in ("reads", "writes", "failed"):
            table.add_column(name, justify="right")
        for phase in phases:
            table.add_column(phase.name)
        for s in self.stats:
            marks = []
            for phase in phases:
                answer = self.answers.get(phase, {}).get(s.agent_id)
                if answer == "ack":
                    marks.append(f"[green]{self.glyphs.ack}[/]")
                elif answer == "nack":
                    marks.append(f"[red]{self.glyphs.nack}[/]")
                elif s.agent_id in self.cohorts[phase]:
                    marks.append("[yellow]…[/]" if phase is self.current else "[red]-[/]")
                else:
                    marks.append("")
            failed = f"[red]{s.failed}[/]" if s.failed else "0"
            table.add_row(s.agent_id, s.query_set, str(s.reads), str(s.writes), failed, *marks)
        return table

    @contextlib.contextmanager
    def live(self) -> Iterator[None]:
        """Draw the fleet table under the event lines, on a terminal only."""
        console = self.console
        if not console.is_terminal or console.is_dumb_terminal:
            yield
            return
        with Live(
            console=console,
            get_renderable=self.fleet_table,
            refresh_per_second=8,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        ):
            yield


# ------------------------------------------------------------------------------ the report


def _agents_table(stats: Sequence[AppStats]) -> Table:
    table = Table(title="queries per agent", title_justify="left", box=box.SQUARE)
    table.add_column("agent")
    table.add_column("set at end")
    for name in ("old-set ok", "new-set ok", "reads", "writes", "failed"):
        table.add_column(name, justify="right")
    for s in stats:
        failed = f"[bold red]{s.failed}[/]" if s.failed else "[green]0[/]"
        table.add_row(
            s.agent_id,
            s.query_set,
            str(s.old_queries),
            str(s.new_queries),
            str(s.reads),
            str(s.writes),
            failed,
        )
    return table


def _phases_table(result: MigrationResult, view: DemoView) -> Table:
    table = Table(title=f"phases of {result.name}", title_justify="left", box=box.SQUARE)
    table.add_column("phase")
    table.add_column("duration", justify="right")
    table.add_column("acks", justify="right")
    for record in result.phases:
        cohort = view.cohorts.get(record.phase, ())
        acked = sum(1 for a in view.answers.get(record.phase, {}).values() if a == "ack")
        acks = f"{acked}/{len(cohort)}" if record.phase in _ACKED else "-"
        table.add_row(record.phase.name, f"{record.duration * 1000:.0f} ms", acks)
    return table


_ACKED = frozenset({Phase.ANNOUNCE, Phase.APPLY, Phase.CONFIRM, Phase.ROLLBACK})


def _report(
    console: Console,
    result: MigrationResult,
    view: DemoView,
    stats: Sequence[AppStats],
    columns_before: tuple[str, ...],
    columns_after: tuple[str, ...],
) -> None:
    console.print()
    unchanged = " (unchanged)" if columns_after == columns_before else ""
    console.print(f"[bold]users columns:[/] {', '.join(columns_after)}{unchanged}")
    console.print()
    console.print(_agents_table(stats))
    console.print(_phases_table(result, view))
    colour = "green" if result.status is MigrationStatus.COMPLETED else "red"
    console.print(f"[bold]status:[/] [bold {colour}]{result.status.name}[/]")
    if result.reason:
        console.print(f"[bold]reason:[/] {safe(result.reason)}")
    if result.schema_restored is True:
        console.print("[bold]schema:[/] restored by rollback_sql")
    elif result.schema_restored is None and result.status is MigrationStatus.FAILED:
        console.print("[bold]schema:[/] untouched (EXECUTE never committed, nothing to undo)")
    elif result.schema_restored is False:
        console.print("[bold]schema:[/] [red]left expanded[/]")
    for warning in result.warnings:
        console.print(f"[bold]warning:[/] {safe(warning)}")


def _verdict(scenario: str, stats: Sequence[AppStats], result: MigrationResult) -> str:
    queries = sum(s.reads + s.writes for s in stats)
    if scenario == "success":
        return (
            f"{len(stats)} agents ran {queries} queries while users changed; "
            "every one switched to the new columns at APPLY and none failed."
        )
    if scenario == "timeout":
        return (
            "an agent that never acked stopped the migration before any SQL ran; "
            f"ROLLBACK left users unchanged and {queries} queries ran without a failure."
        )
    return (
        "a failing statement rolled back the whole EXECUTE transaction, including the one "
        f"before it; users is unchanged and {queries} queries ran without a failure."
    )


# --------------------------------------------------------------------------------- the run


async def run_demo(
    dsn: str,
    *,
    agents: int = 3,
    scenario: str = "success",
    ack_timeout: float | None = None,
    console: Console | None = None,
    warmup: float = 1.0,
    cooldown: float = 1.0,
) -> int:
    """Run the demo against `dsn`; return 0 if the scenario showed what it promises, else 1.

    Drops and recreates table `users` and schema `lockstep` in that database. `ack_timeout`
    None means the scenario's default (3 s for ``timeout``, 30 s otherwise). The apps run for
    `warmup` seconds before the migration and `cooldown` seconds after it. Raises `ValueError`
    for bad arguments and `DemoSetupError` if the database cannot be prepared.
    """
    _check_scenario(scenario)
    if not 1 <= agents <= MAX_AGENTS:
        raise ValueError(f"agents must be between 1 and {MAX_AGENTS}, got {agents}")
    timeout = default_ack_timeout(scenario) if ack_timeout is None else ack_timeout
    if not timeout > 0:
        raise ValueError(f"ack_timeout must be > 0, got {ack_timeout}")
    if warmup < 0 or cooldown < 0:
        raise ValueError("warmup and cooldown must be >= 0")
    console = console or Console(highlight=False, soft_wrap=True)
    migration = demo_migration(scenario)
    ids = agent_ids(agents)
    silent = ids[-1] if scenario == "timeout" else None

    console.print(
        f"[bold]lockstep demo[/]: scenario [bold]{scenario}[/], {agents} agent(s), "
        f"ack timeout {timeout:g} s"
    )
    db = await trio.to_thread.run_sync(_prepare, dsn, scenario)
    console.print(f"Database: {safe(db.description)}")
    if db.dropped:
        console.print(f"Dropped what an earlier run left: {', '.join(db.dropped)}")
    console.print(f"Created table users ({', '.join(db.columns)}) with {SEED_ROWS} rows")
    if silent:
        console.print(f"[yellow]{silent}'s on_announce hook will hang: it never acks[/]")

    stats = [AppStats(agent_id) for agent_id in ids]
    view = DemoView(console, migration, stats)
    started = False
    try:
        async with open_coordinator(dsn, port=0, ack_timeout=timeout) as coord:
            started = True
            console.print(f"Coordinator listening on {coord.url}")
            unsubscribe = coord.subscribe(view.on_event)
            try:
                result = await _run_fleet(
                    coord, dsn, migration, stats, view, silent, warmup, cooldown
                )
            finally:
                unsubscribe()
    except psycopg.Error as exc:
        if started:
            raise  # a bug, not a setup problem: keep the traceback
        raise DemoSetupError(
            f"the coordinator could not use the database: {_one_line(exc)}"
        ) from exc
    console.print(f"Stopped {agents} agent(s) and the coordinator.")

    columns_after = await trio.to_thread.run_sync(_columns, dsn)
    _report(console, result, view, stats, db.columns, columns_after)
    problems = check_outcome(
        scenario,
        result,
        columns_before=db.columns,
        columns_after=columns_after,
        stats=stats,
        silent_agent=silent,
    )
    console.print()
    if problems:
        console.print(f"[bold red]The {scenario} scenario did not show what it should:[/]")
        for problem in problems:
            console.print(f"  - {safe(problem)}")
        return 1
    console.print(f"[bold green]Demo OK ({scenario}):[/] {_verdict(scenario, stats, result)}")
    return 0


async def _run_fleet(
    coord: Coordinator,
    dsn: str,
    migration: Migration,
    stats: Sequence[AppStats],
    view: DemoView,
    silent: str | None,
    warmup: float,
    cooldown: float,
) -> MigrationResult:
    """Connect the agents, run their apps around the migration, return its result."""

    async def never_ack(info: MigrationInfo) -> None:
        await trio.sleep_forever()  # cancelled when the agent disconnects at the end

    rng = random.Random()
    async with contextlib.AsyncExitStack() as stack:
        connected = []
        for s in stats:
            hook = never_ack if s.agent_id == silent else None
            connected.append(
                await stack.enter_async_context(
                    open_agent(coord.url, agent_id=s.agent_id, on_announce=hook)
                )
            )
        await coord.wait_for_agents(len(stats), timeout=_JOIN_TIMEOUT)
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            for agent, s in zip(connected, stats, strict=True):
                app = functools.partial(
                    run_app,
                    dsn,
                    s,
                    schema_lease=functools.partial(agent.using, MIGRATION_NAME),
                    stop=stop,
                    rng=random.Random(rng.random()),
                )
                nursery.start_soon(app)
            with view.live():
                view.say(f"apps query users on the old query set for {warmup:g} s")
                await trio.sleep(warmup)
                view.say(f"[bold]run_migration({safe(migration.name)})[/]")
                result = await coord.run_migration(migration)
                view.say(f"apps keep querying users for {cooldown:g} s")
                await trio.sleep(cooldown)
                stop.set()
    return result
