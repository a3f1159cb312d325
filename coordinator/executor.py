"""Where migration SQL runs: lock-safe, retried, in transactions where PostgreSQL allows them.

The runner only sees the `Executor` protocol (``run_phase(phase, groups)``), so the property
tests can drive the real runner with a fake executor while every integration test uses
`PostgresExecutor` on a real server. `PostgresExecutor` adds what makes DDL safe on a live
database:

- **Execution groups, exactly as planned.** The runner hands over the groups of the
  migration's `statemachine.sql.Plan` (what ``lockstep plan`` prints): runs of transactional
  statements (one transaction each, all-or-nothing) and statements
  that cannot run in a transaction (``CREATE INDEX CONCURRENTLY``, ``ALTER TYPE ... ADD VALUE``,
  ``VACUUM``...), each run alone on an autocommit connection. A phase without such statements is
  one transaction, as before. With them, a phase is no longer atomic: groups that committed stay
  committed when a later group fails, and `SqlFailure.committed_groups` says how many did. The
  runner then treats the phase as partly applied, so a failed EXECUTE still goes through
  ROLLBACK and runs `rollback_sql`; derived rollbacks use ``IF EXISTS`` so they undo a partial
  run as well as a complete one.
- **Short lock waits.** Every group is one lock-safe attempt of `coordinator.pg.attempts`:
  a short ``lock_timeout``, retries with backoff on SQLSTATE 55P03 within the `RetryPolicy`
  budget, and a failure that names the blocking sessions.
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
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import psycopg
import trio
from pglast import ast
from pglast.stream import maybe_double_quote_name
from psycopg import sql as pgsql

from coordinator.backfill import run_backfill
from coordinator.events import Reporter
from coordinator.history import BackfillPositionStore, GroupJournal
from coordinator.pg import thread as pgthread
from coordinator.pg.attempts import (
    DEFAULT_LOCK_TIMEOUT,
    DEFAULT_STATEMENT_TIMEOUT,
    AttemptOutcome,
    LockSafeSession,
    RetryPolicy,
    plural,
)
from coordinator.pg.errors import SqlFailure, pg_message
from statemachine.migration import Backfill
from statemachine.phases import Phase
from statemachine.result import BackfillStats, SqlAttempt
from statemachine.sql import ExecutionGroup, parse_statement

log = logging.getLogger("lockstep.coordinator")


class Executor(Protocol):
    async def run_phase(self, phase: Phase, groups: Sequence[ExecutionGroup]) -> list[SqlAttempt]:
        """Run the planned `groups` of `phase` in order; raise `SqlFailure` on error."""
        ...


@runtime_checkable
class ReportingExecutor(Protocol):
    """An executor that reports progress and runs backfills (the runner checks for it)."""

    async def run_phase_reporting(
        self,
        phase: Phase,
        groups: Sequence[ExecutionGroup],
        report: Reporter,
        *,
        journal: GroupJournal | None = None,
    ) -> list[SqlAttempt]: ...

    async def run_backfill(
        self,
        backfill: Backfill,
        report: Reporter,
        *,
        positions: BackfillPositionStore | None = None,
        index: int = 0,
    ) -> BackfillStats: ...


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
    """Runs each phase's planned execution groups on fresh connections, lock-safely.

    With `reuse_connections` (a coordinator's own executor; `aclose` ends it) a
    transactional group runs on the session the previous one left clean, reset with
    ``DISCARD ALL`` (`LockSafeSession`); autocommit statements always get a fresh session.
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
        reuse_connections: bool = False,
    ) -> None:
        if autocommit_statement_timeout is not None and not autocommit_statement_timeout > 0:
            raise ValueError(
                "autocommit_statement_timeout must be > 0 seconds or None, "
                f"got {autocommit_statement_timeout}"
            )
        self.session = LockSafeSession(
            dsn,
            lock_timeout=lock_timeout,
            statement_timeout=statement_timeout,
            retry=retry,
            rng=rng,
        )
        self.session.reuse_connection = reuse_connections
        self.dsn = dsn
        self.autocommit_statement_timeout = autocommit_statement_timeout

    async def aclose(self) -> None:
        """Close the connection kept for the next transaction (`reuse_connections`)."""
        await self.session.aclose()

    @property
    def lock_timeout(self) -> float:
        return self.session.lock_timeout

    @property
    def retry(self) -> RetryPolicy:
        return self.session.retry

    # ---------------------------------------------------------------- phases
    async def run_phase(self, phase: Phase, groups: Sequence[ExecutionGroup]) -> list[SqlAttempt]:
        return await self.run_phase_reporting(phase, groups, Reporter(""))

    async def run_phase_reporting(
        self,
        phase: Phase,
        groups: Sequence[ExecutionGroup],
        report: Reporter,
        *,
        journal: GroupJournal | None = None,
    ) -> list[SqlAttempt]:
        """Run the planned groups one by one; raise `SqlFailure` (with `committed_groups`).

        With a `journal`, groups it lists as committed are skipped (a resumed run never runs
        committed SQL twice) and each group that commits is marked in it: inside the group's
        own transaction, so the mark and the SQL commit together or not at all.
        """
        attempts: list[SqlAttempt] = []
        for index, group in enumerate(groups):
            if journal is not None and (phase, index) in journal.committed:
                report.say(phase, f"group {index + 1}/{len(groups)} committed before: skipped")
                continue
            try:
                attempts += await self._run_group(phase, index, len(groups), group, report, journal)
            except SqlFailure as exc:
                raise exc.with_attempts([*attempts, *exc.attempts], committed_groups=index) from exc
        return attempts

    async def _run_group(
        self,
        phase: Phase,
        index: int,
        count: int,
        group: ExecutionGroup,
        report: Reporter,
        journal: GroupJournal | None,
    ) -> list[SqlAttempt]:
        how = "transaction" if group.transactional else "autocommit"
        label = f"group {index + 1}/{count} [{how}, {plural(len(group.statements), 'statement')}]"
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

        def mark(conn: psycopg.Connection[Any]) -> None:
            if journal is not None:
                journal.mark(conn, phase, index)

        def execute_all(conn: psycopg.Connection[Any], current: list[str | None]) -> None:
            for statement in group.statements:
                current[0] = statement
                conn.execute(statement.encode())
            mark(conn)

        async def attempt() -> AttemptOutcome[None]:
            if group.transactional:
                return await self.session.transaction_attempt(group.statements, execute_all)
            return await self._autocommit_attempt(group.statements[0], mark)

        async def committed() -> bool:
            return journal is not None and await journal.recorded(phase, index)

        try:
            await self.session.with_lock_retries(
                phase, label, group.statements, attempt, record, report, index, committed=committed
            )
        except SqlFailure as exc:
            raise exc.with_attempts(attempts) from exc
        report.say(phase, f"{label} committed")
        return attempts

    # -------------------------------------------------------------- attempts
    async def _autocommit_attempt(
        self, statement: str, mark: Callable[[psycopg.Connection[Any]], None]
    ) -> AttemptOutcome[None]:
        """One statement alone on an autocommit connection, dropping an INVALID index it left."""
        conn = await pgthread.connect(self.dsn, autocommit=True)
        try:
            await pgthread.run_in_thread(
                conn,
                lambda: self.session.set_timeouts(
                    conn, self.autocommit_statement_timeout, local=False
                ),
            )
            build = _index_build(statement)
            before: list[str] = []
            notes: list[str] = []
            if build is not None:
                notes += await self._drop_leftover(conn, build)
                before = await pgthread.run_in_thread(conn, lambda: _invalid_indexes(conn, build))

            def execute() -> None:
                conn.execute(statement.encode())
                # Committed already (autocommit): a crash between the two runs it again on
                # resume, which is why such statements should be idempotent (docs/durability.md).
                mark(conn)

            succeeded = False
            try:
                _, error, seen = await self.session.watched(conn, execute)
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
                last = pg_message(exc)
                await trio.sleep(self.retry.backoff(attempt, self.session.rng))
                continue
            log.warning("dropped INVALID index %s (%s)", name, why)
            return f"dropped INVALID index {name} ({why})"
        log.error("could not drop INVALID index %s: %s", name, last)
        return f"could not drop INVALID index {name} ({why}): {last}"

    # ------------------------------------------------------------- backfills
    async def run_backfill(
        self,
        backfill: Backfill,
        report: Reporter,
        *,
        positions: BackfillPositionStore | None = None,
        index: int = 0,
    ) -> BackfillStats:
        """Run backfill number `index` of the migration in short batches, continuing from
        and storing its position in `positions` when given (see `coordinator.backfill`)."""
        return await run_backfill(self.session, backfill, report, positions=positions, index=index)


def _invalid_indexes(conn: psycopg.Connection[Any], build: _IndexBuild) -> list[str]:
    rows = conn.execute(_INVALID_INDEXES_SQL, {"rel": build.relation}).fetchall()
    return [str(name) for (name,) in rows]


__all__ = ["Executor", "PostgresExecutor", "ReportingExecutor"]
