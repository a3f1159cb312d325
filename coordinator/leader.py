"""Leader election on PostgreSQL: one coordinator acts on a database at a time, and knows it.

Why not consensus code of our own: the database the migrations change is already the one
thing every coordinator must reach, so it is the arbiter. The leader is whoever holds the
session advisory lock `ADVISORY_LOCK_KEY` on a dedicated connection; taking it increments the
epoch in `lockstep.leader`, and every durable write of run state is conditional on that epoch
(`coordinator.history`), so a deposed leader can change nothing even before it notices.

A lock taken once and never looked at again is not leadership: an operator's
`pg_terminate_backend`, `idle_session_timeout`, a server restart or a network partition ends
the session and frees the lock for a successor while the holder still thinks it leads. So
`open_leadership` probes its lock session every `probe_interval` seconds (is the session
alive, does it still hold the lock, is the epoch still ours?) and gives the probe
`probe_timeout` seconds to answer, timed from the query sent to its answer: a leader too busy
to look at an answer at once is not deposed by its own load. The first probe that fails ends
the leadership: the body of the ``async with`` is cancelled and `LeadershipLost` raised. A
leader thus stops acting within `probe_interval + probe_timeout` seconds of losing its
session (4 s by default; later only if its event loop is as late in everything it does), and
the epoch fence covers that window.

A standby polls `pg_try_advisory_lock` every `poll_interval` seconds; PostgreSQL frees the
lock as soon as it sees the holder's session end, so a dead leader is replaced within about
`poll_interval` of its connection closing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import trio

from coordinator.pg import thread as pgthread
from coordinator.pg.errors import pg_message
from statemachine.exceptions import LockstepError, unwrap_single_group

log = logging.getLogger("lockstep.coordinator")

#: Key of the advisory lock (the bytes "lockstep" read as a signed 64-bit integer).
ADVISORY_LOCK_KEY = int.from_bytes(b"lockstep", "big", signed=True)

#: The granted leader lock of the current database, as rows of pg_locks (classid/objid are
#: the key's two halves; the key is our own integer constant, so formatting it in is safe).
#: Every "is there a leader?" question is this one: the probe, `lock_is_free`, status.
LEADER_LOCK_ROWS = (
    "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted "
    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    f"AND ((classid::bigint << 32) | objid::bigint) = {ADVISORY_LOCK_KEY}"
)

#: Does this session still hold the leader lock, and what is the epoch now?
_HOLDS_LOCK = (
    f"SELECT EXISTS ({LEADER_LOCK_ROWS} AND pid = pg_backend_pid()), "
    "(SELECT epoch FROM lockstep.leader WHERE id = 1)"
)


class Deposed(LockstepError):
    """Raised when a write of a run's state finds another coordinator took the lock since
    (the epoch moved on): this coordinator must stop acting on the migration at once."""


class LeadershipLost(Deposed):
    """Raised by `open_leadership` when the lock session failed a probe (terminated, timed
    out, the lock or the epoch gone): the body was cancelled, a successor may already lead."""


def default_holder(detail: str = "") -> str:
    """How `lockstep status` names a leader: process, host and what it serves."""
    text = f"pid {os.getpid()} on {socket.gethostname()}"
    return f"{text}, {detail}" if detail else text


@dataclasses.dataclass
class Leadership:
    """This process's leadership of one database, as long as `lost_reason` is None."""

    epoch: int
    holder: str
    lost_reason: str | None = None

    def is_leader(self) -> bool:
        return self.lost_reason is None


async def _try_take(conn: psycopg.Connection[Any], holder: str, takes_queue: bool) -> int | None:
    """Take the lock and a new epoch if the lock is free; None if another session holds it."""

    def work() -> int | None:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (ADVISORY_LOCK_KEY,)).fetchone()
        if row is None or not row[0]:
            return None
        taken = conn.execute(
            "UPDATE lockstep.leader SET epoch = epoch + 1, holder = %s, since = now(), "
            "backend_pid = pg_backend_pid(), takes_queue = %s WHERE id = 1 RETURNING epoch",
            (holder, takes_queue),
        ).fetchone()
        assert taken is not None
        return int(taken[0])

    return await pgthread.run_in_thread(conn, work)


@dataclasses.dataclass
class _ProbeCall:
    """One probe as its worker thread saw it (`time.monotonic`): written by the thread, read
    by the probe even after it stopped waiting, so a late look still sees a timely answer."""

    asked: float | None = None
    answered: float | None = None
    holds: bool = False
    epoch: int = 0
    error: psycopg.Error | None = None

    def waited(self, now: float) -> float:
        """How long the session has had to answer by `now` (0 before it was asked)."""
        if self.asked is None:
            return 0.0
        return (now if self.answered is None else self.answered) - self.asked


async def _probe(
    conn: psycopg.Connection[Any], epoch: int, timeout: float, limiter: trio.CapacityLimiter
) -> str | None:
    """None while the leadership holds; otherwise why it does not.

    The timeout is the database's, timed in the worker thread from the query sent to its
    answer, not trio's from the probe's start. A leader busy accepting thousands of agents
    runs batches of tasks that last seconds: its thread started late, or answered at once
    and waited a batch to be looked at, while trio's deadline fired first, so a healthy
    leader deposed itself and dropped its whole fleet (seen at 10,000 agents: "did not
    answer a probe within 3 s"). A busy loop slows this leader's reaction to a lost session
    exactly as it slows everything the leader does; a session that does not answer within
    `timeout` of being asked still ends the leadership. `limiter` is the probe's own thread
    token, so the database work of migrations can never keep a probe from being asked.
    """
    call = _ProbeCall()

    def work() -> None:
        call.asked = time.monotonic()
        try:
            row = conn.execute(_HOLDS_LOCK.encode()).fetchone()
        except psycopg.Error as exc:
            call.error = exc
            return
        assert row is not None
        call.holds, call.epoch = bool(row[0]), int(row[1])
        call.answered = time.monotonic()

    async with trio.open_nursery() as nursery:

        async def ask() -> None:
            # Abandoned, not cancelled, past the timeout: a partitioned connection may
            # never answer, and asking the server to cancel would hang the same way.
            await trio.to_thread.run_sync(work, abandon_on_cancel=True, limiter=limiter)
            nursery.cancel_scope.cancel()  # answered: stop waiting

        nursery.start_soon(ask)
        while (waited := call.waited(time.monotonic())) <= timeout:
            # Until the thread has waited `timeout` since it asked (or, not started yet,
            # a tenth of it before looking again).
            await trio.sleep(timeout - waited if call.asked is not None else timeout / 10)
        nursery.cancel_scope.cancel()
    if call.error is not None:
        return f"the lock session failed: {pg_message(call.error)}"
    if call.answered is None or call.waited(call.answered) > timeout:
        return f"the lock session did not answer a probe within {timeout:g} s"
    if not call.holds:
        return "the lock session no longer holds the leader lock"
    if call.epoch != epoch:
        return f"another coordinator took over (epoch {call.epoch}, ours {epoch})"
    return None


async def _connect_lock_session(dsn: str) -> psycopg.Connection[Any]:
    conn = await pgthread.connect(dsn, autocommit=True)

    def settle() -> None:
        # The lock session is idle by design: a server-wide idle_session_timeout must not end
        # it (PostgreSQL 14+; older servers have no such setting and no such risk).
        with contextlib.suppress(psycopg.errors.UndefinedObject):
            conn.execute("SET idle_session_timeout = 0")

    await pgthread.run_in_thread(conn, settle)
    return conn


class LockSession:
    """The leader lock's session, kept open between leaderships (`open_leadership(session=)`).

    Why: a coordinator that runs migrations one after the other takes the lock once per
    migration; opening a session each time costs a backend start-up and a round trip more
    than unlocking and keeping it. Released, the lock is given back with
    ``pg_advisory_unlock_all()`` (a standby can take it at once, as when the session
    closes); a session that failed, or could not be released, is closed instead, and the
    next leadership opens a new one.
    """

    def __init__(self) -> None:
        self.conn: psycopg.Connection[Any] | None = None
        #: Sessions opened so far (the benchmark and tests read it).
        self.opened = 0

    async def connection(self, dsn: str) -> tuple[psycopg.Connection[Any], bool]:
        """The held session, or a new one; and whether it was held (reused)."""
        if self.conn is not None and not self.conn.closed:
            return self.conn, True
        self.conn = await _connect_lock_session(dsn)
        self.opened += 1
        return self.conn, False

    async def release(self) -> None:
        """Give the lock back and keep the session; close it if that fails."""
        conn = self.conn
        if conn is None:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(2.0):
            try:
                await trio.to_thread.run_sync(
                    lambda: conn.execute("SELECT pg_advisory_unlock_all()"),
                    abandon_on_cancel=True,
                )
                return
            except psycopg.Error as exc:
                log.info("closing the leader lock session: %s", pg_message(exc))
        await self.discard()

    async def discard(self) -> None:
        """Close the held session (the lock goes with it)."""
        conn, self.conn = self.conn, None
        if conn is not None:
            await _discard(conn)


async def _discard(conn: psycopg.Connection[Any]) -> None:
    """Close the lock session without waiting on a connection that may never answer."""
    with trio.CancelScope(shield=True), trio.move_on_after(2.0):
        await trio.to_thread.run_sync(conn.close, abandon_on_cancel=True)


async def _watch(
    conn: psycopg.Connection[Any],
    leadership: Leadership,
    interval: float,
    timeout: float,
    scope: trio.CancelScope,
) -> None:
    """Probe until a probe fails, then record why and cancel the leader's work (`scope`)."""
    limiter = trio.CapacityLimiter(1)
    while True:
        await trio.sleep(interval)
        reason = await _probe(conn, leadership.epoch, timeout, limiter)
        if reason is not None:
            leadership.lost_reason = reason
            log.error("lost the leadership (epoch %d): %s", leadership.epoch, reason)
            scope.cancel()
            return


@contextlib.asynccontextmanager
async def open_leadership(
    dsn: str,
    *,
    holder: str | None = None,
    poll_interval: float = 0.5,
    probe_interval: float = 1.0,
    probe_timeout: float = 3.0,
    takes_queue: bool = False,
    session: LockSession | None = None,
) -> AsyncIterator[Leadership]:
    """Wait to become the leader of the database at `dsn`, then hold it while the body runs.

    Waits (as a standby) while another session holds the lock, polling every
    `poll_interval` s. Inside the body the leadership is probed continually; when a probe
    fails the body is cancelled and `LeadershipLost` raised. Leaving the body releases the
    lock (closing the session), so the next standby takes over. `takes_queue` records that
    this leader runs submitted migrations (``lockstep serve``; ``lockstep apply`` runs only
    its own files), so an apply that finds it leading submits to it instead of waiting.
    With `session`, the lock session is taken from it and, unless the leadership was lost,
    kept open there after the lock is released (`LockSession`).
    """
    holder = holder or default_holder()
    conn: psycopg.Connection[Any] | None = None
    reused = False
    leadership: Leadership | None = None
    delay = poll_interval
    try:
        while True:
            try:
                if conn is None:
                    if session is None:
                        conn = await _connect_lock_session(dsn)
                    else:
                        conn, reused = await session.connection(dsn)
                epoch = await _try_take(conn, holder, takes_queue)
            except psycopg.OperationalError as exc:
                if reused:
                    # The held session died while idle: that says nothing about the
                    # database now; try a new session at once.
                    assert session is not None
                    await session.discard()
                    conn, reused = None, False
                    continue
                # The database is a dependency that fails: wait for it, as a standby would.
                log.warning(
                    "cannot reach the database to take the leader lock (%s); retrying in %.1f s",
                    pg_message(exc),
                    delay,
                )
                if conn is not None:
                    await _discard(conn)
                    conn = None
                    if session is not None:
                        session.conn = None
                await trio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if epoch is not None:
                break
            delay = poll_interval
            await trio.sleep(poll_interval)
        assert conn is not None
        leadership = Leadership(epoch, holder)
        log.info("leader of the database with epoch %d (%s)", epoch, holder)
        with unwrap_single_group():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    _watch, conn, leadership, probe_interval, probe_timeout, nursery.cancel_scope
                )
                try:
                    yield leadership
                finally:
                    nursery.cancel_scope.cancel()
        if leadership.lost_reason is not None:
            raise LeadershipLost(f"no longer the leader: {leadership.lost_reason}")
    finally:
        if session is not None and leadership is not None and leadership.is_leader():
            await session.release()
        elif session is not None:
            await session.discard()
        elif conn is not None:
            await _discard(conn)


__all__ = [
    "ADVISORY_LOCK_KEY",
    "LEADER_LOCK_ROWS",
    "Deposed",
    "Leadership",
    "LeadershipLost",
    "LockSession",
    "default_holder",
    "open_leadership",
]
