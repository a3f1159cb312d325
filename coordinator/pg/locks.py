"""Who is blocking our DDL: the sessions named when a lock wait is given up.

A statement that times out on its lock (SQLSTATE 55P03) is retried; when the retry budget is
spent the operator needs to know *which session* to look at. PostgreSQL only tells that while
the statement waits (`pg_blocking_pids(pid)` of the waiting backend is empty once the wait was
cancelled), so `BlockerWatch` polls it from a second connection during each attempt. If the
lock was given up before the first poll (a very short `lock_timeout`, a busy machine), the
fallback `lock_holders` lists the sessions holding locks on the relations the statements name:
less precise (they may hold a compatible lock) but never empty-handed while the blocker is
still there.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import psycopg
import trio
from pglast.parser import ParseError
from pglast.visitors import referenced_relations

from coordinator.pg import thread as pgthread

log = logging.getLogger("lockstep.coordinator")

#: SQLSTATE of "canceling statement due to lock timeout".
LOCK_NOT_AVAILABLE = "55P03"

_QUERY_CHARS = 200

_BLOCKERS_SQL = """
SELECT a.pid, a.state, a.query, a.application_name,
       EXTRACT(EPOCH FROM now() - coalesce(a.xact_start, a.query_start, a.backend_start))
FROM unnest(pg_blocking_pids(%s)) AS b(pid)
JOIN pg_stat_activity AS a ON a.pid = b.pid
ORDER BY a.pid
"""

_HOLDERS_SQL = """
SELECT DISTINCT a.pid, a.state, a.query, a.application_name,
       EXTRACT(EPOCH FROM now() - coalesce(a.xact_start, a.query_start, a.backend_start))
FROM pg_locks AS l
JOIN pg_stat_activity AS a ON a.pid = l.pid
WHERE l.granted
  AND l.locktype = 'relation'
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.relation IN (SELECT to_regclass(r) FROM unnest(%s::text[]) AS r)
  AND l.pid <> ALL(%s::int[])
ORDER BY a.pid
"""


@dataclasses.dataclass(frozen=True)
class BlockingSession:
    """A session that held a lock our statement waited for (from `pg_stat_activity`).

    `age` is how long its current transaction has been open (its query's age when it is not in
    a transaction): the lock it holds may have been taken by any statement of that transaction,
    so `query` is only its *latest* statement.
    """

    pid: int
    state: str | None
    query: str | None
    age: float | None
    application_name: str | None = None

    def describe(self) -> str:
        parts = [self.state or "unknown state"]
        if self.age is not None:
            parts.append(f"transaction open {self.age:.1f} s")
        if self.application_name:
            parts.append(f"application {self.application_name!r}")
        query = " ".join((self.query or "").split())
        if len(query) > _QUERY_CHARS:
            query = query[: _QUERY_CHARS - 3] + "..."
        return f"pid {self.pid} ({', '.join(parts)}): last query {query!r}"


def describe_blockers(sessions: Sequence[BlockingSession]) -> str:
    if not sessions:
        return "the blocking session could not be identified (it was gone when we looked)"
    return "; ".join(s.describe() for s in sessions)


def _rows_to_sessions(rows: Iterable[tuple[Any, ...]]) -> list[BlockingSession]:
    out = []
    for pid, state, query, app, age in rows:
        out.append(
            BlockingSession(
                pid=int(pid),
                state=state,
                query=query,
                age=None if age is None else float(age),
                application_name=app or None,
            )
        )
    return out


def fetch_blockers(conn: psycopg.Connection[Any], pid: int) -> list[BlockingSession]:
    """Sessions `pid` is waiting for right now (blocking; run it in a worker thread)."""
    return _rows_to_sessions(conn.execute(_BLOCKERS_SQL, (pid,)).fetchall())


def relations_in(statements: Iterable[str]) -> list[str]:
    """Relations the statements name, quoted as `to_regclass` expects (best effort)."""
    names: set[str] = set()
    for statement in statements:
        try:
            names |= referenced_relations(statement)
        except ParseError:
            continue
    return sorted(names)


def fetch_lock_holders(
    conn: psycopg.Connection[Any], relations: Sequence[str], exclude_pids: Sequence[int]
) -> list[BlockingSession]:
    """Sessions holding any granted lock on `relations` (blocking; run it in a worker thread)."""
    if not relations:
        return []
    rows = conn.execute(_HOLDERS_SQL, (list(relations), list(exclude_pids))).fetchall()
    return _rows_to_sessions(rows)


class BlockerWatch:
    """Polls `pg_blocking_pids(pid)` while one attempt runs; remembers everyone it saw.

    Run `watch` in a nursery next to the attempt and cancel it when the attempt ends. It waits
    `first_poll` before connecting, so statements that are not blocked cost no extra connection.
    """

    def __init__(
        self, dsn: str, pid: int, *, first_poll: float = 0.05, interval: float = 0.1
    ) -> None:
        self.dsn = dsn
        self.pid = pid
        self.first_poll = first_poll
        self.interval = interval
        self._seen: dict[int, BlockingSession] = {}

    @property
    def seen(self) -> list[BlockingSession]:
        return [self._seen[pid] for pid in sorted(self._seen)]

    async def watch(self) -> None:
        await trio.sleep(self.first_poll)
        try:
            conn = await pgthread.connect(self.dsn, autocommit=True)
        except psycopg.Error as exc:  # diagnosis is best effort: never fail the attempt
            log.warning("cannot watch for blocking sessions: %s", exc)
            return
        try:
            while True:
                try:
                    # Not pgthread.run_in_thread: this query takes milliseconds, so when the
                    # attempt ends we let it finish rather than cancel it on the server.
                    found = await trio.to_thread.run_sync(fetch_blockers, conn, self.pid)
                except psycopg.Error as exc:
                    log.warning("cannot read pg_blocking_pids: %s", exc)
                    return
                for session in found:
                    self._seen[session.pid] = session
                await trio.sleep(self.interval)
        finally:
            await pgthread.close(conn)


async def lock_holders(
    dsn: str, statements: Sequence[str], exclude_pids: Sequence[int]
) -> list[BlockingSession]:
    """Fallback diagnosis: who holds locks on the relations `statements` name."""
    relations = relations_in(statements)
    if not relations:
        return []
    try:
        conn = await pgthread.connect(dsn, autocommit=True)
    except psycopg.Error as exc:
        log.warning("cannot look up lock holders: %s", exc)
        return []
    try:
        return await pgthread.run_in_thread(
            conn, lambda: fetch_lock_holders(conn, relations, exclude_pids)
        )
    except psycopg.Error as exc:
        log.warning("cannot look up lock holders: %s", exc)
        return []
    finally:
        await pgthread.close(conn)


__all__ = [
    "LOCK_NOT_AVAILABLE",
    "BlockerWatch",
    "BlockingSession",
    "describe_blockers",
    "fetch_blockers",
    "fetch_lock_holders",
    "lock_holders",
    "relations_in",
]
