"""Durable backfill positions and adaptive batches on a real PostgreSQL.

Each batch writes its last key and the running totals in its own transaction
(`lockstep.backfill_position`); a backfill that finds a stored position continues after it. The
SIGKILL version with a real coordinator process is test_backfill_crash.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading

import psycopg
import pytest
import trio

from coordinator import open_coordinator
from coordinator.backfill import (
    PROBE_BASELINE_COUNT,
    SIGNALS_SQL,
    BackfillProgress,
    CommitProbe,
    run_backfill,
)
from coordinator.events import Event, Reporter
from coordinator.history import (
    BackfillPosition,
    Deposed,
    PostgresBackfillPositions,
    PostgresHistory,
    PostgresJournal,
)
from coordinator.pg.attempts import LockSafeSession
from statemachine import Backfill, Migration, MigrationMachine, MigrationStatus, Phase
from statemachine.checkpoint import Checkpoint
from tests.support.flow import execute

MIGRATION_ID = "m-1"


def scalar(dsn: str, sql: str) -> object:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(sql.encode()).fetchone()
    assert row is not None
    return row[0]


def make_table(dsn: str, key_type: str, key_values: str, rows: int) -> None:
    """`items(k <key_type> PRIMARY KEY, hits int)`: `hits` counts how often a row was updated."""
    execute(
        dsn,
        f"CREATE TABLE items (k {key_type} PRIMARY KEY, hits int NOT NULL DEFAULT 0)",
        f"INSERT INTO items (k) SELECT {key_values} FROM generate_series(1, {rows}) g",
    )


async def positions_store(dsn: str, epoch: int = 0) -> PostgresBackfillPositions:
    await PostgresHistory(dsn).ensure_schema()
    return PostgresBackfillPositions(MIGRATION_ID, epoch)


def stored(dsn: str) -> tuple[object, ...]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT last_key, rows, batches, complete FROM lockstep.backfill_position "
            "WHERE migration_id = %s AND backfill = 0",
            (MIGRATION_ID,),
        ).fetchone()
    assert row is not None
    return tuple(row)


COUNT = Backfill("items", "hits = hits + 1", key="k", batch_size=3, pacing="fixed")


@pytest.mark.parametrize(
    ("key_type", "key_values", "last"),
    [
        ("int", "g", "12"),
        ("text", "'u' || lpad(g::text, 3, '0')", "u012"),
        ("uuid", "('00000000-0000-0000-0000-' || lpad(g::text, 12, '0'))::uuid", None),
        ("timestamptz", "'2026-01-01 00:00:00.000001+00'::timestamptz + g * interval '1 h'", None),
        ("timestamp", "'2026-01-01'::timestamp + g * interval '1.5 s'", None),
        ("numeric", "g / 7.0", None),
    ],
)
async def test_every_key_type_round_trips_and_each_row_is_done_once(
    dsn: str, key_type: str, key_values: str, last: str | None
) -> None:
    make_table(dsn, key_type, key_values, 12)
    positions = await positions_store(dsn)
    # Batches of 5: the second one (6..10) is where text order and int order disagree.
    by_five = dataclasses.replace(COUNT, batch_size=5)
    stats = await run_backfill(
        LockSafeSession(dsn), by_five, Reporter("m"), positions=positions, index=0
    )
    assert (stats.rows, stats.batches, stats.complete) == (12, 3, True)
    assert scalar(dsn, "SELECT array_agg(DISTINCT hits) FROM items") == [1]
    last_key, rows, batches, complete = stored(dsn)
    assert (rows, batches, complete) == (12, 3, True)
    # The stored text casts back to the largest key exactly.
    expected = last or scalar(dsn, "SELECT k::text FROM items ORDER BY k DESC LIMIT 1")
    assert last_key == expected
    assert scalar(dsn, f"SELECT count(*) FROM items WHERE k = '{last_key}'::{key_type}") == 1


async def test_a_stored_position_is_where_the_backfill_continues(dsn: str) -> None:
    make_table(dsn, "int", "g", 20)
    positions = await positions_store(dsn)
    with psycopg.connect(dsn) as conn:
        positions.save(conn, 0, BackfillPosition("11", 11, 4, False))
        conn.commit()
    events: list[Event] = []
    stats = await run_backfill(
        LockSafeSession(dsn), COUNT, Reporter("m", events.append), positions=positions, index=0
    )
    assert (stats.rows, stats.batches) == (20, 4 + 3)  # 9 more rows, in 3 batches
    assert scalar(dsn, "SELECT count(*) FROM items WHERE hits = 0") == 11  # k <= 11 untouched
    assert scalar(dsn, "SELECT min(k) FROM items WHERE hits = 1") == 12
    assert any(
        "resuming after key 11 (11 rows in 4 batches done before)" in e.message for e in events
    )  # type: ignore[attr-defined]
    assert stored(dsn) == ("20", 20, 7, True)


async def test_a_finished_backfill_is_not_run_again(dsn: str) -> None:
    make_table(dsn, "int", "g", 5)
    positions = await positions_store(dsn)
    session = LockSafeSession(dsn)
    await run_backfill(session, COUNT, Reporter("m"), positions=positions, index=0)
    again = await run_backfill(session, COUNT, Reporter("m"), positions=positions, index=0)
    assert (again.rows, again.batches, again.complete) == (5, 2, True)
    assert scalar(dsn, "SELECT array_agg(DISTINCT hits) FROM items") == [1]


async def test_a_deposed_coordinators_batch_rolls_back_with_its_position(dsn: str) -> None:
    make_table(dsn, "int", "g", 12)
    positions = await positions_store(dsn, epoch=0)

    def take_over(event: Event) -> None:
        if isinstance(event, BackfillProgress) and event.batches == 2:
            execute(dsn, "UPDATE lockstep.leader SET epoch = epoch + 1")

    with pytest.raises(Deposed):
        await run_backfill(
            LockSafeSession(dsn), COUNT, Reporter("m", take_over), positions=positions, index=0
        )
    # Batches 1 and 2 committed with their position; batch 3 was rolled back with its write.
    assert stored(dsn) == ("6", 6, 2, False)
    assert scalar(dsn, "SELECT count(*) FROM items WHERE hits = 1") == 6
    assert scalar(dsn, "SELECT count(*) FROM items WHERE hits > 1") == 0


async def test_an_adopted_run_continues_its_backfill_after_the_stored_key(dsn: str) -> None:
    # What a coordinator killed mid-backfill leaves: EXECUTE committed (journal marked), state
    # still EXECUTE, the position of its last committed batch.
    make_table(dsn, "int", "g", 30)
    execute(dsn, "UPDATE items SET hits = 1 WHERE k <= 10")
    migration = Migration(
        "count",
        ["COMMENT ON TABLE items IS 'counted'"],
        rollback_sql=[],
        backfills=[Backfill("items", "hits = hits + 1", key="k", batch_size=5)],
    )
    store = PostgresHistory(dsn)
    await store.ensure_schema()
    machine = MigrationMachine(migration.id, has_contract=False, connected=[])
    machine.start()
    machine.expand_committed()
    assert machine.state.phase is Phase.EXECUTE
    await store.record_start(migration, Checkpoint.of(machine))
    with psycopg.connect(dsn) as conn:
        PostgresJournal(migration.id, 0, set()).mark(conn, Phase.EXECUTE, 0)
        PostgresBackfillPositions(migration.id, 0).save(
            conn, 0, BackfillPosition("10", 10, 2, False)
        )
    events: list[Event] = []
    async with open_coordinator(dsn, ack_timeout=5) as coord:
        coord.subscribe(events.append)
        with trio.fail_after(60):
            result = await coord.run_migration(migration)  # the resumed one
    assert result.status is MigrationStatus.COMPLETED, result.reason
    assert scalar(dsn, "SELECT array_agg(DISTINCT hits) FROM items") == [1]
    (stats,) = result.backfills
    assert (stats.rows, stats.complete) == (30, True)
    first = next(e for e in events if isinstance(e, BackfillProgress))
    assert first.batches == 3 and first.rows == 15  # its first batch: keys 11..15


async def test_a_run_stores_its_positions_and_adaptive_batches_grow(dsn: str) -> None:
    make_table(dsn, "int", "g", 300)
    # A generous target: a 10-row batch is far under it on any machine, so each batch doubles.
    tuned = Backfill("items", "hits = hits + 1", key="k", batch_size=10, target_seconds=2.0)
    migration = Migration(
        "count", ["COMMENT ON TABLE items IS 'x'"], rollback_sql=[], backfills=[tuned]
    )
    events: list[Event] = []
    async with open_coordinator(dsn) as coord:
        coord.subscribe(events.append)
        with trio.fail_after(60):
            result = await coord.run_migration(migration)
    assert result.status is MigrationStatus.COMPLETED, result.reason
    progress = [e for e in events if isinstance(e, BackfillProgress)]
    assert progress[0].size == 10
    # Each batch doubles the next one, unless probe commits were slow (a loaded machine).
    for batch, following in itertools.pairwise(progress):
        assert following.size == batch.next_size
        assert batch.next_size == 2 * batch.size or batch.why.startswith("commits"), batch
    assert any(b.next_size == 2 * b.size for b in progress)
    batches = len(progress)
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT last_key, rows, batches, complete FROM lockstep.backfill_position "
            "WHERE migration_id = %s",
            (migration.id,),
        ).fetchone()
    assert row == ("300", 300, batches, True)


async def test_a_slow_batch_shrinks_the_next_one_at_once(dsn: str) -> None:
    make_table(dsn, "int", "g", 60)
    # The uncorrelated sub-select runs once per statement: every batch takes >= 0.2 s.
    slow = Backfill(
        "items",
        "hits = hits + 1 + (SELECT 0 FROM pg_sleep(0.2))",
        key="k",
        batch_size=40,
        min_batch=5,
        target_seconds=0.05,
    )
    events: list[Event] = []
    stats = await run_backfill(LockSafeSession(dsn), slow, Reporter("m", events.append))
    sizes = [e.size for e in events if isinstance(e, BackfillProgress)]
    assert sizes[0] == 40
    assert sizes[1] <= 10  # at most 40 * 0.05 / 0.2
    assert sizes[2] == 5
    assert stats.rows == 60
    assert scalar(dsn, "SELECT array_agg(DISTINCT hits) FROM items") == [1]
    # Batches of 0.2 s are long enough for probe commits, timed while each one ran.
    probed = [e.signals.commit_seconds for e in events if isinstance(e, BackfillProgress)]
    assert all(seconds is not None and seconds > 0 for seconds in probed), probed


async def test_fixed_batches_make_no_probe_commits(dsn: str) -> None:
    make_table(dsn, "int", "g", 6)
    slow = Backfill(
        "items",
        "hits = hits + 1 + (SELECT 0 FROM pg_sleep(0.1))",
        key="k",
        batch_size=3,
        pacing="fixed",
    )
    events: list[Event] = []
    await run_backfill(LockSafeSession(dsn), slow, Reporter("m", events.append))
    probed = [e.signals.commit_seconds for e in events if isinstance(e, BackfillProgress)]
    assert probed == [None, None]


async def test_a_probe_commit_is_a_real_commit(dsn: str) -> None:
    probe = CommitProbe(dsn)
    try:
        before = scalar(dsn, "SELECT pg_current_xact_id()::text::bigint")
        baseline = await probe.baseline()
        after = scalar(dsn, "SELECT pg_current_xact_id()::text::bigint")
    finally:
        await probe.close()
    assert baseline is not None and baseline > 0
    assert isinstance(before, int) and isinstance(after, int)
    assert after - before > PROBE_BASELINE_COUNT  # each probe took a transaction id


async def test_the_signals_see_a_session_waiting_on_the_batchs_lock(dsn: str) -> None:
    make_table(dsn, "int", "g", 3)
    with psycopg.connect(dsn) as batch:
        batch.execute("UPDATE items SET hits = 1 WHERE k = 1")
        assert batch.execute(SIGNALS_SQL).fetchone() == (0, None, 0)
        waiter_done = threading.Event()

        def wait_on_the_row() -> None:
            with psycopg.connect(dsn, autocommit=True) as app:
                app.execute("UPDATE items SET hits = 5 WHERE k = 1")
            waiter_done.set()

        thread = threading.Thread(target=wait_on_the_row)
        thread.start()
        try:
            with trio.fail_after(10):
                while True:
                    # pg_stat_activity is read once per transaction; a batch reads it once.
                    batch.execute("SELECT pg_stat_clear_snapshot()")
                    row = batch.execute(SIGNALS_SQL).fetchone()
                    if row is not None and row[:2] == (1, None):
                        break
                    await trio.sleep(0.02)
        finally:
            batch.rollback()
            thread.join(10)
    assert waiter_done.is_set()


async def test_each_backfill_of_a_run_keeps_its_own_position(dsn: str) -> None:
    make_table(dsn, "int", "g", 7)
    execute(dsn, "CREATE TABLE others AS SELECT g AS k, 0 AS hits FROM generate_series(1, 4) g")
    execute(dsn, "ALTER TABLE others ADD PRIMARY KEY (k)")
    migration = Migration(
        "two",
        ["COMMENT ON TABLE items IS 'x'"],
        rollback_sql=[],
        backfills=[
            Backfill("items", "hits = hits + 1", key="k", batch_size=3, pacing="fixed"),
            Backfill("others", "hits = hits + 1", key="k", batch_size=3, pacing="fixed"),
        ],
    )
    async with open_coordinator(dsn) as coord:
        with trio.fail_after(60):
            result = await coord.run_migration(migration)
    assert result.status is MigrationStatus.COMPLETED, result.reason
    assert [(b.table, b.rows) for b in result.backfills] == [("items", 7), ("others", 4)]
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT backfill, last_key, rows, batches, complete FROM lockstep.backfill_position "
            "WHERE migration_id = %s ORDER BY backfill",
            (migration.id,),
        ).fetchall()
    assert rows == [(0, "7", 7, 3, True), (1, "4", 4, 2, True)]
    assert scalar(dsn, "SELECT array_agg(DISTINCT hits) FROM others") == [1]


async def test_cancelling_a_backfill_mid_batch_stops_it_at_once_and_rolls_the_batch_back(
    dsn: str,
) -> None:
    make_table(dsn, "int", "g", 10)
    positions = await positions_store(dsn)
    stuck = Backfill(
        "items",
        "hits = hits + 1 + (SELECT 0 FROM pg_sleep(CASE WHEN k > 5 THEN 30 ELSE 0 END))",
        key="k",
        batch_size=5,
        pacing="adaptive",
        target_seconds=5.0,
    )
    session = LockSafeSession(dsn)
    with trio.move_on_after(1.5) as scope:
        await run_backfill(session, stuck, Reporter("m"), positions=positions, index=0)
    assert scope.cancelled_caught
    # The first batch (k 1..5) committed with its position; the second was cancelled.
    assert stored(dsn) == ("5", 5, 1, False)
    assert scalar(dsn, "SELECT count(*) FROM items WHERE hits = 1") == 5
    with trio.fail_after(10):  # the server stopped the statement: no session is left in it
        while scalar(
            dsn,
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep%' "
            "AND pid <> pg_backend_pid()",
        ):
            await trio.sleep(0.05)
