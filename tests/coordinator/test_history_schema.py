"""`PostgresHistory.ensure_schema`: created once, then left alone; never downgraded."""

from __future__ import annotations

import psycopg
import pytest
import trio

from coordinator.history import SCHEMA_VERSION, PostgresHistory, SchemaTooNew


async def test_a_current_schema_is_checked_without_ddl_so_readers_never_block_it(
    dsn: str,
) -> None:
    history = PostgresHistory(dsn)
    await history.ensure_schema()
    # A long `lockstep status` read, or a leader's open write: any lock at all on the tables.
    with psycopg.connect(dsn) as reader:
        reader.execute("LOCK TABLE lockstep.migrations, lockstep.leader IN ACCESS SHARE MODE")
        with trio.fail_after(10):  # ALTER TABLE ... IF NOT EXISTS would wait for the reader
            await history.ensure_schema()
        reader.rollback()


async def test_a_schema_written_by_a_newer_lockstep_is_refused_and_left_as_it_is(
    dsn: str,
) -> None:
    history = PostgresHistory(dsn)
    await history.ensure_schema()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE lockstep.schema_version SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(SchemaTooNew, match=f"version {SCHEMA_VERSION + 1}, newer"):
        await history.ensure_schema()
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT version FROM lockstep.schema_version").fetchone()
    assert row == (SCHEMA_VERSION + 1,)


async def test_an_older_schema_is_upgraded(dsn: str) -> None:
    history = PostgresHistory(dsn)
    await history.ensure_schema()
    with psycopg.connect(dsn, autocommit=True) as conn:  # as lockstep before version 3 left it
        conn.execute("DROP TABLE lockstep.schema_version")
        conn.execute("ALTER TABLE lockstep.migrations DROP COLUMN progress")
    await history.ensure_schema()
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT version FROM lockstep.schema_version").fetchone() == (
            SCHEMA_VERSION,
        )
        conn.execute("SELECT progress FROM lockstep.migrations")
