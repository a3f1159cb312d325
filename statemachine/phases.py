"""The vocabulary of a migration: its phases, its overall status and the FSM's states.

Kept separate from the machine itself so the wire protocol, the agent and the coordinator can
share the names without importing `transitions`.
"""

from __future__ import annotations

import enum


class Phase(enum.Enum):
    """A step every agent of the fleet moves through together."""

    ANNOUNCE = "announce"
    EXECUTE = "execute"
    APPLY = "apply"
    CONTRACT = "contract"
    CONFIRM = "confirm"
    ROLLBACK = "rollback"


class MigrationStatus(enum.Enum):
    """Where a migration stands as a whole, as users see it."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


class MigrationState(enum.Enum):
    """States of the coordinator's migration FSM: the phases plus the three bookends."""

    PENDING = "pending"
    ANNOUNCE = "announce"
    EXECUTE = "execute"
    APPLY = "apply"
    CONTRACT = "contract"
    CONFIRM = "confirm"
    ROLLBACK = "rollback"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def phase(self) -> Phase | None:
        """The phase this state stands for, or None for PENDING/COMPLETED/FAILED."""
        try:
            return Phase(self.value)
        except ValueError:
            return None

    @property
    def is_terminal(self) -> bool:
        return self in (MigrationState.COMPLETED, MigrationState.FAILED)

    @property
    def status(self) -> MigrationStatus:
        """The user-facing status of a migration in this state."""
        if self is MigrationState.PENDING:
            return MigrationStatus.PENDING
        if self is MigrationState.COMPLETED:
            return MigrationStatus.COMPLETED
        if self is MigrationState.FAILED:
            return MigrationStatus.FAILED
        return MigrationStatus.RUNNING


#: Every named set of phases or states lives here, so a rule such as "which phases roll back on
#: a NACK" is written once and read by the FSM, the runner, the agent, the tests and the docs.

#: Phases in which the coordinator waits for every agent of the cohort to acknowledge.
ACKED_PHASES: frozenset[Phase] = frozenset(
    {Phase.ANNOUNCE, Phase.APPLY, Phase.CONFIRM, Phase.ROLLBACK}
)
#: Phases that run SQL on the coordinator and send agents a notice only (no hook, no ack).
SQL_PHASES: frozenset[Phase] = frozenset({Phase.EXECUTE, Phase.CONTRACT})
#: Acked phases whose failure (NACK, lost agent, deadline) rolls the migration back; in the
#: other acked phases (CONFIRM, ROLLBACK) a failure is only a warning.
REFUSABLE_PHASES: frozenset[Phase] = frozenset({Phase.ANNOUNCE, Phase.APPLY})
#: Phases at whose notice an agent switches query set (and waits for in-flight work).
SWITCH_PHASES: frozenset[Phase] = frozenset({Phase.APPLY, Phase.ROLLBACK})
#: Phases after which nothing more is asked of an agent for this migration.
CLOSING_PHASES: frozenset[Phase] = frozenset({Phase.CONFIRM, Phase.ROLLBACK})

#: FSM states whose failure rolls back (`REFUSABLE_PHASES` as states).
REFUSABLE_STATES: frozenset[MigrationState] = frozenset(
    {MigrationState.ANNOUNCE, MigrationState.APPLY}
)
#: FSM states a host may cancel: everything before the point of no return (CONFIRM).
CANCELLABLE_STATES: frozenset[MigrationState] = frozenset(
    {MigrationState.ANNOUNCE, MigrationState.EXECUTE, MigrationState.APPLY, MigrationState.CONTRACT}
)
#: FSM states in which agents must run the new query set: the expanded schema committed and
#: the migration is not rolling back.
APPLIED_STATES: frozenset[MigrationState] = frozenset(
    {
        MigrationState.APPLY,
        MigrationState.CONTRACT,
        MigrationState.CONFIRM,
        MigrationState.COMPLETED,
    }
)
