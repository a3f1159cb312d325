"""Blocking psycopg work from trio: worker threads, with cancellation reaching the server.

psycopg has no trio support, so each call runs in `trio.to_thread.run_sync`. A plain worker thread
cannot be interrupted, so when the calling trio scope is cancelled we ask PostgreSQL to cancel the
running statement (`Connection.cancel_safe`, from a shielded scope) and wait for the thread to come
back with the resulting error: the statement really stops instead of running on unseen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
import trio

from statemachine.exceptions import unwrap_single_group

T = TypeVar("T")


async def run_in_thread(conn: psycopg.Connection[Any], fn: Callable[[], T]) -> T:
    """Run `fn` (which uses `conn`) in a worker thread; cancellation cancels the statement."""
    done = trio.Event()
    result: list[T] = []

    async def cancel_on_cancellation() -> None:
        try:
            await done.wait()
        except trio.Cancelled:
            with trio.CancelScope(shield=True):
                if not done.is_set():
                    await trio.to_thread.run_sync(conn.cancel_safe)
            raise

    # Unwrapped so callers can `except psycopg.Error`: the nursery would wrap fn's error.
    with unwrap_single_group():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_on_cancellation)
            try:
                result.append(await trio.to_thread.run_sync(fn))
            finally:
                done.set()
    return result[0]


async def connect(dsn: str, *, autocommit: bool = False) -> psycopg.Connection[Any]:
    """Open a sync connection in a worker thread (connecting blocks on the network)."""

    def _connect() -> psycopg.Connection[Any]:
        return psycopg.connect(dsn, autocommit=autocommit)

    return await trio.to_thread.run_sync(_connect)


async def close(conn: psycopg.Connection[Any]) -> None:
    with trio.CancelScope(shield=True):
        await trio.to_thread.run_sync(conn.close)
