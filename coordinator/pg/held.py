"""One connection held for a coordinator's bookkeeping, reused and replaced when it dies.

Its own module (not `coordinator.pg.thread`) because it needs `coordinator.pg.errors`, which
needs the lock diagnosis, which needs the threads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
import trio

from coordinator.pg.errors import is_connection_failure
from coordinator.pg.thread import connect, run_in_thread

T = TypeVar("T")
_IDLE = psycopg.pq.TransactionStatus.IDLE


class HeldConnection:
    """One autocommit connection kept open and reused for the coordinator's bookkeeping.

    Why: history and checkpoint writes are a handful of one-row statements per migration,
    and a fresh connection costs more than the statement (about 2 ms of backend start-up
    on a local server, more over a network). Statements are serialized (one at a time; a
    psycopg connection runs one query at a time anyway). When the held connection turns out
    dead (terminated by an operator, a restart, a failover while it idled), it is dropped
    and the statement runs once more on a fresh connection; a second failure propagates
    unchanged, so callers see and retry a database outage exactly as with a connection per
    statement (`coordinator.pg.errors.is_connection_failure`). Any other interruption (a
    cancellation, an error that is not the session's) also drops the connection rather
    than reuse a session in an unknown state.
    """

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = trio.Lock()
        #: Fresh connections opened so far (the benchmark and tests read it).
        self.opened = 0

    async def query(
        self, sql: str, params: tuple[object, ...] | dict[str, object] = ()
    ) -> tuple[list[tuple[Any, ...]], int]:
        """`query`, on the held connection: the statement's rows (if any) and rowcount."""

        def work(conn: psycopg.Connection[Any]) -> tuple[list[tuple[Any, ...]], int]:
            cur = conn.execute(sql.encode(), params)
            return (list(cur.fetchall()) if cur.description else []), cur.rowcount

        return await self.run(work)

    async def run(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Run `fn(conn)` in a worker thread on the held connection (see the class)."""
        async with self._lock:
            reused = self._conn is not None and not self._conn.closed
            try:
                return await self._run_once(fn)
            except psycopg.OperationalError as exc:
                if not reused or not is_connection_failure(exc):
                    raise
            # The connection died while it was held (idle): that says nothing about the
            # database now, so try once on a fresh one.
            return await self._run_once(fn)

    async def _run_once(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        conn = self._conn
        if conn is None or conn.closed:
            conn = self._conn = None
            conn = await connect(self.dsn, autocommit=True)
            self.opened += 1
            self._conn = conn
        try:
            return await run_in_thread(conn, lambda: fn(conn))
        except psycopg.Error as exc:
            if is_connection_failure(exc) or conn.info.transaction_status is not _IDLE:
                await self._drop()
            raise
        except BaseException:
            await self._drop()
            raise

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                await trio.to_thread.run_sync(conn.close, abandon_on_cancel=True)

    async def aclose(self) -> None:
        """Close the held connection (a later statement opens a new one)."""
        async with self._lock:
            await self._drop()


__all__ = ["HeldConnection"]
