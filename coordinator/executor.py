"""Where migration SQL runs: lock-safe, retried, in transactions where PostgreSQL allows them.

The runner only sees the `Executor` protocol (``run_phase(phase, statements)``), so the property
tests can drive the real runner with a fake executor while every integration test uses
`PostgresExecutor` on a real server. `PostgresExecutor` adds what makes DDL safe on a live
database:

- **Execution groups.** A phase's statements are cut by `statemachine.sql.group_for_execution`
  into runs of transactional statements (one transaction each, all-or-nothing) and statements
  that cannot run in a transaction (``CREATE INDEX CONCURRENTLY``, ``ALTER TYPE ... ADD VALUE``,
  ``VACUUM``...), each run alone on an autocommit connection. A phase without such statements is
  one transaction, as before. With them, a phase is no longer atomic: groups that committed stay
  committed when a later group fails, and `SqlFailure.committed_groups` says how many did. The
  runner then treats the phase as partly applied, so a failed EXECUTE still goes through
  ROLLBACK and runs `rollback_sql`; derived rollbacks use ``IF EXISTS`` so they undo a partial
  run as well as a complete one.
- **Short lock waits.** Every group starts with ``lock_timeout`` (0.5 s by default: a DDL
  statement waiting for its lock blocks every later query on the table, so it must give up
  quickly) and ``statement_timeout``. On SQLSTATE 55P03 the whole group is rolled back and
  retried after an exponential backoff with full jitter, until the `RetryPolicy` budget is
  spent; then the failure names the sessions that blocked it (see `coordinator.locks`).
- **Idempotent concurrent index builds.** A failed ``CREATE INDEX CONCURRENTLY`` (or ``REINDEX
  CONCURRENTLY``) leaves an INVALID index behind; it is dropped before the statement is retried
  or the migration rolls back, so nothing half-built is left and a retry does not trip over it.

Why ``statement_timeout`` defaults to 5 minutes inside transactions: once a transactional DDL
statement holds its lock (often ACCESS EXCLUSIVE), every query on the table waits for it, so a
statement that runs for minutes is already an outage; the cap turns a runaway rewrite into a
clean rollback. Autocommit statements (``CONCURRENTLY`` builds, ``VACUUM``) do not block the
application and may legitimately run for hours on big tables, so they get no cap of ours by
default (`autocommit_statement_timeout`, None leaves the server's setting in place).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import psycopg
import trio
from pglast import ast
from pglast.stream import maybe_double_quote_name
from psycopg import sql as pgsql

from coordinator import pgthread
from coordinator.events import Event, SqlProgress
from coordinator.locks import (
    LOCK_NOT_AVAILABLE,
    BlockerWatch,
    BlockingSession,
    describe_blockers,
    lock_holders,
)
from statemachine.migration import Backfill
from statemachine.phases import Phase
from statemachine.result import BackfillStats, SqlAttempt
from statemachine.sql import ExecutionGroup, SqlSyntaxError, group_for_execution, parse_statement

log = logging.getLogger("lockstep.coordinator")

T = TypeVar("T")

DEFAULT_LOCK_TIMEOUT = 0.5
DEFAULT_STATEMENT_TIMEOUT = 300.0


class SqlFailure(Exception):
    """A phase's SQL failed. The failing group was rolled back (or dropped what it left).

    `committed_groups` counts the execution groups of the phase that committed before the
    failure: 0 means nothing of the phase is left in the database.
    """

    def __init__(
        self,
        statement: str | None,
        message: str,
        *,
        sqlstate: str | None = None,
        attempts: Sequence[SqlAttempt] = (),
        committed_groups: int = 0,
        blockers: Sequence[BlockingSession] = (),
    ) -> None:
        super().__init__(f"{statement!r}: {message}" if statement else message)
        self.statement = statement
        self.message = message
        self.sqlstate = sqlstate
        self.attempts = tuple(attempts)
        self.committed_groups = committed_groups
        self.blockers = tuple(blockers)


class Executor(Protocol):
    async def run_phase(self, phase: Phase, statements: Sequence[str]) -> list[SqlAttempt]:
        """Run `statements` for `phase`; raise `SqlFailure` on error."""
        ...


@dataclasses.dataclass(frozen=True)
class Reporter:
    """Where an executor reports progress: the migration's name and the coordinator's events."""

    migration: str
    emit: Callable[[Event], None] | None = None

    def event(self, event: SqlProgress, level: int = logging.INFO) -> None:
        log.log(level, "%s %s: %s", event.migration or "-", event.phase.name, event.message)
        if self.emit is not None:
            self.emit(event)

    def say(self, phase: Phase, message: str) -> None:
        self.event(SqlProgress(self.migration, phase, message))


@runtime_checkable
class ReportingExecutor(Protocol):
    """An executor that reports progress and runs backfills (the runner checks for it)."""

    async def run_phase_reporting(
        self, phase: Phase, statements: Sequence[str], report: Reporter
    ) -> list[SqlAttempt]: ...

    async def run_backfill(self, backfill: Backfill, report: Reporter) -> BackfillStats: ...


@dataclasses.dataclass(frozen=True)
class LockRetry(SqlProgress):
    """An attempt gave up waiting for a lock; the next one starts after `delay` seconds."""

    group: int
    attempt: int
    delay: float
    blockers: tuple[BlockingSession, ...]


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How long to keep retrying a group whose lock was not granted within `lock_timeout`.

    A new attempt starts only while fewer than `max_attempts` were made and less than
    `max_seconds` passed since the first one. Between attempts we sleep a uniformly random time
    in ``[0, min(max_delay, base_delay * 2**(attempt - 1))]`` ("full jitter"): backing off keeps
    us from hammering a busy table, and the randomness keeps two coordinators or a retrying
    application from colliding in lockstep.
    """

    max_attempts: int = 20
    max_seconds: float = 60.0
    base_delay: float = 0.2
    max_delay: float = 5.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not self.max_seconds >= 0:
            raise ValueError(f"max_seconds must be >= 0, got {self.max_seconds}")
        if not (self.base_delay >= 0 and self.max_delay >= 0):
            raise ValueError("base_delay and max_delay must be >= 0")

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """The sleep after failed attempt number `attempt` (1-based)."""
        ceiling = min(self.max_delay, self.base_delay * 2.0 ** min(attempt - 1, 60))
        return rng.uniform(0.0, ceiling)

    def spent(self, attempts: int, elapsed: float) -> bool:
        return attempts >= self.max_attempts or elapsed >= self.max_seconds


@dataclasses.dataclass
class AttemptOutcome(Generic[T]):
    """One attempt: its value, or the PostgreSQL error and what we learnt about it."""

    value: T | None = None
    error: psycopg.Error | None = None
    statement: str | None = None
    blockers: list[BlockingSession] = dataclasses.field(default_factory=list)
    pid: int = 0
    note: str | None = None


def _pg_message(exc: psycopg.Error) -> str:
    diag = exc.diag
    text = diag.message_primary or str(exc).strip()
    if diag.message_detail:
        text += f" (DETAIL: {diag.message_detail})"
    if exc.sqlstate:
        text += f" [SQLSTATE {exc.sqlstate}]"
    return text


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf


def _ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


@dataclasses.dataclass(frozen=True)
class _IndexBuild:
    """What a concurrent index build acts on, as names `to_regclass` understands."""

    relation: str  # the table (or, for REINDEX INDEX, the index) the statement names
    index: str | None  # the index a CREATE INDEX names, qualified like its table


def _index_build(statement: str) -> _IndexBuild | None:
    """The target of a statement that can leave an INVALID index when it fails."""
    try:
        node = parse_statement(statement)
    except ValueError:
        return None

    def qualified(schema: str | None, name: str) -> str:
        return ".".join(maybe_double_quote_name(p) for p in (schema, name) if p)

    if isinstance(node, ast.IndexStmt) and node.concurrent and node.relation is not None:
        rel = node.relation
        table = qualified(rel.schemaname, str(rel.relname))
        index = qualified(rel.schemaname, node.idxname) if node.idxname else None
        return _IndexBuild(table, index)
    if isinstance(node, ast.ReindexStmt) and node.relation is not None:
        rel = node.relation
        return _IndexBuild(qualified(rel.schemaname, str(rel.relname)), None)
    return None


#: INVALID indexes of the table `%s` names, or of the table of the index it names.
_INVALID_INDEXES_SQL = """
SELECT i.indexrelid::regclass::text FROM pg_index AS i
WHERE NOT i.indisvalid AND i.indrelid IN (
    SELECT c.oid FROM pg_class AS c
    WHERE c.oid = to_regclass(%(rel)s) AND c.relkind IN ('r', 'p', 'm')
    UNION ALL
    SELECT x.indrelid FROM pg_index AS x WHERE x.indexrelid = to_regclass(%(rel)s)
)
ORDER BY 1
"""

_LEFTOVER_SQL = """
SELECT i.indexrelid::regclass::text FROM pg_index AS i
WHERE NOT i.indisvalid AND i.indexrelid = to_regclass(%s) AND i.indrelid = to_regclass(%s)
"""


class PostgresExecutor:
    """Runs each phase's execution groups on fresh connections, lock-safely (module docstring).

    `lock_timeout`, `statement_timeout` and `autocommit_statement_timeout` are in seconds;
    `retry` bounds the retries on lock timeouts; `rng` makes the jitter reproducible in tests.
    """

    def __init__(
        self,
        dsn: str,
        *,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        statement_timeout: float | None = DEFAULT_STATEMENT_TIMEOUT,
        autocommit_statement_timeout: float | None = None,
        retry: RetryPolicy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not lock_timeout > 0:
            raise ValueError(f"lock_timeout must be > 0 seconds, got {lock_timeout}")
        for name, value in (
            ("statement_timeout", statement_timeout),
            ("autocommit_statement_timeout", autocommit_statement_timeout),
        ):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 seconds or None, got {value}")
        self.dsn = dsn
        self.lock_timeout = lock_timeout
        self.statement_timeout = statement_timeout
        self.autocommit_statement_timeout = autocommit_statement_timeout
        self.retry = retry or RetryPolicy()
        self.rng = rng or random.Random()

    # ---------------------------------------------------------------- phases
    async def run_phase(self, phase: Phase, statements: Sequence[str]) -> list[SqlAttempt]:
        return await self.run_phase_reporting(phase, statements, Reporter(""))

    async def run_phase_reporting(
        self, phase: Phase, statements: Sequence[str], report: Reporter
    ) -> list[SqlAttempt]:
        """Run the phase group by group; raise `SqlFailure` (with `committed_groups`)."""
        if not statements:
            return []
        try:
            groups = group_for_execution(statements)
        except SqlSyntaxError as exc:
            # pglast may lag behind the server's grammar: let PostgreSQL judge the SQL.
            report.say(phase, f"cannot group the statements ({exc}); running them as given")
            groups = [ExecutionGroup(True, tuple(statements), tuple(range(len(statements))))]
        attempts: list[SqlAttempt] = []
        for index, group in enumerate(groups):
            try:
                attempts += await self._run_group(phase, index, len(groups), group, report)
            except SqlFailure as exc:
                raise SqlFailure(
                    exc.statement,
                    exc.message,
                    sqlstate=exc.sqlstate,
                    attempts=[*attempts, *exc.attempts],
                    committed_groups=index,
                    blockers=exc.blockers,
                ) from exc
        return attempts

    async def _run_group(
        self, phase: Phase, index: int, count: int, group: ExecutionGroup, report: Reporter
    ) -> list[SqlAttempt]:
        how = "transaction" if group.transactional else "autocommit"
        label = f"group {index + 1}/{count} [{how}, {_plural(len(group.statements), 'statement')}]"
        attempts: list[SqlAttempt] = []

        def record(
            number: int, ok: bool, seconds: float, error: str | None, detail: str | None
        ) -> None:
            attempts.append(
                SqlAttempt(
                    phase,
                    number,
                    ok,
                    seconds,
                    error,
                    group=index,
                    transactional=group.transactional,
                    statements=group.statements,
                    detail=detail,
                )
            )

        def execute_all(conn: psycopg.Connection[Any], current: list[str | None]) -> None:
            for statement in group.statements:
                current[0] = statement
                conn.execute(statement.encode())

        async def attempt() -> AttemptOutcome[None]:
            if group.transactional:
                return await self.transaction_attempt(group.statements, execute_all)
            return await self._autocommit_attempt(group.statements[0])

        try:
            await self.with_lock_retries(
                phase, label, group.statements, attempt, record, report, index
            )
        except SqlFailure as exc:
            raise SqlFailure(
                exc.statement,
                exc.message,
                sqlstate=exc.sqlstate,
                attempts=attempts,
                blockers=exc.blockers,
            ) from exc
        report.say(phase, f"{label} committed")
        return attempts

    async def with_lock_retries(
        self,
        phase: Phase,
        label: str,
        statements: Sequence[str],
        attempt: Callable[[], Awaitable[AttemptOutcome[T]]],
        record: Callable[[int, bool, float, str | None, str | None], None],
        report: Reporter,
        group: int = 0,
    ) -> T | None:
        """Run `attempt` until it succeeds, fails otherwise, or the lock retry budget is spent.

        `record(number, ok, seconds, error, detail)` is called once per attempt. Raises
        `SqlFailure`; lock failures name the blocking sessions.
        """
        started = time.monotonic()
        number = 0
        while True:
            number += 1
            t0 = time.monotonic()
            outcome = await attempt()
            seconds = time.monotonic() - t0
            error = outcome.error
            if error is None:
                record(number, True, seconds, None, outcome.note)
                return outcome.value
            if error.sqlstate != LOCK_NOT_AVAILABLE:
                message = _pg_message(error) + (f"; {outcome.note}" if outcome.note else "")
                record(number, False, seconds, _pg_message(error), outcome.note)
                raise SqlFailure(outcome.statement, message, sqlstate=error.sqlstate, attempts=())
            blockers = outcome.blockers or await lock_holders(self.dsn, statements, [outcome.pid])
            detail = "blocked by " + describe_blockers(blockers)
            if outcome.note:
                detail += f"; {outcome.note}"
            record(number, False, seconds, "lock_timeout", detail)
            elapsed = time.monotonic() - started
            if self.retry.spent(number, elapsed):
                raise SqlFailure(
                    outcome.statement,
                    f"lock not granted within lock_timeout {_ms(self.lock_timeout)} in "
                    f"{_plural(number, 'attempt')} over {elapsed:.1f} s (retry budget spent); "
                    + detail,
                    sqlstate=LOCK_NOT_AVAILABLE,
                    blockers=blockers,
                )
            delay = max(
                0.0, min(self.retry.backoff(number, self.rng), self.retry.max_seconds - elapsed)
            )
            report.event(
                LockRetry(
                    report.migration,
                    phase,
                    f"{label}: lock_timeout on attempt {number}, retrying in {delay:.2f} s; "
                    + detail,
                    group=group,
                    attempt=number,
                    delay=delay,
                    blockers=tuple(blockers),
                ),
                logging.WARNING,
            )
            await trio.sleep(delay)

    # -------------------------------------------------------------- attempts
    def _set_timeouts(
        self, conn: psycopg.Connection[Any], statement_timeout: float | None, *, local: bool
    ) -> None:
        conn.execute("SELECT set_config('lock_timeout', %s, %s)", (_ms(self.lock_timeout), local))
        if statement_timeout is not None:
            conn.execute(
                "SELECT set_config('statement_timeout', %s, %s)", (_ms(statement_timeout), local)
            )

    async def transaction_attempt(
        self,
        statements: Sequence[str],
        work: Callable[[psycopg.Connection[Any], list[str | None]], T],
    ) -> AttemptOutcome[T]:
        """One short transaction with the timeouts set locally, watched for blockers.

        `work(conn, current)` runs inside it and keeps ``current[0]`` on the statement it runs.
        """
        conn = await pgthread.connect(self.dsn)
        current: list[str | None] = [statements[0] if statements else None]
        try:

            def transaction() -> T:
                with conn.transaction():
                    self._set_timeouts(conn, self.statement_timeout, local=True)
                    return work(conn, current)

            value, error, seen = await self._watched(conn, transaction)
            return AttemptOutcome(value, error, current[0], seen, conn.info.backend_pid)
        finally:
            await pgthread.close(conn)

    async def _watched(
        self, conn: psycopg.Connection[Any], fn: Callable[[], T]
    ) -> tuple[T | None, psycopg.Error | None, list[BlockingSession]]:
        """Run `fn` on `conn` while a `BlockerWatch` notes who blocks it."""
        watch = BlockerWatch(
            self.dsn,
            conn.info.backend_pid,
            first_poll=min(0.05, self.lock_timeout / 4),
            interval=min(0.1, self.lock_timeout / 3),
        )
        value: list[T] = []
        error: psycopg.Error | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch.watch)
                try:
                    value.append(await pgthread.run_in_thread(conn, fn))
                except psycopg.Error as exc:  # run_in_thread raises it bare
                    error = exc
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # Cancelled by our host: the nursery groups the statement's and the watcher's
            # Cancelled. Callers (the runner's `except trio.Cancelled`) expect it bare.
            if group.split(trio.Cancelled)[1] is not None:
                raise
            raise _first_leaf(group) from None
        return (value[0] if value else None), error, watch.seen

    async def _autocommit_attempt(self, statement: str) -> AttemptOutcome[None]:
        """One statement alone on an autocommit connection, dropping an INVALID index it left."""
        conn = await pgthread.connect(self.dsn, autocommit=True)
        try:
            await pgthread.run_in_thread(
                conn,
                lambda: self._set_timeouts(conn, self.autocommit_statement_timeout, local=False),
            )
            build = _index_build(statement)
            before: list[str] = []
            notes: list[str] = []
            if build is not None:
                notes += await self._drop_leftover(conn, build)
                before = await pgthread.run_in_thread(conn, lambda: _invalid_indexes(conn, build))

            def execute() -> None:
                conn.execute(statement.encode())

            succeeded = False
            try:
                _, error, seen = await self._watched(conn, execute)
                succeeded = error is None
            finally:
                if build is not None and not succeeded:
                    with trio.CancelScope(shield=True), trio.move_on_after(30):
                        notes += await self._drop_new_invalid(conn, build, before)
            return AttemptOutcome(
                None, error, statement, seen, conn.info.backend_pid, "; ".join(notes) or None
            )
        finally:
            await pgthread.close(conn)

    async def _drop_leftover(self, conn: psycopg.Connection[Any], build: _IndexBuild) -> list[str]:
        """An INVALID index of the name we are about to build is a failed earlier build."""
        if build.index is None:
            return []
        index = build.index
        rows = await pgthread.run_in_thread(
            conn, lambda: conn.execute(_LEFTOVER_SQL, (index, build.relation)).fetchall()
        )
        return [
            await self._drop_index(conn, str(name), "left by an earlier failed build")
            for (name,) in rows
        ]

    async def _drop_new_invalid(
        self, conn: psycopg.Connection[Any], build: _IndexBuild, before: Sequence[str]
    ) -> list[str]:
        after = await pgthread.run_in_thread(conn, lambda: _invalid_indexes(conn, build))
        return [
            await self._drop_index(conn, name, "the failed statement left it")
            for name in after
            if name not in before
        ]

    async def _drop_index(self, conn: psycopg.Connection[Any], name: str, why: str) -> str:
        """Drop an INVALID index (a few tries: the drop needs a lock too)."""
        drop = pgsql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(pgsql.SQL(name))
        last = ""
        for attempt in range(1, 4):
            try:
                await pgthread.run_in_thread(conn, lambda: conn.execute(drop))
            except psycopg.Error as exc:
                last = _pg_message(exc)
                await trio.sleep(self.retry.backoff(attempt, self.rng))
                continue
            log.warning("dropped INVALID index %s (%s)", name, why)
            return f"dropped INVALID index {name} ({why})"
        log.error("could not drop INVALID index %s: %s", name, last)
        return f"could not drop INVALID index {name} ({why}): {last}"

    # ------------------------------------------------------------- backfills
    async def run_backfill(self, backfill: Backfill, report: Reporter) -> BackfillStats:
        """Run one backfill in short batches (see `coordinator.backfill`)."""
        # Imported here: coordinator.backfill builds on this module.
        from coordinator.backfill import run_backfill

        return await run_backfill(self, backfill, report)


def _invalid_indexes(conn: psycopg.Connection[Any], build: _IndexBuild) -> list[str]:
    rows = conn.execute(_INVALID_INDEXES_SQL, {"rel": build.relation}).fetchall()
    return [str(name) for (name,) in rows]


__all__ = [
    "DEFAULT_LOCK_TIMEOUT",
    "DEFAULT_STATEMENT_TIMEOUT",
    "AttemptOutcome",
    "Executor",
    "LockRetry",
    "PostgresExecutor",
    "Reporter",
    "ReportingExecutor",
    "RetryPolicy",
    "SqlFailure",
]
