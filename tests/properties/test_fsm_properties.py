"""Random walks over the pure state machines, checked against an independent oracle.

The migration walk feeds `MigrationMachine` what the outside world can say (acks in order,
duplicated, for the wrong phase or migration, from strangers; NACKs, joins, disconnects,
deadlines, SQL outcomes, cancels) and after every input `tests.support.exploration.Oracle`
checks invariants I1-I4 and PATH (see that module): EXECUTE only after a complete ANNOUNCE ledger,
APPLY only after EXECUTE committed, CONTRACT only after a complete APPLY ledger, every
failure before CONTRACT commits ends FAILED through ROLLBACK, terminal states absorb, and the
path is a path of the documented graph.

The agent walk feeds `AgentMachine` notices in any order and checks that `is_applied` answers
exactly what the hooks that succeeded imply, and that every move is a documented edge.
"""

from __future__ import annotations

import itertools

import hypothesis.strategies as st
import pytest
from hypothesis import event
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)
from transitions import MachineError

from statemachine.agent_fsm import AGENT_TRANSITIONS, AgentMachine, AgentState
from statemachine.failure import Failure, FailureKind
from statemachine.migration_fsm import MigrationMachine
from statemachine.phases import ACKED_PHASES, MigrationState, Phase
from tests.support.exploration import (
    DOCUMENTED_EDGES,
    OTHER_MIGRATION,
    Acked,
    Begin,
    Cancel,
    Deadline,
    Expired,
    Finish,
    Input,
    Joined,
    Left,
    Nacked,
    Oracle,
    SqlError,
    SqlOk,
    drive,
)

S = MigrationState
AGENTS = ("a1", "a2", "a3", "a4")
STRANGER = "stranger"
ANY_AGENT = st.sampled_from((*AGENTS, STRANGER))
ANY_PHASE = st.sampled_from(list(Phase))
DISRUPTIONS = ("deadline", "cancel", "nack", "disconnect", "lease", "sql")
RAW_TRIGGERS = (
    "start",
    "cohort_acked",
    "sql_committed",
    "sql_failed",
    "refused",
    "timed_out",
    "finish",
    "cancel",
)


class MigrationWalk(RuleBasedStateMachine):
    """A `MigrationMachine` and its oracle, fed the same inputs.

    Few rules, each drawing what exactly happens, so that hypothesis rarely has to retry a
    rule whose precondition fails. Each walk allows a few kinds of trouble (`disruptions`),
    so that some walks reach COMPLETED and others fail in every way.
    """

    m: MigrationMachine
    oracle: Oracle

    @initialize(
        # Mostly a real fleet (2-3 agents: partial acks are where guards can go wrong);
        # shrinks toward 2.
        cohort=st.sampled_from([2, 3, 1, 4, 0]).map(lambda n: set(AGENTS[:n])),
        contract=st.booleans(),
        policy=st.sampled_from(("wait", "rollback")),
        # Each kind of trouble allowed with probability 1/2, independently.
        disruptions=st.fixed_dictionaries({k: st.booleans() for k in DISRUPTIONS}).map(
            lambda allowed: {k for k, yes in allowed.items() if yes}
        ),
    )
    def setup(self, cohort: set[str], contract: bool, policy: str, disruptions: set[str]) -> None:
        ticks = itertools.count()
        self.m = MigrationMachine(
            "m-1",
            has_contract=contract,
            connected=cohort,
            clock=lambda: float(next(ticks)),
            on_agent_loss=policy,
        )
        self.oracle = Oracle.for_machine(self.m)
        self.disruptions = sorted(disruptions)
        self._feed(Begin())

    def _feed(self, event: Input) -> None:
        drive(self.m, event)
        self.oracle.check(self.m, event)

    def _cohort(self) -> list[str]:
        ledger = self.m.ledger
        return sorted(ledger.cohort) if ledger is not None and not ledger.closed else []

    # --------------------------------------------------------------- the step
    def _actions(self) -> list[str]:
        """What can happen now: drawing among these (not among rules, some of which would
        not apply) keeps every step meaningful and walks long enough to get anywhere."""
        actions = ["any ack", "connect"]
        if self._cohort() and self.m.phase is not None:
            actions += ["one ack", "all ack"]
        if self.m.state in (S.EXECUTE, S.CONTRACT, S.CONFIRM, S.ROLLBACK):
            actions.append("runner")
        if self.m.is_terminal:
            actions.append("raw trigger")
        return actions + self.disruptions

    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        action = data.draw(st.sampled_from(self._actions()), label="action")
        cohort, phase = self._cohort(), self.m.phase
        if action == "one ack":
            assert phase is not None
            self._feed(Acked(data.draw(st.sampled_from(cohort), label="agent"), phase))
        elif action == "all ack":  # the whole cohort, in any order
            assert phase is not None
            for agent in data.draw(st.permutations(cohort), label="order"):
                self._feed(Acked(agent, phase))
        elif action == "any ack":  # duplicated, another phase or migration, a stranger...
            self._feed(Acked(*self._any_answer(data)))
        elif action == "connect":
            self._feed(Joined(data.draw(ANY_AGENT, label="agent")))
        elif action == "runner":  # the phase's SQL commits, or the runner finishes it
            self._feed(SqlOk() if self.m.state in (S.EXECUTE, S.CONTRACT) else Finish())
        elif action == "raw trigger":
            self._raw_trigger_is_refused(data.draw(st.sampled_from(RAW_TRIGGERS), label="trigger"))
        elif action == "deadline":
            if phase is not None and len(cohort) >= 2:
                # Often some of the cohort answered in time and the rest did not: exactly the
                # case a guard that miscounts acks gets wrong.
                order = data.draw(st.permutations(cohort), label="order")
                in_time = data.draw(st.integers(0, len(cohort) - 1), label="acks in time")
                for agent in order[:in_time]:
                    self._feed(Acked(agent, phase))
            ledger = self.m.ledger
            if ledger is not None and not ledger.closed:
                some = 0 < len(ledger.acked) < len(ledger.cohort)
                event(f"deadline in {self.m.state.name}" + (" after some acks" if some else ""))
            self._feed(Deadline())
        elif action == "cancel":
            self._feed(Cancel())
        elif action == "nack":
            if cohort and phase is not None and data.draw(st.booleans(), label="from cohort"):
                self._feed(Nacked(data.draw(st.sampled_from(cohort), label="agent"), phase))
            else:
                self._feed(Nacked(*self._any_answer(data)))
        elif action == "disconnect":
            pool = [*(cohort or AGENTS), STRANGER]
            self._feed(Left(data.draw(st.sampled_from(pool), label="agent")))
        elif action == "lease":  # a lease certainly expires: connected, departing or not
            pool = [*(cohort or AGENTS), *sorted(self.m.departing), STRANGER]
            self._feed(Expired(data.draw(st.sampled_from(pool), label="agent")))
        elif action == "sql" and self.m.state in (S.EXECUTE, S.CONTRACT):
            late = self.m.state is S.EXECUTE and data.draw(st.booleans(), label="after commit")
            self._feed(SqlError(after_commit=late))

    def _any_answer(self, data: st.DataObject) -> tuple[str, Phase, str | None]:
        return (
            data.draw(ANY_AGENT, label="agent"),
            data.draw(ANY_PHASE, label="phase"),
            data.draw(st.sampled_from((None, OTHER_MIGRATION)), label="migration"),
        )

    def _raw_trigger_is_refused(self, trigger: str) -> None:
        """I4 at the lowest level: the transitions table itself has no way out."""
        state = self.m.state
        with pytest.raises(MachineError):
            getattr(self.m, trigger)(failure=Failure(FailureKind.CANCELLED, None, "test"))
        assert self.m.state is state

    def teardown(self) -> None:
        if hasattr(self, "m"):
            event(f"walk ended in {self.m.state.name}")

    @invariant()
    def machine_and_oracle_agree(self) -> None:
        if hasattr(self, "m"):
            assert self.m.state is self.oracle.state


TestMigrationWalk = MigrationWalk.TestCase


# ------------------------------------------------------------------ agent FSM
AGENT_EDGES = frozenset(
    (source, t["dest"])
    for t in AGENT_TRANSITIONS
    for source in (t["source"] if isinstance(t["source"], list) else [t["source"]])
)


class AgentWalk(RuleBasedStateMachine):
    """An `AgentMachine` fed the notices a coordinator can send one agent.

    The coordinator side walks the documented migration graph (any edge, guards ignored),
    one migration after another; the agent may be away for a while and miss notices, then
    come back and resync (as `Agent` does on a reconnect); each hook succeeds or raises.
    """

    def __init__(self) -> None:
        super().__init__()
        self.agent = AgentMachine()
        self.expected_applied: set[str] = set()
        self.number = 0
        self.connected = True
        self.state = S.PENDING
        self.names: list[str] = []
        self.completed: set[str] = set()

    def _next_migration(self) -> None:
        self.number += 1
        self.names.append(f"mig{self.number}")
        self.state = S.PENDING

    @rule(data=st.data())
    def coordinator_moves(self, data: st.DataObject) -> None:
        if self.state is S.PENDING or self.state.is_terminal:
            self._next_migration()
        dests = sorted((d for s, d in DOCUMENTED_EDGES if s is self.state), key=lambda d: d.value)
        self.state = data.draw(st.sampled_from(dests), label="coordinator enters")
        if self.state is S.COMPLETED:
            self.completed.add(self.names[-1])
        phase = self.state.phase
        if self.connected and phase is not None:
            self._notice(phase, data.draw(st.booleans(), label="hook succeeds"))

    @rule()
    def agent_goes_away_or_comes_back(self) -> None:
        """Away, the agent misses notices; back, it adopts the `Welcome`'s applied list (what
        `Coordinator.applied_names` sends: the completed migrations, plus the running one
        once its new schema is live)."""
        self.connected = not self.connected
        if self.connected:
            live = self.state in (S.APPLY, S.CONTRACT, S.CONFIRM, S.COMPLETED)
            applied = self.completed | ({self.names[-1]} if live and self.names else set())
            before = self.agent.state
            self.agent.resync(sorted(applied))
            assert self.agent.state is AgentState.IDLE, f"resync from {before.name}"
            self.expected_applied = set(applied)

    def _notice(self, phase: Phase, hook_ok: bool) -> None:
        name = self.names[-1]
        before = self.agent.state
        step = self.agent.on_notice(f"id-{name}", name, phase, phase in ACKED_PHASES)
        if step.problem is not None:  # followed the coordinator: a reset to IDLE first
            assert before is not AgentState.IDLE
            before = AgentState.IDLE
        self._check_edge(before, self.agent.state)
        if phase in (Phase.EXECUTE, Phase.CONTRACT):
            assert step.hook is None
            return
        assert step.hook is not None and step.hook.value == f"on_{phase.value}"
        before = self.agent.state
        if hook_ok:
            self.agent.hook_succeeded(phase)
        else:  # the driver NACKs; only a ROLLBACK still reverts (the schema goes back anyway)
            self.agent.hook_failed(phase)
        self._check_edge(before, self.agent.state)
        if phase is Phase.APPLY and hook_ok:
            self.expected_applied.add(name)
        elif phase is Phase.ROLLBACK:
            self.expected_applied.discard(name)

    def _check_edge(self, before: AgentState, after: AgentState) -> None:
        assert before is after or (before, after) in AGENT_EDGES, (
            f"agent moved {before.name} -> {after.name}, not an edge of AGENT_TRANSITIONS"
        )

    @invariant()
    def applied_is_what_the_hooks_did(self) -> None:
        for name in self.names:
            assert self.agent.is_applied(name) is (name in self.expected_applied), name


TestAgentWalk = AgentWalk.TestCase
