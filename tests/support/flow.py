"""Helpers for the integration tests: look at the real database, record what happened.

Why a module and not fixtures: the flow tests need these inside hooks and nurseries, with
per-test arguments (which agent hangs, which one nacks), which plain functions express best.
Everything here talks to the real PostgreSQL of the `dsn` fixture and real WebSockets; nothing
is mocked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import queue
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, TypedDict, TypeVar

import psycopg
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from agent import Agent, MigrationInfo, open_agent
from coordinator import Coordinator, open_coordinator
from coordinator.events import AgentJoined, AgentLeft, Event, MigrationFinished, PhaseStarted
from statemachine import Migration, MigrationResult, Phase
from statemachine.protocol import (
    PROTOCOL_VERSION,
    Ack,
    Error,
    Hello,
    PhaseNotice,
    Welcome,
    decode_coordinator_message,
    encode,
)

HookFn = Callable[[MigrationInfo], Awaitable[object]]
T = TypeVar("T")


class Hooks(TypedDict):
    """The hook keyword arguments of `open_agent`."""

    on_announce: HookFn
    on_apply: HookFn
    on_confirm: HookFn
    on_rollback: HookFn


USERS_DDL = "CREATE TABLE users (id SERIAL PRIMARY KEY, name TEXT, created_at TIMESTAMP)"


# ------------------------------------------------------------------ the database
def execute(dsn: str, *statements: str) -> None:
    """Run setup statements, each in autocommit (test preparation, outside any migration)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement.encode())


def make_users(dsn: str, *extra_columns: str) -> None:
    """The demo's `users` table with three rows, plus `extra_columns` ("old_name TEXT")."""
    execute(dsn, USERS_DDL)
    for column in extra_columns:
        execute(dsn, f"ALTER TABLE users ADD COLUMN {column}")
    execute(dsn, "INSERT INTO users (name, created_at) VALUES ('ann', now()), ('bo', now())")


def columns(dsn: str, table: str = "users") -> list[str]:
    """Column names of `table` in the public schema, in table order (committed state only)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = 'public' AND table_name = %s ORDER BY ordinal_position",
            (table,),
        ).fetchall()
    return [str(name) for (name,) in rows]


async def columns_async(dsn: str, table: str = "users") -> list[str]:
    """`columns` from trio code, in a worker thread so a hook does not block the event loop."""
    return await trio.to_thread.run_sync(columns, dsn, table)


def history(dsn: str) -> list[dict[str, Any]]:
    """Rows of lockstep.migrations, oldest first."""
    with psycopg.connect(dsn) as conn:
        cur = conn.execute(
            "SELECT name, status, reason, schema_restored, phases, started_at, finished_at "
            "FROM lockstep.migrations ORDER BY started_at"
        )
        names = [d.name for d in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def phase_names_of(row: Mapping[str, Any]) -> list[str]:
    phases = row["phases"]
    if isinstance(phases, str):
        phases = json.loads(phases)
    return [str(p["phase"]) for p in phases]


# ------------------------------------------------------------------- agent hooks
async def hang(info: MigrationInfo) -> None:
    """A hook that never returns: the agent stays silent for this phase."""
    await trio.sleep_forever()


def failing(message: str) -> HookFn:
    """A hook that raises, so the agent NACKs with `RuntimeError: <message>`."""

    async def hook(info: MigrationInfo) -> None:
        raise RuntimeError(message)

    return hook


@dataclasses.dataclass(frozen=True)
class HookCall:
    agent_id: str
    hook: str
    migration: str
    phase: Phase


class HookLog:
    """Records every hook call of every agent, in the order they happened."""

    def __init__(self) -> None:
        self.calls: list[HookCall] = []

    def hook(self, agent_id: str, name: str, then: HookFn | None = None) -> HookFn:
        """A hook that records the call, then awaits `then` (whose outcome is the answer)."""

        async def recorded(info: MigrationInfo) -> None:
            self.calls.append(HookCall(agent_id, name, info.name, info.phase))
            if then is not None:
                await then(info)

        return recorded

    def hooks(self, agent_id: str, **then: HookFn) -> Hooks:
        """Recording `on_*` hooks for `open_agent`; `then` gives the behaviour of some."""
        unknown = set(then) - set(Hooks.__annotations__)
        if unknown:
            raise TypeError(f"unknown hooks: {sorted(unknown)}")
        return Hooks(
            on_announce=self.hook(agent_id, "on_announce", then.get("on_announce")),
            on_apply=self.hook(agent_id, "on_apply", then.get("on_apply")),
            on_confirm=self.hook(agent_id, "on_confirm", then.get("on_confirm")),
            on_rollback=self.hook(agent_id, "on_rollback", then.get("on_rollback")),
        )

    def of(self, agent_id: str) -> list[str]:
        return [c.hook for c in self.calls if c.agent_id == agent_id]


@contextlib.asynccontextmanager
async def agents(
    url: str,
    ids: list[str],
    log: HookLog,
    behaviour: Mapping[str, Mapping[str, HookFn]] | None = None,
) -> AsyncIterator[dict[str, Agent]]:
    """Connect one recording agent per id; `behaviour[id]` sets what some of its hooks do."""
    behaviour = behaviour or {}
    async with contextlib.AsyncExitStack() as stack:
        connected = {}
        for agent_id in ids:
            hooks = log.hooks(agent_id, **behaviour.get(agent_id, {}))
            connected[agent_id] = await stack.enter_async_context(
                open_agent(url, agent_id=agent_id, **hooks)
            )
        yield connected


# ------------------------------------------------------------ coordinator events
class EventLog:
    """Subscriber for `coord.subscribe`: keeps every event the coordinator emitted."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def phases(self, migration: str | None = None) -> list[tuple[str, Phase]]:
        return [
            (e.migration, e.phase)
            for e in self.events
            if isinstance(e, PhaseStarted) and migration in (None, e.migration)
        ]

    def index(self, predicate: Callable[[Event], bool]) -> int:
        """Position of the first event matching `predicate` (ValueError if none)."""
        for i, event in enumerate(self.events):
            if predicate(event):
                return i
        raise ValueError("no such event")

    def finished(self, migration: str) -> int:
        return self.index(lambda e: isinstance(e, MigrationFinished) and e.migration == migration)

    def started(self, migration: str, phase: Phase) -> int:
        return self.index(
            lambda e: isinstance(e, PhaseStarted) and e.migration == migration and e.phase is phase
        )


async def fleet_becomes(coord: Coordinator, expected: set[str], timeout: float = 5) -> None:
    """Wait until exactly `expected` agents are connected (joins and leaves wake us)."""
    wake = [trio.Event()]

    def on_event(event: Event) -> None:
        if isinstance(event, AgentJoined | AgentLeft):
            wake[0].set()

    unsubscribe = coord.subscribe(on_event)
    try:
        with trio.fail_after(timeout):
            while coord.agents != expected:
                await wake[0].wait()
                wake[0] = trio.Event()
    finally:
        unsubscribe()


async def until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    """Wait until `predicate()` holds (polled: for what no event announces)."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def confirmed(log: HookLog, migration: str, agent_ids: Iterable[str]) -> None:
    """Wait until each agent ran `on_confirm` for `migration`: the coordinator completes
    without waiting for CONFIRM answers, so `run_migration` may return before they did."""
    wanted = set(agent_ids)
    await until(
        lambda: (
            wanted
            <= {
                c.agent_id for c in log.calls if c.migration == migration and c.hook == "on_confirm"
            }
        )
    )


# --------------------------------------------------------------- raw websockets
@contextlib.asynccontextmanager
async def raw_client(url: str) -> AsyncIterator[WebSocketConnection]:
    """A bare WebSocket to the coordinator, for sending frames no real agent would send."""
    async with open_websocket_url(url, connect_timeout=5, disconnect_timeout=5) as ws:
        yield ws


async def say_hello(ws: WebSocketConnection, agent_id: str) -> Welcome:
    await ws.send_message(encode(Hello(protocol=PROTOCOL_VERSION, agent_id=agent_id)))
    with trio.fail_after(5):
        reply = decode_coordinator_message(await ws.get_message())
    assert isinstance(reply, Welcome), reply
    return reply


async def next_error(ws: WebSocketConnection, timeout: float = 5) -> Error:
    """The next Error frame (phase notices in between are skipped)."""
    with trio.fail_after(timeout):
        while True:
            msg = decode_coordinator_message(await ws.get_message())
            if isinstance(msg, Error):
                return msg


async def answer_phases(ws: WebSocketConnection, seen: list[Phase]) -> None:
    """Play a well-behaved agent by hand: ack every notice that asks for it."""
    while True:
        msg = decode_coordinator_message(await ws.get_message())
        if isinstance(msg, PhaseNotice):
            seen.append(msg.phase)
            if msg.ack_required:
                await ws.send_message(encode(Ack(migration_id=msg.migration_id, phase=msg.phase)))


# ------------------------------------------------- a coordinator in its own thread
@dataclasses.dataclass
class ThreadedCoordinator:
    """A coordinator living in its own `trio.run`, so it can outlive many short trio runs
    (one per Hypothesis example) and prove that one server survives all of them."""

    coordinator: Coordinator
    token: trio.lowlevel.TrioToken

    @property
    def url(self) -> str:
        return self.coordinator.url

    async def call(self, fn: Callable[..., Awaitable[T]], *args: object) -> T:
        """Await `fn(*args)` on the coordinator's own loop, from any other trio loop."""

        def in_worker() -> T:
            return trio.from_thread.run(fn, *args, trio_token=self.token)

        return await trio.to_thread.run_sync(in_worker)

    async def run_migration(self, migration: Migration) -> MigrationResult:
        return await self.call(self.coordinator.run_migration, migration)


@contextlib.contextmanager
def coordinator_in_thread(dsn: str, **options: Any) -> Iterator[ThreadedCoordinator]:
    """`open_coordinator(dsn, **options)` served from a background thread until exit.

    If the coordinator dies while in use, its exception is raised at exit, so a crash the
    test did not otherwise notice still fails it.
    """
    handoff: queue.Queue[ThreadedCoordinator | BaseException] = queue.Queue()
    stop: list[trio.Event] = []
    crashed: list[BaseException] = []

    async def serve() -> None:
        async with open_coordinator(dsn, **options) as coordinator:
            stop.append(trio.Event())
            handoff.put(ThreadedCoordinator(coordinator, trio.lowlevel.current_trio_token()))
            await stop[0].wait()

    def main() -> None:
        try:
            trio.run(serve)
        except BaseException as exc:
            crashed.append(exc)
            handoff.put(exc)

    thread = threading.Thread(target=main, name="coordinator", daemon=True)
    thread.start()
    started = handoff.get(timeout=60)
    if isinstance(started, BaseException):
        raise started
    try:
        yield started
    finally:
        if not crashed:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(stop[0].set, trio_token=started.token)
        thread.join(timeout=30)
    if crashed:
        raise crashed[0]
    assert not thread.is_alive(), "the coordinator thread did not stop"
