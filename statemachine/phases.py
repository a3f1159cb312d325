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


#: Phases in which the coordinator waits for every agent of the cohort to acknowledge.
ACKED_PHASES: frozenset[Phase] = frozenset(
    {Phase.ANNOUNCE, Phase.APPLY, Phase.CONFIRM, Phase.ROLLBACK}
)
