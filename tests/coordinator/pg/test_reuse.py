"""Connections the coordinator keeps between migrations, on a real PostgreSQL.

A migration used to open about a dozen connections (history, checkpoints, the lint gate's
catalog, the leader lock, the executor); now each of those is held and reused. What must
stay true: a held connection that died while idle (an operator's `pg_terminate_backend`, a
restart) is replaced without the caller seeing an error; an unreachable database still
fails the caller exactly as before; a reused executor session starts clean (nothing a
migration's SQL SET leaks into the next one); and the catalog the lint gate reads is never
stale.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
import trio

from coordinator.history import PostgresHistory
from coordinator.leader import LockSession, open_leadership
from coordinator.pg.attempts import LockSafeSession
from coordinator.pg.catalog import CatalogReader
from coordinator.pg.held import HeldConnection


def _terminate(dsn: str, pid: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))


async def _pid(held: HeldConnection) -> int:
    rows, _ = await held.query("SELECT pg_backend_pid()")
    return int(rows[0][0])


async def test_a_held_connection_is_reused_and_replaced_once_terminated(dsn: str) -> None:
    held = HeldConnection(dsn)
    try:
        first = await _pid(held)
        assert await _pid(held) == first, "the second statement must reuse the session"
        assert held.opened == 1
        await trio.to_thread.run_sync(_terminate, dsn, first)
        assert await _pid(held) != first, "a session that died idle is replaced silently"
        assert held.opened == 2
    finally:
        await held.aclose()


async def test_a_statement_error_keeps_the_held_session(dsn: str) -> None:
    held = HeldConnection(dsn)
    try:
        first = await _pid(held)
        with pytest.raises(psycopg.errors.UndefinedTable):
            await held.query("SELECT * FROM no_such_table")
        assert await _pid(held) == first
    finally:
        await held.aclose()


async def test_an_unreachable_database_still_fails_the_caller(dsn: str) -> None:
    held = HeldConnection("postgresql://127.0.0.1:1/nothing?connect_timeout=2")
    with pytest.raises(psycopg.OperationalError):
        await held.query("SELECT 1")
    assert held.opened == 0


async def test_history_reuses_one_connection(dsn: str) -> None:
    history = PostgresHistory(dsn, hold_connections=True)
    try:
        await history.ensure_schema()
        for _ in range(3):
            assert await history.applied() == []
            assert await history.lock_is_free()
        assert history.held is not None and history.held.opened == 1
    finally:
        await history.aclose()


async def test_the_lock_session_is_kept_released_and_replaced(dsn: str) -> None:
    history = PostgresHistory(dsn)
    await history.ensure_schema()
    session = LockSession()
    try:
        epochs = []
        for _ in range(2):
            async with open_leadership(dsn, session=session) as lead:
                epochs.append(lead.epoch)
                assert not await history.lock_is_free()
            assert await history.lock_is_free(), "leaving the body gives the lock back"
        assert epochs[1] == epochs[0] + 1
        assert session.opened == 1, "the second leadership reused the session"
        assert session.conn is not None
        pid = session.conn.info.backend_pid
        await trio.to_thread.run_sync(_terminate, dsn, pid)
        with trio.fail_after(5):  # no backoff: a session that died idle is simply replaced
            async with open_leadership(dsn, session=session, poll_interval=10) as lead:
                assert lead.epoch == epochs[1] + 1
        assert session.opened == 2
    finally:
        await session.discard()


async def test_a_reused_executor_session_starts_clean(dsn: str) -> None:
    session = LockSafeSession(dsn)
    session.reuse_connection = True

    def leak(conn: psycopg.Connection[Any], current: list[str | None]) -> int:
        conn.execute("SET application_name = 'leaked by a migration'")
        conn.execute("CREATE TEMP TABLE scratch (x int)")
        return conn.info.backend_pid

    def look(conn: psycopg.Connection[Any], current: list[str | None]) -> tuple[Any, ...]:
        row = conn.execute(
            "SELECT current_setting('application_name'), to_regclass('pg_temp.scratch'),"
            " pg_backend_pid()"
        ).fetchone()
        assert row is not None
        return tuple(row)

    try:
        first = await session.transaction_attempt(["SET ..."], leak)
        assert first.error is None
        second = await session.transaction_attempt(["SELECT ..."], look)
        assert second.error is None and second.value is not None
        application_name, scratch, pid = second.value
        assert pid == first.value, "the clean session must be reused"
        assert application_name != "leaked by a migration"
        assert scratch is None, "the temporary table must be gone"
        assert session.opened == 1
        await trio.to_thread.run_sync(_terminate, dsn, pid)
        third = await session.transaction_attempt(["SELECT ..."], look)
        assert third.error is None, "a spare that died idle is no database outage"
        assert session.opened == 2
    finally:
        await session.aclose()


async def test_a_failed_attempt_does_not_leave_its_session_for_the_next(dsn: str) -> None:
    session = LockSafeSession(dsn)
    session.reuse_connection = True

    def fail(conn: psycopg.Connection[Any], current: list[str | None]) -> None:
        conn.execute("SELECT * FROM no_such_table")

    try:
        failed = await session.transaction_attempt(["SELECT"], fail)
        assert failed.error is not None
        ok = await session.transaction_attempt(["SELECT"], lambda conn, current: None)
        assert ok.error is None
        assert session.opened == 2
    finally:
        await session.aclose()


async def test_the_catalog_reader_never_serves_stale_tables_or_functions(dsn: str) -> None:
    reader = CatalogReader(dsn)

    def execute(sql: str) -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.encode())

    try:
        before = await reader.read()
        assert "public.t" not in before.tables
        await trio.to_thread.run_sync(execute, "CREATE TABLE t (id int)")
        await trio.to_thread.run_sync(
            execute, "CREATE FUNCTION f() RETURNS int LANGUAGE sql VOLATILE AS 'SELECT 1'"
        )
        after = await reader.read()
        assert after.tables["public.t"].empty
        assert after.functions["public.f"] == "volatile"
        await trio.to_thread.run_sync(execute, "INSERT INTO t VALUES (1)")
        await trio.to_thread.run_sync(execute, "ALTER FUNCTION f() IMMUTABLE")
        again = await reader.read()
        assert not again.tables["public.t"].empty
        assert again.functions["public.f"] == "immutable"
        await trio.to_thread.run_sync(execute, "DROP FUNCTION f()")
        assert "public.f" not in (await reader.read()).functions
        assert reader.held.opened == 1
    finally:
        await reader.aclose()
