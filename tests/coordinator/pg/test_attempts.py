"""Lock safety on a real PostgreSQL: short lock waits, retries with backoff, blocker diagnosis.

No wall-clock asserts: the tests wait for lock-retry *events* (each one is a real attempt that
gave up after lock_timeout) and assert on attempts and on what the application managed to do.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import psycopg
import pytest
import trio

from agent import open_agent
from coordinator import open_coordinator
from coordinator.events import Event, Reporter
from coordinator.executor import PostgresExecutor
from coordinator.pg.attempts import LockRetry, RetryPolicy
from coordinator.pg.errors import SqlFailure
from coordinator.pg.locks import BlockerWatch, BlockingSession, lock_holders, relations_in
from statemachine import Migration, MigrationStatus, Phase
from statemachine.sql import group_for_execution

#: Guard against a hang when lock safety is broken (a test then fails instead of waiting forever).
HANG_GUARD = 60

FAST = RetryPolicy(max_attempts=50, max_seconds=60, base_delay=0.05, max_delay=0.2)


def execute(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement.encode())


def make_users(dsn: str) -> None:
    execute(
        dsn,
        "CREATE TABLE users (id serial PRIMARY KEY, name text)",
        "INSERT INTO users (name) SELECT 'u' || g FROM generate_series(1, 10) g",
    )


def columns(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'users'"
        ).fetchall()
    return [str(r[0]) for r in rows]


class Holder:
    """A session holding a lock in an open transaction (what blocks DDL in production)."""

    def __init__(self, dsn: str, statement: str) -> None:
        self.statement = statement
        self.conn = psycopg.connect(dsn, application_name="long-report")
        self.conn.execute(statement.encode())  # opens a transaction and keeps it open
        self.pid = self.conn.info.backend_pid

    def release(self) -> None:
        if not self.conn.closed:
            self.conn.rollback()
            self.conn.close()


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    opened: list[Holder] = []
    yield opened
    for holder in opened:
        holder.release()


def release_after_retries(
    retries: int, release: Callable[[], None]
) -> tuple[Callable[[Event], None], list[LockRetry]]:
    """A subscriber that counts LockRetry events and releases the lock after `retries`."""
    seen: list[LockRetry] = []

    def on_event(event: Event) -> None:
        if isinstance(event, LockRetry):
            seen.append(event)
            if len(seen) == retries:
                release()

    return on_event, seen


async def test_migration_retries_until_the_lock_is_released(
    dsn: str, holders: list[Holder]
) -> None:
    make_users(dsn)
    holder = Holder(dsn, "LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
    holders.append(holder)
    on_event, seen = release_after_retries(2, holder.release)
    migration = Migration(
        "add_email",
        [
            "ALTER TABLE users ADD COLUMN email text",
        ],
    )
    async with open_coordinator(dsn, lock_timeout=0.2, lock_retry=FAST) as coordinator:
        coordinator.subscribe(on_event)
        with trio.fail_after(HANG_GUARD):
            result = await coordinator.run_migration(migration)
    assert result.status is MigrationStatus.COMPLETED, result.reason
    assert result.lock_retries >= 2
    assert len(seen) == result.lock_retries
    failed = [a for a in result.sql_attempts if not a.ok]
    assert all(a.error == "lock_timeout" and a.phase is Phase.EXECUTE for a in failed)
    assert [a.attempt for a in result.sql_attempts if a.phase is Phase.EXECUTE] == list(
        range(1, result.lock_retries + 2)
    )
    # Every retry event names the session that held the lock.
    assert all(holder.pid in [b.pid for b in e.blockers] for e in seen)
    assert "email" in columns(dsn)


async def test_spent_budget_fails_and_names_the_blocking_session(
    dsn: str, holders: list[Holder]
) -> None:
    make_users(dsn)
    holder = Holder(dsn, "LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
    holders.append(holder)
    budget = RetryPolicy(max_attempts=3, max_seconds=60, base_delay=0.05, max_delay=0.1)
    migration = Migration(
        "add_email",
        [
            "ALTER TABLE users ADD COLUMN email text",
        ],
    )
    async with open_coordinator(dsn, lock_timeout=0.2, lock_retry=budget) as coordinator:
        with trio.fail_after(HANG_GUARD):
            result = await coordinator.run_migration(migration)
    assert result.status is MigrationStatus.FAILED
    assert result.lock_retries == 3
    reason = result.reason or ""
    assert "retry budget spent" in reason
    assert f"pid {holder.pid}" in reason
    assert "LOCK TABLE users IN ACCESS EXCLUSIVE MODE" in reason
    assert "idle in transaction" in reason
    assert "long-report" in reason
    assert result.schema_restored is None  # nothing committed, nothing to undo
    assert "email" not in columns(dsn)


async def test_application_queries_get_through_while_the_ddl_retries(
    dsn: str, holders: list[Holder]
) -> None:
    """A DDL statement queued for ACCESS EXCLUSIVE blocks every later query on the table.

    Here a long transaction holds a weak lock (it read the table), so plain reads are not
    blocked by *it*; only by the DDL waiting behind it. With lock_timeout the DDL steps out
    of the queue after each attempt, so reads are served while the migration keeps retrying.
    """
    make_users(dsn)
    holder = Holder(dsn, "SELECT count(*) FROM users")  # ACCESS SHARE, idle in transaction
    holders.append(holder)
    served = 0
    served_while_blocked: list[int] = []
    stop = threading.Event()

    def application() -> None:
        nonlocal served
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                conn.execute("SELECT count(*) FROM users").fetchone()
                served += 1

    first_retry_served: list[int] = []

    def on_retry() -> None:
        served_while_blocked.append(served - first_retry_served[0])
        holder.release()

    on_event, seen = release_after_retries(4, on_retry)

    def mark_first(event: Event) -> None:
        if isinstance(event, LockRetry) and not first_retry_served:
            first_retry_served.append(served)

    migration = Migration(
        "add_email",
        [
            "ALTER TABLE users ADD COLUMN email text",
        ],
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, application)
        try:
            async with open_coordinator(dsn, lock_timeout=0.3, lock_retry=FAST) as coordinator:
                coordinator.subscribe(mark_first)
                coordinator.subscribe(on_event)
                with trio.fail_after(HANG_GUARD):
                    result = await coordinator.run_migration(migration)
        finally:
            stop.set()
    assert result.status is MigrationStatus.COMPLETED, result.reason
    assert len(seen) >= 4
    # Between the first and the fourth lock timeout the holder never let go, yet the
    # application's reads completed: each one waited at most one lock_timeout.
    assert served_while_blocked[0] >= 1


async def test_lock_waits_do_not_count_against_the_ack_timeout(
    dsn: str, holders: list[Holder]
) -> None:
    make_users(dsn)
    holder = Holder(dsn, "LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
    holders.append(holder)
    # 4 lock timeouts of 0.5 s each: at least 2 s of lock waiting, twice the ack timeout.
    on_event, seen = release_after_retries(4, holder.release)
    migration = Migration(
        "add_email",
        [
            "ALTER TABLE users ADD COLUMN email text",
        ],
    )
    async with (
        open_coordinator(dsn, ack_timeout=1.0, lock_timeout=0.5, lock_retry=FAST) as coordinator,
        open_agent(coordinator.url, agent_id="app-1") as agent,
    ):
        coordinator.subscribe(on_event)
        await coordinator.wait_for_agents(1, timeout=10)
        with trio.fail_after(HANG_GUARD):
            result = await coordinator.run_migration(migration)
        assert agent.is_applied("add_email")
    assert result.status is MigrationStatus.COMPLETED, result.reason
    assert len(seen) >= 4
    assert sum(a.seconds for a in result.sql_attempts if not a.ok) >= 4 * 0.5 * 0.9


async def test_concurrent_index_build_retries_on_lock_timeout(
    dsn: str, holders: list[Holder]
) -> None:
    make_users(dsn)
    # SHARE UPDATE EXCLUSIVE conflicts with itself: CREATE INDEX CONCURRENTLY needs it.
    holder = Holder(dsn, "LOCK TABLE users IN SHARE UPDATE EXCLUSIVE MODE")
    holders.append(holder)
    on_event, _ = release_after_retries(2, holder.release)
    executor = PostgresExecutor(dsn, lock_timeout=0.2, retry=FAST)
    attempts = await executor.run_phase_reporting(
        Phase.EXECUTE,
        group_for_execution(
            [
                "CREATE INDEX CONCURRENTLY users_name ON users (name)",
            ]
        ),
        Reporter("m", on_event),
    )
    assert [a.error for a in attempts[:2]] == ["lock_timeout", "lock_timeout"]
    assert attempts[-1].ok and not attempts[-1].transactional
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT c.relname, i.indisvalid FROM pg_index i "
            "JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = 'users'::regclass"
        ).fetchall()
    assert sorted(rows) == [("users_name", True), ("users_pkey", True)]


async def test_executor_failure_carries_the_blockers(dsn: str, holders: list[Holder]) -> None:
    make_users(dsn)
    holder = Holder(dsn, "LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
    holders.append(holder)
    executor = PostgresExecutor(dsn, lock_timeout=0.1, retry=RetryPolicy(max_attempts=1))
    with pytest.raises(SqlFailure) as info:
        await executor.run_phase(
            Phase.EXECUTE,
            group_for_execution(
                [
                    "ALTER TABLE users ADD COLUMN email text",
                ]
            ),
        )
    assert info.value.sqlstate == "55P03"
    assert [b.pid for b in info.value.blockers] == [holder.pid]
    assert info.value.attempts[0].error == "lock_timeout"


async def test_lock_holders_fallback_finds_the_session_holding_the_table(
    dsn: str, holders: list[Holder]
) -> None:
    make_users(dsn)
    holder = Holder(dsn, "SELECT count(*) FROM users")
    holders.append(holder)
    found = await lock_holders(dsn, ["ALTER TABLE users ADD COLUMN x int"], exclude_pids=[])
    assert [s.pid for s in found] == [holder.pid]
    assert found[0].state == "idle in transaction"
    assert found[0].query == "SELECT count(*) FROM users"
    assert await lock_holders(dsn, ["ALTER TABLE users ADD COLUMN x int"], [holder.pid]) == []


async def test_blocker_watch_sees_who_blocks_a_waiting_statement(
    dsn: str, holders: list[Holder]
) -> None:
    make_users(dsn)
    holder = Holder(dsn, "LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
    holders.append(holder)
    waiter = psycopg.connect(dsn, autocommit=True)
    watch = BlockerWatch(dsn, waiter.info.backend_pid, first_poll=0, interval=0.01)

    def wait_for_the_lock() -> None:
        with pytest.raises(psycopg.errors.QueryCanceled):  # we cancel it once it was seen
            waiter.execute("SELECT count(*) FROM users")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, wait_for_the_lock)
        nursery.start_soon(watch.watch)
        try:
            with trio.move_on_after(HANG_GUARD):
                while not watch.seen:
                    await trio.sleep(0.01)
        finally:
            waiter.cancel_safe()  # stop the waiting statement (seen, or given up)
            nursery.cancel_scope.cancel()
    waiter.close()
    (seen,) = watch.seen
    assert seen.pid == holder.pid
    assert seen.state == "idle in transaction"
    assert seen.query == "LOCK TABLE users IN ACCESS EXCLUSIVE MODE"
    assert seen.application_name == "long-report"
    assert seen.age is not None and seen.age >= 0


def test_relations_in_names_every_relation_quoted_for_to_regclass() -> None:
    assert relations_in(
        ['ALTER TABLE "Users" ADD COLUMN org int REFERENCES public.orgs (id)', "not sql at all"]
    ) == ['"Users"', "public.orgs"]


def test_blocking_session_description_is_one_readable_line() -> None:
    session = BlockingSession(42, "active", "SELECT\n  pg_sleep(60)", 12.34, "report")
    text = session.describe()
    assert text == (
        "pid 42 (active, transaction open 12.3 s, application 'report'): "
        "last query 'SELECT pg_sleep(60)'"
    )
    assert len(BlockingSession(1, None, "x" * 1000, None).describe()) < 300


async def test_host_cancellation_while_the_ddl_waits_stops_it_on_the_server(
    dsn: str, holders: list[Holder]
) -> None:
    make_users(dsn)
    holder = Holder(dsn, "LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
    holders.append(holder)
    ddl = "ALTER TABLE users ADD COLUMN email text"

    def waiting_ddl_pids() -> list[int]:
        with psycopg.connect(dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query = %s",
                (ddl,),
            ).fetchall()
        return [int(r[0]) for r in rows]

    async with open_coordinator(dsn, lock_timeout=30) as coordinator:
        with trio.fail_after(HANG_GUARD), trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:

                async def cancel_once_waiting() -> None:
                    while not await trio.to_thread.run_sync(waiting_ddl_pids):
                        await trio.sleep(0.02)
                    scope.cancel()

                nursery.start_soon(cancel_once_waiting)
                await coordinator.run_migration(Migration("add_email", [ddl]))
    assert scope.cancelled_caught
    assert waiting_ddl_pids() == []  # the server stopped the statement too
    holder.release()
    assert "email" not in columns(dsn)
