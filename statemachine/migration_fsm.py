"""The coordinator's state machine for one migration: where every phase is decided.

The machine is a plain synchronous `transitions.Machine` (see DESIGN.md: `AsyncMachine` does not
run under trio). It performs no I/O: the runner in `coordinator/runner.py` feeds it acks, NACKs,
disconnects, deadlines and SQL outcomes, and reads back the state to know what to do next. The
guards look only at the current phase's `AckLedger`, so the rules below are the whole story:

    PENDING --start--> ANNOUNCE --cohort_acked [cohort_complete]--> EXECUTE
    EXECUTE --sql_committed--> APPLY
    APPLY --cohort_acked [cohort_complete, contract_planned]--> CONTRACT
    APPLY --cohort_acked [cohort_complete, unless contract_planned]--> CONFIRM
    CONTRACT --sql_committed--> CONFIRM --finish--> COMPLETED
    ANNOUNCE/APPLY --refused [cohort_failed] | deadline [unless cohort_complete]--> ROLLBACK
    EXECUTE/CONTRACT --sql_failed--> ROLLBACK --finish--> FAILED
    ANNOUNCE/EXECUTE/APPLY/CONTRACT --cancel--> ROLLBACK   (the host cancelled the run)

Cohorts: each acked phase's cohort is the set of agents connected when the phase begins, so an
agent that joins during ANNOUNCE or EXECUTE must still ack APPLY before CONTRACT may run.
ROLLBACK's cohort leaves out agents that already missed a deadline of this migration.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import Any

from transitions import EventData, Machine

from statemachine.failure import Failure, FailureKind
from statemachine.ledger import AckLedger, AckOutcome
from statemachine.phases import ACKED_PHASES, MigrationState, Phase

S = MigrationState

#: Phases whose failure (NACK, loss, deadline) rolls the migration back.
_ROLLBACK_ON_REFUSAL = (S.ANNOUNCE, S.APPLY)
#: States reached only after the point of no return (CONTRACT committed or nothing to undo).
_FORWARD_ONLY = (S.CONFIRM, S.COMPLETED)

#: The transition table, shared by the runtime machine and the rendered diagrams.
MIGRATION_TRANSITIONS: list[dict[str, Any]] = [
    {"trigger": "start", "source": S.PENDING, "dest": S.ANNOUNCE},
    {
        "trigger": "cohort_acked",
        "source": S.ANNOUNCE,
        "dest": S.EXECUTE,
        "conditions": "cohort_complete",
    },
    {"trigger": "sql_committed", "source": S.EXECUTE, "dest": S.APPLY, "before": "_mark_executed"},
    {
        "trigger": "cohort_acked",
        "source": S.APPLY,
        "dest": S.CONTRACT,
        "conditions": ["cohort_complete", "contract_planned"],
    },
    {
        "trigger": "cohort_acked",
        "source": S.APPLY,
        "dest": S.CONFIRM,
        "conditions": "cohort_complete",
        "unless": "contract_planned",
    },
    {
        "trigger": "sql_committed",
        "source": S.CONTRACT,
        "dest": S.CONFIRM,
        "before": "_mark_contracted",
    },
    {
        "trigger": "refused",
        "source": [S.ANNOUNCE, S.APPLY],
        "dest": S.ROLLBACK,
        "conditions": "cohort_failed",
        "before": "_set_failure",
    },
    {
        "trigger": "deadline",
        "source": [S.ANNOUNCE, S.APPLY],
        "dest": S.ROLLBACK,
        "unless": "cohort_complete",
        "before": "_set_failure",
    },
    {
        "trigger": "sql_failed",
        "source": [S.EXECUTE, S.CONTRACT],
        "dest": S.ROLLBACK,
        "before": "_set_failure",
    },
    {
        "trigger": "cancel",
        "source": [S.ANNOUNCE, S.EXECUTE, S.APPLY, S.CONTRACT],
        "dest": S.ROLLBACK,
        "before": "_set_failure",
    },
    {"trigger": "finish", "source": S.CONFIRM, "dest": S.COMPLETED},
    {"trigger": "finish", "source": S.ROLLBACK, "dest": S.FAILED},
]

#: What each guard checks, in words, for docs and diagrams.
GUARD_DESCRIPTIONS: dict[str, str] = {
    "cohort_complete": "every agent of the phase's cohort acked this phase",
    "cohort_failed": "a cohort agent NACKed or disconnected before acking",
    "contract_planned": "the migration has contract_sql",
}


@dataclasses.dataclass(frozen=True)
class StateRecord:
    state: MigrationState
    entered_at: float


class MigrationMachine:
    """State, ledgers and history of one migration; triggers are bound by `transitions`.

    Drive it with the `receive_*`, `agent_*`, `deadline_passed`, `sql_*` and `finish_*`
    methods: they accept any input in any state (answers that no longer matter are recorded as
    STALE/CLOSED and change nothing) and advance the machine when a guard allows it. The raw
    triggers (`start`, `cohort_acked`, ...) stay strict and raise `MachineError` when misused.
    """

    state: MigrationState
    # Bound by transitions.Machine; declared for type checkers.
    start: Callable[..., bool]
    cohort_acked: Callable[..., bool]
    sql_committed: Callable[..., bool]
    sql_failed: Callable[..., bool]
    refused: Callable[..., bool]
    deadline: Callable[..., bool]
    finish: Callable[..., bool]
    cancel: Callable[..., bool]

    def __init__(
        self,
        migration_id: str,
        *,
        has_contract: bool,
        connected: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.migration_id = migration_id
        self.has_contract = has_contract
        self.connected: set[str] = set(connected)
        self.ledger: AckLedger | None = None
        self.failure: Failure | None = None
        self.executed = False  # the EXECUTE transaction committed
        self.contracted = False  # the CONTRACT transaction committed
        self.schema_restored: bool | None = None  # set when ROLLBACK finishes
        self.warnings: list[str] = []
        #: Agents that missed a deadline of this migration; ROLLBACK does not wait for them.
        self.unresponsive: set[str] = set()
        self._clock = clock
        self.history: list[StateRecord] = [StateRecord(S.PENDING, clock())]
        self.machine = Machine(
            model=self,
            states=list(MigrationState),
            initial=S.PENDING,
            transitions=MIGRATION_TRANSITIONS,
            auto_transitions=False,
            send_event=True,
            after_state_change="_entered",
        )

    # ----------------------------------------------------------------- guards
    def cohort_complete(self, event: EventData) -> bool:
        ledger = self.ledger
        return ledger is not None and ledger.phase is self.state.phase and ledger.complete

    def cohort_failed(self, event: EventData) -> bool:
        ledger = self.ledger
        return ledger is not None and ledger.phase is self.state.phase and ledger.failed

    def contract_planned(self, event: EventData) -> bool:
        return self.has_contract

    # -------------------------------------------------------------- callbacks
    def _mark_executed(self, event: EventData) -> None:
        self.executed = True

    def _mark_contracted(self, event: EventData) -> None:
        self.contracted = True

    def _set_failure(self, event: EventData) -> None:
        failure = event.kwargs.get("failure")
        if not isinstance(failure, Failure):
            raise TypeError(f"{event.event.name} needs failure=Failure(...)")
        if self.failure is None:
            self.failure = failure

    def _entered(self, event: EventData) -> None:
        self.history.append(StateRecord(self.state, self._clock()))
        phase = self.state.phase
        if self.ledger is not None:
            self.ledger.closed = True
        cohort = self.connected
        if phase is Phase.ROLLBACK:
            # Agents that already let a deadline pass are not waited for a second time: the
            # rollback would run after that wait anyway, so it would only double the outage.
            cohort = self.connected - self.unresponsive
            skipped = sorted(self.connected & self.unresponsive)
            if skipped:
                self.warnings.append(
                    f"ROLLBACK: not waiting for agent(s) {', '.join(skipped)}, which already "
                    "missed a deadline; they were sent the rollback all the same"
                )
        self.ledger = AckLedger(phase, cohort) if phase in ACKED_PHASES else None

    # ----------------------------------------------------------------- queries
    @property
    def phase(self) -> Phase | None:
        return self.state.phase

    @property
    def is_terminal(self) -> bool:
        return self.state.is_terminal

    @property
    def awaiting_acks(self) -> bool:
        """The runner should wait for answers (or the deadline) before doing anything."""
        ledger = self.ledger
        return ledger is not None and not ledger.closed and not ledger.settled

    @property
    def needs_rollback_sql(self) -> bool:
        """EXECUTE committed and CONTRACT did not: the expanded schema must be put back."""
        return self.executed and not self.contracted

    @property
    def applied(self) -> bool:
        """Agents joining now should run the new code: the expanded schema is committed and
        the migration is not rolling back."""
        return self.state in (S.APPLY, S.CONTRACT, S.CONFIRM, S.COMPLETED)

    # ------------------------------------------------------------------ inputs
    def begin(self) -> None:
        self.start()
        self._advance_if_complete()

    def receive_ack(self, agent_id: str, migration_id: str, phase: Phase) -> AckOutcome:
        if migration_id != self.migration_id or self.ledger is None:
            return AckOutcome.STALE
        outcome = self.ledger.record_ack(agent_id, phase)
        if outcome is AckOutcome.RECORDED:
            self._advance_if_complete()
        return outcome

    def receive_nack(
        self, agent_id: str, migration_id: str, phase: Phase, error: str
    ) -> AckOutcome:
        if migration_id != self.migration_id or self.ledger is None:
            return AckOutcome.STALE
        outcome = self.ledger.record_nack(agent_id, phase, error)
        if outcome is AckOutcome.RECORDED:
            failure = Failure(FailureKind.NACK, phase, error, agents=(agent_id,))
            if self.state in _ROLLBACK_ON_REFUSAL:
                self.refused(failure=failure)
            else:
                self.warnings.append(failure.describe())
        return outcome

    def agent_connected(self, agent_id: str) -> None:
        self.connected.add(agent_id)

    def agent_disconnected(self, agent_id: str) -> AckOutcome:
        self.connected.discard(agent_id)
        if self.ledger is None:
            return AckOutcome.STALE
        outcome = self.ledger.record_lost(agent_id)
        if outcome is AckOutcome.RECORDED:
            phase = self.ledger.phase
            failure = Failure(
                FailureKind.DISCONNECT, phase, "connection closed", agents=(agent_id,)
            )
            if self.state in _ROLLBACK_ON_REFUSAL:
                self.refused(failure=failure)
            else:
                self.warnings.append(failure.describe())
        return outcome

    def deadline_passed(self, timeout: float) -> bool:
        """The phase's ack deadline expired. Returns True if that changed the state."""
        ledger = self.ledger
        if ledger is None or ledger.closed or ledger.complete:
            return False
        missing = ledger.missing()
        self.unresponsive.update(missing)
        message = f"no ack within {timeout:g} s"
        if self.state in _ROLLBACK_ON_REFUSAL:
            failure = Failure(FailureKind.TIMEOUT, ledger.phase, message, agents=tuple(missing))
            return self.deadline(failure=failure)
        if missing:
            self.warnings.append(
                f"{ledger.phase.name}: agent(s) {', '.join(missing)} did not ack ({message})"
            )
        ledger.closed = True
        return False

    def sql_succeeded(self) -> None:
        self.sql_committed()
        self._advance_if_complete()

    def sql_error(self, statement: str | None, message: str) -> None:
        phase = self.state.phase
        self.sql_failed(failure=Failure(FailureKind.SQL_ERROR, phase, message, statement=statement))

    def expand_committed(self) -> None:
        """EXECUTE's transaction committed; backfills may still run before APPLY."""
        self.executed = True

    def cancelled(self, message: str) -> bool:
        """The host cancelled the run: roll back whatever can still be rolled back."""
        if self.state not in (S.ANNOUNCE, S.EXECUTE, S.APPLY, S.CONTRACT):
            return False
        return self.cancel(failure=Failure(FailureKind.CANCELLED, self.state.phase, message))

    def finish_confirm(self) -> None:
        self.finish()

    def finish_rollback(self, *, schema_restored: bool | None, note: str | None = None) -> None:
        self.schema_restored = schema_restored
        if note:
            self.warnings.append(note)
        self.finish()

    def _advance_if_complete(self) -> None:
        if self.state in _ROLLBACK_ON_REFUSAL and self.ledger is not None and self.ledger.complete:
            self.cohort_acked()


__all__ = [
    "GUARD_DESCRIPTIONS",
    "MIGRATION_TRANSITIONS",
    "MigrationMachine",
    "StateRecord",
]
