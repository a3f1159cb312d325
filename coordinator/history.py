"""The durable state of migrations in PostgreSQL: history, checkpoints, journal, leader epoch.

Like Flyway's schema history, every migration lockstep runs leaves a row in
`lockstep.migrations` (status, phases, reason, checksum of its SQL). Since schema version 2
the row is also the migration's durable state while it runs: the spec itself (so a successor
can finish it without the file), the checkpoint of its state machine (written before the
coordinator acts on a new state) and the journal of execution groups that committed (written
inside each group's own transaction, so "did it commit?" is never a guess). The coordinator
reads the completed names at start-up to tell joining agents which query set to use, and
refuses to run a name twice.

A session advisory lock, held on its own connection for the whole migration, makes a second
coordinator on the same database wait its turn (invariant 5 in docs/design.md). Whoever takes
it increments the epoch in `lockstep.leader`; every write of a run's state is conditional on
that epoch still being the holder's, so a coordinator that lost its lock session without
knowing it can change nothing (`Deposed`): its EXECUTE or CONTRACT transaction rolls back
with the journal write that fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any, Protocol

import psycopg
import trio

from coordinator.leader import (
    ADVISORY_LOCK_KEY,
    LEADER_LOCK_ROWS,
    Deposed,
    Leadership,
    LockSession,
    open_leadership,
)
from coordinator.pg import thread as pgthread
from coordinator.pg.held import HeldConnection
from statemachine.checkpoint import Checkpoint
from statemachine.exceptions import LockstepError
from statemachine.migration import Migration
from statemachine.phases import MigrationStatus, Phase
from statemachine.result import MigrationResult

#: Version of the `lockstep` schema this code reads and writes.
SCHEMA_VERSION = 4

#: Serializes schema upgrades (its own key: the leader holds `ADVISORY_LOCK_KEY` for as long
#: as it leads, and a standby must still be able to check the schema).
SCHEMA_LOCK_KEY = int.from_bytes(b"lsschema", "big", signed=True)

#: Creates or upgrades the schema. Run under a transaction-level advisory lock, so two
#: coordinators starting at once do not race on CREATE ... IF NOT EXISTS.
SCHEMA_SQL = """
SELECT pg_advisory_xact_lock({key});
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
ALTER TABLE lockstep.migrations
    ADD COLUMN IF NOT EXISTS spec jsonb,
    ADD COLUMN IF NOT EXISTS checkpoint jsonb,
    ADD COLUMN IF NOT EXISTS journal jsonb NOT NULL DEFAULT '[]',
    ADD COLUMN IF NOT EXISTS updated_at timestamptz;
CREATE TABLE IF NOT EXISTS lockstep.leader (
    id     int PRIMARY KEY CHECK (id = 1),
    epoch  bigint NOT NULL,
    holder text,
    since  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO lockstep.leader (id, epoch) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
-- version 3: the durable queue (`lockstep submit`), abort requests, live progress, and the
-- leader's backend pid (so `lockstep status` can tell a live leader from a stale row).
ALTER TABLE lockstep.leader ADD COLUMN IF NOT EXISTS backend_pid int,
    ADD COLUMN IF NOT EXISTS takes_queue boolean NOT NULL DEFAULT false;
ALTER TABLE lockstep.migrations
    ADD COLUMN IF NOT EXISTS submitted_at timestamptz,
    ADD COLUMN IF NOT EXISTS force boolean NOT NULL DEFAULT false,
    ADD COLUMN IF NOT EXISTS abort_requested text,
    ADD COLUMN IF NOT EXISTS progress jsonb;
-- version 4: the URL the leader serves on, where relaying replicas link (docs/replicas.md).
ALTER TABLE lockstep.leader ADD COLUMN IF NOT EXISTS url text;
CREATE TABLE IF NOT EXISTS lockstep.schema_version (version int NOT NULL);
DELETE FROM lockstep.schema_version;
INSERT INTO lockstep.schema_version (version) VALUES ({version});
-- Backfill positions: the last key each backfill of a run committed (see BackfillPosition).
CREATE TABLE IF NOT EXISTS lockstep.backfill_position (
    migration_id text NOT NULL,
    backfill     int NOT NULL,
    last_key     text,
    rows         bigint NOT NULL DEFAULT 0,
    batches      int NOT NULL DEFAULT 0,
    complete     boolean NOT NULL DEFAULT false,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (migration_id, backfill)
);
"""

#: Fences a write: true only while `epoch` is still the leader's. FOR SHARE holds the leader
#: row until the write's transaction ends, so a successor's epoch bump waits for it: the
#: successor then reads a journal that includes it, and no commit lands after its read.
EPOCH_FENCE = "%(epoch)s = (SELECT epoch FROM lockstep.leader WHERE id = 1 FOR SHARE)"


class SchemaTooNew(LockstepError):
    """Raised by `PostgresHistory.ensure_schema` when the database's `lockstep` schema was
    written by a newer lockstep than this one (running on it could misread its state)."""


def _schema_version(conn: psycopg.Connection[Any]) -> int | None:
    """The recorded schema version; None on a new database or before version 3 (no table)."""
    row = conn.execute("SELECT to_regclass('lockstep.schema_version') IS NOT NULL").fetchone()
    if not (row and row[0]):
        return None
    row = conn.execute("SELECT max(version) FROM lockstep.schema_version").fetchone()
    return None if row is None or row[0] is None else int(row[0])


@dataclasses.dataclass(frozen=True)
class UnfinishedRun:
    """A migration a coordinator started and did not finish: what a successor resumes."""

    migration: Migration
    checkpoint: Checkpoint
    journal: frozenset[tuple[Phase, int]]


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


#: The most recent migrations, newest first, as `HistoryRow` fields (`rows`, status).
HISTORY_ROWS_SQL = (
    "SELECT name, status, started_at, finished_at, reason, schema_restored "
    "FROM lockstep.migrations ORDER BY started_at DESC LIMIT %s"
)


@dataclasses.dataclass(frozen=True)
class HistoryRow:
    name: str
    status: str
    started_at: datetime.datetime
    finished_at: datetime.datetime | None
    reason: str | None
    schema_restored: bool | None


class History(Protocol):
    """Where the coordinator keeps migrations: the history and the durable run state."""

    #: The leader epoch this history writes under (0: none), sent to agents in every frame.
    epoch: int

    async def applied(self) -> list[AppliedMigration]: ...

    async def unfinished(self) -> list[UnfinishedRun]:
        """Runs started and not finished, oldest first (a successor resumes them)."""
        ...

    async def record_start(self, migration: Migration, checkpoint: Checkpoint) -> None: ...

    async def save(self, migration: Migration, checkpoint: Checkpoint) -> None:
        """Persist `checkpoint` before the coordinator acts on it; `Deposed` if fenced off."""
        ...

    def journal(self, migration: Migration) -> GroupJournal | None:
        """The journal of `migration`'s committed execution groups (None: not kept)."""
        ...

    async def record_finish(
        self, migration: Migration, result: MigrationResult, checkpoint: Checkpoint | None = None
    ) -> None:
        """Record the run's end, with its terminal `checkpoint` when given (one write for
        both); `Deposed` if fenced off."""
        ...

    async def save_progress(self, migration: Migration, progress: dict[str, object]) -> None:
        """Best-effort live progress for `lockstep status` (never needed to resume)."""
        ...

    def migration_lock(self) -> contextlib.AbstractAsyncContextManager[None]: ...

    @property
    def deposed(self) -> bool:
        """True once another coordinator took over: the run must stop acting, not roll back."""
        ...


class GroupJournal(Protocol):
    """Which execution groups of a run committed; the executor skips them and marks the rest.

    `mark` runs in the executor's worker thread on the connection that ran the group: inside
    the group's transaction for a transactional group (the mark commits with the SQL or not
    at all), right after the statement for an autocommit one. It raises `Deposed` when the
    epoch moved on, which aborts the group's transaction.
    """

    committed: set[tuple[Phase, int]]

    def mark(self, conn: psycopg.Connection[Any], phase: Phase, group: int) -> None: ...

    async def recorded(self, phase: Phase, group: int) -> bool:
        """Read back from the database whether the group committed (asked after a
        connection was lost mid-group: its COMMIT may or may not have happened)."""
        ...


class InMemoryHistory:
    """History for tests and embedding without a database of record (nothing survives the
    process, so there is never anything to resume)."""

    def __init__(self) -> None:
        self.epoch = 0
        self.rows: dict[str, tuple[Migration, MigrationResult | None]] = {}
        self.checkpoints: dict[str, Checkpoint] = {}
        self._lock = trio.Lock()

    async def applied(self) -> list[AppliedMigration]:
        return [
            AppliedMigration(m.name, checksum(m))
            for m, r in self.rows.values()
            if r is not None and r.status is MigrationStatus.COMPLETED
        ]

    async def unfinished(self) -> list[UnfinishedRun]:
        return []

    async def record_start(self, migration: Migration, checkpoint: Checkpoint) -> None:
        self.rows[migration.id] = (migration, None)
        self.checkpoints[migration.id] = checkpoint

    async def save(self, migration: Migration, checkpoint: Checkpoint) -> None:
        self.checkpoints[migration.id] = checkpoint

    def journal(self, migration: Migration) -> GroupJournal | None:
        return None

    @property
    def deposed(self) -> bool:
        return False

    async def record_finish(
        self, migration: Migration, result: MigrationResult, checkpoint: Checkpoint | None = None
    ) -> None:
        self.rows[migration.id] = (migration, result)
        if checkpoint is not None:
            self.checkpoints[migration.id] = checkpoint

    async def save_progress(self, migration: Migration, progress: dict[str, object]) -> None:
        await trio.lowlevel.checkpoint()

    @contextlib.asynccontextmanager
    async def migration_lock(self) -> AsyncIterator[None]:
        async with self._lock:
            yield


class PostgresJournal:
    """`GroupJournal` kept in the run's row (`journal`, a JSON list of ``"phase:group"``)."""

    def __init__(
        self,
        migration_id: str,
        epoch: int,
        committed: set[tuple[Phase, int]],
        dsn: str | None = None,
    ) -> None:
        self.migration_id = migration_id
        self.epoch = epoch
        self.committed = committed
        self.dsn = dsn

    async def recorded(self, phase: Phase, group: int) -> bool:
        if self.dsn is None:
            return False
        rows, _ = await pgthread.query(
            self.dsn,
            "SELECT journal @> %s::jsonb FROM lockstep.migrations WHERE id = %s",
            (json.dumps([f"{phase.value}:{group}"]), self.migration_id),
        )
        found = bool(rows and rows[0][0])
        if found:
            self.committed.add((phase, group))
        return found

    def mark(self, conn: psycopg.Connection[Any], phase: Phase, group: int) -> None:
        entry = json.dumps([f"{phase.value}:{group}"])
        cur = conn.execute(
            "UPDATE lockstep.migrations SET journal = journal || %(entry)s::jsonb, "
            f"updated_at = now() WHERE id = %(id)s AND {EPOCH_FENCE}",
            {"entry": entry, "id": self.migration_id, "epoch": self.epoch},
        )
        if cur.rowcount != 1:
            raise Deposed(
                f"another coordinator took over migration {self.migration_id} "
                f"(epoch {self.epoch} is no longer the leader's)"
            )
        self.committed.add((phase, group))


def _parse_journal(raw: Any) -> set[tuple[Phase, int]]:
    marks = set()
    for entry in raw or ():
        phase, _, group = str(entry).partition(":")
        marks.add((Phase(phase), int(group)))
    return marks


class PostgresHistory:
    """`History` in the target database's `lockstep` schema (module docstring)."""

    def __init__(self, dsn: str, *, hold_connections: bool = False) -> None:
        self.dsn = dsn
        #: The epoch this coordinator took with the migration lock (0: it holds none).
        self.epoch = 0
        self._leadership: Leadership | None = None
        self._term = False
        #: With `hold_connections` (a coordinator, for its lifetime: `aclose` ends them),
        #: statements reuse one connection and the migration lock one session, instead of a
        #: fresh connection each (see `HeldConnection`, `LockSession`).
        self.held = HeldConnection(dsn) if hold_connections else None
        self.lock_session = LockSession() if hold_connections else None

    async def aclose(self) -> None:
        """Close the connections held for reuse (none unless `hold_connections`)."""
        if self.held is not None:
            await self.held.aclose()
        if self.lock_session is not None:
            await self.lock_session.discard()

    async def _run(
        self, sql: str, params: tuple[object, ...] | dict[str, object] = ()
    ) -> list[tuple[Any, ...]]:
        rows, _ = await self._run_counted(sql, params)
        return rows

    async def _run_counted(
        self, sql: str, params: tuple[object, ...] | dict[str, object] = ()
    ) -> tuple[list[tuple[Any, ...]], int]:
        if self.held is not None:
            return await self.held.query(sql, params)
        return await pgthread.query(self.dsn, sql, params)

    async def ensure_schema(self) -> None:
        """Create or upgrade the `lockstep` schema to `SCHEMA_VERSION` (idempotent).

        A schema already at this version is left alone without any DDL: the upgrade script's
        ``ALTER TABLE ... IF NOT EXISTS`` takes ACCESS EXCLUSIVE locks even when it changes
        nothing, so every ``lockstep submit`` or starting replica running it would queue
        behind a live leader's writes and could deadlock with ``lockstep status`` reads.
        Raises `SchemaTooNew` for a schema written by a newer lockstep (never downgraded)."""
        conn = await pgthread.connect(self.dsn)
        try:

            def work() -> None:
                with conn.transaction():
                    if _schema_version(conn) == SCHEMA_VERSION:
                        return
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
                    found = _schema_version(conn)  # again under the lock: a racer may be done
                    if found == SCHEMA_VERSION:
                        return
                    if found is not None and found > SCHEMA_VERSION:
                        raise SchemaTooNew(
                            f"the lockstep schema of this database is version {found}, newer "
                            f"than this lockstep's {SCHEMA_VERSION}: upgrade lockstep"
                        )
                    # Two integer constants of ours: formatting them in is safe, and a script of
                    # several statements cannot take parameters.
                    script = SCHEMA_SQL.format(key=SCHEMA_LOCK_KEY, version=SCHEMA_VERSION)
                    conn.execute(script.encode())

            await pgthread.run_in_thread(conn, work)
        finally:
            await pgthread.close(conn)

    async def applied(self) -> list[AppliedMigration]:
        rows = await self._run(
            "SELECT name, checksum FROM lockstep.migrations WHERE status = 'completed' "
            "ORDER BY finished_at, name"
        )
        return [AppliedMigration(str(name), str(cs)) for name, cs in rows]

    async def unfinished(self) -> list[UnfinishedRun]:
        rows = await self._run(
            "SELECT spec, checkpoint, journal FROM lockstep.migrations "
            "WHERE status = 'running' AND spec IS NOT NULL AND checkpoint IS NOT NULL "
            "ORDER BY started_at"
        )
        return [
            UnfinishedRun(
                Migration.from_json(spec),
                Checkpoint.from_json(checkpoint),
                frozenset(_parse_journal(journal)),
            )
            for spec, checkpoint, journal in rows
        ]

    async def record_start(self, migration: Migration, checkpoint: Checkpoint) -> None:
        await self._run(
            # A submitted migration already has its row ('queued'): starting it is an update.
            "INSERT INTO lockstep.migrations (id, name, checksum, status, spec, checkpoint, "
            "updated_at) VALUES (%(id)s, %(name)s, %(checksum)s, 'running', %(spec)s, "
            "%(checkpoint)s, now()) "
            "ON CONFLICT (id) DO UPDATE SET status = 'running', started_at = now(), "
            "checkpoint = EXCLUDED.checkpoint, updated_at = now() "
            "WHERE lockstep.migrations.status = 'queued'",
            {
                "id": migration.id,
                "name": migration.name,
                "checksum": checksum(migration),
                "spec": json.dumps(migration.to_json()),
                "checkpoint": json.dumps(checkpoint.to_json()),
            },
        )

    async def save(self, migration: Migration, checkpoint: Checkpoint) -> None:
        _, count = await self._run_counted(
            "UPDATE lockstep.migrations SET checkpoint = %(checkpoint)s, updated_at = now() "
            f"WHERE id = %(id)s AND status = 'running' AND {EPOCH_FENCE}",
            {
                "checkpoint": json.dumps(checkpoint.to_json()),
                "id": migration.id,
                "epoch": self.epoch,
            },
        )
        if count != 1:
            raise Deposed(
                f"migration {migration.name!r}: another coordinator took over "
                f"(epoch {self.epoch} is no longer the leader's)"
            )

    def journal(self, migration: Migration) -> GroupJournal | None:
        return PostgresJournal(migration.id, self.epoch, set(), self.dsn)

    async def journal_of(self, migration: Migration) -> set[tuple[Phase, int]]:
        rows = await self._run(
            "SELECT journal FROM lockstep.migrations WHERE id = %s", (migration.id,)
        )
        return _parse_journal(rows[0][0]) if rows else set()

    async def record_finish(
        self, migration: Migration, result: MigrationResult, checkpoint: Checkpoint | None = None
    ) -> None:
        """The run's status, phases and reason; with `checkpoint`, its terminal checkpoint
        in the same statement (the runner's last write). `Deposed` when the epoch moved on
        and a checkpoint was to be written: the run's state is a successor's now."""
        phases = [
            {"phase": p.phase.name, "started_at": p.started_at, "ended_at": p.ended_at}
            for p in result.phases
        ]
        _, count = await self._run_counted(
            "UPDATE lockstep.migrations SET status = %(status)s, finished_at = now(), "
            "phases = %(phases)s, reason = %(reason)s, schema_restored = %(restored)s, "
            "checkpoint = coalesce(%(checkpoint)s::jsonb, checkpoint), "
            f"updated_at = now() WHERE id = %(id)s AND {EPOCH_FENCE}",
            {
                "status": result.status.value,
                "phases": json.dumps(phases),
                "reason": result.reason,
                "restored": result.schema_restored,
                "checkpoint": None if checkpoint is None else json.dumps(checkpoint.to_json()),
                "id": migration.id,
                "epoch": self.epoch,
            },
        )
        if checkpoint is not None and count != 1:
            raise Deposed(
                f"migration {migration.name!r}: another coordinator took over "
                f"(epoch {self.epoch} is no longer the leader's)"
            )

    async def save_progress(self, migration: Migration, progress: dict[str, object]) -> None:
        await self._run(
            "UPDATE lockstep.migrations SET progress = %(progress)s "
            f"WHERE id = %(id)s AND status = 'running' AND {EPOCH_FENCE}",
            {"progress": json.dumps(progress), "id": migration.id, "epoch": self.epoch},
        )

    async def rows(self, limit: int = 50) -> list[HistoryRow]:
        """The most recent migrations, newest first (read-only: none if lockstep never ran)."""
        try:
            found = await self._run(HISTORY_ROWS_SQL, (limit,))
        except psycopg.errors.UndefinedTable:
            return []
        return [HistoryRow(*row) for row in found]

    async def mark_unresumable(self, *, when_free: bool = True) -> list[str]:
        """Mark rows left 'running' without a checkpoint (written by a lockstep before
        durable runs) as 'interrupted': nothing says how far they got. Only while nobody
        holds the migration lock (`when_free`), or by the leader that holds it. Returns the
        names marked."""
        probe = "pg_try_advisory_xact_lock(%s)" if when_free else "%s IS NOT NULL"
        rows = await self._run(
            f"WITH free AS (SELECT {probe} AS ok) "
            "UPDATE lockstep.migrations SET status = 'interrupted', finished_at = now(), "
            "reason = 'the coordinator stopped before the migration finished and an older "
            "lockstep kept no checkpoint: check the schema' "
            "WHERE status = 'running' AND checkpoint IS NULL AND (SELECT ok FROM free) "
            "RETURNING name",
            (ADVISORY_LOCK_KEY,),
        )
        return [str(name) for (name,) in rows]

    async def current_epoch(self) -> int:
        """The last leader epoch taken on this database (0: no coordinator ever led it)."""
        rows = await self._run("SELECT epoch FROM lockstep.leader WHERE id = 1")
        return int(rows[0][0]) if rows else 0

    async def lock_is_free(self) -> bool:
        """True when no coordinator holds the migration lock right now (read-only probe)."""
        rows = await self._run(f"SELECT NOT EXISTS ({LEADER_LOCK_ROWS})")
        return bool(rows[0][0])

    @property
    def deposed(self) -> bool:
        """True once the leadership this history writes under was lost: stop acting."""
        return self._leadership is not None and not self._leadership.is_leader()

    def lead_with(self, leadership: Leadership | None) -> None:
        """Write under `leadership` held for longer than one migration (``lockstep serve``):
        `migration_lock` then takes nothing itself. None returns to a lock per migration."""
        self._leadership = leadership
        self._term = leadership is not None
        self.epoch = leadership.epoch if leadership is not None else 0

    @contextlib.asynccontextmanager
    async def migration_lock(self) -> AsyncIterator[None]:
        """Be the leader while the body runs: one migration at a time per database.

        Under a term's leadership (`lead_with`) that is already so. Otherwise the lock is
        taken for the body (waiting while another coordinator holds it) with a new epoch,
        probed continually, and released after: `LeadershipLost` if it was lost meanwhile.
        """
        if self._term:
            if self.deposed:
                assert self._leadership is not None
                raise Deposed(f"no longer the leader: {self._leadership.lost_reason}")
            yield
            return
        async with open_leadership(self.dsn, session=self.lock_session) as leadership:
            self._leadership = leadership
            self.epoch = leadership.epoch
            try:
                yield
            finally:
                self.epoch = 0
                self._leadership = None


# ------------------------------------------------------------------ backfill positions
@dataclasses.dataclass(frozen=True)
class BackfillPosition:
    """How far one backfill of a run got: the last key of its last committed batch (as the
    key's text form, which casts back exactly through the key's own type), the rows updated
    and batches run so far, and whether it finished."""

    last_key: str | None
    rows: int
    batches: int
    complete: bool


class BackfillPositionStore(Protocol):
    """Where a backfill keeps its position between batches.

    Both methods run in the backfill's worker thread on the connection that runs its batches;
    `save` runs inside the batch's transaction, so a batch and its position commit together
    or not at all: a crash never loses or repeats a committed batch.
    """

    def load(self, conn: psycopg.Connection[Any], backfill: int) -> BackfillPosition | None: ...

    def save(
        self, conn: psycopg.Connection[Any], backfill: int, position: BackfillPosition
    ) -> None: ...


#: The fence of a position write. It reads the epoch ``FOR SHARE``: a coordinator taking the
#: lock must wait for a batch in flight to commit before it increments the epoch, so it always
#: reads the position of the last batch the deposed one committed, and that one's next batch
#: fails its fence and rolls back.


class PostgresBackfillPositions:
    """`BackfillPositionStore` in ``lockstep.backfill_position``, fenced by the epoch."""

    def __init__(self, migration_id: str, epoch: int) -> None:
        self.migration_id = migration_id
        self.epoch = epoch

    def load(self, conn: psycopg.Connection[Any], backfill: int) -> BackfillPosition | None:
        row = conn.execute(
            "SELECT last_key, rows, batches, complete FROM lockstep.backfill_position "
            "WHERE migration_id = %s AND backfill = %s",
            (self.migration_id, backfill),
        ).fetchone()
        if row is None:
            return None
        return BackfillPosition(row[0], int(row[1]), int(row[2]), bool(row[3]))

    def save(
        self, conn: psycopg.Connection[Any], backfill: int, position: BackfillPosition
    ) -> None:
        """Write `position`; `Deposed` (aborting the batch's transaction) if fenced off."""
        cur = conn.execute(
            "INSERT INTO lockstep.backfill_position AS p "
            "(migration_id, backfill, last_key, rows, batches, complete, updated_at) "
            "SELECT %(id)s, %(backfill)s, %(last)s, %(rows)s, %(batches)s, %(complete)s, now() "
            f"WHERE {EPOCH_FENCE} "
            "ON CONFLICT (migration_id, backfill) DO UPDATE SET last_key = EXCLUDED.last_key, "
            "rows = EXCLUDED.rows, batches = EXCLUDED.batches, complete = EXCLUDED.complete, "
            "updated_at = EXCLUDED.updated_at",
            {
                "id": self.migration_id,
                "backfill": backfill,
                "last": position.last_key,
                "rows": position.rows,
                "batches": position.batches,
                "complete": position.complete,
                "epoch": self.epoch,
            },
        )
        if cur.rowcount != 1:
            raise Deposed(
                f"another coordinator took over migration {self.migration_id} "
                f"(epoch {self.epoch} is no longer the leader's): backfill batch rolled back"
            )


def backfill_positions(
    history: History | None, migration: Migration
) -> BackfillPositionStore | None:
    """The durable position store of `migration`'s backfills; None where nothing is durable
    (then a backfill keeps its position in memory only). Call it while holding the migration
    lock: the store fences its writes with the epoch taken then."""
    if isinstance(history, PostgresHistory):
        return PostgresBackfillPositions(migration.id, history.epoch)
    return None


__all__ = [
    "ADVISORY_LOCK_KEY",
    "EPOCH_FENCE",
    "HISTORY_ROWS_SQL",
    "SCHEMA_VERSION",
    "AppliedMigration",
    "BackfillPosition",
    "BackfillPositionStore",
    "Deposed",
    "GroupJournal",
    "History",
    "HistoryRow",
    "InMemoryHistory",
    "PostgresBackfillPositions",
    "PostgresHistory",
    "PostgresJournal",
    "SchemaTooNew",
    "UnfinishedRun",
    "backfill_positions",
    "checksum",
]
