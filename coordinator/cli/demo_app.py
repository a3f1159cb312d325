"""The toy application every `lockstep demo` agent runs: it keeps reading and writing `users`.

The point of the demo is that no query fails while the schema changes under live traffic, so
the app behaves like real code should: each query runs inside its agent's per-request lease
(`with agent.using(MIGRATION_NAME) as new:`), which picks the query set and holds that choice
until the query is done, so the fleet's switch never lands between choosing a query and sending
it. A query that fails is counted, never allowed to crash the loop. The counts are the demo's
evidence.

The queries are blocking psycopg calls in trio worker threads (`coordinator.pg.thread`), one
connection per app, autocommit, so a failed statement never leaves an aborted transaction
behind to fail the next one too.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import psycopg
import trio

from coordinator.pg import thread as pgthread

__all__ = [
    "MIGRATION_NAME",
    "NEW_QUERIES",
    "OLD_QUERIES",
    "AppStats",
    "QuerySet",
    "run_app",
]

#: The migration that introduces the columns the new query set uses.
MIGRATION_NAME = "add_user_email"

#: How many distinct error messages an app remembers (the count keeps going).
_MAX_ERRORS_KEPT = 5


@dataclasses.dataclass(frozen=True)
class QuerySet:
    """One version of the application's SQL."""

    name: str
    write: str
    read: str
    uses_email: bool


#: What the app runs before it switched: only the columns that exist before the migration.
OLD_QUERIES = QuerySet(
    name="old",
    write="INSERT INTO users (name, created_at) VALUES (%s, now())",
    read="SELECT id, name, created_at FROM users ORDER BY id DESC LIMIT 10",
    uses_email=False,
)

#: What the app runs once `add_user_email` is applied: it writes and reads the new columns.
NEW_QUERIES = QuerySet(
    name="new",
    write=(
        "INSERT INTO users (name, created_at, email, email_verified) VALUES (%s, now(), %s, %s)"
    ),
    read=(
        "SELECT id, name, created_at, email, email_verified FROM users ORDER BY id DESC LIMIT 10"
    ),
    uses_email=True,
)


@dataclasses.dataclass
class AppStats:
    """Query counts of one app; mutated only by its own `run_app` task."""

    agent_id: str
    reads: int = 0
    writes: int = 0
    failed: int = 0
    old_queries: int = 0  # successful queries of the old set
    new_queries: int = 0  # successful queries of the new set
    query_set: str = OLD_QUERIES.name  # the set the last query used
    errors: list[str] = dataclasses.field(default_factory=list)

    @property
    def total(self) -> int:
        return self.reads + self.writes + self.failed

    def record_error(self, error: str) -> None:
        self.failed += 1
        if error not in self.errors and len(self.errors) < _MAX_ERRORS_KEPT:
            self.errors.append(error)


def _error_text(exc: BaseException) -> str:
    first_line = str(exc).strip().splitlines()[:1]
    return f"{type(exc).__name__}: {first_line[0]}" if first_line else type(exc).__name__


async def run_app(
    dsn: str,
    stats: AppStats,
    *,
    schema_lease: Callable[[], AbstractContextManager[bool]],
    stop: trio.Event,
    pause: tuple[float, float] = (0.02, 0.05),
    rng: random.Random | None = None,
) -> None:
    """Write one row and read the newest rows, then pause, until `stop` is set.

    Every query runs inside `schema_lease()` (in the demo: `agent.using(MIGRATION_NAME)`),
    which says whether to use the new query set and holds that choice until the query is done:
    the agent acks APPLY only once no query on the old set is running. Failed queries
    and failed connection attempts are counted in `stats.failed`; the loop goes on.
    """
    rng = rng or random.Random()
    conn: psycopg.Connection[Any] | None = None
    n = 0
    try:
        while not stop.is_set():
            if conn is None or conn.closed:
                try:
                    conn = await pgthread.connect(dsn, autocommit=True)
                except psycopg.Error as exc:
                    stats.record_error(_error_text(exc))
                    conn = None
            if conn is not None:
                n += 1
                await _query(conn, stats, schema_lease, write=True, n=n, rng=rng)
                await _query(conn, stats, schema_lease, write=False, n=n, rng=rng)
            with trio.move_on_after(rng.uniform(*pause)):
                await stop.wait()
    finally:
        if conn is not None:
            await pgthread.close(conn)


async def _query(
    conn: psycopg.Connection[Any],
    stats: AppStats,
    schema_lease: Callable[[], AbstractContextManager[bool]],
    *,
    write: bool,
    n: int,
    rng: random.Random,
) -> None:
    with schema_lease() as new:
        await _run_query(
            conn, stats, NEW_QUERIES if new else OLD_QUERIES, write=write, n=n, rng=rng
        )


async def _run_query(
    conn: psycopg.Connection[Any],
    stats: AppStats,
    queries: QuerySet,
    *,
    write: bool,
    n: int,
    rng: random.Random,
) -> None:
    stats.query_set = queries.name
    name = f"{stats.agent_id}-user-{n}"
    if write:
        sql = queries.write
        params: tuple[object, ...] = (name,)
        if queries.uses_email:
            params = (name, f"{name}@example.com", rng.random() < 0.5)
    else:
        sql, params = queries.read, ()

    def execute() -> int:
        cursor = conn.execute(sql.encode(), params)
        return len(cursor.fetchall()) if cursor.description else cursor.rowcount

    try:
        await pgthread.run_in_thread(conn, execute)
    except psycopg.Error as exc:
        stats.record_error(_error_text(exc))
        return
    if write:
        stats.writes += 1
    else:
        stats.reads += 1
    if queries.uses_email:
        stats.new_queries += 1
    else:
        stats.old_queries += 1
