"""Batched backfills: rewrite existing rows in short transactions between EXECUTE and APPLY.

Why batches: one ``UPDATE users SET full_name = name`` on a big table holds row locks on every
row until it commits and writes one huge transaction; the application's writes to those rows
wait the whole time. A backfill instead updates one range of `key` per transaction, each with
the executor's `lock_timeout`/`statement_timeout` and lock-timeout retries, sized by
`statemachine.backfill_pacing` (to about 50 ms per batch by default; fixed on request) and
optionally sleeping `delay` seconds between batches to leave room for the application.

The batches run on one dedicated connection (a connection per batch costs more than a small
batch's work), and just before each commit the batch reads what the application feels from
it, on the same connection and in the same transaction, while its locks are still held:

- the sessions waiting for one of its locks (`pg_stat_activity` sessions in a ``Lock`` wait
  whose `pg_blocking_pids` include ours). That is exactly the latency a backfill adds to the
  application's writes, and it costs nothing when nobody waits (`pg_blocking_pids` is only
  called for sessions already waiting on a lock);
- the largest `replay_lag` in `pg_stat_replication`, when there are standbys: a backfill
  writes WAL as fast as the server allows, and a standby that falls behind serves stale
  reads (and holds WAL on the primary);
- the sessions waiting to write or flush WAL, reported only (see `BatchSignals`).

And while each batch runs, a `CommitProbe` on a second connection times a commit that writes
nothing but its commit record every 10 ms: what any application commit waits for (a WAL
flush, behind the WAL the batch is writing), compared with its median before the backfill
started. Measured, that is where an unpaced backfill hurts the application: its reads kept
their latency while its writes' p99 grew several times. A plain ``SELECT 1`` probe is not
used: it measures CPU contention rather than anything the backfill causes, and the batch's
own time already grows with the server's load.

Resuming: batches follow the key (keyset pagination: each batch starts after the last key of
the previous one), so progress never depends on the WHERE clause and each row is visited once,
even when the SET does not change whether the row matches. With a durable store
(`coordinator.history.BackfillPositionStore`, the target database's `lockstep` schema) each
batch writes its last key and the running totals **in its own transaction**, so a
coordinator that takes over after a crash continues right after the last committed batch:
no committed batch is lost or repeated. The key travels as its text form, and every batch
(not only a resumed one) compares ``key > $1`` with that text, which PostgreSQL casts to the
key's own type: int, text, uuid, timestamps and numerics all round-trip exactly (the
connection uses ``DateStyle=ISO`` so date and time keys read back the same way everywhere).

`key` must be unique and NOT NULL (a primary key is ideal, and an index on it keeps each batch
cheap): rows sharing a key value across a batch boundary, or with a NULL key, would be skipped.

Rows inserted while the backfill runs with a key below the current position are not visited:
the expand step must keep new rows correct itself (a sync trigger or a default), as the
rename recipe does.

The fragments of a `Backfill` (`table`, `set`, `key`, `where`) are SQL written by the migration
author, like the migration's statements; the batch statement built from them is parsed with
PostgreSQL's parser before the first batch, so a fragment that does not fit (or that smuggles a
second statement in) fails clearly before anything runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import statistics
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import psycopg
import trio

from coordinator.events import Reporter, SqlProgress
from coordinator.history import BackfillPosition, BackfillPositionStore
from coordinator.pg import thread as pgthread
from coordinator.pg.attempts import AttemptOutcome, LockSafeSession
from coordinator.pg.errors import SqlFailure, pg_message
from statemachine.backfill_pacing import BatchSignals, Pace, PacingPolicy, next_pace
from statemachine.migration import Backfill
from statemachine.phases import Phase
from statemachine.result import BackfillStats
from statemachine.sql import SqlSyntaxError, parse_statement

T = TypeVar("T")
log = logging.getLogger("lockstep.coordinator")


@dataclasses.dataclass(frozen=True)
class BackfillProgress(SqlProgress):
    """A batch committed: totals so far for `table`, and how the batch went.

    `size` is the batch's limit, `seconds` its time (start to commit), `signals` what it saw
    just before committing; `next_size`, `rest` and `why` are what the pacing chose for the
    next batch: its size, the sleep before it, and the reason.
    """

    table: str
    batches: int
    rows: int
    size: int = 0
    seconds: float = 0.0
    signals: BatchSignals = dataclasses.field(default_factory=BatchSignals)
    next_size: int = 0
    rest: float = 0.0
    why: str = ""


class BackfillFailed(SqlFailure):
    """A batch failed; `stats` holds what the batches before it did (they stay committed)."""

    def __init__(self, statement: str | None, message: str, stats: BackfillStats, **kw: Any):
        super().__init__(statement, message, **kw)
        self.stats = stats


@dataclasses.dataclass(frozen=True)
class BatchQuery:
    """The batch statement, for the first batch and for the ones after a key."""

    first: str
    next: str
    display: str
    checked: str  # the same statement with $1/$2 parameters, as the parser saw it


def _batch_sql(backfill: Backfill, *, after: str | None, limit: str) -> str:
    """The batch: select the next `limit` keys, update their rows, return the last key.

    The UPDATE names its rows as ``key = ANY (ARRAY (...))`` rather than ``key IN (SELECT
    ...)``: the planner cannot see the CTE's size in a join and, on a table of a few hundred
    thousand rows, hashes the batch and scans the whole table for every batch (measured:
    ~35 ms per 1,000-row batch on 200,000 rows); an array of keys is always an index scan.
    The last key is cast to text *outside* its sub-select: inside, ``ORDER BY k`` would sort
    by the text output column of that name ('9' after '10').
    """
    key, table = backfill.key, backfill.table
    conditions = []
    if backfill.where:
        conditions.append(f"({backfill.where})")
    if after is not None:
        conditions.append(f"{key} > {after}")
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    recheck = f" AND ({backfill.where})" if backfill.where else ""
    return (
        f"WITH lockstep_batch AS (SELECT {key} AS k FROM {table}{where} "
        f"ORDER BY {key} LIMIT {limit}), "
        f"lockstep_updated AS (UPDATE {table} SET {backfill.set} "
        f"WHERE {key} = ANY (ARRAY (SELECT k FROM lockstep_batch)){recheck} RETURNING 1) "
        "SELECT (SELECT k FROM lockstep_batch ORDER BY k DESC LIMIT 1)::text, "
        "(SELECT count(*) FROM lockstep_batch), (SELECT count(*) FROM lockstep_updated)"
    )


def _describe(backfill: Backfill) -> str:
    if backfill.pacing == "fixed":
        return f"batches of {backfill.batch_size} by {backfill.key}"
    return (
        f"batches of ~{backfill.target_seconds * 1000:g} ms by {backfill.key}, "
        f"{backfill.smallest_batch}-{backfill.largest_batch} rows, from {backfill.batch_size}"
    )


def batch_query(backfill: Backfill) -> BatchQuery:
    """Build and check the batch statement; `SqlFailure` if the fragments do not make one.

    The executed text uses psycopg placeholders, so a ``%`` in a fragment is doubled; the
    parser checks the same text with PostgreSQL's ``$n`` parameters.
    """
    checked = _batch_sql(backfill, after="$1", limit="$2")
    try:
        parse_statement(checked)
    except SqlSyntaxError as exc:
        raise SqlFailure(None, f"backfill of {backfill.table}: invalid SQL: {exc.message}") from exc
    except ValueError as exc:
        raise SqlFailure(None, f"backfill of {backfill.table}: {exc}") from exc
    escaped = dataclasses.replace(
        backfill,
        table=backfill.table.replace("%", "%%"),
        set=backfill.set.replace("%", "%%"),
        key=backfill.key.replace("%", "%%"),
        where=None if backfill.where is None else backfill.where.replace("%", "%%"),
    )
    where = f" WHERE {backfill.where}" if backfill.where else ""
    return BatchQuery(
        first=_batch_sql(escaped, after=None, limit="%(limit)s"),
        next=_batch_sql(escaped, after="%(last)s", limit="%(limit)s"),
        checked=checked,
        display=f"UPDATE {backfill.table} SET {backfill.set}{where} ({_describe(backfill)})",
    )


#: Read just before a batch commits, on its connection (module docstring). `pg_blocking_pids`
#: runs only for sessions already waiting on a lock, so an unblocked batch pays a scan of
#: `pg_stat_activity` and nothing more.
SIGNALS_SQL = (
    "SELECT (SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
    "AND pg_backend_pid() = ANY (pg_blocking_pids(pid))), "
    "(SELECT extract(epoch FROM max(replay_lag))::float8 FROM pg_stat_replication), "
    "(SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
    "AND pid <> pg_backend_pid() AND ("
    "(wait_event_type = 'LWLock' AND wait_event IN ('WALWrite', 'WALInsert', 'WALBufMapping')) "
    "OR (wait_event_type = 'IO' AND wait_event IN ('WalSync', 'WalWrite')) "
    "OR (wait_event_type = 'IPC' AND wait_event = 'SyncRep')))"
)


@dataclasses.dataclass(frozen=True)
class BatchOutcome:
    """One committed batch: its last key (text), rows selected and updated, time, signals."""

    last_key: str | None
    selected: int
    updated: int
    seconds: float
    signals: BatchSignals


class _BatchConnection:
    """The backfill's one connection, opened again if an error broke it."""

    def __init__(self, session: LockSafeSession) -> None:
        self.session = session
        self.conn: psycopg.Connection[Any] | None = None

    async def get(self) -> psycopg.Connection[Any]:
        if self.conn is not None and self.conn.broken:
            await self.close()
        if self.conn is None:
            conn = await pgthread.connect(self.session.dsn)
            try:
                await pgthread.run_in_thread(conn, lambda: self._configure(conn))
            except BaseException:
                await pgthread.close(conn)
                raise
            self.conn = conn
        return self.conn

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        # The connection runs only batches: session-level timeouts cost no round trip per
        # batch. ISO dates make a date or time key's text form the same for every reader.
        self.session.set_timeouts(conn, self.session.statement_timeout, local=False)
        conn.execute("SET DateStyle = ISO")
        conn.commit()

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            await pgthread.close(conn)


@contextlib.asynccontextmanager
async def _open_batch_connection(session: LockSafeSession) -> AsyncIterator[_BatchConnection]:
    batches = _BatchConnection(session)
    try:
        yield batches
    finally:
        await batches.close()


#: A transaction that writes nothing but its commit record: its time is a WAL flush, what
#: every application commit waits for.
PROBE_SQL = "SELECT pg_current_xact_id()"
#: Probe commits before the first batch (their median is the baseline) and the pause
#: between two probes while a batch runs.
PROBE_BASELINE_COUNT = 5
PROBE_INTERVAL = 0.01
#: A probe commit slower than this is cancelled and counted as this slow.
PROBE_TIMEOUT = 5.0


class CommitProbe:
    """Times probe commits on a connection of its own (`PROBE_SQL`), to see what the
    application's commits take while a batch runs. Best effort: if the probe's connection
    fails, the backfill goes on without it (`broken`)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: psycopg.Connection[Any] | None = None
        self.broken = False

    async def once(self) -> float | None:
        """One probe commit's seconds; None once the probe is broken."""
        if self.broken:
            return None
        try:
            if self.conn is None:
                self.conn = await pgthread.connect(self.dsn, autocommit=True)
            conn = self.conn

            def commit() -> float:
                t0 = time.monotonic()
                conn.execute(PROBE_SQL)
                return time.monotonic() - t0

            # A commit that hangs (a synchronous standby gone) must not hold the batch, whose
            # end waits for the probe in flight: past the limit it counts as that slow.
            seconds = PROBE_TIMEOUT
            with trio.move_on_after(PROBE_TIMEOUT):
                seconds = await pgthread.run_in_thread(conn, commit)
        except psycopg.Error as exc:
            log.warning("backfill: commit probe stopped: %s", pg_message(exc))
            self.broken = True
            return None
        return seconds

    async def baseline(self) -> float | None:
        """The median of a few probe commits before the backfill writes anything."""
        seen = []
        for _ in range(PROBE_BASELINE_COUNT):
            seconds = await self.once()
            if seconds is None:
                return None
            seen.append(seconds)
            await trio.sleep(PROBE_INTERVAL)
        return statistics.median(seen)

    async def during(self, done: trio.Event, seen: list[float]) -> None:
        """Probe every `PROBE_INTERVAL` until `done` is set, appending to `seen`."""
        while True:
            with trio.move_on_after(PROBE_INTERVAL):
                await done.wait()
            if done.is_set():
                return
            seconds = await self.once()
            if seconds is None:
                return
            seen.append(seconds)

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            await pgthread.close(conn)


class _Backfill:
    """One backfill's run: its position, totals and pacing (see `run_backfill`)."""

    def __init__(
        self,
        session: LockSafeSession,
        backfill: Backfill,
        report: Reporter,
        positions: BackfillPositionStore | None,
        index: int,
    ) -> None:
        self.session = session
        self.backfill = backfill
        self.report = report
        self.positions = positions
        self.index = index
        self.query = batch_query(backfill)
        self.policy = PacingPolicy.of(backfill)
        self.probe = CommitProbe(session.dsn)
        self.started = time.monotonic()
        self.size = self.policy.start
        self.last: str | None = None
        self.batches = self.rows = self.lock_retries = 0

    def stats(self, complete: bool) -> BackfillStats:
        return BackfillStats(
            self.backfill.table,
            self.rows,
            self.batches,
            time.monotonic() - self.started,
            self.lock_retries,
            complete,
        )

    def _record(
        self, number: int, ok: bool, seconds: float, error: str | None, detail: str | None
    ) -> None:
        if error == "lock_timeout":
            self.lock_retries += 1

    def _batch(self, conn: psycopg.Connection[Any], size: int) -> BatchOutcome:
        """One batch and its position in one transaction (runs in the worker thread)."""
        params: dict[str, int | str] = {"limit": size}
        if self.last is None:
            sql_text = self.query.first
        else:
            sql_text, params["last"] = self.query.next, self.last
        t0 = time.monotonic()
        with conn.transaction():
            row = conn.execute(sql_text.encode(), params).fetchone()
            assert row is not None
            last_key, selected, updated = row[0], int(row[1]), int(row[2])
            seen = conn.execute(SIGNALS_SQL).fetchone()
            assert seen is not None
            signals = BatchSignals(
                blocked_sessions=int(seen[0]),
                replication_lag=None if seen[1] is None else float(seen[1]),
                wal_waits=int(seen[2]),
            )
            if self.positions is not None:
                done = selected < size
                self.positions.save(
                    conn,
                    self.index,
                    BackfillPosition(
                        last_key if selected else self.last,
                        self.rows + updated,
                        self.batches + (1 if selected else 0),
                        done,
                    ),
                )
        return BatchOutcome(last_key, selected, updated, time.monotonic() - t0, signals)

    async def _attempt(self, batches: _BatchConnection, size: int) -> AttemptOutcome[BatchOutcome]:
        conn = await batches.get()
        try:
            value, probes = await self._probed(conn, size)
        except psycopg.Error as exc:  # run_in_thread raises it bare
            return AttemptOutcome(None, exc, self.query.display, [], conn.info.backend_pid)
        if probes:
            signals = dataclasses.replace(value.signals, commit_seconds=statistics.median(probes))
            value = dataclasses.replace(value, signals=signals)
        return AttemptOutcome(value, None, self.query.display, [], conn.info.backend_pid)

    async def _probed(
        self, conn: psycopg.Connection[Any], size: int
    ) -> tuple[BatchOutcome, list[float]]:
        """One batch, with probe commits timed while it runs (when the policy watches them)."""
        if self.policy.commit_baseline is None:
            return await pgthread.run_in_thread(conn, lambda: self._batch(conn, size)), []
        probes: list[float] = []
        done = trio.Event()
        value: list[BatchOutcome] = []
        failure: list[BaseException] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.probe.during, done, probes)
            try:
                value.append(await pgthread.run_in_thread(conn, lambda: self._batch(conn, size)))
            except BaseException as exc:  # re-raised bare below, never inside a group
                failure.append(exc)
            finally:
                done.set()
        if failure:
            raise failure[0]
        return value[0], probes

    async def _resume(self, batches: _BatchConnection) -> bool:
        """Continue from the stored position, if any; True if the backfill already finished."""
        if self.positions is None:
            return False
        conn = await batches.get()
        positions = self.positions
        stored = await pgthread.run_in_thread(
            conn, lambda: _read_committed(conn, lambda: positions.load(conn, self.index))
        )
        if stored is None:
            return False
        self.last, self.rows, self.batches = stored.last_key, stored.rows, stored.batches
        table = self.backfill.table
        if stored.complete:
            self.report.say(
                Phase.EXECUTE,
                f"backfill {table} finished before: {self.rows} rows in {self.batches} batches",
            )
            return True
        after = "the start" if self.last is None else f"key {self.last}"
        self.report.say(
            Phase.EXECUTE,
            f"backfill {table}: resuming after {after} "
            f"({self.rows} rows in {self.batches} batches done before)",
        )
        return False

    async def run(self) -> BackfillStats:
        try:
            return await self._run()
        finally:
            await self.probe.close()

    async def _run(self) -> BackfillStats:
        backfill, report = self.backfill, self.report
        report.say(Phase.EXECUTE, f"backfill {backfill.table}: {self.query.display}")
        async with _open_batch_connection(self.session) as batches:
            if await self._resume(batches):
                return self.stats(True)
            if self.policy.adaptive:
                baseline = await self.probe.baseline()
                self.policy = dataclasses.replace(self.policy, commit_baseline=baseline)
            while True:
                size = self.size

                async def attempt(size: int = size) -> AttemptOutcome[BatchOutcome]:
                    return await self._attempt(batches, size)

                label = f"backfill {backfill.table} batch {self.batches + 1}"
                try:
                    outcome = await self.session.with_lock_retries(
                        Phase.EXECUTE, label, [self.query.checked], attempt, self._record, report
                    )
                except SqlFailure as exc:
                    raise BackfillFailed(
                        self.query.display,
                        f"backfill of {backfill.table} failed in batch {self.batches + 1} "
                        f"(after {self.rows} rows in {self.batches} batches): {exc.message}",
                        self.stats(False),
                        sqlstate=exc.sqlstate,
                        blockers=exc.blockers,
                    ) from exc
                assert outcome is not None
                if outcome.selected == 0:
                    break
                self.batches += 1
                self.rows += outcome.updated
                self.last = outcome.last_key
                pace = next_pace(self.policy, size, outcome.seconds, outcome.signals)
                self.size = pace.size
                self._progress(outcome, size, pace)
                if outcome.selected < size:
                    break  # a short batch was the last one: no need to ask for an empty one
                if pace.sleep or backfill.delay:
                    await trio.sleep(pace.sleep + backfill.delay)
        done = self.stats(True)
        report.say(
            Phase.EXECUTE,
            f"backfill {backfill.table} done: {done.rows} rows in {done.batches} batches "
            f"({done.seconds:.1f} s)",
        )
        return done

    def _progress(self, outcome: BatchOutcome, size: int, pace: Pace) -> None:
        table = self.backfill.table
        self.report.event(
            BackfillProgress(
                self.report.migration,
                Phase.EXECUTE,
                f"backfill {table}: batch {self.batches} updated {outcome.updated} rows "
                f"({self.rows} so far)",
                table=table,
                batches=self.batches,
                rows=self.rows,
                size=size,
                seconds=outcome.seconds,
                signals=outcome.signals,
                next_size=pace.size,
                rest=pace.sleep,
                why=pace.why,
            )
        )


def _read_committed(conn: psycopg.Connection[Any], read: Callable[[], T]) -> T:
    """`read` in a transaction of its own, so the connection is not left idle in one."""
    with conn.transaction():
        return read()


async def run_backfill(
    session: LockSafeSession,
    backfill: Backfill,
    report: Reporter,
    *,
    positions: BackfillPositionStore | None = None,
    index: int = 0,
) -> BackfillStats:
    """Update every matching row in batches; raise `BackfillFailed` if a batch fails.

    With `positions`, backfill number `index` of the run continues after the position it
    stored (and stores its position with every batch); without, it starts at the lowest key.
    A `coordinator.history.Deposed` from the store propagates: the batch rolled back.
    """
    return await _Backfill(session, backfill, report, positions, index).run()


__all__ = [
    "SIGNALS_SQL",
    "BackfillFailed",
    "BackfillProgress",
    "BatchOutcome",
    "BatchQuery",
    "batch_query",
    "run_backfill",
]
