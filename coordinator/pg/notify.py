"""LISTEN from trio: call `wake` on every notification of a channel, reconnecting on failure.

psycopg's `Connection.notifies` blocks, so it runs in a worker thread with a short timeout
and is abandoned on cancellation (a blocked read has nothing to cancel on the server). A
notification can be lost while the connection is down, which is why every user of this also
polls slowly: LISTEN makes the common case immediate, the poll makes the rare one correct.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import psycopg
import trio

from coordinator.pg import thread as pgthread
from coordinator.pg.errors import pg_message

log = logging.getLogger("lockstep.coordinator")


async def listen(
    dsn: str,
    channel: str,
    wake: Callable[[str], None],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Call `wake(payload)` for each NOTIFY on `channel` until cancelled.

    `nursery.start` returns once the first LISTEN is in place (or failed: the task then
    retries in the background, and the caller's poll covers the gap).
    """
    started = False
    delay = 0.5
    while True:
        try:
            conn = await pgthread.connect(dsn, autocommit=True)
        except psycopg.OperationalError as exc:
            log.warning("cannot LISTEN for %s (%s); polling meanwhile", channel, pg_message(exc))
            if not started:
                task_status.started()
                started = True
            await trio.sleep(delay)
            delay = min(delay * 2, 10.0)
            continue
        try:
            await pgthread.run_in_thread(conn, _execute(conn, f"LISTEN {channel}"))
            if not started:
                task_status.started()
                started = True
            delay = 0.5
            receive = _receiver(conn)
            while True:
                for payload in await trio.to_thread.run_sync(receive, abandon_on_cancel=True):
                    wake(payload)
        except psycopg.OperationalError as exc:
            log.warning(
                "LISTEN %s lost its connection (%s); reconnecting", channel, pg_message(exc)
            )
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                await trio.to_thread.run_sync(conn.close, abandon_on_cancel=True)
        await trio.sleep(delay)


def _execute(conn: psycopg.Connection[Any], sql: str) -> Callable[[], object]:
    return lambda: conn.execute(sql.encode())


def _receiver(conn: psycopg.Connection[Any]) -> Callable[[], list[str]]:
    """One blocking wait of at most a second for the next notification's payload."""
    return lambda: [n.payload for n in conn.notifies(timeout=1.0, stop_after=1)]
