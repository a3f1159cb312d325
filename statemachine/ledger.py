"""Who of a phase's cohort has answered: the data the FSM's guards look at.

A ledger belongs to one phase of one migration. Recording an answer is O(1) and completeness is a
length comparison, so a fleet of thousands of agents costs nothing per ack; the set of missing
agents is only computed when somebody asks (at a deadline, for the failure reason).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from statemachine.phases import Phase


class AckOutcome(enum.Enum):
    """What recording one answer did; the coordinator logs anything but RECORDED."""

    RECORDED = "recorded"
    DUPLICATE = "duplicate"  # this agent already answered this phase
    STALE = "stale"  # an answer for another phase or migration
    STRANGER = "stranger"  # the agent is not in this phase's cohort
    CLOSED = "closed"  # the phase is over; answers no longer count


class AckLedger:
    """Acks, NACKs and losses of one phase's cohort."""

    __slots__ = ("_acked", "_cohort", "_departed", "_lost", "_nacks", "closed", "phase")

    def __init__(self, phase: Phase, cohort: Iterable[str]) -> None:
        self.phase = phase
        self._cohort = frozenset(cohort)
        self._acked: set[str] = set()
        self._nacks: dict[str, str] = {}
        self._lost: set[str] = set()
        #: Cohort agents whose lease certainly expired before they answered: fenced, so
        #: they no longer owe an answer (the churn-tolerant "wait" mode).
        self._departed: set[str] = set()
        self.closed = False

    @property
    def cohort(self) -> frozenset[str]:
        return self._cohort

    @property
    def acked(self) -> frozenset[str]:
        return frozenset(self._acked)

    @property
    def nacks(self) -> dict[str, str]:
        return dict(self._nacks)

    @property
    def lost(self) -> frozenset[str]:
        return frozenset(self._lost)

    @property
    def departed(self) -> frozenset[str]:
        return frozenset(self._departed)

    @property
    def complete(self) -> bool:
        """Every cohort agent acked or departed (its lease certainly expired: it is fenced);
        vacuously true for an empty cohort."""
        return len(self._acked) + len(self._departed) == len(self._cohort)

    @property
    def failed(self) -> bool:
        """Some cohort agent refused or vanished before acking."""
        return bool(self._nacks) or bool(self._lost)

    @property
    def settled(self) -> bool:
        """Nobody is left to wait for: each cohort agent acked, nacked or was lost."""
        answered = len(self._acked) + len(self._nacks) + len(self._lost) + len(self._departed)
        return answered == len(self._cohort)

    def missing(self) -> list[str]:
        """Cohort agents that have not answered at all, sorted for stable messages."""
        answered = self._acked | self._nacks.keys() | self._lost | self._departed
        return sorted(self._cohort - answered)

    def _check(self, agent_id: str, phase: Phase) -> AckOutcome | None:
        if self.closed:
            return AckOutcome.CLOSED
        if phase is not self.phase:
            return AckOutcome.STALE
        if agent_id not in self._cohort:
            return AckOutcome.STRANGER
        if (
            agent_id in self._acked
            or agent_id in self._nacks
            or agent_id in self._lost
            or agent_id in self._departed
        ):
            return AckOutcome.DUPLICATE
        return None

    def record_ack(self, agent_id: str, phase: Phase) -> AckOutcome:
        refused = self._check(agent_id, phase)
        if refused is not None:
            return refused
        self._acked.add(agent_id)
        return AckOutcome.RECORDED

    def record_nack(self, agent_id: str, phase: Phase, error: str) -> AckOutcome:
        refused = self._check(agent_id, phase)
        if refused is not None:
            return refused
        self._nacks[agent_id] = error
        return AckOutcome.RECORDED

    def record_lost(self, agent_id: str) -> AckOutcome:
        """The agent disconnected; it counts as lost only if it still owed an answer."""
        refused = self._check(agent_id, self.phase)
        if refused is not None:
            return refused
        self._lost.add(agent_id)
        return AckOutcome.RECORDED

    def record_departed(self, agent_id: str) -> AckOutcome:
        """The agent's lease certainly expired; it leaves the cohort only if it still owed
        an answer (an agent that acked already keeps its ack)."""
        refused = self._check(agent_id, self.phase)
        if refused is not None:
            return refused
        self._departed.add(agent_id)
        return AckOutcome.RECORDED
