"""The running system under random fleets: real coordinator, real agents, virtual time.

hypothesis picks the fleet (how many agents; when each joins, leaves and comes back with the
same `Agent` object, which then resyncs; how long each hook takes, some past the ack timeout;
which hooks raise), one or two migrations started at once (with or without contract SQL, SQL
that fails on demand), and `harness.play` runs it over in-memory WebSockets under
`MockClock(autojump_threshold=0)`. Then the recording is checked against the invariants, using
only what an outside observer sees: the frames the coordinator read, its events (who joined or
left, when each phase started), the executor's calls and the agents' final `is_applied`.
Nothing here asks the FSM's ledger whether it was right.

- I1/I2/I3 and timing: for every ANNOUNCE/APPLY phase, the answers of its cohort decide what
  must come next and when: a NACK or a cohort agent leaving -> ROLLBACK at that instant; all
  acks -> the next phase at the last ack; otherwise ROLLBACK at exactly `ack_timeout`
  virtual seconds after the phase started. APPLY follows only a committed EXECUTE, CONFIRM a
  committed CONTRACT, a failed statement -> ROLLBACK; FAILED only ever after ROLLBACK.
- a phase's cohort is the set of agents connected when the machine entered it.
- the path is a path of the documented graph; the database ends with the schema it started
  with after FAILED (unless rollback SQL failed, which the result says) and with the change
  after COMPLETED.
- AGREE: every still-connected agent agrees with the outcome (COMPLETED: is_applied; FAILED:
  not, unless its own on_rollback hook raised, see `tests/statemachine/test_agent_fsm.py`).
- I5 (the fifth of docs/design.md) at most one migration in flight.
"""

from __future__ import annotations

import itertools

import hypothesis.strategies as st
from hypothesis import event, given

from coordinator.events import (
    AgentJoined,
    AgentLeft,
    MigrationFinished,
    PhaseStarted,
)
from statemachine.phases import MigrationState, MigrationStatus, Phase
from tests.support.exploration import DOCUMENTED_EDGES
from tests.support.system_harness import (
    AgentPlan,
    MigrationPlan,
    Received,
    Recording,
    Scenario,
    SqlCall,
    play,
)

S = MigrationState
FLAKY = st.sampled_from([False, False, False, False, True])  # mostly well-behaved

# Hook delays as multiples of the ack timeout: 1.5 misses the deadline, 0.6 + 0.6 may.
DELAYS = st.sampled_from([0.0, 0.0, 0.25, 0.6, 1.5])


@st.composite
def agent_plans(draw: st.DrawFn) -> AgentPlan:
    raises = frozenset(
        p for p in (Phase.ANNOUNCE, Phase.APPLY, Phase.CONFIRM, Phase.ROLLBACK) if draw(FLAKY)
    )
    join_at = draw(st.sampled_from([0.0, 0.0, 0.0, 0.5, 1.2, 2.5]))
    leave_at = rejoin_at = None
    if draw(FLAKY):
        leave_at = join_at + draw(st.sampled_from([0.1, 0.7, 1.3, 2.6]))
        if draw(st.booleans()):
            rejoin_at = leave_at + draw(st.sampled_from([0.2, 1.1, 3.0]))
    return AgentPlan(
        delays=tuple(draw(DELAYS) for _ in range(4)),
        raises=raises,
        join_at=join_at,
        leave_at=leave_at,
        rejoin_at=rejoin_at,
    )


@st.composite
def migration_plans(draw: st.DrawFn) -> MigrationPlan:
    fail = frozenset(p for p in (Phase.EXECUTE, Phase.CONTRACT, Phase.ROLLBACK) if draw(FLAKY))
    return MigrationPlan(
        contract=draw(st.booleans()),
        fail=fail,
        sql_seconds=draw(st.sampled_from([0.0, 0.5])),
    )


scenarios = st.builds(
    Scenario,
    ack_timeout=st.sampled_from([2.0, 30.0]),
    agents=st.lists(agent_plans(), min_size=0, max_size=4).map(tuple),
    migrations=st.lists(migration_plans(), min_size=1, max_size=2).map(tuple),
)


@given(scenario=scenarios)
def test_running_system_keeps_the_invariants(scenario: Scenario) -> None:
    recording = play(scenario)
    for name, result in sorted(recording.results.items()):
        event(
            f"{name} {result.status.name}"
            + (f" ({result.failure.kind.name})" if result.failure else "")
        )
    check_one_at_a_time(recording)
    for name in recording.results:
        check_path_and_schema(recording, name)
        check_phases(recording, name)
        check_agents_agree(recording, name)


# ------------------------------------------------------------------- the checks
def check_one_at_a_time(rec: Recording) -> None:
    """Invariant 5: nothing of migration B happens between A's first phase and its end."""
    running: str | None = None
    for entry in rec.log:
        item = entry.item
        name = getattr(item, "migration", None)
        if not isinstance(item, PhaseStarted | SqlCall | MigrationFinished) or name is None:
            continue
        if running is None:
            running = name
        assert name == running, f"{name} ran while {running} was in flight"
        if isinstance(item, MigrationFinished):
            running = None


def check_path_and_schema(rec: Recording, name: str) -> None:
    result = rec.results[name]
    states = [S.PENDING, *(S(p.phase.value) for p in result.phases)]
    assert result.status in (MigrationStatus.COMPLETED, MigrationStatus.FAILED)
    states.append(S.COMPLETED if result.status is MigrationStatus.COMPLETED else S.FAILED)
    for a, b in itertools.pairwise(states):
        assert (a, b) in DOCUMENTED_EDGES, f"{name}: {a.name} -> {b.name} is not a documented edge"
    plan = rec.scenario.migrations[int(name.removeprefix("mig"))]
    new, old = f"{name}_new", f"{name}_old"
    if result.status is MigrationStatus.COMPLETED:
        assert states[-2] is S.CONFIRM and S.ROLLBACK not in states
        assert new in rec.schema_after, f"{name} completed without its column"
        assert (old in rec.schema_after) is not plan.contract, "contract SQL must have run"
    else:
        assert states[-2] is S.ROLLBACK, "FAILED only through ROLLBACK"
        assert result.failure is not None
        assert old in rec.schema_after, "CONTRACT never commits in a failed migration"
        if result.schema_restored is False:
            assert Phase.ROLLBACK in plan.fail, f"schema not restored: {result.warnings}"
        else:
            assert new not in rec.schema_after, f"{name} failed but left its column behind"


def _connected_between(rec: Recording, first: int, last: int) -> list[set[str]]:
    """The set of connected agents after each log entry `first..last` (by the events)."""
    connected: set[str] = set()
    seen = []
    for i, entry in enumerate(rec.log[: last + 1]):
        if isinstance(entry.item, AgentJoined):
            connected.add(entry.item.agent_id)
        elif isinstance(entry.item, AgentLeft):
            connected.discard(entry.item.agent_id)
        if i >= first:
            seen.append(set(connected))
    return seen


def check_phases(rec: Recording, name: str) -> None:
    """I1-I3 and the timing of every decision, from the events alone."""
    timeout = rec.scenario.ack_timeout
    result = rec.results[name]
    starts = [
        i
        for i, e in enumerate(rec.log)
        if isinstance(e.item, PhaseStarted) and e.item.migration == name
    ]
    finished = next(
        i
        for i, e in enumerate(rec.log)
        if isinstance(e.item, MigrationFinished) and e.item.migration == name
    )
    for n, index in enumerate(starts):
        start = rec.log[index]
        item = start.item
        assert isinstance(item, PhaseStarted)
        following = starts[n + 1] if n + 1 < len(starts) else None
        nxt = rec.log[following].item if following is not None else None
        next_phase = nxt.phase if isinstance(nxt, PhaseStarted) else None
        if item.ack_required:
            # The machine fixes a cohort when it enters the state, which for a rollback caused
            # by an agent is a little before the runner announces it: any instant since the
            # previous phase will do.
            since = starts[n - 1] + 1 if n else index
            candidates = _connected_between(rec, since, index)
            cohort = set(item.cohort)
            if item.phase is Phase.ROLLBACK and result.failure is not None:
                # ROLLBACK does not wait again for the agents whose missed deadline caused it.
                skipped = (
                    set(result.failure.agents) if result.failure.kind.value == "timeout" else set()
                )
                assert not cohort & skipped, f"{name} ROLLBACK waits for {cohort & skipped}"
                candidates = [c - skipped for c in candidates]
            assert cohort in candidates, (
                f"{name} {item.phase.name}: cohort {sorted(item.cohort)} was never the set of "
                f"connected agents since the previous phase: {[sorted(c) for c in candidates]}"
            )
        if item.phase in (Phase.ANNOUNCE, Phase.APPLY):
            _check_waiting_phase(rec, name, index, following, timeout)
        elif item.phase in (Phase.EXECUTE, Phase.CONTRACT):
            calls = [
                e.item
                for e in rec.log[index : following if following is not None else finished]
                if isinstance(e.item, SqlCall)
                and e.item.migration == name
                and e.item.phase is item.phase
            ]
            assert len(calls) == 1, f"{name} {item.phase.name}: expected one SQL run, got {calls}"
            if calls[0].ok:
                allowed = (
                    {Phase.APPLY, Phase.CONFIRM, Phase.CONTRACT}
                    if item.phase is Phase.EXECUTE
                    else {Phase.CONFIRM}
                )
                assert next_phase in allowed, (
                    f"{name}: {item.phase.name} committed, then {next_phase}: I2 says {allowed}"
                )
            else:
                assert next_phase is Phase.ROLLBACK, (
                    f"{name}: {item.phase.name} SQL failed, then {next_phase}"
                )
        elif item.phase is Phase.CONFIRM:
            assert following is None and result.status is MigrationStatus.COMPLETED
        elif item.phase is Phase.ROLLBACK:
            assert following is None and result.status is MigrationStatus.FAILED


def _check_waiting_phase(
    rec: Recording, name: str, index: int, following: int | None, timeout: float
) -> None:
    """What the cohort's answers imply for an ANNOUNCE/APPLY phase, and when."""
    start = rec.log[index]
    item = start.item
    assert isinstance(item, PhaseStarted)
    phase, t0, deadline = item.phase, start.time, start.time + timeout
    cohort = set(item.cohort)
    acked: set[str] = set()
    answered: set[str] = set()
    # ("advance" | "rollback", time); nobody to wait for means moving on at once
    decided: tuple[str, float] | None = None if cohort else ("advance", t0)
    for entry in rec.log[index + 1 :] if cohort else ():
        if entry.time > deadline:
            break
        x = entry.item
        if isinstance(x, Received) and x.migration == name and x.phase is phase:
            if x.agent_id in cohort and x.agent_id not in answered:
                answered.add(x.agent_id)
                if not x.ok:
                    decided = ("rollback", entry.time)
                else:
                    acked.add(x.agent_id)
                    if acked == cohort:
                        decided = ("advance", entry.time)
        elif isinstance(x, AgentLeft) and x.agent_id in cohort and x.agent_id not in answered:
            answered.add(x.agent_id)
            decided = ("rollback", entry.time)
        if decided is not None:
            break
    if decided is None or decided[1] > deadline:
        decided = ("timeout", deadline)
    what, when = decided
    assert following is not None, f"{name} {phase.name} must be followed by another phase"
    nxt = rec.log[following]
    assert isinstance(nxt.item, PhaseStarted)
    got = nxt.item.phase
    story = (
        f"{name} {phase.name} started at t={t0:g} (deadline {deadline:g}) for cohort "
        f"{sorted(cohort)}; acked {sorted(acked)} -> expected {what} at t={when:g}, "
        f"got {got.name} at t={nxt.time:g}"
    )
    if when == deadline and what != "timeout":
        # An answer landed exactly on the deadline: either side of the race is correct.
        assert nxt.time == deadline, story
        return
    if what == "advance":
        assert got is not Phase.ROLLBACK, f"I3 rolled back though every cohort agent acked: {story}"
    elif got is not Phase.ROLLBACK:
        rule = (
            "I1 EXECUTE started before every ANNOUNCE cohort agent acked"
            if phase is Phase.ANNOUNCE
            else "I2 APPLY ended before every APPLY cohort agent acked"
        )
        raise AssertionError(f"{rule}: {story}")
    if what == "timeout":
        assert nxt.time == when, (
            f"ROLLBACK must fire exactly ack_timeout after the phase began: {story}"
        )
    else:
        assert nxt.time == when, f"the decision must be taken at once: {story}"


def check_agents_agree(rec: Recording, name: str) -> None:
    result = rec.results[name]
    completed = result.status is MigrationStatus.COMPLETED
    for agent_id, (connected, applied) in rec.agents.items():
        if not connected:
            continue
        assert agent_id in rec.still_connected
        if completed:
            assert name in applied, f"{name} COMPLETED but connected agent {agent_id} is not on it"
        else:
            assert name not in applied, (
                f"{name} FAILED but connected agent {agent_id} still uses it"
            )
