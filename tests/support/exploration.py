"""Checking the migration FSM against the invariants, by hand-fed inputs or by exhaustion.

Three pieces, all pure (no trio, no sockets), shared by the property tests and the exhaustive
walk so that both state the invariants in one place:

- `Input`s: everything the outside world can tell a `MigrationMachine` (an agent's ack or
  NACK, a join, a disconnect, a deadline, an SQL outcome, a host cancel, the runner finishing
  a phase), and `drive`, which feeds one to the machine the way `coordinator/runner.py` does.
- `Oracle`: an independent model of the rules. It keeps its own books (who was connected when
  each phase began, who acked it, whether the EXECUTE transaction committed), predicts where
  each input must lead, and raises `InvariantViolation` naming the broken invariant when the
  machine goes anywhere else. It never reads the machine's ledger to decide, so a broken guard
  or ledger cannot vouch for itself.
- `explore`: a breadth-first walk over a small fleet (`World`: the coordinator's machine, the
  agents' `AgentMachine`s and the frames in flight between them), trying every interleaving
  of deliveries, hook successes and failures, disconnects, deadlines, SQL outcomes and
  cancels up to a depth, checking the oracle on every step and the agents' consistency with
  the outcome whenever the fleet is quiet.

Invariants (I1-I4 are docs/design.md's; `docs/state-machine.md` lists the tests):

- I1 EXECUTE starts only when every agent of the ANNOUNCE cohort acked ANNOUNCE.
- I2 APPLY only after the EXECUTE transaction committed; CONTRACT only after every agent of
  the APPLY cohort acked APPLY (and only if there is contract SQL).
- I3 Any NACK, loss or missing ack at the deadline in ANNOUNCE/APPLY, any failed statement,
  any cancel before CONTRACT commits leads to ROLLBACK, and ROLLBACK only ever ends FAILED;
  rollback SQL is due exactly when EXECUTE committed and CONTRACT did not.
- I4 COMPLETED and FAILED are terminal: no input changes them.
- PATH: every state change is an edge of `MIGRATION_TRANSITIONS`, the documented graph.
- AGREE (fleet, `World` only): once the fleet is quiet after COMPLETED every connected agent
  runs the new schema (`is_applied`); after FAILED none does, except an agent whose
  `on_rollback` hook raised: it NACKed ROLLBACK and, by the agent FSM's design, keeps saying
  it did not switch back (`tests/statemachine/test_agent_fsm.py`), which the result's
  warnings report.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
from collections import deque
from collections.abc import Iterable
from typing import Any

from statemachine.agent_fsm import AgentMachine
from statemachine.migration_fsm import MIGRATION_TRANSITIONS, MigrationMachine
from statemachine.phases import ACKED_PHASES, MigrationState, Phase

S = MigrationState
OTHER_MIGRATION = "some-other-migration"

#: (source, dest) pairs of the documented graph.
DOCUMENTED_EDGES: frozenset[tuple[MigrationState, MigrationState]] = frozenset(
    (source, t["dest"])
    for t in MIGRATION_TRANSITIONS
    for source in (t["source"] if isinstance(t["source"], list) else [t["source"]])
)

_WAITING = (S.ANNOUNCE, S.APPLY)  # acked phases whose failure rolls back
_CANCELLABLE = (S.ANNOUNCE, S.EXECUTE, S.APPLY, S.CONTRACT)


class InvariantViolation(AssertionError):
    """The machine did something the rules forbid; the message names the invariant."""


# ---------------------------------------------------------------------------- inputs
@dataclasses.dataclass(frozen=True)
class Begin:
    def __str__(self) -> str:
        return "begin"


@dataclasses.dataclass(frozen=True)
class Acked:
    agent: str
    phase: Phase
    migration_id: str | None = None  # None: the migration being run

    def __str__(self) -> str:
        other = "" if self.migration_id is None else f" (for {self.migration_id})"
        return f"{self.agent} acks {self.phase.name}{other}"


@dataclasses.dataclass(frozen=True)
class Nacked:
    agent: str
    phase: Phase
    migration_id: str | None = None

    def __str__(self) -> str:
        other = "" if self.migration_id is None else f" (for {self.migration_id})"
        return f"{self.agent} NACKs {self.phase.name}{other}"


@dataclasses.dataclass(frozen=True)
class Joined:
    agent: str

    def __str__(self) -> str:
        return f"{self.agent} connects"


@dataclasses.dataclass(frozen=True)
class Left:
    agent: str

    def __str__(self) -> str:
        return f"{self.agent} disconnects"


@dataclasses.dataclass(frozen=True)
class Expired:
    """The agent's lease certainly expired (it is fenced): `lease_expired`."""

    agent: str

    def __str__(self) -> str:
        return f"{self.agent}'s lease expires"


@dataclasses.dataclass(frozen=True)
class Deadline:
    def __str__(self) -> str:
        return "the ack deadline passes"


@dataclasses.dataclass(frozen=True)
class SqlOk:
    def __str__(self) -> str:
        return "the phase's SQL commits"


@dataclasses.dataclass(frozen=True)
class SqlError:
    after_commit: bool = False  # EXECUTE committed, then a backfill failed

    def __str__(self) -> str:
        return "a backfill fails after EXECUTE committed" if self.after_commit else "SQL fails"


@dataclasses.dataclass(frozen=True)
class Cancel:
    def __str__(self) -> str:
        return "the host cancels the run"


@dataclasses.dataclass(frozen=True)
class Finish:
    def __str__(self) -> str:
        return "the runner finishes the phase"


Input = (
    Begin | Acked | Nacked | Joined | Left | Expired | Deadline | SqlOk | SqlError | Cancel | Finish
)


def drive(m: MigrationMachine, event: Input, *, timeout: float = 30.0) -> None:
    """Feed `event` to `m`: each event is one of the FSM's inputs, the same call the runner makes
    (`coordinator/runner.py`); nothing here decides what an input means."""
    mid = m.migration_id
    match event:
        case Begin():
            m.start()
        case Acked(agent, phase, other):
            m.receive_ack(agent, other or mid, phase)
        case Nacked(agent, phase, other):
            m.receive_nack(agent, other or mid, phase, "the hook raised")
        case Joined(agent):
            m.agent_connected(agent)
        case Left(agent):
            m.agent_disconnected(agent)
        case Expired(agent):
            m.lease_expired(agent)
        case Deadline():
            m.deadline_passed(timeout)
        case SqlOk():
            m.sql_committed()
        case SqlError(after_commit):
            if after_commit:
                m.expand_committed()
            m.sql_failed(statement="ALTER TABLE t ADD COLUMN c int", message="simulated failure")
        case Cancel():
            if m.may_cancel():
                m.cancel(message="cancelled by the test")
        case Finish():
            if m.state is S.ROLLBACK:
                m.finish(schema_restored=True if m.needs_rollback_sql else None)
            else:
                m.finish()


# ---------------------------------------------------------------------------- oracle
def _fmt(agents: Iterable[str]) -> str:
    return "{" + ", ".join(sorted(agents)) + "}"


@dataclasses.dataclass
class Oracle:
    """Independent books about one migration and the rules they imply; see module docstring."""

    has_contract: bool
    connected: set[str]
    state: MigrationState = S.PENDING
    cohort: frozenset[str] | None = None  # of the current acked phase
    acked: set[str] = dataclasses.field(default_factory=set)
    answered: set[str] = dataclasses.field(default_factory=set)  # acked, NACKed or lost
    closed: bool = False  # the current phase's deadline passed (CONFIRM/ROLLBACK)
    executed: bool = False
    contracted: bool = False
    #: Agents that let a deadline of this migration pass: ROLLBACK does not wait for them.
    unresponsive: set[str] = dataclasses.field(default_factory=set)
    path: list[MigrationState] = dataclasses.field(default_factory=lambda: [S.PENDING])
    #: "wait": a disconnect only makes the agent departing (its lease may be valid), and a
    #: lease expiry takes it out of the cohort; "rollback": either one refuses the phase.
    policy: str = "wait"
    departing: set[str] = dataclasses.field(default_factory=set)
    departed: set[str] = dataclasses.field(default_factory=set)  # of the current phase

    @classmethod
    def for_machine(cls, m: MigrationMachine) -> Oracle:
        return cls(
            has_contract=m.has_contract,
            connected=set(m.connected),
            policy=m.on_agent_loss,
            departing=set(m.departing),
        )

    def clone(self) -> Oracle:
        return dataclasses.replace(
            self,
            connected=set(self.connected),
            acked=set(self.acked),
            answered=set(self.answered),
            unresponsive=set(self.unresponsive),
            path=list(self.path),
            departing=set(self.departing),
            departed=set(self.departed),
        )

    def key(self) -> tuple[Any, ...]:
        """The books minus agent names (see `membership`), for de-duplication."""
        return (self.state.value, self.cohort is None, self.closed, self.executed, self.contracted)

    def membership(self, agent: str) -> tuple[bool, ...]:
        """Where `agent` appears in the books."""
        return (
            agent in self.connected,
            self.cohort is not None and agent in self.cohort,
            agent in self.acked,
            agent in self.answered,
            agent in self.unresponsive,
            agent in self.departing,
            agent in self.departed,
        )

    def _done(self) -> bool:
        """Every cohort agent acked or departed: the phase may complete."""
        assert self.cohort is not None
        return self.cohort <= self.acked | self.departed

    # -------------------------------------------------------------- the rules
    def _enter(self, state: MigrationState, expected: list[MigrationState]) -> None:
        self.state = state
        expected.append(state)
        phase = state.phase
        if phase is not None and phase in ACKED_PHASES:
            cohort = self.connected | self.departing
            if phase is Phase.ROLLBACK:
                cohort = cohort - self.unresponsive
            self.cohort = frozenset(cohort)
            self.acked, self.answered, self.closed = set(), set(), False
            self.departed = set()
        else:
            self.cohort = None
        if state in _WAITING and not self.cohort:
            self._advance(expected)  # nobody to wait for

    def _advance(self, expected: list[MigrationState]) -> None:
        if self.state is S.ANNOUNCE:
            self._enter(S.EXECUTE, expected)
        elif self.state is S.APPLY:
            self._enter(S.CONTRACT if self.has_contract else S.CONFIRM, expected)

    def _counts(self, agent: str, phase: Phase | None, migration_id: str | None = None) -> bool:
        """Would the current phase record this answer (or this loss, for `phase=None`)?"""
        return (
            migration_id is None
            and self.cohort is not None
            and not self.closed
            and (phase is None or phase is self.state.phase)
            and agent in self.cohort
            and agent not in self.answered
        )

    def predict(self, event: Input) -> list[MigrationState]:
        """Apply `event` to the books; return the states the machine must enter, in order."""
        expected: list[MigrationState] = []
        state = self.state
        match event:
            case Begin():
                if state is S.PENDING:
                    self._enter(S.ANNOUNCE, expected)
            case Acked(agent, phase, other):
                if self._counts(agent, phase, other):
                    self.acked.add(agent)
                    self.answered.add(agent)
                    if state in _WAITING and self._done():
                        self._advance(expected)
            case Nacked(agent, phase, other):
                if self._counts(agent, phase, other):
                    self.answered.add(agent)
                    if state in _WAITING:
                        self._enter(S.ROLLBACK, expected)
            case Joined(agent):
                self.connected.add(agent)
                self.departing.discard(agent)
            case Left(agent) if self.policy == "wait":
                self.connected.discard(agent)
                self.departing.add(agent)
            case Expired(agent) if self.policy == "wait":
                self.connected.discard(agent)
                self.departing.discard(agent)
                if self._counts(agent, None):
                    self.answered.add(agent)
                    self.departed.add(agent)
                    if state in _WAITING and self._done():
                        self._advance(expected)
            case Left(agent) | Expired(agent):  # on_agent_loss="rollback"
                self.connected.discard(agent)
                if self._counts(agent, None):
                    self.answered.add(agent)
                    if state in _WAITING:
                        self._enter(S.ROLLBACK, expected)
            case Deadline():
                if self.cohort is not None and not self.closed and not self._done():
                    self.unresponsive |= self.cohort - self.answered
                    if state in _WAITING:
                        self._enter(S.ROLLBACK, expected)
                    else:
                        self.closed = True
            case SqlOk():
                if state is S.EXECUTE:
                    self.executed = True
                    self._enter(S.APPLY, expected)
                elif state is S.CONTRACT:
                    self.contracted = True
                    self._enter(S.CONFIRM, expected)
            case SqlError(after_commit):
                if state in (S.EXECUTE, S.CONTRACT):
                    self.executed |= after_commit
                    self._enter(S.ROLLBACK, expected)
            case Cancel():
                if state in _CANCELLABLE:
                    self._enter(S.ROLLBACK, expected)
            case Finish():
                if state is S.CONFIRM:
                    self._enter(S.COMPLETED, expected)
                elif state is S.ROLLBACK:
                    self._enter(S.FAILED, expected)
        return expected

    # ------------------------------------------------------------- the check
    def check(self, m: MigrationMachine, event: Input) -> None:
        """`event` was just fed to `m`: raise `InvariantViolation` unless `m` obeyed the rules."""
        before, before_cohort, before_acked = self.state, self.cohort, set(self.acked)
        expected = self.predict(event)
        actual = [r.state for r in m.history[len(self.path) :]]
        previous = before
        for state in actual:
            if (previous, state) not in DOCUMENTED_EDGES:
                raise InvariantViolation(
                    f"PATH: {previous.name} -> {state.name} is not an edge of "
                    f"MIGRATION_TRANSITIONS (after: {event})"
                )
            previous = state
        if actual != expected:
            raise InvariantViolation(
                self._explain(before, before_cohort, before_acked, event, expected, actual)
            )
        self.path.extend(actual)
        self._check_state(m)

    def _explain(
        self,
        state: MigrationState,
        cohort: frozenset[str] | None,
        acked: set[str],
        event: Input,
        expected: list[MigrationState],
        actual: list[MigrationState],
    ) -> str:
        if isinstance(event, Acked) and event.migration_id is None and event.phase is state.phase:
            acked = acked | ({event.agent} & set(cohort or ()))  # show the ack just counted
        went = " -> ".join(s.name for s in [state, *actual])
        should = " -> ".join(s.name for s in [state, *expected])
        ledger = f"cohort {_fmt(cohort or ())}, acked {_fmt(acked)}"
        if state.is_terminal:
            why = f"I4 {state.name} is terminal, yet {event} moved it"
        elif S.EXECUTE in actual and S.EXECUTE not in expected:
            why = f"I1 EXECUTE started before the whole ANNOUNCE cohort acked ({ledger})"
        elif S.APPLY in actual and S.APPLY not in expected:
            why = "I2 APPLY was sent before the EXECUTE transaction committed"
        elif {S.CONTRACT, S.CONFIRM} & set(actual) and state is S.APPLY and not expected:
            why = f"I2 APPLY ended before the whole APPLY cohort acked ({ledger})"
        elif S.CONTRACT in actual and S.CONTRACT not in expected:
            why = "I2 CONTRACT ran for a migration without contract SQL"
        elif len(expected) > len(actual) and expected[: len(actual)] == actual:
            stuck = actual[-1] if actual else state
            why = (
                f"the machine stalled in {stuck.name}: after {event} its rules say it must "
                f"move on ({ledger})"
            )
            if S.ROLLBACK in expected:
                why = f"I3 {event} in {state.name} did not roll back ({ledger})"
        elif S.ROLLBACK in expected and S.ROLLBACK not in actual:
            why = f"I3 {event} in {state.name} did not roll back ({ledger})"
        elif S.ROLLBACK in actual and S.ROLLBACK not in expected:
            why = f"I3 {event} in {state.name} rolled back for no reason ({ledger})"
        else:
            why = f"the machine does not follow the rules on {event} ({ledger})"
        return f"{why}: went {went}, should go {should}"

    def _check_state(self, m: MigrationMachine) -> None:
        if m.state is not self.state:  # pragma: no cover - check() compared the paths
            raise InvariantViolation(f"machine in {m.state.name}, oracle in {self.state.name}")
        if self.state is S.FAILED and self.path[-2] is not S.ROLLBACK:
            raise InvariantViolation("I3 FAILED was reached without going through ROLLBACK")
        if self.state is S.COMPLETED and S.ROLLBACK in self.path:
            raise InvariantViolation("I3 a migration that rolled back ended COMPLETED")
        in_rollback = self.state in (S.ROLLBACK, S.FAILED)
        if (m.failure is not None) != in_rollback:
            raise InvariantViolation(
                f"I3 failure is {m.failure!r} in {self.state.name}: a failure must be recorded "
                "exactly when the migration rolls back"
            )
        if in_rollback and m.needs_rollback_sql != (self.executed and not self.contracted):
            raise InvariantViolation(
                f"I3 rollback SQL due={m.needs_rollback_sql}, but EXECUTE committed="
                f"{self.executed} and CONTRACT committed={self.contracted}"
            )
        ledger = m.ledger
        if self.cohort is not None and (ledger is None or ledger.cohort != self.cohort):
            got = "no ledger" if ledger is None else f"cohort {_fmt(ledger.cohort)}"
            raise InvariantViolation(
                f"{self.state.name}'s cohort must be the agents connected (or departing) when "
                "it began, "
                f"{_fmt(self.cohort)}; the machine has {got}"
            )


# ----------------------------------------------------------------------------- world
class Hook(enum.Enum):
    OK = "ok"
    RAISES = "raises"


@dataclasses.dataclass(frozen=True)
class Deliver:
    """The agent reads the next notice in its inbox; its hook (if any) returns or raises."""

    agent: str
    hook: Hook = Hook.OK

    def __str__(self) -> str:
        how = "" if self.hook is Hook.OK else ", its hook raises"
        return f"{self.agent} reads its next notice{how}"


@dataclasses.dataclass(frozen=True)
class Reply:
    """The agent's oldest unsent answer reaches the coordinator."""

    agent: str

    def __str__(self) -> str:
        return f"{self.agent}'s next answer arrives"


Step = Deliver | Reply | Left | Expired | Deadline | SqlOk | SqlError | Cancel

Notice = tuple[Phase, bool]  # (phase, ack_required)
Answer = tuple[Phase, bool]  # (phase, ok)

_NOTICE_STATES = {
    S.ANNOUNCE: True,
    S.APPLY: True,
    S.CONFIRM: True,
    S.ROLLBACK: True,
    S.EXECUTE: False,
    S.CONTRACT: False,
}


def _model_vars(obj: object) -> dict[str, Any]:
    """The data of a transitions model: its attributes minus the machine and bound triggers."""
    return {
        k: _clone(v)
        for k, v in vars(obj).items()
        if k not in ("machine", "_clock") and not callable(v)
    }


def _clone(value: Any) -> Any:
    """A copy that shares nothing mutable with `value`, much faster than `copy.deepcopy`
    (which the walk would otherwise spend most of its time in).

    Containers are copied one level deep: what the machines keep in lists, sets and dicts
    (state records, strings, tuples) is immutable. Objects with `__slots__` (the
    `AckLedger`) are copied slot by slot; anything else is deep-copied.
    """
    if isinstance(value, list):
        return list(value)
    if isinstance(value, set):
        return set(value)
    if isinstance(value, dict):
        return dict(value)
    if value is None or isinstance(value, str | int | float | tuple | frozenset | enum.Enum):
        return value
    params = getattr(type(value), "__dataclass_params__", None)
    if params is not None and params.frozen:  # StateRecord, Failure
        return value
    slots = getattr(type(value), "__slots__", None)
    if slots is not None:  # the AckLedger: copy each slot the same way
        clone = copy.copy(value)
        for slot in slots:
            setattr(clone, slot, _clone(getattr(value, slot)))
        return clone
    return copy.deepcopy(value)


class World:
    """A coordinator's `MigrationMachine`, `n` agents' `AgentMachine`s and the frames between
    them, advanced one `Step` at a time with the runner's reactions applied at once."""

    MIGRATION_ID = "m-1"
    NAME = "m"

    def __init__(self, agents: Iterable[str], *, has_contract: bool, policy: str = "wait") -> None:
        self.agent_ids = tuple(agents)
        self.machine = MigrationMachine(
            self.MIGRATION_ID,
            has_contract=has_contract,
            connected=self.agent_ids,
            clock=lambda: 0.0,
            on_agent_loss=policy,
        )
        self.oracle = Oracle.for_machine(self.machine)
        self.agents = {a: AgentMachine() for a in self.agent_ids}
        self.connected = set(self.agent_ids)
        self.inbox: dict[str, tuple[Notice, ...]] = {a: () for a in self.agent_ids}
        self.outbox: dict[str, tuple[Answer, ...]] = {a: () for a in self.agent_ids}
        self._feed(Begin())

    # ------------------------------------------------------ snapshot/restore
    def snapshot(self) -> tuple[Any, ...]:
        """A deep copy of everything mutable; `restore` puts it back (faster than deepcopy
        of the machines, which carry their `transitions.Machine`)."""
        return (
            _model_vars(self.machine),
            {a: _model_vars(am) for a, am in self.agents.items()},
            self.oracle.clone(),
            set(self.connected),
            dict(self.inbox),
            dict(self.outbox),
        )

    def restore(self, snap: tuple[Any, ...]) -> None:
        m_vars, a_vars, oracle, connected, inbox, outbox = snap
        vars(self.machine).update({k: _clone(v) for k, v in m_vars.items()})
        for a, values in a_vars.items():
            vars(self.agents[a]).update({k: _clone(v) for k, v in values.items()})
        self.oracle = oracle.clone()
        self.connected, self.inbox, self.outbox = set(connected), dict(inbox), dict(outbox)

    def key(self) -> tuple[Any, ...]:
        """The world up to renaming agents, for de-duplication.

        Agents are interchangeable (same options, names only used for ordering), so a world
        is described by its name-free parts plus the sorted signatures of its agents, each
        saying where that agent appears (oracle books, ledger, connections, frames in flight)
        instead of naming it: two worlds get the same key exactly when renaming agents turns
        one into the other. This symmetry reduction divides the states to visit by up to n!.
        """
        m = self.machine
        ledger = m.ledger
        sets: tuple[frozenset[str], ...] = ()
        if ledger is not None:
            sets = (ledger.cohort, ledger.acked, frozenset(ledger.nacks), ledger.lost)
        name_free = (
            self.oracle.key(),
            m.state.value,
            m.executed,
            m.contracted,
            ledger is None,
            ledger is not None and ledger.closed,
        )
        agents = sorted(
            (
                self.oracle.membership(a),
                tuple(a in group for group in sets),
                a in m.connected,
                a in self.connected,
                am.state.value,
                am.is_applied(self.NAME),
                am.migration_id is None,
                tuple((p.value, flag) for p, flag in self.inbox[a]),
                tuple((p.value, flag) for p, flag in self.outbox[a]),
            )
            for a, am in self.agents.items()
        )
        return (name_free, tuple(agents))

    # ------------------------------------------------------------- stepping
    def steps(self) -> list[Step]:
        """Every step that can happen next."""
        m = self.machine
        out: list[Step] = []
        for a in self.agent_ids:
            if a not in self.connected:
                if a in m.departing:
                    out.append(Expired(a))
                continue
            if self.inbox[a]:
                out.append(Deliver(a))
                phase, _ = self.inbox[a][0]
                if phase not in (Phase.EXECUTE, Phase.CONTRACT):  # those run no hook
                    out.append(Deliver(a, Hook.RAISES))
            if self.outbox[a]:
                out.append(Reply(a))
            out.append(Left(a))
        if m.awaiting_acks:
            out.append(Deadline())
        if m.state in (S.EXECUTE, S.CONTRACT):
            out += [SqlOk(), SqlError()]
            if m.state is S.EXECUTE:
                out.append(SqlError(after_commit=True))
        if m.state in _CANCELLABLE:
            out.append(Cancel())
        return out

    def apply(self, step: Step) -> None:
        match step:
            case Deliver(agent, hook):
                self._deliver(agent, hook)
            case Reply(agent):
                (phase, ok), *rest = self.outbox[agent]
                self.outbox[agent] = tuple(rest)
                self._feed(Acked(agent, phase) if ok else Nacked(agent, phase))
            case Left(agent):
                self.connected.discard(agent)
                self.inbox[agent] = self.outbox[agent] = ()
                self._feed(step)
            case _:
                self._feed(step)

    def _deliver(self, agent: str, hook: Hook) -> None:
        (phase, ack_required), *rest = self.inbox[agent]
        self.inbox[agent] = tuple(rest)
        am = self.agents[agent]
        step = am.on_notice(self.MIGRATION_ID, self.NAME, phase, ack_required)
        ok = hook is Hook.OK
        if step.hook is not None:
            if ok:
                am.hook_succeeded(phase)
            else:
                am.hook_failed(phase)
        if step.ack:
            self.outbox[agent] += ((phase, ok),)
        self._read_plain_notices(agent)

    def _feed(self, event: Input) -> None:
        """Give `event` to the machine, check the oracle, then react like the runner."""
        m = self.machine
        before = len(m.history)
        drive(m, event)
        self.oracle.check(m, event)
        if len(m.history) != before:
            self._broadcast()
        if m.state in (S.CONFIRM, S.ROLLBACK) and not m.awaiting_acks:
            self._feed(Finish())  # everybody answered: the runner moves on at once

    def _broadcast(self) -> None:
        """The runner notifies the state it finds the machine in (not the ones it skipped)."""
        m = self.machine
        ack_required = _NOTICE_STATES.get(m.state)
        if ack_required is None:
            return
        assert m.state.phase is not None
        # ROLLBACK reaches every connected agent, even those its ledger does not wait for.
        waits_for_cohort = ack_required and m.ledger and m.state is not S.ROLLBACK
        targets = m.ledger.cohort if waits_for_cohort and m.ledger else self.connected
        for a in sorted(targets):
            if a in self.connected:
                self.inbox[a] += ((m.state.phase, ack_required),)
                self._read_plain_notices(a)

    def _read_plain_notices(self, agent: str) -> None:
        """Partial-order reduction: an EXECUTE/CONTRACT notice runs no hook and sends no
        answer, so reading it commutes with every other step (a disconnect only drops an
        agent nobody checks any more). Reading it at once prunes interleavings that cannot
        differ in any invariant."""
        while self.inbox[agent] and not self.inbox[agent][0][1]:
            self._deliver(agent, Hook.OK)

    # ---------------------------------------------------------- fleet check
    @property
    def quiet(self) -> bool:
        return self.machine.is_terminal and not any(self.inbox[a] for a in self.connected)

    def check_fleet(self) -> None:
        """AGREE: once quiet, every connected agent agrees with the outcome."""
        if not self.quiet:
            return
        completed = self.machine.state is S.COMPLETED
        for a in sorted(self.connected):
            if self.agents[a].is_applied(self.NAME) != completed:
                raise InvariantViolation(
                    f"AGREE: the migration ended {self.machine.state.name} but connected agent {a} "
                    f"has is_applied={not completed} (agent state "
                    f"{self.agents[a].state.name})"
                )


# ----------------------------------------------------------------------- exploration
@dataclasses.dataclass(frozen=True)
class ExplorationReport:
    agents: int
    has_contract: bool
    depth: int
    states: int  # distinct world states reached (the initial one included)
    transitions: int  # steps tried
    deepest: int  # the longest shortest path to a state: < depth means the walk was complete
    outcomes: dict[str, int]  # terminal-state name -> distinct quiet worlds ending there

    @property
    def complete(self) -> bool:
        """No state was left unexpanded: every reachable world was checked."""
        return self.deepest < self.depth

    def __str__(self) -> str:
        ends = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))
        contract = "with" if self.has_contract else "without"
        return (
            f"{self.agents} agent(s), {contract} contract, depth {self.depth}: "
            f"{self.states} states, {self.transitions} transitions, deepest {self.deepest}"
            f"{' (complete)' if self.complete else ''} ({ends})"
        )


class ExplorationFailure(AssertionError):
    """An invariant broke; the message has the shortest step sequence that breaks it."""


def explore(
    n_agents: int, *, depth: int, has_contract: bool, policy: str = "wait"
) -> ExplorationReport:
    """Breadth-first over every interleaving of `Step`s for `n_agents` agents, `depth` deep.

    Worlds already seen (same `World.key`) are not expanded twice. Raises
    `ExplorationFailure` with the (shortest, since breadth-first) trace on a violation.
    """
    if not 1 <= n_agents <= 26:
        raise ValueError(f"n_agents must be 1..26, got {n_agents}")
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    agents = [f"a{i + 1}" for i in range(n_agents)]
    world = World(agents, has_contract=has_contract, policy=policy)
    start = world.key()
    parents: dict[tuple[Any, ...], tuple[tuple[Any, ...], Step] | None] = {start: None}
    frontier: deque[tuple[tuple[Any, ...], tuple[Any, ...], int]] = deque(
        [(start, world.snapshot(), 0)]
    )
    transitions = deepest = 0
    outcomes: dict[str, int] = {}

    def trace(key: tuple[Any, ...], last: Step | None = None) -> str:
        steps: list[str] = [] if last is None else [str(last)]
        link = parents[key]
        while link is not None:
            key, step = link
            steps.append(str(step))
            link = parents[key]
        lines = [f"  {i}. {s}" for i, s in enumerate(reversed(steps), 1)]
        return f"agents {', '.join(agents)}, contract={has_contract}:\n" + "\n".join(lines)

    while frontier:
        key, snap, level = frontier.popleft()
        if level == depth:
            continue
        world.restore(snap)
        for step in world.steps():
            transitions += 1
            world.restore(snap)
            try:
                world.apply(step)
                world.check_fleet()
                if not world.machine.is_terminal and not world.steps():
                    raise InvariantViolation(
                        f"deadlock: the migration is stuck in {world.machine.state.name} with "
                        "no step left (not even a deadline)"
                    )
            except InvariantViolation as exc:
                raise ExplorationFailure(f"{exc}\n{trace(key, step)}") from None
            child = world.key()
            if child in parents:
                continue
            parents[child] = (key, step)
            deepest = max(deepest, level + 1)
            if world.quiet:
                name = world.machine.state.name
                outcomes[name] = outcomes.get(name, 0) + 1
            frontier.append((child, world.snapshot(), level + 1))
    return ExplorationReport(
        n_agents, has_contract, depth, len(parents), transitions, deepest, outcomes
    )


__all__ = [
    "DOCUMENTED_EDGES",
    "OTHER_MIGRATION",
    "Acked",
    "Begin",
    "Cancel",
    "Deadline",
    "Deliver",
    "ExplorationFailure",
    "ExplorationReport",
    "Finish",
    "Hook",
    "Input",
    "InvariantViolation",
    "Joined",
    "Left",
    "Nacked",
    "Oracle",
    "Reply",
    "SqlError",
    "SqlOk",
    "Step",
    "World",
    "drive",
    "explore",
]
