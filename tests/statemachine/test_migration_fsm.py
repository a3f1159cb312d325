"""MigrationMachine: every path a migration can take, driven with plain calls (no trio, no DB).

These are the rules of docs/design.md stated on the pure machine: EXECUTE only after every
ANNOUNCE ack, CONTRACT only after every APPLY ack, any refusal before CONTRACT commits leads to
ROLLBACK then FAILED, and the terminal states absorb every input.
"""

# The machine's state changes behind mypy's back (triggers are bound at run time), so its
# narrowing of `m.state` after one assert would flag every later check as unreachable.
# mypy: disable-error-code="comparison-overlap"

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from transitions import MachineError

from statemachine import (
    AckOutcome,
    Failure,
    FailureKind,
    MigrationMachine,
    MigrationState,
    MigrationStatus,
    Phase,
)

S = MigrationState
MID = "mig-1"


def _machine(*agents: str, contract: bool = False, policy: str = "wait") -> MigrationMachine:
    ticks = itertools.count(100)
    return MigrationMachine(
        MID,
        has_contract=contract,
        connected=agents,
        clock=lambda: float(next(ticks)),
        on_agent_loss=policy,
    )


def _ack_all(m: MigrationMachine, phase: Phase, *agents: str) -> None:
    for agent in agents:
        assert m.receive_ack(agent, MID, phase) is AckOutcome.RECORDED


def _states(m: MigrationMachine) -> list[MigrationState]:
    return [record.state for record in m.history]


def _to_apply(m: MigrationMachine, *agents: str) -> None:
    m.start()
    _ack_all(m, Phase.ANNOUNCE, *agents)
    m.sql_committed()
    assert m.state is S.APPLY


def _enter(m: MigrationMachine, phase: Phase, *agents: str) -> None:
    """Start `m` and bring it to the acked `phase` (ANNOUNCE or APPLY), all `agents` acking."""
    if phase is Phase.APPLY:
        _to_apply(m, *agents)
    else:
        m.start()


# ------------------------------------------------------------------ happy paths
def test_happy_path_without_contract() -> None:
    m = _machine("a", "b")
    assert m.state is S.PENDING
    m.start()
    assert m.state is S.ANNOUNCE
    assert m.ledger is not None and m.ledger.cohort == {"a", "b"}
    assert m.awaiting_acks
    m.receive_ack("a", MID, Phase.ANNOUNCE)
    assert m.state is S.ANNOUNCE, "EXECUTE must wait for every cohort agent"
    m.receive_ack("b", MID, Phase.ANNOUNCE)
    assert m.state is S.EXECUTE
    assert m.ledger is None
    assert not m.executed
    assert not m.applied
    m.sql_committed()
    assert m.state is S.APPLY
    assert m.executed
    assert m.applied
    _ack_all(m, Phase.APPLY, "a", "b")
    assert m.state is S.CONFIRM
    assert not m.contracted
    _ack_all(m, Phase.CONFIRM, "a", "b")
    assert m.state is S.CONFIRM, "CONFIRM ends when the runner says so, not on the last ack"
    m.finish()
    assert m.state is S.COMPLETED
    assert m.is_terminal
    assert m.failure is None
    assert m.warnings == []
    assert _states(m) == [S.PENDING, S.ANNOUNCE, S.EXECUTE, S.APPLY, S.CONFIRM, S.COMPLETED]
    assert [r.entered_at for r in m.history] == [100.0, 101.0, 102.0, 103.0, 104.0, 105.0]


def test_happy_path_with_contract() -> None:
    m = _machine("a", contract=True)
    _to_apply(m, "a")
    _ack_all(m, Phase.APPLY, "a")
    assert m.state is S.CONTRACT
    assert m.ledger is None
    assert m.needs_rollback_sql  # CONTRACT has not committed yet
    m.sql_committed()
    assert m.state is S.CONFIRM
    assert m.contracted
    assert not m.needs_rollback_sql
    m.finish()
    assert _states(m) == [
        S.PENDING,
        S.ANNOUNCE,
        S.EXECUTE,
        S.APPLY,
        S.CONTRACT,
        S.CONFIRM,
        S.COMPLETED,
    ]


def test_contract_waits_for_every_apply_ack() -> None:
    m = _machine("a", "b", contract=True)
    _to_apply(m, "a", "b")
    m.receive_ack("a", MID, Phase.APPLY)
    assert m.state is S.APPLY, "one APPLY ack of two must not start CONTRACT"
    assert m.deadline_passed(1.0) is True
    assert m.state is S.ROLLBACK, "a missing APPLY ack at the deadline rolls back, never contracts"
    assert not m.contracted


def test_empty_cohort_runs_straight_through() -> None:
    m = _machine(contract=True)
    m.start()
    assert m.state is S.EXECUTE, "nobody to wait for in ANNOUNCE"
    m.sql_committed()
    assert m.state is S.CONTRACT
    m.sql_committed()
    assert m.state is S.CONFIRM
    assert not m.awaiting_acks
    m.finish()
    assert m.state is S.COMPLETED


# ------------------------------------------------------- refusals -> ROLLBACK
@pytest.mark.parametrize("phase", [Phase.ANNOUNCE, Phase.APPLY])
def test_nack_rolls_back_then_fails(phase: Phase) -> None:
    m = _machine("a", "b")
    _enter(m, phase, "a", "b")
    m.receive_ack("a", MID, phase)
    assert m.receive_nack("b", MID, phase, "ValueError: no") is AckOutcome.RECORDED
    assert m.state is S.ROLLBACK
    assert m.failure is not None
    assert m.failure.kind is FailureKind.NACK
    assert m.failure.phase is phase
    assert m.failure.agents == ("b",)
    assert str(m.failure) == f"nack in {phase.name} from agent b: ValueError: no"
    assert m.needs_rollback_sql is (phase is Phase.APPLY)
    assert not m.applied
    assert m.ledger is not None and m.ledger.phase is Phase.ROLLBACK
    assert m.ledger.cohort == {"a", "b"}
    m.finish(schema_restored=True if phase is Phase.APPLY else None)
    assert m.state is S.FAILED
    assert m.is_terminal


@pytest.mark.parametrize("phase", [Phase.ANNOUNCE, Phase.APPLY])
def test_disconnect_before_acking_rolls_back(phase: Phase) -> None:
    """on_agent_loss="rollback": the behaviour before leases."""
    m = _machine("a", "b", policy="rollback")
    _enter(m, phase, "a", "b")
    assert m.agent_disconnected("b") is AckOutcome.RECORDED
    assert m.state is S.ROLLBACK
    assert m.failure is not None
    assert m.failure.kind is FailureKind.DISCONNECT
    assert m.failure.agents == ("b",)
    assert "agent b disconnected" in str(m.failure)
    assert m.ledger is not None and m.ledger.cohort == {"a"}, "a gone agent is not asked again"


def test_disconnect_after_acking_changes_nothing() -> None:
    m = _machine("a", "b", policy="rollback")
    m.start()
    m.receive_ack("a", MID, Phase.ANNOUNCE)
    assert m.agent_disconnected("a") is AckOutcome.DUPLICATE
    assert m.state is S.ANNOUNCE
    m.receive_ack("b", MID, Phase.ANNOUNCE)
    assert m.state is S.EXECUTE
    m.sql_committed()
    assert m.ledger is not None and m.ledger.cohort == {"b"}


@pytest.mark.parametrize("phase", [Phase.ANNOUNCE, Phase.APPLY])
def test_deadline_rolls_back_naming_the_missing_agents(phase: Phase) -> None:
    m = _machine("c", "a", "b")
    _enter(m, phase, "a", "b", "c")
    m.receive_ack("b", MID, phase)
    assert m.deadline_passed(2.5) is True
    assert m.state is S.ROLLBACK
    assert m.failure is not None
    assert m.failure.kind is FailureKind.TIMEOUT
    assert m.failure.agents == ("a", "c")
    assert (
        str(m.failure)
        == f"timeout in {phase.name}: agent(s) a, c did not ack (no ack within 2.5 s)"
    )


def test_first_failure_wins() -> None:
    m = _machine("a", "b")
    m.start()
    m.receive_nack("a", MID, Phase.ANNOUNCE, "first")
    m.agent_disconnected("b")
    m.receive_nack("b", MID, Phase.ROLLBACK, "second")
    assert m.failure is not None and m.failure.message == "first"


def test_sql_failure_in_execute_has_nothing_to_undo() -> None:
    m = _machine("a")
    m.start()
    m.receive_ack("a", MID, Phase.ANNOUNCE)
    m.sql_failed(statement="ALTER TABLE t ADD COLUMN x int", message='relation "t" does not exist')
    assert m.state is S.ROLLBACK
    assert m.failure is not None
    assert m.failure.kind is FailureKind.SQL_ERROR
    assert m.failure.phase is Phase.EXECUTE
    assert m.failure.statement == "ALTER TABLE t ADD COLUMN x int"
    assert 'relation "t" does not exist' in str(m.failure)
    assert not m.executed
    assert not m.needs_rollback_sql
    m.finish(schema_restored=None)
    assert m.state is S.FAILED
    assert _states(m) == [S.PENDING, S.ANNOUNCE, S.EXECUTE, S.ROLLBACK, S.FAILED]


def test_sql_failure_in_contract_undoes_the_expand() -> None:
    m = _machine("a", contract=True)
    _to_apply(m, "a")
    m.receive_ack("a", MID, Phase.APPLY)
    assert m.state is S.CONTRACT
    m.sql_failed(statement="ALTER TABLE t DROP COLUMN old", message="lock timeout")
    assert m.state is S.ROLLBACK
    assert m.failure is not None and m.failure.phase is Phase.CONTRACT
    assert m.needs_rollback_sql, "EXECUTE committed and CONTRACT did not: undo the expand"
    m.finish(schema_restored=False, note="no rollback_sql: the schema was left expanded")
    assert m.state is S.FAILED
    assert m.schema_restored is False
    assert m.warnings == ["no rollback_sql: the schema was left expanded"]


def test_cancel_rolls_back_from_any_working_state() -> None:
    m = _machine("a")
    _to_apply(m, "a")
    assert m.may_cancel() is True
    assert m.cancel(message="host said stop") is True
    assert m.state is S.ROLLBACK
    assert m.failure is not None and m.failure.kind is FailureKind.CANCELLED
    assert m.failure.message == "host said stop"
    assert m.may_cancel() is False, "ROLLBACK cannot be cancelled into ROLLBACK"


# ------------------------------------------------------------ terminal states
def _completed() -> MigrationMachine:
    m = _machine("a")
    _to_apply(m, "a")
    m.receive_ack("a", MID, Phase.APPLY)
    m.finish()
    assert m.state is S.COMPLETED
    return m


def _failed() -> MigrationMachine:
    m = _machine("a")
    m.start()
    m.receive_nack("a", MID, Phase.ANNOUNCE, "no")
    m.finish(schema_restored=None)
    assert m.state is S.FAILED
    return m


@pytest.mark.parametrize("build", [_completed, _failed], ids=["completed", "failed"])
def test_terminal_states_absorb_every_input(build: Callable[[], MigrationMachine]) -> None:
    m = build()
    final, failure, history = m.state, m.failure, list(m.history)
    for phase in Phase:
        if m.state is S.COMPLETED and phase is Phase.CONFIRM:
            # CONFIRM was not waited for: its late answers are still recorded, once.
            assert m.receive_ack("a", MID, phase) is AckOutcome.RECORDED
            assert m.receive_nack("a", MID, phase, "late") is AckOutcome.DUPLICATE
            continue
        assert m.receive_ack("a", MID, phase) is AckOutcome.STALE
        assert m.receive_nack("a", MID, phase, "late") is AckOutcome.STALE
    assert m.agent_disconnected("a") is AckOutcome.STALE
    m.agent_connected("b")
    assert m.deadline_passed(1.0) is False
    assert m.may_cancel() is False
    for trigger in (m.start, m.sql_committed, m.finish):
        with pytest.raises(MachineError):
            trigger()
    with pytest.raises(MachineError):
        m.sql_failed(statement="x", message="y")
    assert (m.state, m.failure, m.history) == (final, failure, history)


# --------------------------------------------------------------- late joiners
def test_late_joiner_is_not_in_announce_but_must_ack_apply() -> None:
    m = _machine("a", contract=True)
    m.start()
    m.agent_connected("late")
    assert m.receive_ack("late", MID, Phase.ANNOUNCE) is AckOutcome.STRANGER
    m.receive_ack("a", MID, Phase.ANNOUNCE)
    assert m.state is S.EXECUTE
    m.agent_connected("later")  # joined while the expand SQL ran
    m.sql_committed()
    assert m.ledger is not None and m.ledger.cohort == {"a", "late", "later"}
    _ack_all(m, Phase.APPLY, "a", "late")
    assert m.state is S.APPLY, "CONTRACT must wait for the agents that joined late"
    m.receive_ack("later", MID, Phase.APPLY)
    assert m.state is S.CONTRACT


def test_joining_during_a_phase_does_not_extend_its_cohort() -> None:
    m = _machine("a")
    _to_apply(m, "a")
    m.agent_connected("late")
    m.receive_ack("a", MID, Phase.APPLY)
    assert m.state is S.CONFIRM
    assert m.ledger is not None and m.ledger.cohort == {"a", "late"}


# -------------------------------------------------------------- odd answers
def test_answers_for_another_migration_or_phase_are_stale() -> None:
    m = _machine("a")
    m.start()
    assert m.receive_ack("a", "other-migration", Phase.ANNOUNCE) is AckOutcome.STALE
    assert m.receive_nack("a", "other-migration", Phase.ANNOUNCE, "x") is AckOutcome.STALE
    assert m.receive_ack("a", MID, Phase.APPLY) is AckOutcome.STALE
    assert m.state is S.ANNOUNCE
    m.receive_ack("a", MID, Phase.ANNOUNCE)
    m.sql_committed()
    assert m.receive_ack("a", MID, Phase.ANNOUNCE) is AckOutcome.STALE, "late ack of a past phase"
    assert m.state is S.APPLY


def test_answers_in_execute_are_stale() -> None:
    m = _machine("a", policy="rollback")
    m.start()
    m.receive_ack("a", MID, Phase.ANNOUNCE)
    assert m.state is S.EXECUTE
    assert m.receive_nack("a", MID, Phase.EXECUTE, "x") is AckOutcome.STALE
    assert m.agent_disconnected("a") is AckOutcome.STALE
    assert m.state is S.EXECUTE, "a disconnect in EXECUTE is judged at APPLY"
    m.sql_committed()
    assert m.ledger is not None and m.ledger.cohort == frozenset()


# ------------------------------------------------------------ CONFIRM warnings
def test_problems_in_confirm_are_warnings_not_rollbacks() -> None:
    m = _machine("a", "b", "c", policy="rollback")
    _to_apply(m, "a", "b", "c")
    _ack_all(m, Phase.APPLY, "a", "b", "c")
    assert m.state is S.CONFIRM
    m.receive_nack("a", MID, Phase.CONFIRM, "cache flush failed")
    m.agent_disconnected("b")
    assert m.state is S.CONFIRM
    assert m.deadline_passed(3.0) is False
    assert m.state is S.CONFIRM
    assert m.ledger is not None and m.ledger.closed
    assert m.receive_ack("c", MID, Phase.CONFIRM) is AckOutcome.CLOSED
    m.finish()
    assert m.state is S.COMPLETED
    assert m.failure is None
    assert m.warnings == [
        "nack in CONFIRM from agent a: cache flush failed",
        "agent b disconnected in CONFIRM before acking",
        "CONFIRM: agent(s) c did not ack (no ack within 3 s)",
    ]


def test_confirm_acks_are_not_waited_for() -> None:
    m = _machine("a", "b")
    m.start()
    assert m.acks_awaited and m.awaiting_acks, "ANNOUNCE waits for its cohort"
    _ack_all(m, Phase.ANNOUNCE, "a", "b")
    m.sql_committed()
    assert m.acks_awaited and m.awaiting_acks, "APPLY waits for its cohort"
    _ack_all(m, Phase.APPLY, "a", "b")
    assert m.state is S.CONFIRM
    assert m.ledger is not None and not m.ledger.settled
    assert not m.acks_awaited, "no CONFIRM answer can change the outcome: nothing to wait for"
    assert not m.awaiting_acks
    m.finish()
    assert m.state is S.COMPLETED
    assert not m.acks_awaited and not m.awaiting_acks
    assert m.receive_ack("a", MID, Phase.CONFIRM) is AckOutcome.RECORDED, "late, still counted"
    assert m.receive_ack("a", MID, Phase.CONFIRM) is AckOutcome.DUPLICATE
    assert m.receive_ack("b", MID, Phase.APPLY) is AckOutcome.STALE
    assert m.state is S.COMPLETED
    assert m.warnings == []
    m.receive_nack("b", MID, Phase.CONFIRM, "cache flush failed")
    assert m.state is S.COMPLETED, "a late NACK is only a warning"
    assert m.warnings == ["nack in CONFIRM from agent b: cache flush failed"]


def test_rollback_acks_are_still_waited_for() -> None:
    m = _machine("a", "b")
    m.start()
    m.receive_nack("a", MID, Phase.ANNOUNCE, "no")
    assert m.state is S.ROLLBACK
    assert m.acks_awaited and m.awaiting_acks


def test_problems_in_rollback_are_warnings() -> None:
    m = _machine("a", "b")
    m.start()
    m.receive_nack("a", MID, Phase.ANNOUNCE, "no")
    m.receive_nack("b", MID, Phase.ROLLBACK, "could not revert")
    assert m.state is S.ROLLBACK
    assert m.warnings == ["nack in ROLLBACK from agent b: could not revert"]
    assert m.failure is not None and m.failure.agents == ("a",)


def test_deadline_after_a_complete_cohort_does_nothing() -> None:
    m = _machine("a")
    _to_apply(m, "a")
    _ack_all(m, Phase.APPLY, "a")
    _ack_all(m, Phase.CONFIRM, "a")
    assert m.deadline_passed(1.0) is False
    assert m.warnings == []
    assert m.state is S.CONFIRM


# ------------------------------------------------------------ raw triggers
def test_raw_triggers_raise_machine_error_when_misused() -> None:
    m = _machine("a")
    with pytest.raises(MachineError):
        m.cohort_acked()  # PENDING has no cohort_acked
    with pytest.raises(MachineError):
        m.sql_committed()
    m.start()
    with pytest.raises(MachineError):
        m.start()
    with pytest.raises(MachineError):
        m.sql_committed()  # ANNOUNCE runs no SQL
    with pytest.raises(MachineError):
        m.finish()
    assert m.state is S.ANNOUNCE


def test_raw_triggers_respect_their_guards() -> None:
    m = _machine("a")
    m.start()
    assert m.cohort_acked() is False, "guard: cohort not complete"
    assert m.state is S.ANNOUNCE
    assert m.refused(failure=None) is False, "guard: nobody refused"
    m.receive_ack("a", MID, Phase.ANNOUNCE)
    m.sql_committed()
    m.receive_ack("a", MID, Phase.APPLY)
    assert m.state is S.CONFIRM
    with pytest.raises(MachineError):
        m.timed_out(failure=None)  # CONFIRM never rolls back


def test_apply_guards_hold_for_raw_triggers() -> None:
    """The guards themselves, not only the driver methods, keep CONTRACT behind APPLY acks."""
    m = _machine("a", "b", contract=True)
    _to_apply(m, "a", "b")
    m.receive_ack("a", MID, Phase.APPLY)
    assert m.cohort_acked() is False
    assert m.state is S.APPLY
    late = Failure(FailureKind.TIMEOUT, Phase.APPLY, "late", agents=("b",))
    assert m.timed_out(failure=late) is True
    assert m.state is S.ROLLBACK
    assert m.failure is late


def test_failure_triggers_demand_a_failure() -> None:
    m = _machine("a")
    m.start()
    m.receive_ack("a", MID, Phase.ANNOUNCE)
    with pytest.raises(TypeError, match="sql_failed needs message="):
        m.sql_failed()
    assert m.state is S.EXECUTE


def test_partial_commit_in_execute_means_rollback_sql_must_run() -> None:
    m = _machine("a")
    m.start()
    m.receive_ack("a", MID, Phase.ANNOUNCE)
    m.sql_failed(statement="CREATE INDEX CONCURRENTLY i ON t (c)", message="x", committed_groups=1)
    assert m.state is S.ROLLBACK
    assert m.needs_rollback_sql, "a committed group of EXECUTE must be undone"
    assert m.warnings == []


def test_partial_commit_in_contract_is_a_warning_and_needs_no_rollback_sql() -> None:
    m = MigrationMachine(MID, has_contract=True, connected=["a"])
    m.start()
    m.receive_ack("a", MID, Phase.ANNOUNCE)
    m.sql_committed()
    m.receive_ack("a", MID, Phase.APPLY)
    assert m.state is S.CONTRACT
    m.sql_failed(statement="DROP INDEX CONCURRENTLY i", message="x", committed_groups=2)
    assert m.state is S.ROLLBACK
    assert m.needs_rollback_sql, "EXECUTE committed, CONTRACT did not: put the expansion back"
    assert m.warnings == [
        "CONTRACT failed after 2 of its execution group(s) committed; rollback_sql cannot "
        "restore what they changed"
    ]


def test_status_follows_the_state() -> None:
    m = _machine("a")
    assert m.status is MigrationStatus.PENDING
    m.start()
    assert m.status is MigrationStatus.RUNNING
    m.receive_nack("a", MID, Phase.ANNOUNCE, "no")
    m.finish(schema_restored=None)
    assert m.status is MigrationStatus.FAILED


def test_rollback_does_not_wait_again_for_agents_that_missed_the_deadline() -> None:
    m = MigrationMachine("m1", has_contract=False, connected=["a", "b", "c"])
    m.start()
    for agent in "abc":
        m.receive_ack(agent, "m1", Phase.ANNOUNCE)
    m.sql_committed()
    m.receive_ack("a", "m1", Phase.APPLY)
    m.deadline_passed(1.0)  # b and c never acked APPLY
    assert m.state is MigrationState.ROLLBACK
    assert m.ledger is not None and m.ledger.cohort == {"a"}
    assert any("ROLLBACK: not waiting for agent(s) b, c" in w for w in m.warnings)


# ------------------------------------------------- agent loss: waiting for leases
@pytest.mark.parametrize("phase", [Phase.ANNOUNCE, Phase.APPLY])
def test_disconnect_waits_and_a_reconnect_with_an_ack_completes(phase: Phase) -> None:
    m = _machine("a", "b", contract=True)
    _enter(m, phase, "a", "b")
    assert m.agent_disconnected("b") is AckOutcome.STALE
    assert m.state.phase is phase and m.failure is None
    assert m.departing == {"b"}
    m.receive_ack("a", MID, phase)
    assert m.state.phase is phase, "b still owes its answer"
    m.agent_connected("b")
    assert m.departing == set()
    assert m.receive_ack("b", MID, phase) is AckOutcome.RECORDED
    assert m.state is (S.EXECUTE if phase is Phase.ANNOUNCE else S.CONTRACT)
    assert m.departed == set()


def test_lease_expiry_takes_the_agent_out_of_the_cohort() -> None:
    m = _machine("a", "b", contract=True)
    _to_apply(m, "a", "b")
    m.receive_ack("a", MID, Phase.APPLY)
    m.agent_disconnected("b")
    assert m.state is S.APPLY
    assert m.lease_expired("b") is AckOutcome.RECORDED
    assert m.state is S.CONTRACT and m.failure is None
    assert m.departed == {"b"}
    assert m.lease_expired("b") is AckOutcome.STALE, "CONTRACT has no ledger"


def test_an_agent_lost_in_execute_is_in_the_apply_cohort_until_its_lease_expires() -> None:
    m = _machine("a", "b", contract=True)
    m.start()
    _ack_all(m, Phase.ANNOUNCE, "a", "b")
    assert m.state is S.EXECUTE
    m.agent_disconnected("b")
    m.sql_committed()
    assert m.ledger is not None and m.ledger.cohort == {"a", "b"}, (
        "a departing agent may still run the old queries: it must answer APPLY too"
    )
    m.receive_ack("a", MID, Phase.APPLY)
    assert m.state is S.APPLY, "no CONTRACT while b may be alive and unfenced"
    m.lease_expired("b")
    assert m.state is S.CONTRACT


def test_a_connected_agent_whose_lease_expires_departs_too() -> None:
    """A partition: the coordinator still sees the socket, but no renewal came."""
    m = _machine("a", "b")
    m.start()
    m.receive_ack("a", MID, Phase.ANNOUNCE)
    assert m.lease_expired("b") is AckOutcome.RECORDED
    assert m.state is S.EXECUTE
    assert "b" not in m.connected


@pytest.mark.parametrize("phase", [Phase.ANNOUNCE, Phase.APPLY])
def test_waiting_still_rolls_back_on_a_nack_and_on_the_deadline(phase: Phase) -> None:
    m = _machine("a", "b", "c")
    _enter(m, phase, "a", "b", "c")
    m.agent_disconnected("c")
    m.receive_nack("a", MID, phase, "no")
    assert m.state is S.ROLLBACK and m.failure is not None
    assert m.failure.kind is FailureKind.NACK
    m2 = _machine("a", "b")
    _enter(m2, phase, "a", "b")
    m2.receive_ack("a", MID, phase)
    m2.agent_disconnected("b")
    assert m2.deadline_passed(5.0) is True
    assert m2.state is S.ROLLBACK and m2.failure is not None
    assert m2.failure.kind is FailureKind.TIMEOUT and m2.failure.agents == ("b",)


def test_rollback_policy_treats_a_lease_expiry_as_a_loss() -> None:
    m = _machine("a", "b", policy="rollback")
    m.start()
    assert m.lease_expired("b") is AckOutcome.RECORDED
    assert m.state is S.ROLLBACK and m.failure is not None
    assert m.failure.kind is FailureKind.DISCONNECT and m.failure.message == "lease expired"


def test_rollback_policy_ignores_departing_agents() -> None:
    m = MigrationMachine(
        MID, has_contract=False, connected=["a"], departing=["b"], on_agent_loss="rollback"
    )
    m.start()
    assert m.ledger is not None and m.ledger.cohort == {"a"}


def test_unknown_agent_loss_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="on_agent_loss must be one of wait, rollback"):
        MigrationMachine(MID, has_contract=False, on_agent_loss="retry")
