"""The migration history table and the one-migration-per-database lock.

Like Flyway's schema history, every migration lockstep runs leaves a row in
`lockstep.migrations` (status, phases, reason, checksum of its SQL). The coordinator reads the
completed names at start-up to tell joining agents which query set to use, and refuses to run a
name twice. A session advisory lock, held on its own connection for the whole migration, makes
a second coordinator on the same database wait its turn (invariant 5 in docs/design.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any, Protocol

import trio

from coordinator.pg import thread as pgthread
from statemachine.migration import Migration
from statemachine.phases import MigrationStatus
from statemachine.result import MigrationResult

#: Key of the advisory lock (the bytes "lockstep" read as a signed 64-bit integer).
ADVISORY_LOCK_KEY = int.from_bytes(b"lockstep", "big", signed=True)

SCHEMA_SQL = """
CREATE SCHEMA IF NOT EXISTS lockstep;
CREATE TABLE IF NOT EXISTS lockstep.migrations (
    id           text PRIMARY KEY,
    name         text NOT NULL,
    checksum     text NOT NULL,
    status       text NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    phases       jsonb NOT NULL DEFAULT '[]',
    reason       text,
    schema_restored boolean
);
CREATE UNIQUE INDEX IF NOT EXISTS migrations_completed_name
    ON lockstep.migrations (name) WHERE status = 'completed';
"""


def checksum(migration: Migration) -> str:
    """Identifies the SQL of a migration, so a changed file under an old name is caught."""
    body = json.dumps(
        [migration.sql, migration.contract_sql, migration.rollback_sql], sort_keys=True
    )
    return hashlib.sha256(body.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class AppliedMigration:
    name: str
    checksum: str


@dataclasses.dataclass(frozen=True)
class HistoryRow:
    name: str
    status: str
    started_at: datetime.datetime
    finished_at: datetime.datetime | None
    reason: str | None
    schema_restored: bool | None


class History(Protocol):
    async def applied(self) -> list[AppliedMigration]: ...

    async def record_start(self, migration: Migration) -> None: ...

    async def record_finish(self, migration: Migration, result: MigrationResult) -> None: ...

    def migration_lock(self) -> contextlib.AbstractAsyncContextManager[None]: ...


class InMemoryHistory:
    """History for tests and embedding without a database of record."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[Migration, MigrationResult | None]] = {}
        self._lock = trio.Lock()

    async def applied(self) -> list[AppliedMigration]:
        return [
            AppliedMigration(m.name, checksum(m))
            for m, r in self.rows.values()
            if r is not None and r.status is MigrationStatus.COMPLETED
        ]

    async def record_start(self, migration: Migration) -> None:
        self.rows[migration.id] = (migration, None)

    async def record_finish(self, migration: Migration, result: MigrationResult) -> None:
        self.rows[migration.id] = (migration, result)

    @contextlib.asynccontextmanager
    async def migration_lock(self) -> AsyncIterator[None]:
        async with self._lock:
            yield


class PostgresHistory:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    async def _run(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        conn = await pgthread.connect(self.dsn, autocommit=True)
        try:

            def work() -> list[tuple[Any, ...]]:
                cur = conn.execute(sql.encode(), params)
                return list(cur.fetchall()) if cur.description else []

            return await pgthread.run_in_thread(conn, work)
        finally:
            await pgthread.close(conn)

    async def ensure_schema(self) -> None:
        await self._run(SCHEMA_SQL)

    async def applied(self) -> list[AppliedMigration]:
        rows = await self._run(
            "SELECT name, checksum FROM lockstep.migrations WHERE status = 'completed' "
            "ORDER BY finished_at, name"
        )
        return [AppliedMigration(str(name), str(cs)) for name, cs in rows]

    async def record_start(self, migration: Migration) -> None:
        await self._run(
            "INSERT INTO lockstep.migrations (id, name, checksum, status) "
            "VALUES (%s, %s, %s, 'running')",
            (migration.id, migration.name, checksum(migration)),
        )

    async def record_finish(self, migration: Migration, result: MigrationResult) -> None:
        phases = [
            {"phase": p.phase.name, "started_at": p.started_at, "ended_at": p.ended_at}
            for p in result.phases
        ]
        await self._run(
            "UPDATE lockstep.migrations SET status = %s, finished_at = now(), phases = %s, "
            "reason = %s, schema_restored = %s WHERE id = %s",
            (
                result.status.value,
                json.dumps(phases),
                result.reason,
                result.schema_restored,
                migration.id,
            ),
        )

    async def mark_interrupted(self) -> list[str]:
        """Mark rows left 'running' by a coordinator that died as 'interrupted'.

        Only when nobody holds the migration lock: a live coordinator elsewhere holds it for
        its whole run, so its row must not be touched. Returns the names marked.
        """
        rows = await self._run(
            "WITH free AS (SELECT pg_try_advisory_xact_lock(%s) AS ok) "
            "UPDATE lockstep.migrations SET status = 'interrupted', finished_at = now(), "
            "reason = 'the coordinator stopped before the migration finished: check the "
            "schema, its rollback did not run' "
            "WHERE status = 'running' AND (SELECT ok FROM free) RETURNING name",
            (ADVISORY_LOCK_KEY,),
        )
        return [str(name) for (name,) in rows]

    async def rows(self, limit: int = 50) -> list[HistoryRow]:
        """The most recent migrations, newest first."""
        found = await self._run(
            "SELECT name, status, started_at, finished_at, reason, schema_restored "
            "FROM lockstep.migrations ORDER BY started_at DESC LIMIT %s",
            (limit,),
        )
        return [HistoryRow(*row) for row in found]

    @contextlib.asynccontextmanager
    async def migration_lock(self) -> AsyncIterator[None]:
        """Hold the database-wide advisory lock on a dedicated connection."""
        conn = await pgthread.connect(self.dsn, autocommit=True)
        try:
            await pgthread.run_in_thread(
                conn, lambda: conn.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
            )
            yield
        finally:
            # Closing the session releases the lock even if unlocking is never reached.
            await pgthread.close(conn)


__all__ = [
    "ADVISORY_LOCK_KEY",
    "AppliedMigration",
    "History",
    "HistoryRow",
    "InMemoryHistory",
    "PostgresHistory",
    "checksum",
]
