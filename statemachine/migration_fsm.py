"""The coordinator's state machine for one migration: where every phase is decided.

The machine is a plain synchronous `transitions.Machine` (`AsyncMachine` does not run under trio:
see docs/design.md). It performs no I/O: the runner in `coordinator/runner.py` feeds it acks,
NACKs, disconnects, deadlines and SQL outcomes, and reads back the state to know what to do
next. The guards look only at the current phase's `AckLedger`, so the rules below are the whole
story:

    PENDING --start--> ANNOUNCE --cohort_acked [cohort_complete]--> EXECUTE
    EXECUTE --sql_committed--> APPLY
    APPLY --cohort_acked [cohort_complete, contract_planned]--> CONTRACT
    APPLY --cohort_acked [cohort_complete, unless contract_planned]--> CONFIRM
    CONTRACT --sql_committed--> CONFIRM --finish--> COMPLETED  (without waiting for acks)
    ANNOUNCE/APPLY --refused [cohort_failed] | timed_out [unless cohort_complete]--> ROLLBACK
    EXECUTE/CONTRACT --sql_failed--> ROLLBACK --finish--> FAILED
    ANNOUNCE/EXECUTE/APPLY/CONTRACT --cancel--> ROLLBACK   (the host cancelled the run)

Inputs, one verb each: the driver calls `start`, `receive_ack`, `receive_nack`,
`agent_connected`, `agent_disconnected`, `lease_expired`, `deadline_passed`, `expand_committed`,
`sql_committed`, `sql_failed`, `cancel` and `finish`. `start`, `sql_committed`, `sql_failed`,
`cancel` and `finish` are transitions of the table themselves; `cohort_acked`, `refused` and
`timed_out` are the machine's own decisions, fired from inside the answer inputs, never by a
driver.

Cohorts: each acked phase's cohort is the set of agents connected when the phase begins, plus
(in the default "wait" mode) those that disconnected but whose lease has not certainly expired
(`departing`): they may still be serving on the old query set. So an agent that joins during
ANNOUNCE or EXECUTE must still ack APPLY before CONTRACT may run. ROLLBACK's cohort leaves out
agents that already missed a deadline of this migration.

Agent loss (`on_agent_loss`): with "wait" (the default) a cohort agent that disconnects owes
its answer still: it may reconnect and ack, or its lease certainly expires (`lease_expired`),
which fences it and takes it out of the cohort (`departed`). With "rollback", a cohort agent
that disconnects (or whose lease expires) before answering refuses the phase at once, the
behaviour before leases.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import Any

from transitions import EventData, Machine

from statemachine.failure import Failure, FailureKind
from statemachine.ledger import AckLedger, AckOutcome
from statemachine.phases import (
    ACKED_PHASES,
    APPLIED_STATES,
    CANCELLABLE_STATES,
    REFUSABLE_STATES,
    MigrationState,
    MigrationStatus,
    Phase,
)

S = MigrationState

#: The transition table, shared by the runtime machine and the rendered diagrams.
MIGRATION_TRANSITIONS: list[dict[str, Any]] = [
    {"trigger": "start", "source": S.PENDING, "dest": S.ANNOUNCE, "after": "_advance"},
    {
        "trigger": "cohort_acked",
        "source": S.ANNOUNCE,
        "dest": S.EXECUTE,
        "conditions": "cohort_complete",
    },
    {
        "trigger": "sql_committed",
        "source": S.EXECUTE,
        "dest": S.APPLY,
        "before": "_mark_executed",
        "after": "_advance",
    },
    {
        "trigger": "cohort_acked",
        "source": S.APPLY,
        "dest": S.CONTRACT,
        "conditions": ["cohort_complete", "previous_queries_retired", "contract_planned"],
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
        "source": sorted(REFUSABLE_STATES, key=list(S).index),
        "dest": S.ROLLBACK,
        "conditions": "cohort_failed",
        "before": "_set_failure",
    },
    {
        "trigger": "timed_out",
        "source": sorted(REFUSABLE_STATES, key=list(S).index),
        "dest": S.ROLLBACK,
        "unless": "cohort_complete",
        "before": "_set_failure",
    },
    {
        "trigger": "sql_failed",
        "source": [S.EXECUTE, S.CONTRACT],
        "dest": S.ROLLBACK,
        "before": "_sql_failure",
    },
    {
        "trigger": "cancel",
        "source": sorted(CANCELLABLE_STATES, key=list(S).index),
        "dest": S.ROLLBACK,
        "before": "_cancel_failure",
    },
    {"trigger": "finish", "source": S.CONFIRM, "dest": S.COMPLETED},
    {"trigger": "finish", "source": S.ROLLBACK, "dest": S.FAILED, "before": "_record_restore"},
]

#: What `on_agent_loss` may be: wait for the agent's lease, or roll back at once.
AGENT_LOSS_POLICIES = ("wait", "rollback")

#: What each guard checks, in words, for docs and diagrams.
GUARD_DESCRIPTIONS: dict[str, str] = {
    "cohort_complete": "every agent of the phase's cohort acked this phase or its lease "
    "certainly expired",
    "previous_queries_retired": "no agent that may still run the previous queries is alive and "
    "unfenced: each acked APPLY or its lease certainly expired",
    "cohort_failed": "a cohort agent NACKed (or, with on_agent_loss=rollback, disconnected) "
    "before acking",
    "contract_planned": "the migration has contract_sql",
}


@dataclasses.dataclass(frozen=True)
class StateRecord:
    state: MigrationState
    entered_at: float


class MigrationMachine:
    """State, ledgers and history of one migration; triggers are bound by `transitions`.

    The inputs (module docstring) are the whole driving API. The answer inputs accept
    anything in any state (answers that no longer matter are recorded as STALE/CLOSED and
    change nothing) and advance the machine when a guard allows it; the transition inputs
    (`start`, `sql_committed`, `sql_failed`, `cancel`, `finish`) are strict and raise
    `MachineError` in a state that has no such transition (`may_cancel()` asks first).
    """

    state: MigrationState
    # Bound by transitions.Machine; declared for type checkers.
    start: Callable[..., bool]
    cohort_acked: Callable[..., bool]
    sql_committed: Callable[..., bool]
    sql_failed: Callable[..., bool]
    refused: Callable[..., bool]
    timed_out: Callable[..., bool]
    finish: Callable[..., bool]
    cancel: Callable[..., bool]
    may_cancel: Callable[[], bool]

    def __init__(
        self,
        migration_id: str,
        *,
        has_contract: bool,
        connected: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
        on_agent_loss: str = "wait",
        departing: Iterable[str] = (),
        lease_seconds: float = 0.0,
    ) -> None:
        if on_agent_loss not in AGENT_LOSS_POLICIES:
            raise ValueError(
                f"on_agent_loss must be one of {', '.join(AGENT_LOSS_POLICIES)}, "
                f"got {on_agent_loss!r}"
            )
        self.migration_id = migration_id
        self.on_agent_loss = on_agent_loss
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
        #: Agents that disconnected while their lease may still be valid ("wait" mode): they
        #: may still serve on the schema they last knew, so they stay in the next cohorts.
        self.departing: set[str] = (
            set(departing) - self.connected if on_agent_loss == "wait" else set()
        )
        #: Agents whose lease certainly expired during this run (fenced, out of the cohort).
        self.departed: set[str] = set()
        #: The lease its agents hold (0: none): a successor waits out at least this long
        #: for agents it cannot account for (statemachine.checkpoint).
        self.lease_seconds = lease_seconds
        self._clock = clock
        self.history: list[StateRecord] = [StateRecord(S.PENDING, clock())]
        self.machine = Machine(
            model=self,
            # `_entered` runs on entering every state, before a transition's `after`
            # callbacks, so `_advance` already sees the new phase's ledger.
            states=[{"name": state, "on_enter": "_entered"} for state in MigrationState],
            initial=S.PENDING,
            transitions=MIGRATION_TRANSITIONS,
            auto_transitions=False,
            send_event=True,
        )

    # ----------------------------------------------------------------- guards
    def cohort_complete(self, event: EventData) -> bool:
        ledger = self.ledger
        return ledger is not None and ledger.phase is self.state.phase and ledger.complete

    def cohort_failed(self, event: EventData) -> bool:
        ledger = self.ledger
        return ledger is not None and ledger.phase is self.state.phase and ledger.failed

    def previous_queries_retired(self, event: EventData) -> bool:
        """No cohort agent is pending with a lease that may still be valid: each one that
        could still run the old queries acked APPLY or was declared departed."""
        ledger = self.ledger
        if ledger is None or ledger.phase is not self.state.phase:
            return False
        return (
            not ((self.departing | self.connected) & ledger.cohort)
            - ledger.acked
            - (ledger.departed)
        )

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

    def _sql_failure(self, event: EventData) -> None:
        """A phase's SQL failed; the partial-commit rule decides what ROLLBACK must undo.

        Autocommit statements make a phase non-atomic: the groups that committed before the
        failure stay. In EXECUTE that means the schema is (partly) expanded, so ROLLBACK must
        run rollback_sql (derived rollbacks use IF EXISTS, so they undo a partial run too); in
        CONTRACT nothing can restore what a destructive group did, which the result says.
        """
        if "message" not in event.kwargs:
            raise TypeError("sql_failed needs message=... (and statement=, committed_groups=)")
        committed = int(event.kwargs.get("committed_groups", 0))
        phase = self.state.phase
        if committed:
            if self.state is S.EXECUTE:
                self.executed = True
            else:
                self.warnings.append(
                    f"{self.state.name} failed after {committed} of its execution group(s) "
                    "committed; rollback_sql cannot restore what they changed"
                )
        message = str(event.kwargs["message"])
        statement = event.kwargs.get("statement")
        self._set_failure_once(Failure(FailureKind.SQL_ERROR, phase, message, statement=statement))

    def _cancel_failure(self, event: EventData) -> None:
        message = str(event.kwargs.get("message", "the migration was cancelled by its host"))
        self._set_failure_once(Failure(FailureKind.CANCELLED, self.state.phase, message))

    def _set_failure_once(self, failure: Failure) -> None:
        if self.failure is None:
            self.failure = failure

    def _record_restore(self, event: EventData) -> None:
        """How ROLLBACK ended: `schema_restored` (None: nothing was committed) and a note."""
        self.schema_restored = event.kwargs.get("schema_restored")
        note = event.kwargs.get("note")
        if note:
            self.warnings.append(str(note))

    def enter_current_state(self) -> None:
        """Run the entry rules of the current state again: a new ledger for its phase, from
        the agents connected now. Used when a successor coordinator resumes the machine."""
        self._entered(None)

    def _entered(self, event: EventData | None) -> None:
        self.history.append(StateRecord(self.state, self._clock()))
        phase = self.state.phase
        if self.state is S.COMPLETED and self.ledger is not None:
            # CONFIRM was not waited for (`acks_awaited`): its answers, which come after,
            # are still recorded (for the events, metrics and the log), changing nothing.
            return
        if self.ledger is not None:
            self.ledger.closed = True
        present = self.connected | self.departing
        cohort = present
        if phase is Phase.ROLLBACK:
            # Agents that already let a deadline pass are not waited for a second time: the
            # rollback would run after that wait anyway, so it would only double the outage.
            cohort = present - self.unresponsive
            skipped = sorted(present & self.unresponsive)
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
    def status(self) -> MigrationStatus:
        return self.state.status

    @property
    def acks_awaited(self) -> bool:
        """Whether the current phase's answers are waited for at all.

        Not in CONFIRM: its notice still asks every agent to ack (the `on_confirm` hook
        runs), but no answer can change the outcome any more (a NACK, a loss or a silence
        would only be a warning), so the migration completes as soon as the notice is sent
        instead of holding the next migration for a full round of acks. Answers that come
        later are stale to the machine and reach only the events and the log.
        """
        return self.state is not S.CONFIRM and not self.is_terminal

    @property
    def awaiting_acks(self) -> bool:
        """The runner should wait for answers (or the deadline) before doing anything."""
        ledger = self.ledger
        return ledger is not None and not ledger.closed and not ledger.settled and self.acks_awaited

    @property
    def needs_rollback_sql(self) -> bool:
        """EXECUTE committed and CONTRACT did not: the expanded schema must be put back."""
        return self.executed and not self.contracted

    @property
    def applied(self) -> bool:
        """Agents joining now should run the new code: the expanded schema is committed and
        the migration is not rolling back."""
        return self.state in APPLIED_STATES

    # ------------------------------------------------------------------ inputs
    def receive_ack(self, agent_id: str, migration_id: str, phase: Phase) -> AckOutcome:
        if migration_id != self.migration_id or self.ledger is None:
            return AckOutcome.STALE
        outcome = self.ledger.record_ack(agent_id, phase)
        if outcome is AckOutcome.RECORDED:
            self._advance()
        return outcome

    def receive_nack(
        self, agent_id: str, migration_id: str, phase: Phase, error: str
    ) -> AckOutcome:
        if migration_id != self.migration_id or self.ledger is None:
            return AckOutcome.STALE
        outcome = self.ledger.record_nack(agent_id, phase, error)
        if outcome is AckOutcome.RECORDED:
            self._refuse(Failure(FailureKind.NACK, phase, error, agents=(agent_id,)))
        return outcome

    def agent_connected(self, agent_id: str) -> None:
        """`agent_id` (re)joined. One that had departed (a restarted instance) is present
        again: `departed` lists only agents still gone; the ledger keeps what it recorded."""
        self.connected.add(agent_id)
        self.departing.discard(agent_id)
        self.departed.discard(agent_id)

    def agent_disconnected(self, agent_id: str) -> AckOutcome:
        """The agent's connection closed. With "wait" it becomes `departing` and still owes
        its answer (RECORDED is never returned: nothing was decided); with "rollback" a
        cohort agent that owed an answer refuses the phase."""
        self.connected.discard(agent_id)
        if self.on_agent_loss == "wait":
            self.departing.add(agent_id)
            return AckOutcome.STALE
        return self._lost(agent_id, "connection closed")

    def lease_expired(self, agent_id: str) -> AckOutcome:
        """The agent's lease certainly expired: it has fenced itself. With "wait" it leaves
        the cohort (`departed`), which may complete the phase; with "rollback" a cohort agent
        that still owed an answer refuses the phase. RECORDED when the ledger changed."""
        known = agent_id in self.connected or agent_id in self.departing
        self.connected.discard(agent_id)
        self.departing.discard(agent_id)
        if self.on_agent_loss == "rollback":
            return self._lost(agent_id, "lease expired")
        if known:
            self.departed.add(agent_id)
        if self.ledger is None or self.is_terminal:
            return AckOutcome.STALE
        outcome = self.ledger.record_departed(agent_id)
        if outcome is AckOutcome.RECORDED:
            self.departed.add(agent_id)
            self._advance()
        return outcome

    def _lost(self, agent_id: str, how: str) -> AckOutcome:
        if self.ledger is None or self.is_terminal:
            return AckOutcome.STALE
        outcome = self.ledger.record_lost(agent_id)
        if outcome is AckOutcome.RECORDED:
            phase = self.ledger.phase
            self._refuse(Failure(FailureKind.DISCONNECT, phase, how, agents=(agent_id,)))
        return outcome

    def deadline_passed(self, timeout: float) -> bool:
        """The phase's ack deadline expired. Returns True if that changed the state."""
        ledger = self.ledger
        if ledger is None or ledger.closed or ledger.complete or self.is_terminal:
            return False
        missing = ledger.missing()
        self.unresponsive.update(missing)
        message = f"no ack within {timeout:g} s"
        if self.state in REFUSABLE_STATES:
            failure = Failure(FailureKind.TIMEOUT, ledger.phase, message, agents=tuple(missing))
            return self.timed_out(failure=failure)
        if missing:
            self.warnings.append(
                f"{ledger.phase.name}: agent(s) {', '.join(missing)} did not ack ({message})"
            )
        ledger.closed = True
        return False

    def expand_committed(self) -> None:
        """EXECUTE's transaction committed; backfills may still run before `sql_committed`."""
        self.executed = True

    def _refuse(self, failure: Failure) -> None:
        """A cohort agent refused (NACK) or was lost: roll back, or only warn after the point
        where the migration goes forward whatever happens."""
        if self.state in REFUSABLE_STATES:
            self.refused(failure=failure)
        else:
            self.warnings.append(failure.describe())

    def _advance(self, event: EventData | None = None) -> None:
        if self.state in REFUSABLE_STATES and self.ledger is not None and self.ledger.complete:
            self.cohort_acked()


__all__ = [
    "AGENT_LOSS_POLICIES",
    "GUARD_DESCRIPTIONS",
    "MIGRATION_TRANSITIONS",
    "MigrationMachine",
    "StateRecord",
]
