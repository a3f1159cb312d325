"""Run a recipe under live traffic: through lockstep, and directly without it (the control).

Every run gets its own database (`fresh_database`), so nothing one recipe leaves behind can
help or hurt the next. Waits are conditions ("every loop served N more queries"), never
fixed sleeps, so the same code serves a slow CI machine and the benchmark; the only timeout
(`stuck_after`) exists to turn a hang into an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import psycopg
import trio

from agent.client import HookFn, MigrationInfo, open_agent
from coordinator.core import open_coordinator
from statemachine.migration import Migration
from statemachine.phases import MigrationStatus
from statemachine.result import MigrationResult
from tests.bench.apploop import QueryLoop, Sample
from tests.bench.recipes import Recipe
from tests.support import scratchdb

_POLL = 0.01


class HarnessError(RuntimeError):
    """The traffic could not be driven (a loop stopped making progress, setup failed...)."""


@dataclasses.dataclass(frozen=True)
class Window:
    """A span of `time.monotonic()` seconds."""

    start: float
    end: float

    def holds(self, sample: Sample) -> bool:
        return self.start <= sample.at < self.end

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclasses.dataclass(frozen=True)
class WaitSample:
    """What the application's active sessions were waiting on at `at`
    (``wait_event_type:wait_event`` per waiting session, from `pg_stat_activity`)."""

    at: float
    waits: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Traffic:
    """Every query the loops sent, the windows that matter, and (when monitored) what the
    application's sessions waited on."""

    samples: tuple[Sample, ...]
    baseline: Window
    ddl: Window
    waits: tuple[WaitSample, ...] = ()

    def during(self, window: Window) -> list[Sample]:
        return [s for s in self.samples if window.holds(s)]

    @property
    def failures(self) -> list[Sample]:
        return [s for s in self.samples if s.error is not None]

    @property
    def side_by_side(self) -> int:
        """New-code queries sent while some instance still ran old code (sent an old one later)."""
        last_old = max((s.at for s in self.samples if not s.new), default=-math.inf)
        return sum(1 for s in self.samples if s.new and s.at < last_old)


@dataclasses.dataclass(frozen=True)
class LockstepRun:
    recipe: Recipe
    result: MigrationResult
    traffic: Traffic
    schema_problems: tuple[str, ...]
    old_queries: int
    new_queries: int


@dataclasses.dataclass(frozen=True)
class DirectRun:
    recipe: Recipe
    traffic: Traffic
    ddl_error: str | None


def fresh_database(
    server_dsn: str, prefix: str = "lockstep_bench"
) -> contextlib.AbstractContextManager[str]:
    """A new empty database for one benchmark run (see `tests.support.scratchdb`)."""
    return scratchdb.fresh_database(server_dsn, prefix)


def _execute_all(dsn: str, statements: Sequence[str]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement.encode())


async def setup_schema(dsn: str, recipe: Recipe) -> None:
    """Create and seed the recipe's starting schema."""
    try:
        await trio.to_thread.run_sync(_execute_all, dsn, recipe.setup)
    except psycopg.Error as exc:
        raise HarnessError(f"setup of recipe {recipe.key} failed: {exc}") from exc


async def check_schema(dsn: str, recipe: Recipe) -> list[str]:
    def check() -> list[str]:
        with psycopg.connect(dsn, autocommit=True) as conn:
            return recipe.check(conn)

    return await trio.to_thread.run_sync(check)


# ------------------------------------------------------------------ waiting on the loops
async def wait_until(
    condition: Callable[[], bool], what: str, *, stuck_after: float, loops: Sequence[QueryLoop]
) -> None:
    """Poll `condition`; raise `HarnessError` naming `what` if it never holds."""
    with trio.move_on_after(stuck_after):
        while not condition():
            await trio.sleep(_POLL)
        return
    failures = [f for loop in loops for f in loop.failures()]
    last = f"; last failed query: {failures[-1].error}" if failures else ""
    raise HarnessError(f"gave up after {stuck_after:.0f}s waiting for {what}{last}")


async def each_serves(
    loops: Sequence[QueryLoop],
    queries: int,
    *,
    since: float,
    new: bool | None = None,
    stuck_after: float,
) -> None:
    """Wait until every loop sent `queries` queries (of one set if `new` is given) since `since`."""
    which = {None: "", True: " new-code", False: " old-code"}[new]
    await wait_until(
        lambda: all(loop.count(new=new, since=since) >= queries for loop in loops),
        f"every loop to serve {queries}{which} queries",
        stuck_after=stuck_after,
        loops=loops,
    )


def rolling_apply(
    loops: Sequence[QueryLoop], index: int, queries: int, *, stuck_after: float
) -> HookFn:
    """`on_apply` for instance `index` of a rolling switch: it switches only once every earlier
    instance served `queries` new-code queries.

    Without it all instances switch within milliseconds and CONTRACT follows at once, so the
    stretch where old and new code run side by side on the expanded schema (the one the sync
    triggers exist for) would hardly be exercised. A real fleet deploys like this.
    """
    loop = loops[index]
    earlier = loops[:index]

    async def on_apply(info: MigrationInfo) -> None:
        if info.name == loop.migration and not info.resynced:
            await wait_until(
                lambda: all(e.count(new=True) >= queries for e in earlier),
                f"instances before #{index + 1} to serve {queries} new-code queries",
                stuck_after=stuck_after,
                loops=loops,
            )
            # ... and this one still served old code after that, side by side with them.
            await each_serves([loop], 1, since=time.monotonic(), new=False, stuck_after=stuck_after)
        await loop.on_apply(info)

    return on_apply


async def join_agents(
    stack: contextlib.AsyncExitStack,
    url: str,
    loops: Sequence[QueryLoop],
    *,
    rolling_queries: int,
    stuck_after: float,
) -> None:
    for i, loop in enumerate(loops):
        on_apply = (
            rolling_apply(loops, i, rolling_queries, stuck_after=stuck_after)
            if rolling_queries
            else loop.on_apply
        )
        loop.agent = await stack.enter_async_context(
            open_agent(
                url, agent_id=f"app-{i + 1}", on_apply=on_apply, on_rollback=loop.on_rollback
            )
        )


def merged_samples(loops: Sequence[QueryLoop]) -> tuple[Sample, ...]:
    return tuple(sorted((s for loop in loops for s in loop.samples), key=lambda s: s.at))


async def measure_baseline(
    loops: Sequence[QueryLoop], seconds: float, queries: int, stuck_after: float
) -> Window:
    start = time.monotonic()
    await each_serves(loops, queries, since=start, stuck_after=stuck_after)
    await trio.sleep(max(0.0, start + seconds - time.monotonic()))
    return Window(start, time.monotonic())


# ------------------------------------------------------------------ with lockstep
async def run_with_lockstep(
    dsn: str,
    recipe: Recipe,
    *,
    agents: int = 2,
    baseline_seconds: float = 0.0,
    min_queries: int = 10,
    pause: float = 0.002,
    ack_timeout: float = 30.0,
    lock_timeout: float = 0.5,
    stuck_after: float = 120.0,
    migration: Migration | None = None,
) -> LockstepRun:
    """Set up `recipe` in `dsn`, run its migration through lockstep while `agents` instances
    query the database, and check the resulting schema.

    Each instance serves `min_queries` before the migration (and for at least
    `baseline_seconds`, the no-migration baseline) and `min_queries` new-code queries after it.
    The switch in APPLY is rolling (`rolling_apply`): old and new code run side by side.
    """
    await setup_schema(dsn, recipe)
    migration = migration or recipe.migration()
    loops = [
        QueryLoop(dsn, migration.name, recipe.old_queries, recipe.new_queries, pause=pause, seed=i)
        for i in range(agents)
    ]
    async with (
        open_coordinator(dsn, ack_timeout=ack_timeout, lock_timeout=lock_timeout) as coord,
        contextlib.AsyncExitStack() as stack,
    ):
        await join_agents(
            stack, coord.url, loops, rolling_queries=min_queries, stuck_after=stuck_after
        )
        await coord.wait_for_agents(agents, timeout=stuck_after)
        async with trio.open_nursery() as nursery:
            for loop in loops:
                nursery.start_soon(loop.run)
            try:
                await each_serves(loops, min_queries, since=0.0, stuck_after=stuck_after)
                baseline = await measure_baseline(loops, baseline_seconds, min_queries, stuck_after)
                started = time.monotonic()
                result = await coord.run_migration(migration)
                ddl = Window(started, time.monotonic())
                if result.status is MigrationStatus.COMPLETED:
                    await each_serves(
                        loops, min_queries, since=ddl.end, new=True, stuck_after=stuck_after
                    )
            finally:
                for loop in loops:
                    loop.stop()
    problems = await check_schema(dsn, recipe) if result.status is MigrationStatus.COMPLETED else []
    return LockstepRun(
        recipe=recipe,
        result=result,
        traffic=Traffic(merged_samples(loops), baseline, ddl),
        schema_problems=tuple(problems),
        old_queries=sum(loop.count(new=False) for loop in loops),
        new_queries=sum(loop.count(new=True) for loop in loops),
    )


# ------------------------------------------------------------------ without lockstep
def direct_statements(migration: Migration) -> list[str]:
    """What a tool without coordination runs: expand, the backfills as one UPDATE each, contract."""
    backfills = [
        f"UPDATE {b.table} SET {b.set}" + (f" WHERE {b.where}" if b.where else "")
        for b in migration.backfills
    ]
    return [*migration.sql, *backfills, *migration.contract_sql]


def run_ddl_directly(dsn: str, statements: Sequence[str]) -> str | None:
    """Run each statement on one autocommit connection with no lock_timeout; first error."""
    try:
        _execute_all(dsn, statements)
    except psycopg.Error as exc:
        return f"{type(exc).__name__}: {str(exc).strip()}"
    return None


async def run_direct(
    dsn: str,
    recipe: Recipe,
    *,
    instances: int = 2,
    min_queries: int = 10,
    pause: float = 0.002,
    stuck_after: float = 120.0,
) -> DirectRun:
    """Apply the recipe's SQL straight to the database while old-code instances keep running.

    The instances have no agent, so they never switch: this is a deploy that migrates first and
    rolls the new code out afterwards, measured until every instance served `min_queries` more.
    """
    await setup_schema(dsn, recipe)
    migration = recipe.migration()
    loops = [
        QueryLoop(dsn, migration.name, recipe.old_queries, recipe.new_queries, pause=pause, seed=i)
        for i in range(instances)
    ]
    async with trio.open_nursery() as nursery:
        for loop in loops:
            nursery.start_soon(loop.run)
        try:
            await each_serves(loops, min_queries, since=0.0, stuck_after=stuck_after)
            baseline = await measure_baseline(loops, 0.0, min_queries, stuck_after)
            started = time.monotonic()
            error = await trio.to_thread.run_sync(
                run_ddl_directly, dsn, direct_statements(migration)
            )
            ddl = Window(started, time.monotonic())
            await each_serves(loops, min_queries, since=ddl.end, stuck_after=stuck_after)
        finally:
            for loop in loops:
                loop.stop()
    return DirectRun(recipe, Traffic(merged_samples(loops), baseline, ddl), error)
