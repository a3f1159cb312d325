"""The real coordinator and real agents, wired over in-memory WebSockets, on a virtual clock.

Only PostgreSQL is faked (`FakeExecutor`: a set of column names changed all-or-nothing per
phase, failing on demand); the runner, the FSM, the connection handlers, the wire protocol and
the agent client are the production code. `play` runs one `Scenario` under
`trio.testing.MockClock(autojump_threshold=0)` (ack timeouts of 30 s take no real time and
every deadline lands at an exact virtual instant) and returns a `Recording`: every coordinator
event, every answer frame the coordinator read (`Tap`) and every executor call, in order and
stamped with `trio.current_time()`, plus the results and the agents' final views.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
from collections.abc import Iterator, Sequence
from typing import Any

import trio
import trio.testing
from trio_websocket import WebSocketConnection, wrap_client_stream, wrap_server_stream

from agent.client import Agent, MigrationInfo
from coordinator.core import Coordinator
from coordinator.events import Event, PhaseStarted
from coordinator.history import InMemoryHistory
from coordinator.pg.errors import SqlFailure
from statemachine.migration import Migration
from statemachine.phases import Phase
from statemachine.protocol import Ack, Nack, ProtocolError, decode_agent_message
from statemachine.result import MigrationResult, SqlAttempt
from statemachine.sql import ExecutionGroup

HOOK_PHASES = (Phase.ANNOUNCE, Phase.APPLY, Phase.CONFIRM, Phase.ROLLBACK)


# --------------------------------------------------------------------- scenario
@dataclasses.dataclass(frozen=True)
class AgentPlan:
    """How one agent behaves; times are multiples of the ack timeout."""

    delays: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)  # per HOOK_PHASES entry
    raises: frozenset[Phase] = frozenset()  # hooks that raise (-> NACK)
    join_at: float = 0.0  # 0: connected before the first migration starts
    leave_at: float | None = None  # disconnect at this time, if any
    rejoin_at: float | None = None  # then reconnect (same Agent object: it resyncs)

    def delay(self, phase: Phase) -> float:
        return self.delays[HOOK_PHASES.index(phase)]


@dataclasses.dataclass(frozen=True)
class MigrationPlan:
    contract: bool = False
    fail: frozenset[Phase] = frozenset()  # EXECUTE / CONTRACT / ROLLBACK SQL that fails
    sql_seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class Scenario:
    ack_timeout: float
    agents: tuple[AgentPlan, ...]
    migrations: tuple[MigrationPlan, ...]

    def agent_ids(self) -> list[str]:
        return [f"agent-{i}" for i in range(len(self.agents))]

    def migration_specs(self) -> list[Migration]:
        specs = []
        for i, plan in enumerate(self.migrations):
            name = f"mig{i}"
            specs.append(
                Migration(
                    name,
                    [f"ALTER TABLE users ADD COLUMN {name}_new text"],
                    rollback_sql=[f"ALTER TABLE users DROP COLUMN {name}_new"],
                    contract_sql=[f"ALTER TABLE users DROP COLUMN {name}_old"]
                    if plan.contract
                    else (),
                    id=f"id-{name}",  # the same on every call, so frames can be attributed
                )
            )
        return specs


# --------------------------------------------------------------------- recording
@dataclasses.dataclass(frozen=True)
class SqlCall:
    """One `run_phase` call of the fake executor, logged when it returns or raises."""

    migration: str
    phase: Phase
    ok: bool


@dataclasses.dataclass(frozen=True)
class Received:
    """An Ack/Nack frame as the coordinator reads it off the wire (logged just before the
    coordinator acts on it): which migration it answers comes from the frame itself."""

    agent_id: str
    migration: str
    phase: Phase
    ok: bool


Item = Event | SqlCall | Received


@dataclasses.dataclass(frozen=True)
class Entry:
    time: float
    item: Item


@dataclasses.dataclass
class Recording:
    scenario: Scenario
    log: list[Entry] = dataclasses.field(default_factory=list)
    results: dict[str, MigrationResult] = dataclasses.field(default_factory=dict)
    schema_after: frozenset[str] = frozenset()
    #: agent id -> (still connected at the end, migrations it reports applied)
    agents: dict[str, tuple[bool, frozenset[str]]] = dataclasses.field(default_factory=dict)
    still_connected: frozenset[str] = frozenset()  # the coordinator's fleet at the end

    def record(self, item: Item) -> None:
        self.log.append(Entry(trio.current_time(), item))
        if isinstance(item, PhaseStarted):
            again = [
                e
                for e in self.log[:-1]
                if isinstance(e.item, PhaseStarted)
                and (e.item.migration, e.item.phase) == (item.migration, item.phase)
            ]
            if again:  # no path of the migration graph visits a state twice
                raise RunnerLoop(
                    f"{item.migration} started {item.phase.name} again at "
                    f"t={trio.current_time():g} (first at t={again[0].time:g}): the runner is "
                    "going round in circles, a phase that should have ended did not"
                )


class RunnerLoop(BaseException):
    """Raised from the event subscriber when a phase starts twice.

    A BaseException on purpose: the event bus swallows `Exception`s from subscribers, and a
    runner looping on an FSM that will not move may never reach a checkpoint where a cancel
    could stop it; raising out of the `PhaseStarted` emit is the one way out.
    """


class ScenarioHung(AssertionError):
    """The scenario did not end: the message says how."""


_STATEMENT = re.compile(r"ALTER TABLE users (ADD|DROP) COLUMN (\w+)(?: text)?")


class FakeExecutor:
    """Implements `coordinator.executor.Executor` on a set of column names.

    ``... ADD COLUMN c ...`` adds a column, ``... DROP COLUMN c`` removes one (and fails if it
    is not there); a phase's statements apply all-or-nothing, like one PostgreSQL transaction.
    Column names start with the migration's name, which is how a call is attributed.
    """

    def __init__(self, scenario: Scenario, recording: Recording) -> None:
        self.recording = recording
        self.plans = {
            m.name: p for m, p in zip(scenario.migration_specs(), scenario.migrations, strict=True)
        }
        self.schema = {f"{m.name}_old" for m in scenario.migration_specs()}

    async def run_phase(self, phase: Phase, groups: Sequence[ExecutionGroup]) -> list[SqlAttempt]:
        statements = [statement for group in groups for statement in group.statements]
        name = _STATEMENT.fullmatch(statements[0]).group(2).rsplit("_", 1)[0]  # type: ignore[union-attr]
        plan = self.plans[name]
        await trio.sleep(plan.sql_seconds)
        if phase in plan.fail:
            self.recording.record(SqlCall(name, phase, ok=False))
            attempt = SqlAttempt(phase, 1, False, plan.sql_seconds, "injected failure")
            raise SqlFailure(statements[0], "injected failure", attempts=[attempt])
        schema = set(self.schema)
        for statement in statements:
            match = _STATEMENT.fullmatch(statement)
            if match is None:
                raise SqlFailure(statement, "the fake executor only knows ADD/DROP COLUMN")
            verb, column = match.groups()
            if verb == "ADD":
                schema.add(column)
            elif column in schema:
                schema.remove(column)
            else:
                raise SqlFailure(statement, f"column {column} does not exist")
        self.schema = schema
        self.recording.record(SqlCall(name, phase, ok=True))
        return [SqlAttempt(phase, 1, True, plan.sql_seconds)]


# ------------------------------------------------------------------------ wiring
class Tap:
    """The coordinator's end of one connection, logging every answer it reads."""

    def __init__(self, ws: WebSocketConnection, agent_id: str, recording: Recording) -> None:
        self._ws = ws
        self._agent_id = agent_id
        self._recording = recording

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ws, name)

    async def get_message(self) -> str | bytes:
        frame = await self._ws.get_message()
        try:
            msg = decode_agent_message(frame)
        except ProtocolError:
            return frame
        if isinstance(msg, Ack | Nack):
            name = msg.migration_id.removeprefix("id-")
            self._recording.record(Received(self._agent_id, name, msg.phase, isinstance(msg, Ack)))
        return frame


async def connect(
    nursery: trio.Nursery, coordinator: Coordinator, agent: Agent, recording: Recording
) -> WebSocketConnection:
    """Join `agent` to `coordinator` over an in-memory stream; returns the client socket."""
    client_stream, server_stream = trio.testing.memory_stream_pair()

    async def server_side() -> None:
        request = await wrap_server_stream(nursery, server_stream)
        ws = await request.accept()
        await coordinator.handle_connection(Tap(ws, agent.agent_id, recording))  # type: ignore[arg-type]

    nursery.start_soon(server_side)
    ws = await wrap_client_stream(nursery, client_stream, "lockstep.test", "/")  # type: ignore[arg-type]
    await nursery.start(agent.serve, ws)
    return ws


def make_agent(agent_id: str, plan: AgentPlan, timeout: float, recording: Recording) -> Agent:

    def hook(phase: Phase):  # type: ignore[no-untyped-def]
        async def run(info: MigrationInfo) -> None:
            await trio.sleep(plan.delay(phase) * timeout)
            if phase in plan.raises:
                raise RuntimeError(f"{agent_id} refuses {phase.name}")

        return run

    return Agent(
        agent_id,
        on_announce=hook(Phase.ANNOUNCE),
        on_apply=hook(Phase.APPLY),
        on_confirm=hook(Phase.CONFIRM),
        on_rollback=hook(Phase.ROLLBACK),
    )


#: Virtual seconds after which a scenario counts as hung (a runner waiting forever).
HANG_LIMIT_TIMEOUTS = 60


async def run_scenario(scenario: Scenario) -> Recording:
    """Play `scenario` on a fresh coordinator and fleet; see the module docstring."""
    timeout = scenario.ack_timeout
    recording = Recording(scenario)
    executor = FakeExecutor(scenario, recording)
    coordinator = Coordinator(
        executor=executor,
        history=InMemoryHistory(),
        ack_timeout=timeout,
        heartbeat_interval=math.inf,
        # The invariants here judge each cohort against the agents *connected* and a leave as
        # a refusal: the behaviour of on_agent_loss="rollback". The "wait" mode is covered by
        # the FSM walks (tests/properties/test_fsm_properties.py, test_exhaustive.py) and the
        # lease tests (tests/system/test_leases.py).
        on_agent_loss="rollback",
    )
    coordinator.subscribe(recording.record)
    ids = scenario.agent_ids()
    agents = {
        a: make_agent(a, plan, timeout, recording)
        for a, plan in zip(ids, scenario.agents, strict=True)
    }
    limit = HANG_LIMIT_TIMEOUTS * timeout
    with trio.move_on_after(limit) as hang:
        async with trio.open_nursery() as nursery:

            async def life(agent_id: str, plan: AgentPlan) -> None:
                now = plan.join_at
                await trio.sleep(now * timeout)
                ws = await connect(nursery, coordinator, agents[agent_id], recording)
                if plan.leave_at is None:
                    return
                await trio.sleep((plan.leave_at - now) * timeout)
                await ws.aclose()
                if plan.rejoin_at is not None:
                    await trio.sleep((plan.rejoin_at - plan.leave_at) * timeout)
                    await connect(nursery, coordinator, agents[agent_id], recording)

            early = [a for a, p in zip(ids, scenario.agents, strict=True) if p.join_at == 0.0]
            for agent_id, plan in zip(ids, scenario.agents, strict=True):
                nursery.start_soon(life, agent_id, plan)
            await coordinator.wait_for_agents(len(early))

            async def run(migration: Migration) -> None:
                recording.results[migration.name] = await coordinator.run_migration(migration)

            async with trio.open_nursery() as runs:  # started together: they must queue
                for migration in scenario.migration_specs():
                    runs.start_soon(run, migration)
            # Let every agent finish its hooks and read every notice, however slow.
            await trio.sleep(
                12 * timeout * (1 + max((max(p.delays) for p in scenario.agents), default=0))
            )
            recording.still_connected = coordinator.agents
            for agent_id, agent in agents.items():
                recording.agents[agent_id] = (agent.connected, agent.applied)
            recording.schema_after = frozenset(executor.schema)
            nursery.cancel_scope.cancel()
    if hang.cancelled_caught:
        raise ScenarioHung(
            f"the scenario did not finish within {limit:g} virtual seconds "
            f"({HANG_LIMIT_TIMEOUTS} ack timeouts): a migration never ended"
        )
    return recording


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """Keep lockstep's expected warnings (NACKs, timeouts) out of failure reports, which
    hypothesis would fill with hundreds of examples' worth; errors still show."""
    logger = logging.getLogger("lockstep")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def play(scenario: Scenario) -> Recording:
    """`run_scenario` on a fresh virtual clock; a looping runner becomes `ScenarioHung`."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    try:
        with quiet_logs():
            return trio.run(run_scenario, scenario, clock=clock)
    except BaseExceptionGroup as group:
        loop, _ = group.split(RunnerLoop)
        if loop is None:
            raise
        first: BaseException = loop
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise ScenarioHung(str(first)) from None
