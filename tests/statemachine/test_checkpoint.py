"""The durable checkpoint of a migration FSM: lossless JSON, and the resume rules."""

from __future__ import annotations

import json

import pytest

from statemachine import Failure, FailureKind, MigrationMachine, MigrationState, Phase
from statemachine.checkpoint import Checkpoint, restore, resume_state

S = MigrationState
MID = "m1"


def _in_apply(has_contract: bool = True) -> MigrationMachine:
    m = MigrationMachine(MID, has_contract=has_contract, connected=["a", "b"])
    m.start()
    m.receive_ack("a", MID, Phase.ANNOUNCE)
    m.receive_ack("b", MID, Phase.ANNOUNCE)
    m.sql_committed()
    m.receive_ack("a", MID, Phase.APPLY)
    return m


def test_json_round_trip_is_lossless() -> None:
    m = _in_apply()
    m.warnings.append("w")
    m.failure = Failure(FailureKind.NACK, Phase.APPLY, "boom", agents=("b",), statement=None)
    checkpoint = Checkpoint.of(m)
    again = Checkpoint.from_json(json.loads(json.dumps(checkpoint.to_json())))
    assert again == checkpoint
    assert again.acked == {"a"} and again.cohort == {"a", "b"}


def test_a_checkpoint_of_another_version_is_refused() -> None:
    data = Checkpoint.of(_in_apply()).to_json() | {"version": 99}
    with pytest.raises(ValueError, match="version 99"):
        Checkpoint.from_json(data)


def test_contract_that_committed_resumes_forward_only() -> None:
    m = _in_apply()
    m.receive_ack("b", MID, Phase.APPLY)
    assert m.state is S.CONTRACT
    m.contracted = True  # the CONTRACT transaction committed, the coordinator died
    assert resume_state(Checkpoint.of(m)) is S.CONFIRM
    m.contracted = False
    assert resume_state(Checkpoint.of(m)) is S.CONTRACT


def test_restore_enters_the_phase_afresh_for_old_and_new_agents() -> None:
    checkpoint = Checkpoint.of(_in_apply())
    m = restore(checkpoint, has_contract=True, connected=["c"])
    assert m.state is S.APPLY
    assert m.executed and not m.contracted
    assert m.ledger is not None and m.ledger.cohort == {"a", "b", "c"}
    assert m.ledger.acked == frozenset(), "a resumed phase collects its acks again"
    assert [r.state for r in m.history][-2:] == [S.APPLY, S.APPLY]
    for agent in "abc":
        m.receive_ack(agent, MID, Phase.APPLY)
    assert m.state is S.CONTRACT


def test_an_agent_that_never_comes_back_cannot_let_contract_run() -> None:
    m = restore(Checkpoint.of(_in_apply()), has_contract=True, connected=["a"])
    m.receive_ack("a", MID, Phase.APPLY)
    assert m.state is S.APPLY, "b was in the fleet the checkpoint knew: it must ack too"
    m.deadline_passed(1.0)
    assert m.state is S.ROLLBACK and m.needs_rollback_sql


def test_restore_of_a_pending_run_starts_from_the_beginning() -> None:
    m = restore(
        Checkpoint.of(MigrationMachine(MID, has_contract=False)), has_contract=False, connected=[]
    )
    assert m.state is S.PENDING
