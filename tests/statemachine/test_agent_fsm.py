"""AgentMachine: which hook each notice runs and which schema the app may use afterwards.

The driver (`agent/client.py`) calls `on_notice`, runs the named hook, and calls
`hook_succeeded` only when the hook returned; these tests play that driver by hand.
"""

# The state changes behind mypy's back (triggers are bound at run time), so its narrowing of
# `m.state` after one assert would flag later checks as unreachable.
# mypy: disable-error-code="comparison-overlap"

from __future__ import annotations

from statemachine import AgentMachine, AgentState, Phase
from statemachine.agent_fsm import Hook, Step

A = AgentState
MID, NAME = "mig-1", "add_email"


def _notice(m: AgentMachine, phase: Phase, *, mid: str = MID, name: str = NAME) -> Step:
    ack_required = phase not in (Phase.EXECUTE, Phase.CONTRACT)  # as the runner sends them
    return m.on_notice(mid, name, phase, ack_required=ack_required)


def _ok(m: AgentMachine, phase: Phase, *, mid: str = MID, name: str = NAME) -> Step:
    """One notice whose hook (if any) succeeded."""
    step = _notice(m, phase, mid=mid, name=name)
    if step.hook is not None:
        m.hook_succeeded(phase)
    return step


def test_full_sequence_with_contract() -> None:
    m = AgentMachine()
    assert m.state is A.IDLE
    step = _notice(m, Phase.ANNOUNCE)
    assert step == Step(hook=Hook.ON_ANNOUNCE, ack=True)
    assert m.state is A.IDLE, "state moves only once the hook succeeded"
    m.hook_succeeded(Phase.ANNOUNCE)
    assert m.state is A.READY
    assert _notice(m, Phase.EXECUTE) == Step(hook=None, ack=False)
    assert m.state is A.EXECUTING
    assert not m.is_applied(NAME)
    assert _ok(m, Phase.APPLY).hook is Hook.ON_APPLY
    assert m.state is A.SWITCHED
    assert m.is_applied(NAME)
    assert _notice(m, Phase.CONTRACT) == Step(hook=None, ack=False)
    assert m.state is A.CONTRACTING
    assert _ok(m, Phase.CONFIRM).hook is Hook.ON_CONFIRM
    assert m.state is A.IDLE
    assert m.is_applied(NAME), "a confirmed migration stays applied"
    assert m.migration_id is None and m.migration_name is None and m.phase is None
    assert m.seen == [
        (NAME, Phase.ANNOUNCE),
        (NAME, Phase.EXECUTE),
        (NAME, Phase.APPLY),
        (NAME, Phase.CONTRACT),
        (NAME, Phase.CONFIRM),
    ]


def test_sequence_without_contract() -> None:
    m = AgentMachine()
    for phase in (Phase.ANNOUNCE, Phase.EXECUTE, Phase.APPLY, Phase.CONFIRM):
        _ok(m, phase)
    assert m.state is A.IDLE
    assert m.applied == {NAME}


def test_phase_tracks_the_latest_notice() -> None:
    m = AgentMachine()
    _notice(m, Phase.ANNOUNCE)
    assert m.phase is Phase.ANNOUNCE
    assert m.migration_id == MID
    assert m.migration_name == NAME


def test_rollback_after_apply_unmarks_the_migration() -> None:
    m = AgentMachine(applied=["older"])
    for phase in (Phase.ANNOUNCE, Phase.EXECUTE, Phase.APPLY):
        _ok(m, phase)
    assert m.is_applied(NAME)
    step = _ok(m, Phase.ROLLBACK)
    assert step == Step(hook=Hook.ON_ROLLBACK, ack=True)
    assert m.state is A.IDLE
    assert not m.is_applied(NAME)
    assert m.is_applied("older"), "rolling back one migration keeps the earlier ones"
    assert m.migration_id is None


def test_rollback_from_announce_leaves_nothing_applied() -> None:
    m = AgentMachine()
    _ok(m, Phase.ANNOUNCE)
    _ok(m, Phase.ROLLBACK)
    assert m.state is A.IDLE
    assert m.applied == set()


def test_late_joiner_switches_from_idle() -> None:
    """An agent that connected after ANNOUNCE still belongs to the APPLY cohort."""
    m = AgentMachine()
    step = _notice(m, Phase.APPLY)
    assert step == Step(hook=Hook.ON_APPLY, ack=True, problem=None)
    m.hook_succeeded(Phase.APPLY)
    assert m.state is A.SWITCHED
    assert m.is_applied(NAME)


def test_late_joiner_during_execute() -> None:
    m = AgentMachine()
    _notice(m, Phase.EXECUTE)
    assert m.state is A.EXECUTING
    _ok(m, Phase.APPLY)
    assert m.state is A.SWITCHED


def test_late_joiner_confirm_from_idle() -> None:
    m = AgentMachine(applied=[NAME])  # the Welcome listed it
    _ok(m, Phase.CONFIRM)
    assert m.state is A.IDLE
    assert m.is_applied(NAME)


def test_failed_apply_hook_keeps_state_and_applied_set() -> None:
    m = AgentMachine()
    _ok(m, Phase.ANNOUNCE)
    _notice(m, Phase.EXECUTE)
    step = _notice(m, Phase.APPLY)
    assert step.hook is Hook.ON_APPLY
    # The hook raised: the driver sends a NACK and never calls hook_succeeded.
    assert m.state is A.EXECUTING
    assert not m.is_applied(NAME)
    _ok(m, Phase.ROLLBACK)
    assert m.state is A.IDLE
    assert not m.is_applied(NAME)


def test_failed_announce_hook_keeps_idle() -> None:
    m = AgentMachine()
    _notice(m, Phase.ANNOUNCE)
    assert m.state is A.IDLE
    assert m.migration_id == MID, "the notice is still remembered for the ROLLBACK that follows"


def test_failed_rollback_hook_still_reverts() -> None:
    """The schema goes back whatever the hook managed: the new queries must stop."""
    m = AgentMachine()
    for phase in (Phase.ANNOUNCE, Phase.EXECUTE, Phase.APPLY):
        _ok(m, phase)
    _notice(m, Phase.ROLLBACK)
    m.hook_failed(Phase.ROLLBACK)
    assert m.state is A.IDLE
    assert not m.is_applied(NAME)


def test_failed_apply_hook_keeps_the_old_queries() -> None:
    m = AgentMachine()
    for phase in (Phase.ANNOUNCE, Phase.EXECUTE):
        _ok(m, phase)
    _notice(m, Phase.APPLY)
    m.hook_failed(Phase.APPLY)
    assert m.state is A.EXECUTING
    assert not m.is_applied(NAME)


def test_a_new_migration_while_busy_follows_the_coordinator() -> None:
    m = AgentMachine()
    _ok(m, Phase.ANNOUNCE)
    step = _notice(m, Phase.ANNOUNCE, mid="mig-2", name="second")
    assert step.hook is Hook.ON_ANNOUNCE
    assert step.problem is not None
    assert "'second'" in step.problem and "'add_email'" in step.problem
    assert "READY" in step.problem
    assert m.migration_id == "mig-2"
    m.hook_succeeded(Phase.ANNOUNCE)
    assert m.state is A.READY


def test_a_new_migration_when_idle_is_no_problem() -> None:
    m = AgentMachine()
    for phase in (Phase.ANNOUNCE, Phase.EXECUTE, Phase.APPLY, Phase.CONFIRM):
        _ok(m, phase)
    step = _notice(m, Phase.ANNOUNCE, mid="mig-2", name="second")
    assert step.problem is None
    assert m.migration_name == "second"


def test_out_of_order_notices_are_tolerated() -> None:
    m = AgentMachine()
    _ok(m, Phase.ANNOUNCE)
    assert _notice(m, Phase.CONTRACT).hook is None  # not SWITCHED: ignored, no exception
    assert m.state is A.READY
    _ok(m, Phase.ANNOUNCE)  # a repeated ANNOUNCE is harmless
    assert m.state is A.READY


def test_ack_required_is_passed_through() -> None:
    m = AgentMachine()
    assert m.on_notice(MID, NAME, Phase.ANNOUNCE, ack_required=False).ack is False
    assert m.on_notice(MID, NAME, Phase.EXECUTE, ack_required=True).ack is True
