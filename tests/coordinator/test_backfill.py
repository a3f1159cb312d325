"""Batched backfills on a real PostgreSQL: batches, progress, resuming, failure -> ROLLBACK."""

from __future__ import annotations

import psycopg
import pytest
import trio

from coordinator import open_coordinator
from coordinator.backfill import BackfillProgress, batch_query
from coordinator.events import Event, SqlProgress
from coordinator.pg.attempts import LockRetry, RetryPolicy
from coordinator.pg.errors import SqlFailure
from statemachine import Backfill, Migration, MigrationResult, MigrationStatus, Phase

ADD_FULL_NAME = "ALTER TABLE users ADD COLUMN full_name text"


def execute(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement.encode())


def make_users(dsn: str, rows: int) -> None:
    execute(
        dsn,
        "CREATE TABLE users (id serial PRIMARY KEY, name text NOT NULL)",
        f"INSERT INTO users (name) SELECT 'u' || g FROM generate_series(1, {rows}) g",
    )


def scalar(dsn: str, sql: str) -> object:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(sql.encode()).fetchone()
    assert row is not None
    return row[0]


async def migrate(dsn: str, migration: Migration, events: list[Event]) -> MigrationResult:
    """Run `migration` with no agents, recording every event into `events`."""
    async with open_coordinator(dsn) as coordinator:
        coordinator.subscribe(events.append)
        with trio.fail_after(60):
            return await coordinator.run_migration(migration)


async def test_backfill_fills_every_row_in_batches(dsn: str) -> None:
    make_users(dsn, 25)
    events: list[Event] = []
    migration = Migration(
        "full_name",
        [ADD_FULL_NAME],
        backfills=[Backfill("users", "full_name = name", batch_size=10, pacing="fixed")],
    )
    result = await migrate(dsn, migration, events)
    assert result.status is MigrationStatus.COMPLETED, result.reason
    progress = [e for e in events if isinstance(e, BackfillProgress)]
    assert [(p.batches, p.rows) for p in progress] == [(1, 10), (2, 20), (3, 25)]
    assert all(p.phase is Phase.EXECUTE and p.table == "users" for p in progress)
    (stats,) = result.backfills
    assert (stats.table, stats.rows, stats.batches, stats.complete) == ("users", 25, 3, True)
    assert scalar(dsn, "SELECT count(*) FROM users WHERE full_name = name") == 25


async def test_backfill_runs_after_execute_commits_and_before_apply(dsn: str) -> None:
    make_users(dsn, 3)
    events: list[Event] = []
    migration = Migration(
        "full_name", [ADD_FULL_NAME], backfills=[Backfill("users", "full_name = name")]
    )
    result = await migrate(dsn, migration, events)
    assert result.status is MigrationStatus.COMPLETED
    order = [
        e.message
        for e in events
        if isinstance(e, SqlProgress) and ("committed" in e.message or "backfill" in e.message)
    ]
    assert order[0].endswith("committed")  # EXECUTE's transaction first
    assert order[1].startswith("backfill users: UPDATE users SET full_name = name")
    assert result.phase_names == ["ANNOUNCE", "EXECUTE", "APPLY", "CONFIRM"]


async def test_backfill_with_a_where_resumes_where_a_previous_run_stopped(dsn: str) -> None:
    make_users(dsn, 30)
    execute(dsn, ADD_FULL_NAME, "UPDATE users SET full_name = name WHERE id <= 12")
    events: list[Event] = []
    migration = Migration(
        "finish_full_name",
        ["COMMENT ON COLUMN users.full_name IS 'filled'"],
        rollback_sql=[],
        backfills=[
            Backfill(
                "users", "full_name = name", where="full_name IS NULL", batch_size=7, pacing="fixed"
            )
        ],
    )
    result = await migrate(dsn, migration, events)
    assert result.status is MigrationStatus.COMPLETED, result.reason
    (stats,) = result.backfills
    assert (stats.rows, stats.batches) == (18, 3)  # only the 18 rows still to do
    assert scalar(dsn, "SELECT count(*) FROM users WHERE full_name IS NULL") == 0


async def test_keyset_pagination_visits_each_row_once_even_without_a_where(dsn: str) -> None:
    # The SET keeps every row "matching": only the key position guarantees progress.
    make_users(dsn, 9)
    execute(dsn, "ALTER TABLE users ADD COLUMN hits int NOT NULL DEFAULT 0")
    migration = Migration(
        "count_hits",
        ["COMMENT ON TABLE users IS 'x'"],
        rollback_sql=[],
        backfills=[Backfill("users", "hits = hits + 1", batch_size=4, delay=0.01, pacing="fixed")],
    )
    result = await migrate(dsn, migration, [])
    assert result.status is MigrationStatus.COMPLETED
    assert result.backfills[0].batches == 3
    assert scalar(dsn, "SELECT array_agg(DISTINCT hits) FROM users") == [1]


async def test_backfill_failure_rolls_the_migration_back(dsn: str) -> None:
    make_users(dsn, 30)
    failing = Backfill(
        "users",
        "full_name = CASE WHEN id > 15 THEN (1 / (16 - id))::text ELSE name END",
        batch_size=10,
    )
    migration = Migration("full_name", [ADD_FULL_NAME], backfills=[failing])
    result = await migrate(dsn, migration, [])
    assert result.status is MigrationStatus.FAILED
    reason = result.reason or ""
    assert "backfill of users failed in batch 2 (after 10 rows in 1 batches)" in reason
    assert "division by zero" in reason
    assert "ROLLBACK" in result.phase_names
    assert result.schema_restored is True  # the derived rollback dropped full_name
    (stats,) = result.backfills
    assert (stats.rows, stats.batches, stats.complete) == (10, 1, False)
    assert (
        scalar(
            dsn,
            "SELECT count(*) FROM information_schema.columns "
            "WHERE table_name = 'users' AND column_name = 'full_name'",
        )
        == 0
    )


async def test_backfill_batches_retry_on_lock_timeout(dsn: str) -> None:
    make_users(dsn, 5)
    holder = psycopg.connect(dsn)
    events: list[Event] = []

    def block_the_backfill(event: Event) -> None:
        # Right after EXECUTE committed: SHARE mode blocks the batch UPDATEs.
        if isinstance(event, SqlProgress) and event.message.startswith("backfill users: UPDATE"):
            holder.execute("LOCK TABLE users IN SHARE MODE")
        if isinstance(event, LockRetry) and not holder.closed:
            holder.rollback()
            holder.close()

    migration = Migration(
        "full_name", [ADD_FULL_NAME], backfills=[Backfill("users", "full_name = name")]
    )
    try:
        async with open_coordinator(
            dsn, lock_timeout=0.2, lock_retry=RetryPolicy(base_delay=0.05)
        ) as coordinator:
            coordinator.subscribe(block_the_backfill)
            coordinator.subscribe(events.append)
            with trio.fail_after(60):
                result = await coordinator.run_migration(migration)
    finally:
        holder.close()
    assert result.status is MigrationStatus.COMPLETED, result.reason
    assert result.backfills[0].lock_retries == 1
    assert result.lock_retries == 1
    retry = next(e for e in events if isinstance(e, LockRetry))
    assert "backfill users batch 1" in retry.message


def test_batch_query_refuses_a_fragment_that_adds_a_statement() -> None:
    with pytest.raises(SqlFailure, match=r'backfill of users: invalid SQL: .* at or near ";"'):
        batch_query(Backfill("users", "name = 'x'; DROP TABLE users"))
    with pytest.raises(SqlFailure, match="backfill of users: invalid SQL"):
        batch_query(Backfill("users", "name = = 1"))


async def test_percent_signs_in_fragments_are_plain_sql(dsn: str) -> None:
    make_users(dsn, 3)
    migration = Migration(
        "percent",
        [ADD_FULL_NAME],
        backfills=[Backfill("users", "full_name = name || '%'", where="name LIKE 'u%'")],
    )
    result = await migrate(dsn, migration, [])
    assert result.status is MigrationStatus.COMPLETED, result.reason
    assert scalar(dsn, "SELECT min(full_name) FROM users") == "u1%"


async def test_invalid_backfill_fails_before_touching_rows(dsn: str) -> None:
    make_users(dsn, 3)
    migration = Migration("bad", [ADD_FULL_NAME], backfills=[Backfill("users", "nope = name")])
    result = await migrate(dsn, migration, [])
    assert result.status is MigrationStatus.FAILED
    assert 'column "nope" of relation "users" does not exist' in (result.reason or "")
    assert result.schema_restored is True
