"""The durable queue of migrations: submit, abort, and what the leader takes next.

Why in PostgreSQL: a submitted migration must survive every coordinator (the leader may die
between ``lockstep submit`` and its turn), and anyone who reaches the database can submit or
watch, from any machine. A queued migration is a row of `lockstep.migrations` with status
``queued`` that holds the whole spec; the leader starts them oldest first (`next_queued`), and
``NOTIFY lockstep`` wakes it at once (`CHANNEL`; it also polls, in case a notification is
lost with a connection).

Row statuses, as `lockstep status` shows them: ``queued`` (waiting its turn), ``running``,
``completed``, ``failed`` (rolled back, or left expanded: the reason says), ``rejected`` (the
lint gate refused it when its turn came), ``cancelled`` (aborted before it started) and
``interrupted`` (left by a lockstep older than durable runs).

Submitting is idempotent by name: a name already queued or running with the same SQL returns
that row; the same name with different SQL, or a completed name whose SQL changed, is refused
(`SubmitRefused`), as Flyway's validate would.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

import trio

from coordinator.history import EPOCH_FENCE, checksum
from coordinator.pg import thread as pgthread
from statemachine.exceptions import LockstepError
from statemachine.migration import Migration

#: The channel the leader LISTENs on: a submit or an abort request wakes it at once.
CHANNEL = "lockstep"

#: Serializes submitters (a transaction-level advisory lock), so two submits of one name
#: cannot both queue it. Distinct from the leader's key.
_QUEUE_LOCK_KEY = int.from_bytes(b"lsqueue!", "big", signed=True)


class SubmitRefused(LockstepError):
    """Raised by `submit` when a migration cannot be queued: its name is queued, running or
    completed with different SQL. Nothing of that submit was queued."""


class AbortRefused(LockstepError):
    """Raised by `request_abort` when the migration cannot be rolled back: it is not queued
    or running, or its CONTRACT committed (from then on it only goes forward)."""


@dataclasses.dataclass(frozen=True)
class Submission:
    """What `submit` did with one migration: `outcome` is ``queued`` (new row),
    ``already queued``, ``already running`` or ``already completed`` (nothing to do)."""

    id: str
    name: str
    outcome: str


@dataclasses.dataclass(frozen=True)
class AbortRequest:
    """What `request_abort` did: ``cancelled`` (it had not started: it never will) or
    ``requested`` (it is running: the leader rolls it back at its next safe point)."""

    id: str
    name: str
    outcome: str


@dataclasses.dataclass(frozen=True)
class QueuedMigration:
    migration: Migration
    force: bool
    abort_requested: str | None


async def submit(
    dsn: str, migrations: Sequence[Migration], *, force: bool = False
) -> list[Submission]:
    """Queue `migrations` in order (one transaction: all or none) and wake the leader.

    `force` lets a migration with lint errors run (the gate still checks when its turn
    comes, with the live catalog). Raises `SubmitRefused` (module docstring).
    """
    conn = await pgthread.connect(dsn)
    try:

        def work() -> list[Submission]:
            done = []
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_QUEUE_LOCK_KEY,))
                for migration in migrations:
                    done.append(_submit_one(conn, migration, force))
                if any(s.outcome == "queued" for s in done):
                    conn.execute(f"NOTIFY {CHANNEL}, 'queue'")
            return done

        return await pgthread.run_in_thread(conn, work)
    finally:
        await pgthread.close(conn)


def _submit_one(conn: Any, migration: Migration, force: bool) -> Submission:
    mine = checksum(migration)
    rows = conn.execute(
        "SELECT id, status, checksum FROM lockstep.migrations "
        "WHERE name = %s AND status IN ('queued', 'running', 'completed') "
        "ORDER BY status = 'completed'",
        (migration.name,),
    ).fetchall()
    for row_id, status, theirs in rows:
        if theirs != mine:
            raise SubmitRefused(
                f"migration {migration.name!r} is already {status} with different SQL "
                "(its checksum differs): give the new version a new name"
            )
        return Submission(str(row_id), migration.name, f"already {status}")
    conn.execute(
        "INSERT INTO lockstep.migrations (id, name, checksum, status, spec, submitted_at, "
        "started_at, force, updated_at) "
        "VALUES (%s, %s, %s, 'queued', %s, clock_timestamp(), clock_timestamp(), %s, now())",
        (migration.id, migration.name, mine, json.dumps(migration.to_json()), force),
    )
    return Submission(migration.id, migration.name, "queued")


async def next_queued(dsn: str) -> QueuedMigration | None:
    """The oldest queued migration, or None (read-only: the leader starts it itself)."""
    rows, _ = await pgthread.query(
        dsn,
        "SELECT spec, force, abort_requested FROM lockstep.migrations WHERE status = 'queued' "
        "ORDER BY submitted_at, id LIMIT 1",
    )
    if not rows:
        return None
    spec, force, abort = rows[0]
    return QueuedMigration(Migration.from_json(spec), bool(force), abort)


async def request_abort(dsn: str, name: str, reason: str) -> AbortRequest:
    """Ask for the queued or running migration `name` to be rolled back; wakes the leader.

    A queued one is cancelled at once. Raises `AbortRefused` when nothing by that name is
    queued or running, or when its CONTRACT committed.
    """
    conn = await pgthread.connect(dsn)
    try:

        def work() -> AbortRequest:
            with conn.transaction():
                row = conn.execute(
                    "SELECT id, status, checkpoint FROM lockstep.migrations "
                    "WHERE name = %s AND status IN ('queued', 'running') FOR UPDATE",
                    (name,),
                ).fetchone()
                if row is None:
                    raise AbortRefused(f"no migration named {name!r} is queued or running")
                row_id, status, checkpoint = row
                if status == "queued":
                    conn.execute(
                        "UPDATE lockstep.migrations SET status = 'cancelled', "
                        "finished_at = now(), reason = %s, updated_at = now() WHERE id = %s",
                        (f"aborted before it started: {reason}", row_id),
                    )
                    return AbortRequest(str(row_id), name, "cancelled")
                if checkpoint and checkpoint.get("contracted"):
                    raise AbortRefused(
                        f"migration {name!r} cannot be rolled back: its CONTRACT committed, "
                        "so it only goes forward (to CONFIRM and COMPLETED)"
                    )
                conn.execute(
                    "UPDATE lockstep.migrations SET abort_requested = %s, updated_at = now() "
                    "WHERE id = %s",
                    (reason, row_id),
                )
                conn.execute(f"NOTIFY {CHANNEL}, 'abort'")
                return AbortRequest(str(row_id), name, "requested")

        return await pgthread.run_in_thread(conn, work)
    finally:
        await pgthread.close(conn)


async def abort_requested(dsn: str, migration_id: str) -> str | None:
    """The reason of a pending abort request for the run `migration_id`, or None."""
    rows, _ = await pgthread.query(
        dsn, "SELECT abort_requested FROM lockstep.migrations WHERE id = %s", (migration_id,)
    )
    return str(rows[0][0]) if rows and rows[0][0] is not None else None


#: Row statuses after which nothing more happens to a run.
FINAL_STATUSES = frozenset({"completed", "failed", "rejected", "cancelled", "interrupted"})


@dataclasses.dataclass(frozen=True)
class RunState:
    """One submitted run as `watch` sees it: its row status and, while running, its state."""

    id: str
    name: str
    status: str
    state: str | None
    reason: str | None

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES


async def watch(
    dsn: str,
    ids: Sequence[str],
    *,
    on_change: Callable[[RunState], None] | None = None,
    poll_interval: float = 0.5,
) -> list[RunState]:
    """Follow the runs `ids` until each reached a final status; returns their last states.

    `on_change` is called with each change of status or state, in the order seen (the
    Python way to follow a submitted migration live, as ``lockstep submit --wait`` does).
    Read-only; it polls, because a watcher must not depend on a coordinator being up.
    """
    seen: dict[str, RunState] = {}
    while True:
        rows, _ = await pgthread.query(
            dsn,
            "SELECT id, name, status, checkpoint->>'state', reason FROM lockstep.migrations "
            "WHERE id = ANY(%s)",
            (list(ids),),
        )
        for row in rows:
            state = RunState(*(None if v is None else str(v) for v in row))  # type: ignore[arg-type]
            if seen.get(state.id) != state:
                seen[state.id] = state
                if on_change is not None:
                    on_change(state)
        if len(seen) == len(set(ids)) and all(s.final for s in seen.values()):
            return [seen[i] for i in ids]
        await trio.sleep(poll_interval)


async def mark_not_run(dsn: str, migration_id: str, status: str, reason: str, epoch: int) -> None:
    """Close a queued row the leader will not run (``rejected`` or ``cancelled``), fenced by
    the leader's `epoch` like every write of run state."""
    await pgthread.query(
        dsn,
        "UPDATE lockstep.migrations SET status = %(status)s, finished_at = now(), "
        "reason = %(reason)s, updated_at = now() WHERE id = %(id)s AND status = 'queued' "
        f"AND {EPOCH_FENCE}",
        {"status": status, "reason": reason, "id": migration_id, "epoch": epoch},
    )


__all__ = [
    "CHANNEL",
    "FINAL_STATUSES",
    "AbortRefused",
    "AbortRequest",
    "QueuedMigration",
    "RunState",
    "Submission",
    "SubmitRefused",
    "abort_requested",
    "mark_not_run",
    "next_queued",
    "request_abort",
    "submit",
    "watch",
]
