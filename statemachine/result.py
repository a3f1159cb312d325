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
    """One try at running a phase's SQL; lock timeouts make more than one."""

    phase: Phase
    attempt: int
    ok: bool
    seconds: float
    error: str | None = None


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

    @property
    def reason(self) -> str | None:
        """Why the migration failed, naming the agent or the statement and PostgreSQL's error."""
        return None if self.failure is None else self.failure.describe()

    @property
    def phase_names(self) -> list[str]:
        return [p.phase.name for p in self.phases]

    @property
    def lock_retries(self) -> int:
        return sum(1 for a in self.sql_attempts if not a.ok and a.error == "lock_timeout")
