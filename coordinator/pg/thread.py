"""Blocking psycopg work from trio: worker threads, with cancellation reaching the server.

psycopg has no trio support, so each call runs in `trio.to_thread.run_sync`. A plain worker thread
cannot be interrupted, so when the calling trio scope is cancelled we ask PostgreSQL to cancel the
running statement (`Connection.cancel_safe`, from a shielded scope) and wait for the thread to come
back with the resulting error: the statement really stops instead of running on unseen.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
import trio

T = TypeVar("T")


async def run_in_thread(conn: psycopg.Connection[Any], fn: Callable[[], T]) -> T:
    """Run `fn` (which uses `conn`) in a worker thread; cancellation cancels the statement.

    No nursery is involved, so `fn`'s own error reaches the caller as itself (callers catch
    `psycopg.Error`) and a cancellation is a plain `trio.Cancelled`, never a group of both.
    On cancellation the thread is abandoned only after PostgreSQL was asked to stop the
    statement and the thread came back, so `conn` is never closed under a running query.
    """
    finished = threading.Event()
    gate = threading.Lock()
    began = abandoned = False

    def work() -> T:
        nonlocal began
        with gate:
            if abandoned:  # cancelled before this thread got to it: `conn` is not ours now
                raise _Abandoned
            began = True
        try:
            return fn()
        finally:
            finished.set()

    try:
        return await trio.to_thread.run_sync(work, abandon_on_cancel=True)
    except trio.Cancelled:
        with gate:
            abandoned = True
            running = began
        # Cancelled before `fn` started (the scope was already cancelled, or the thread had
        # not picked the job up yet): there is nothing to stop and nothing to wait for.
        if running:
            with trio.CancelScope(shield=True):
                if not finished.is_set():
                    with contextlib.suppress(psycopg.Error):
                        await trio.to_thread.run_sync(conn.cancel_safe)
                    await trio.to_thread.run_sync(finished.wait, _CANCEL_GRACE)
        raise


class _Abandoned(Exception):
    """Raised in a worker thread whose job was cancelled before it started (nobody sees it)."""


#: How long a cancelled caller waits for the server to stop the statement.
_CANCEL_GRACE = 30.0


async def connect(dsn: str, *, autocommit: bool = False) -> psycopg.Connection[Any]:
    """Open a sync connection in a worker thread (connecting blocks on the network)."""

    def _connect() -> psycopg.Connection[Any]:
        return psycopg.connect(dsn, autocommit=autocommit)

    return await trio.to_thread.run_sync(_connect)


async def close(conn: psycopg.Connection[Any]) -> None:
    with trio.CancelScope(shield=True):
        await trio.to_thread.run_sync(conn.close)


async def query(
    dsn: str, sql: str, params: tuple[object, ...] | dict[str, object] = ()
) -> tuple[list[tuple[Any, ...]], int]:
    """Run one statement on a fresh autocommit connection: its rows (if any) and rowcount.

    For the coordinator's bookkeeping (history, queue, status), which is rare enough that a
    connection per statement costs nothing and never leaves a session in a bad state.
    """
    conn = await connect(dsn, autocommit=True)
    try:

        def work() -> tuple[list[tuple[Any, ...]], int]:
            cur = conn.execute(sql.encode(), params)
            return (list(cur.fetchall()) if cur.description else []), cur.rowcount

        return await run_in_thread(conn, work)
    finally:
        await close(conn)
