"""Lock-safe attempts: one short transaction or one autocommit statement, retried on lock
timeouts with backoff, watched for the sessions that block it.

This is the layer the executor (phase SQL) and the backfill (batches) share, so both get the
same rules: every attempt starts with a short ``lock_timeout`` (a DDL statement waiting for
its lock blocks every later query on the table, so it must give up quickly) and a
``statement_timeout``; on SQLSTATE 55P03 the attempt is rolled back and retried after an
exponential backoff with full jitter until the `RetryPolicy` budget is spent; then the
failure names the sessions that blocked it (`coordinator.pg.locks`).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import psycopg
import trio

from coordinator.events import Reporter, SqlProgress
from coordinator.pg import thread as pgthread
from coordinator.pg.errors import SqlFailure, is_connection_failure, pg_message
from coordinator.pg.locks import (
    LOCK_NOT_AVAILABLE,
    BlockerWatch,
    BlockingSession,
    describe_blockers,
    lock_holders,
)
from statemachine.phases import Phase

T = TypeVar("T")

DEFAULT_LOCK_TIMEOUT = 0.5
DEFAULT_STATEMENT_TIMEOUT = 300.0

#: ``record(number, ok, seconds, error, detail)``: called once per attempt.
RecordAttempt = Callable[[int, bool, float, "str | None", "str | None"], None]


@dataclasses.dataclass(frozen=True)
class LockRetry(SqlProgress):
    """An attempt gave up waiting for a lock; the next one starts after `delay` seconds."""

    group: int
    attempt: int
    delay: float
    blockers: tuple[BlockingSession, ...]


@dataclasses.dataclass(frozen=True)
class DatabaseUnreachable(SqlProgress):
    """An attempt lost its connection (or could not connect); it runs again after `delay`."""

    group: int
    delay: float


async def _answer(question: Callable[[], Awaitable[bool]]) -> bool:
    """Ask `question` of the database, waiting while it is unreachable."""
    delay = 0.25
    while True:
        try:
            return await question()
        except psycopg.OperationalError as exc:
            if not is_connection_failure(exc):
                raise
            await trio.sleep(delay)
            delay = min(delay * 2, 5.0)


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


def ms(seconds: float) -> str:
    """A duration as PostgreSQL settings take it: ``"500ms"`` (at least 1 ms)."""
    return f"{max(1, round(seconds * 1000))}ms"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf


class LockSafeSession:
    """Opens connections to `dsn` and runs lock-safe attempts on them (module docstring).

    `lock_timeout` and `statement_timeout` are in seconds; `retry` bounds the retries on lock
    timeouts; `rng` makes the jitter reproducible in tests.
    """

    def __init__(
        self,
        dsn: str,
        *,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        statement_timeout: float | None = DEFAULT_STATEMENT_TIMEOUT,
        retry: RetryPolicy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not lock_timeout > 0:
            raise ValueError(f"lock_timeout must be > 0 seconds, got {lock_timeout}")
        if statement_timeout is not None and not statement_timeout > 0:
            raise ValueError(
                f"statement_timeout must be > 0 seconds or None, got {statement_timeout}"
            )
        self.dsn = dsn
        self.lock_timeout = lock_timeout
        self.statement_timeout = statement_timeout
        self.retry = retry or RetryPolicy()
        self.rng = rng or random.Random()
        #: With `reuse_connection` (a coordinator's executor, closed by `aclose`), a
        #: transaction attempt that ended cleanly leaves its connection here for the next
        #: one instead of closing it (see `_checkout`).
        self.reuse_connection = False
        self._spare: psycopg.Connection[Any] | None = None
        #: Fresh connections the transaction attempts opened (the benchmark reads it).
        self.opened = 0

    async def _checkout(self) -> psycopg.Connection[Any]:
        """A connection for one attempt: the spare one, reset, or a fresh one.

        Why a reset and not a fresh session: a connection costs a backend start-up (2-10 ms
        on a loaded machine), more than the DDL of a small migration. ``DISCARD ALL`` gives
        the session back its fresh state (settings a migration's SQL changed with SET,
        prepared statements, temporary tables, advisory locks), and it is also the liveness
        check: a spare session that died while idle is replaced here, before the attempt,
        so it never counts as a database outage.
        """
        conn, self._spare = self._spare, None
        if conn is not None:
            spare = conn
            try:
                await pgthread.run_in_thread(spare, lambda: spare.execute("DISCARD ALL"))
                return spare
            except psycopg.Error:
                await _forget(spare)
        self.opened += 1
        return await pgthread.connect(self.dsn, autocommit=self.reuse_connection)

    async def _checkin(self, conn: psycopg.Connection[Any], clean: bool) -> None:
        if (
            clean
            and self.reuse_connection
            and self._spare is None
            and not conn.closed
            and conn.info.transaction_status is psycopg.pq.TransactionStatus.IDLE
        ):
            self._spare = conn
            return
        await pgthread.close(conn)

    async def aclose(self) -> None:
        """Close the spare connection, if one is kept (`reuse_connection`)."""
        conn, self._spare = self._spare, None
        if conn is not None:
            await _forget(conn)

    async def with_lock_retries(
        self,
        phase: Phase,
        label: str,
        statements: Sequence[str],
        attempt: Callable[[], Awaitable[AttemptOutcome[T]]],
        record: RecordAttempt,
        report: Reporter,
        group: int = 0,
        *,
        committed: Callable[[], Awaitable[bool]] | None = None,
    ) -> T | None:
        """Run `attempt` until it succeeds, fails otherwise, or the lock retry budget is spent.

        `record` is called once per attempt. Raises `SqlFailure`; lock failures name the
        blocking sessions. An attempt that failed because the connection or the database
        went away is retried once it answers again, for as long as it takes (cancellable):
        before that retry `committed()` (the journal, read back) says whether the attempt
        committed after all, since a connection lost during COMMIT leaves that unknown.
        """
        started = time.monotonic()
        number = 0
        outage = 0
        while True:
            number += 1
            t0 = time.monotonic()
            try:
                outcome = await attempt()
            except psycopg.OperationalError as exc:  # could not even connect
                if not is_connection_failure(exc):
                    raise SqlFailure(
                        statements[0] if statements else None, pg_message(exc)
                    ) from exc
                outcome = AttemptOutcome(error=exc, statement=statements[0] if statements else None)
            seconds = time.monotonic() - t0
            error = outcome.error
            if error is None:
                record(number, True, seconds, None, outcome.note)
                return outcome.value
            if is_connection_failure(error):
                outage += 1
                record(number, False, seconds, pg_message(error), "database unreachable")
                await self._wait_for_database(phase, label, error, outage, report, group)
                if committed is not None and await _answer(committed):
                    report.say(phase, f"{label}: committed before the connection was lost")
                    return None
                number -= 1  # an outage is not a lock attempt: it spends no retry budget
                continue
            outage = 0
            if error.sqlstate != LOCK_NOT_AVAILABLE:
                message = pg_message(error) + (f"; {outcome.note}" if outcome.note else "")
                record(number, False, seconds, pg_message(error), outcome.note)
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
                    f"lock not granted within lock_timeout {ms(self.lock_timeout)} in "
                    f"{plural(number, 'attempt')} over {elapsed:.1f} s (retry budget spent); "
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

    async def _wait_for_database(
        self,
        phase: Phase,
        label: str,
        error: psycopg.Error,
        outage: int,
        report: Reporter,
        group: int,
    ) -> None:
        delay = min(0.25 * 2 ** (outage - 1), 5.0)
        report.event(
            DatabaseUnreachable(
                report.migration,
                phase,
                f"{label}: the database connection failed ({pg_message(error)}); "
                f"retrying in {delay:.2f} s",
                group=group,
                delay=delay,
            ),
            logging.WARNING,
        )
        await trio.sleep(delay)

    def set_timeouts(
        self, conn: psycopg.Connection[Any], statement_timeout: float | None, *, local: bool
    ) -> None:
        """``lock_timeout`` and `statement_timeout` for the transaction (`local`) or session.

        ``SET LOCAL`` cannot take a parameter, so the values go through ``set_config``.
        """
        if statement_timeout is None:
            conn.execute(
                "SELECT set_config('lock_timeout', %s, %s)", (ms(self.lock_timeout), local)
            )
            return
        conn.execute(  # one round trip for both
            "SELECT set_config('lock_timeout', %s, %s), set_config('statement_timeout', %s, %s)",
            (ms(self.lock_timeout), local, ms(statement_timeout), local),
        )

    async def transaction_attempt(
        self,
        statements: Sequence[str],
        work: Callable[[psycopg.Connection[Any], list[str | None]], T],
    ) -> AttemptOutcome[T]:
        """One short transaction with the timeouts set locally, watched for blockers.

        `work(conn, current)` runs inside it and keeps ``current[0]`` on the statement it runs.
        """
        conn = await self._checkout()
        current: list[str | None] = [statements[0] if statements else None]
        clean = False
        try:

            def transaction() -> T:
                with conn.transaction():
                    self.set_timeouts(conn, self.statement_timeout, local=True)
                    return work(conn, current)

            value, error, seen = await self.watched(conn, transaction)
            clean = error is None
            return AttemptOutcome(value, error, current[0], seen, conn.info.backend_pid)
        finally:
            with trio.CancelScope(shield=True):
                await self._checkin(conn, clean)

    async def watched(
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


async def _forget(conn: psycopg.Connection[Any]) -> None:
    """Close a connection that may be broken without waiting on it for long."""
    with trio.CancelScope(shield=True), trio.move_on_after(2.0):
        await trio.to_thread.run_sync(conn.close, abandon_on_cancel=True)


__all__ = [
    "DEFAULT_LOCK_TIMEOUT",
    "DEFAULT_STATEMENT_TIMEOUT",
    "AttemptOutcome",
    "DatabaseUnreachable",
    "LockRetry",
    "LockSafeSession",
    "RecordAttempt",
    "RetryPolicy",
]
