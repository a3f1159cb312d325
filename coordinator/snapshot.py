"""What ``lockstep status`` shows, read from the durable state alone (from any machine).

Why a read model of its own: status must work with no coordinator running, from a laptop
that only reaches the database, and must never write (a read command that changes what it
reports on cannot be trusted). Everything here is one read-only pass over `lockstep.*` and
`pg_locks`; nothing is asked of a coordinator process.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

import psycopg

from coordinator.history import HISTORY_ROWS_SQL, HistoryRow
from coordinator.leader import LEADER_LOCK_ROWS
from coordinator.pg import thread as pgthread


@dataclasses.dataclass(frozen=True)
class LeaderInfo:
    """The last leader recorded, and whether a coordinator holds the leader lock right now
    (`alive`: whoever holds it is the leader, even one older than the recorded holder)."""

    holder: str | None
    epoch: int
    since: datetime.datetime | None
    alive: bool
    #: The leader runs submitted migrations (``lockstep serve``), not only its own files.
    takes_queue: bool = False


@dataclasses.dataclass(frozen=True)
class InFlight:
    """The migration running now, from its checkpoint and live progress."""

    name: str
    state: str
    since: datetime.datetime | None
    executed: bool
    contracted: bool
    cohort: tuple[str, ...]
    acked: tuple[str, ...]
    pending: tuple[str, ...]
    lock_retries: int
    backfills: dict[str, dict[str, int]]
    message: str
    abort_requested: str | None
    updated_at: datetime.datetime | None
    #: Disconnected agents whose lease may still be valid, and agents whose lease expired
    #: during the run (fenced, out of their cohort): see docs/leases.md.
    departing: tuple[str, ...] = ()
    departed: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Snapshot:
    leader: LeaderInfo | None
    queue: tuple[str, ...]
    in_flight: tuple[InFlight, ...]
    history: tuple[HistoryRow, ...]

    @property
    def waiting_for_a_coordinator(self) -> bool:
        """Runs are in flight or queued but no leader is alive to move them."""
        alive = self.leader is not None and self.leader.alive
        return not alive and bool(self.in_flight or self.queue)


def _in_flight(row: tuple[Any, ...]) -> InFlight:
    name, checkpoint, progress, abort, updated_at = row
    checkpoint = checkpoint or {}
    progress = progress or {}
    history = checkpoint.get("history") or []
    since = (
        datetime.datetime.fromtimestamp(float(history[-1][1]), tz=datetime.UTC) if history else None
    )
    cohort = tuple(sorted(checkpoint.get("cohort") or ()))
    acked = tuple(sorted(checkpoint.get("acked") or ()))
    departed = tuple(sorted(checkpoint.get("departed") or ()))
    return InFlight(
        name=str(name),
        state=str(checkpoint.get("state", "pending")),
        since=since,
        executed=bool(checkpoint.get("executed")),
        contracted=bool(checkpoint.get("contracted")),
        cohort=cohort,
        acked=acked,
        pending=tuple(a for a in cohort if a not in acked and a not in departed),
        departing=tuple(sorted(checkpoint.get("departing") or ())),
        departed=departed,
        lock_retries=int(progress.get("lock_retries", 0)),
        backfills=dict(progress.get("backfills") or {}),
        message=str(progress.get("message") or ""),
        abort_requested=abort,
        updated_at=updated_at,
    )


async def read_snapshot(dsn: str, limit: int = 50) -> Snapshot:
    """Everything status shows; an empty snapshot if lockstep never ran on the database."""
    conn = await pgthread.connect(dsn, autocommit=True)
    try:

        def work() -> Snapshot:
            try:
                # One snapshot of all of it: a repeatable-read, read-only transaction.
                conn.autocommit = False
                conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
                conn.read_only = True
                with conn.transaction():
                    return _read(conn, limit)
            except psycopg.errors.UndefinedTable:
                return Snapshot(None, (), (), ())

        return await pgthread.run_in_thread(conn, work)
    finally:
        await pgthread.close(conn)


def _read(conn: psycopg.Connection[Any], limit: int) -> Snapshot:
    leader_row = conn.execute(
        f"SELECT holder, epoch, since, takes_queue, EXISTS ({LEADER_LOCK_ROWS}) "
        "FROM lockstep.leader WHERE id = 1".encode()
    ).fetchone()
    leader = None
    if leader_row is not None and (leader_row[1] or leader_row[4]):
        holder, epoch, since, takes_queue, alive = leader_row
        leader = LeaderInfo(holder, int(epoch), since, bool(alive), bool(takes_queue))
    queue = tuple(
        str(name)
        for (name,) in conn.execute(
            "SELECT name FROM lockstep.migrations WHERE status = 'queued' ORDER BY submitted_at, id"
        ).fetchall()
    )
    running = tuple(
        _in_flight(row)
        for row in conn.execute(
            "SELECT name, checkpoint, progress, abort_requested, updated_at "
            "FROM lockstep.migrations WHERE status = 'running' ORDER BY started_at"
        ).fetchall()
    )
    rows = tuple(HistoryRow(*row) for row in conn.execute(HISTORY_ROWS_SQL, (limit,)).fetchall())
    return Snapshot(leader, queue, running, rows)


__all__ = ["InFlight", "LeaderInfo", "Snapshot", "read_snapshot"]
