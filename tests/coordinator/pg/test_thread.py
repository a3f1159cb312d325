"""`pg.thread.run_in_thread`: cancellation stops the statement, and never waits for nothing."""

from __future__ import annotations

import pytest
import trio

from coordinator.pg import thread as pgthread


async def test_cancelling_a_running_statement_stops_it_on_the_server(dsn: str) -> None:
    conn = await pgthread.connect(dsn, autocommit=True)
    try:
        with trio.move_on_after(0.3) as scope:
            await pgthread.run_in_thread(conn, lambda: conn.execute("SELECT pg_sleep(60)"))
        assert scope.cancelled_caught
        # The connection is usable at once: the server stopped the sleep, nothing runs on it.
        rows = await pgthread.run_in_thread(conn, lambda: conn.execute("SELECT 1").fetchall())
        assert rows == [(1,)]
    finally:
        await pgthread.close(conn)


async def test_a_call_cancelled_before_it_started_returns_at_once_and_runs_nothing(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stop of `lockstep serve` cancels many such calls at once; each used to wait out the
    # whole grace for a thread that never ran (the in-process stop took ~30 s).
    monkeypatch.setattr(pgthread, "_CANCEL_GRACE", 20.0)
    conn = await pgthread.connect(dsn, autocommit=True)
    ran: list[bool] = []
    try:
        with trio.fail_after(10):  # half the grace: a bound on a wait, not a speed test
            with trio.CancelScope() as scope:
                scope.cancel()
                await pgthread.run_in_thread(conn, lambda: ran.append(True))
        assert scope.cancelled_caught and ran == []
    finally:
        await pgthread.close(conn)
