"""What `run_migration` returns: the outcome, the path taken and why it ended there."""

from __future__ import annotations

import dataclasses

from statemachine.failure import Failure
from statemachine.phases import MigrationStatus, Phase


@dataclasses.dataclass(frozen=True)
class PhaseRecord:
    """One phase the migration passed through, with wall-clock times (seconds since epoch)."""

    phase: Phase
    started_at: float
    ended_at: float

    @property
    def duration(self) -> float:
        return self.ended_at - self.started_at


@dataclasses.dataclass(frozen=True)
class SqlAttempt:
    """One try at running one execution group of a phase; lock timeouts make more than one.

    A phase's statements run as ordered groups (see `statemachine.sql.group_for_execution`):
    runs of transactional statements share one transaction, and each statement that cannot run
    in a transaction (``CREATE INDEX CONCURRENTLY``...) is a group of its own on an autocommit
    connection. `group` is the group's 0-based position in its phase and `transactional` says
    which kind it was, so a result shows what ran inside a transaction and what ran outside.
    `error` is ``"lock_timeout"`` for a lock that was not granted within `lock_timeout` (what
    `MigrationResult.lock_retries` counts), else PostgreSQL's message; `detail` says more (for a
    lock timeout: the blocking sessions seen while waiting).
    """

    phase: Phase
    attempt: int
    ok: bool
    seconds: float
    error: str | None = None
    group: int = 0
    transactional: bool = True
    statements: tuple[str, ...] = ()
    detail: str | None = None


@dataclasses.dataclass(frozen=True)
class BackfillStats:
    """What one backfill did: rows updated in how many batches, and whether it finished."""

    table: str
    rows: int
    batches: int
    seconds: float
    lock_retries: int = 0
    complete: bool = True


@dataclasses.dataclass(frozen=True)
class MigrationResult:
    migration_id: str
    name: str
    status: MigrationStatus
    phases: tuple[PhaseRecord, ...]
    failure: Failure | None = None
    #: None when nothing had to be undone; False when the schema was left expanded.
    schema_restored: bool | None = None
    warnings: tuple[str, ...] = ()
    sql_attempts: tuple[SqlAttempt, ...] = ()
    #: One entry per backfill that ran (in order), including a failed one's partial counts.
    backfills: tuple[BackfillStats, ...] = ()
    #: Agents whose lease certainly expired during the run (they fenced themselves and left
    #: their cohort instead of holding the migration), sorted.
    departed: tuple[str, ...] = ()

    @property
    def reason(self) -> str | None:
        """Why the migration failed, naming the agent or the statement and PostgreSQL's error."""
        return None if self.failure is None else self.failure.describe()

    @property
    def phase_names(self) -> list[str]:
        return [p.phase.name for p in self.phases]

    @property
    def lock_retries(self) -> int:
        """Attempts that failed on lock_timeout, in phases and in backfill batches."""
        in_phases = sum(1 for a in self.sql_attempts if not a.ok and a.error == "lock_timeout")
        return in_phases + sum(b.lock_retries for b in self.backfills)
