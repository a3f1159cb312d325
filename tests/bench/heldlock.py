"""The held-lock scenario: a long transaction sits on the table the migration must alter.

Its ACCESS SHARE lock does not disturb the application, but every ALTER TABLE needs ACCESS
EXCLUSIVE and must wait for it, and every query that arrives after the waiting ALTER queues
behind it. lockstep bounds that wait with `lock_timeout` and retries; a plain ALTER TABLE waits
as long as the blocker stays. `run_hold` measures the application's longest stall either way,
and `WaitMonitor` records what the application's sessions waited on meanwhile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time

import psycopg
import trio
from psycopg import sql

from coordinator.core import Coordinator, open_coordinator
from coordinator.events import Event
from coordinator.pg.attempts import LockRetry, RetryPolicy
from statemachine.result import MigrationResult
from tests.bench.apploop import APP_NAME, QueryLoop
from tests.bench.harness import (
    Traffic,
    WaitSample,
    Window,
    each_serves,
    join_agents,
    measure_baseline,
    merged_samples,
    run_ddl_directly,
    setup_schema,
)
from tests.bench.recipes import Recipe


@dataclasses.dataclass(frozen=True)
class HoldRun:
    """The held-lock scenario: `traffic.ddl` spans from taking the lock to the DDL's end."""

    lockstep: bool
    hold: float | None
    traffic: Traffic
    result: MigrationResult | None
    ddl_error: str | None


class WaitMonitor:
    """Polls `pg_stat_activity` for what the application's sessions wait on.

    A stall has a cause the latency alone does not show: queued behind a lock (``Lock:relation``)
    is what lockstep bounds; waiting for the disk (``IO:WalSync``...) on a busy machine is not.
    The monitor lets the report name it.
    """

    _SQL = (
        "SELECT wait_event_type || ':' || wait_event FROM pg_stat_activity"
        " WHERE application_name = %s AND state = 'active' AND wait_event IS NOT NULL"
        " AND datname = current_database()"
    )

    def __init__(self, dsn: str, interval: float = 0.05) -> None:
        self.dsn = dsn
        self.interval = interval
        self.samples: list[WaitSample] = []
        self._stop = threading.Event()

    def _main(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self._stop.is_set():
                at = time.monotonic()
                rows = conn.execute(self._SQL, (APP_NAME,)).fetchall()
                self.samples.append(WaitSample(at, tuple(str(r[0]) for r in rows)))
                self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        try:
            await trio.to_thread.run_sync(self._main, abandon_on_cancel=True)
        finally:
            self._stop.set()


class LockHolder:
    """A session that reads `table` in a transaction and keeps it open for `hold` seconds
    (None: until `release()`).

    Its ACCESS SHARE lock does not bother the application, but every ALTER TABLE needs ACCESS
    EXCLUSIVE and must wait for it; while it waits, every later query on the table queues
    behind the ALTER. This is the long report query or idle-in-transaction session that turns
    an "instant" migration into an outage. `release()` ends the transaction early.
    """

    def __init__(self, dsn: str, table: str, hold: float | None) -> None:
        self.dsn = dsn
        self.table = table
        self.hold = hold
        self.locked = trio.Event()
        self._release = threading.Event()

    def release(self) -> None:
        self._release.set()

    async def run(self) -> None:
        token = trio.lowlevel.current_trio_token()

        def hold_lock() -> None:
            with psycopg.connect(self.dsn) as conn:
                conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(self.table)))
                trio.from_thread.run_sync(self.locked.set, trio_token=token)
                self._release.wait(self.hold)
                conn.commit()

        try:
            await trio.to_thread.run_sync(hold_lock, abandon_on_cancel=True)
        finally:
            self._release.set()


async def run_hold(
    dsn: str,
    recipe: Recipe,
    *,
    lockstep: bool,
    hold: float | None,
    agents: int = 2,
    min_queries: int = 10,
    pause: float = 0.002,
    ack_timeout: float = 30.0,
    lock_timeout: float = 0.5,
    lock_retry: RetryPolicy | None = None,
    release_after_retries: int | None = None,
    stuck_after: float = 120.0,
) -> HoldRun:
    """Run `recipe`'s expand SQL while another session holds a conflicting lock for `hold` s
    (None: until the DDL is over).

    With `lockstep`, the migration goes through the coordinator (short `lock_timeout`, retried
    per `lock_retry`); without, the same statements run as a plain ALTER TABLE that waits as
    long as it takes. The window measured runs from the moment the lock is held until both the
    holder and the DDL are done, so the application's longest stall inside it is the figure to
    compare. `release_after_retries` (lockstep only) ends the hold as soon as the coordinator
    reported that many lock retries, so a test need not depend on timing.
    """
    await setup_schema(dsn, recipe)
    migration = recipe.migration()
    loops = [
        QueryLoop(dsn, migration.name, recipe.old_queries, recipe.new_queries, pause=pause, seed=i)
        for i in range(agents)
    ]
    holder = LockHolder(dsn, recipe.table, hold)
    monitor = WaitMonitor(dsn)
    retries = 0

    def on_event(event: Event) -> None:
        nonlocal retries
        if isinstance(event, LockRetry):
            retries += 1
            if release_after_retries is not None and retries >= release_after_retries:
                holder.release()

    result: MigrationResult | None = None
    error: str | None = None
    async with contextlib.AsyncExitStack() as stack:
        coord: Coordinator | None = None
        if lockstep:
            coord = await stack.enter_async_context(
                open_coordinator(
                    dsn, ack_timeout=ack_timeout, lock_timeout=lock_timeout, lock_retry=lock_retry
                )
            )
            coord.subscribe(on_event)
            await join_agents(stack, coord.url, loops, rolling_queries=0, stuck_after=stuck_after)
            await coord.wait_for_agents(agents, timeout=stuck_after)
        async with trio.open_nursery() as nursery:
            for loop in loops:
                nursery.start_soon(loop.run)
            nursery.start_soon(monitor.run)
            try:
                await each_serves(loops, min_queries, since=0.0, stuck_after=stuck_after)
                baseline = await measure_baseline(loops, 0.0, min_queries, stuck_after)
                async with trio.open_nursery() as inner:
                    inner.start_soon(holder.run)
                    await holder.locked.wait()
                    started = time.monotonic()
                    if coord is not None:
                        result = await coord.run_migration(migration)
                    else:
                        error = await trio.to_thread.run_sync(run_ddl_directly, dsn, migration.sql)
                    if hold is None:
                        holder.release()
                ddl = Window(started, time.monotonic())
                await each_serves(loops, min_queries, since=ddl.end, stuck_after=stuck_after)
            finally:
                holder.release()
                monitor.stop()
                for loop in loops:
                    loop.stop()
    traffic = Traffic(merged_samples(loops), baseline, ddl, tuple(monitor.samples))
    return HoldRun(lockstep, hold, traffic, result, error)
