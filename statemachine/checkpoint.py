"""A migration's durable state, and how a coordinator that starts later resumes from it.

Why: a coordinator that dies mid-migration must not leave a schema nobody can reason about.
The runner writes a `Checkpoint` of its `MigrationMachine` to PostgreSQL *before* it acts on
a new state (write-ahead), and the journal of committed execution groups is written in the
same transaction as the group's own SQL. A coordinator that finds an unfinished checkpoint
never guesses: `restore` rebuilds the machine and `resume_point` says where to continue.

The rules (docs/durability.md has the full table):

- an acked phase (ANNOUNCE, APPLY, CONFIRM, ROLLBACK) is entered afresh: the notice is sent
  again and the acks collected again from the agents connected now (agents answer a repeated
  notice idempotently);
- EXECUTE or CONTRACT re-runs only the execution groups the journal does not list as
  committed, so SQL that committed is never run twice and SQL that did not is run again;
- once CONTRACT committed the migration goes forward only (CONFIRM, then COMPLETED);
- a ROLLBACK in progress is finished: acks again, then rollback_sql if EXECUTE committed.

Everything here is plain data and plain functions (JSON-able dicts), so the store in
`coordinator` only has to read and write one document.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from statemachine.failure import Failure, FailureKind
from statemachine.migration_fsm import MigrationMachine, StateRecord
from statemachine.phases import MigrationState, Phase

#: Version of the checkpoint document; bump it when its fields change meaning.
CHECKPOINT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """Everything about one migration run a successor coordinator needs to continue it."""

    migration_id: str
    state: MigrationState
    executed: bool
    contracted: bool
    failure: Failure | None
    warnings: tuple[str, ...]
    unresponsive: frozenset[str]
    history: tuple[StateRecord, ...]
    #: The current phase's cohort and who acked it: for `lockstep status`, not for resuming
    #: (a resumed phase collects its acks again).
    cohort: frozenset[str] = frozenset()
    acked: frozenset[str] = frozenset()
    schema_restored: bool | None = None
    #: The agents connected when the checkpoint was written: a successor waits for them to
    #: come back and keeps them in the next cohorts, so no phase can pass without them.
    connected: frozenset[str] = frozenset()
    #: Agents that disconnected with a lease that may still be valid, and agents whose lease
    #: certainly expired during the run (see `MigrationMachine.departing`/`departed`).
    departing: frozenset[str] = frozenset()
    departed: frozenset[str] = frozenset()
    #: The lease length the run's agents hold: a successor that cannot account for an agent
    #: waits at least this long (stretched by the skew margin) after taking over.
    lease_seconds: float = 0.0
    on_agent_loss: str = "wait"

    @classmethod
    def of(cls, machine: MigrationMachine) -> Checkpoint:
        ledger = machine.ledger
        return cls(
            migration_id=machine.migration_id,
            state=machine.state,
            executed=machine.executed,
            contracted=machine.contracted,
            failure=machine.failure,
            warnings=tuple(machine.warnings),
            unresponsive=frozenset(machine.unresponsive),
            history=tuple(machine.history),
            cohort=ledger.cohort if ledger is not None else frozenset(),
            acked=ledger.acked if ledger is not None else frozenset(),
            schema_restored=machine.schema_restored,
            connected=frozenset(machine.connected),
            departing=frozenset(machine.departing),
            departed=frozenset(machine.departed),
            lease_seconds=machine.lease_seconds,
            on_agent_loss=machine.on_agent_loss,
        )

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> dict[str, Any]:
        failure = self.failure
        return {
            "version": CHECKPOINT_VERSION,
            "migration_id": self.migration_id,
            "state": self.state.value,
            "executed": self.executed,
            "contracted": self.contracted,
            "failure": None
            if failure is None
            else {
                "kind": failure.kind.value,
                "phase": None if failure.phase is None else failure.phase.value,
                "message": failure.message,
                "agents": list(failure.agents),
                "statement": failure.statement,
            },
            "warnings": list(self.warnings),
            "unresponsive": sorted(self.unresponsive),
            "history": [[r.state.value, r.entered_at] for r in self.history],
            "cohort": sorted(self.cohort),
            "acked": sorted(self.acked),
            "schema_restored": self.schema_restored,
            "connected": sorted(self.connected),
            "departing": sorted(self.departing),
            "departed": sorted(self.departed),
            "lease_seconds": self.lease_seconds,
            "on_agent_loss": self.on_agent_loss,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Checkpoint:
        """Parse a stored checkpoint; `ValueError` if it is not one this version can read."""
        if data.get("version") != CHECKPOINT_VERSION:
            raise ValueError(
                f"checkpoint version {data.get('version')!r} is not {CHECKPOINT_VERSION}: "
                "it was written by another lockstep version"
            )
        raw = data.get("failure")
        failure = None
        if raw is not None:
            failure = Failure(
                FailureKind(raw["kind"]),
                None if raw["phase"] is None else Phase(raw["phase"]),
                str(raw["message"]),
                tuple(raw.get("agents", ())),
                raw.get("statement"),
            )
        return cls(
            migration_id=str(data["migration_id"]),
            state=MigrationState(data["state"]),
            executed=bool(data["executed"]),
            contracted=bool(data["contracted"]),
            failure=failure,
            warnings=tuple(data.get("warnings", ())),
            unresponsive=frozenset(data.get("unresponsive", ())),
            history=tuple(StateRecord(MigrationState(s), float(t)) for s, t in data["history"]),
            cohort=frozenset(data.get("cohort", ())),
            acked=frozenset(data.get("acked", ())),
            schema_restored=data.get("schema_restored"),
            connected=frozenset(data.get("connected", ())),
            departing=frozenset(data.get("departing", ())),
            departed=frozenset(data.get("departed", ())),
            lease_seconds=float(data.get("lease_seconds", 0.0)),
            on_agent_loss=str(data.get("on_agent_loss", "wait")),
        )


def restore(
    checkpoint: Checkpoint,
    *,
    has_contract: bool,
    connected: Iterable[str],
    on_agent_loss: str | None = None,
    lease_seconds: float | None = None,
) -> MigrationMachine:
    """A machine in the checkpoint's state, its phase entered afresh for `connected` agents
    and the ones the checkpoint knew (those must answer too, or the phase times out).

    With "wait", the checkpoint's agents that are not connected now are `departing`: the
    successor cannot account for their leases, so it must keep them in the cohort until they
    come back or until it has waited out a whole lease (the driver feeds `lease_expired`).

    The machine's history keeps the earlier states, so the result still shows every phase
    the migration went through before the coordinator changed.
    """
    policy = on_agent_loss or checkpoint.on_agent_loss
    now = set(connected)
    known = {*checkpoint.connected, *checkpoint.departing}
    lease = max(checkpoint.lease_seconds, lease_seconds or 0.0)
    if policy == "wait":
        machine = MigrationMachine(
            checkpoint.migration_id,
            has_contract=has_contract,
            connected=now,
            departing=known - now,
            on_agent_loss=policy,
            lease_seconds=lease,
        )
    else:
        machine = MigrationMachine(
            checkpoint.migration_id,
            has_contract=has_contract,
            connected=known | now,
            on_agent_loss=policy,
            lease_seconds=lease,
        )
    machine.departed = set(checkpoint.departed)
    machine.executed = checkpoint.executed
    machine.contracted = checkpoint.contracted
    machine.failure = checkpoint.failure
    machine.warnings = list(checkpoint.warnings)
    machine.unresponsive = set(checkpoint.unresponsive)
    machine.schema_restored = checkpoint.schema_restored
    target = resume_state(checkpoint)
    if target is MigrationState.PENDING:
        machine.history = list(checkpoint.history)
        return machine
    # Entering the state builds the phase's ledger from the agents connected now; the entry
    # is recorded after the checkpoint's history, so a result shows the phase twice: once
    # before the coordinator changed, once after.
    machine.machine.set_state(target)
    machine.enter_current_state()
    machine.history = [*checkpoint.history, machine.history[-1]]
    return machine


def resume_state(checkpoint: Checkpoint) -> MigrationState:
    """The state a successor continues in (module docstring).

    EXECUTE whose groups all committed continues in EXECUTE too: the runner then finds every
    group journaled, runs nothing again, and reports the commit (backfills run again, which
    their WHERE makes idempotent). CONTRACT that committed continues in CONFIRM.
    """
    state = checkpoint.state
    if state is MigrationState.CONTRACT and checkpoint.contracted:
        return MigrationState.CONFIRM
    return state


__all__ = ["CHECKPOINT_VERSION", "Checkpoint", "restore", "resume_state"]
