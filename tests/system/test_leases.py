"""Leases end to end: fencing under a partition, crashed and restarted agents, the old mode.

Real PostgreSQL, real sockets and, for the crash, a real agent process killed with SIGKILL.
Each test runs a query loop through `agent.using` against PostgreSQL while the migration runs
(old query: ``SELECT old_name``, which CONTRACT drops; new query: ``SELECT new_name``) and
counts the queries that failed: the point of leases is that this count stays 0 whatever
happens to an agent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import pytest
import trio

from agent import Agent, AgentFenced, MigrationInfo, open_agent
from coordinator import Coordinator, open_coordinator
from coordinator.events import AgentLeft, Event, PhaseStarted
from statemachine import Migration, MigrationResult, MigrationStatus, Phase
from statemachine.lease import certainly_expired_after
from tests.support.flow import execute, raw_client, say_hello
from tests.support.tcp_proxy import open_tcp_proxy

LEASE = 1.5
#: Long enough that a test bounded well under it shows nothing waited for a lease to expire.
ROLLING_LEASE = 60.0
NAME = "rename_old_name"
OLD, NEW = "SELECT old_name FROM items", "SELECT new_name FROM items"


def make_items(dsn: str) -> None:
    execute(
        dsn,
        "CREATE TABLE items (id int PRIMARY KEY, old_name text)",
        "INSERT INTO items VALUES (1, 'a'), (2, 'b')",
    )


def rename(**overrides: object) -> Migration:
    spec: dict[str, object] = {
        "sql": "ALTER TABLE items ADD COLUMN new_name text",
        "rollback_sql": "ALTER TABLE items DROP COLUMN new_name",
        "contract_sql": "ALTER TABLE items DROP COLUMN old_name",
    }
    spec.update(overrides)
    return Migration(NAME, **spec)  # type: ignore[arg-type]


@dataclasses.dataclass
class Traffic:
    """What one agent's query loop saw."""

    ok: int = 0
    failed: int = 0
    fenced: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)


async def query_loop(current: Callable[[], Agent | None], dsn: str, traffic: Traffic) -> None:
    """Forever: one request every 20 ms through `agent.using`, as an app would serve them
    (a fenced agent answers 503: counted as fenced, never as a failure)."""
    conn = await trio.to_thread.run_sync(lambda: psycopg.connect(dsn, autocommit=True))
    try:
        while True:
            await trio.sleep(0.02)
            agent = current()
            if agent is None:
                continue  # the instance is restarting: no requests reach it
            try:
                with agent.using(NAME) as new:
                    sql = NEW if new else OLD
                    await trio.to_thread.run_sync(conn.execute, sql)
                traffic.ok += 1
            except AgentFenced:
                traffic.fenced += 1
            except psycopg.Error as exc:
                traffic.failed += 1
                traffic.errors.append(str(exc))
    finally:
        await trio.to_thread.run_sync(conn.close)


@contextlib.asynccontextmanager
async def traffic_on(
    nursery: trio.Nursery, dsn: str, agents: dict[str, Agent | None]
) -> AsyncIterator[dict[str, Traffic]]:
    traffic = {agent_id: Traffic() for agent_id in agents}
    scope = trio.CancelScope()

    async def loops() -> None:
        with scope:
            async with trio.open_nursery() as inner:
                for agent_id in agents:
                    inner.start_soon(
                        query_loop, lambda a=agent_id: agents[a], dsn, traffic[agent_id]
                    )

    nursery.start_soon(loops)
    try:
        yield traffic
    finally:
        scope.cancel()


def phase_started(phase: Phase, then: Callable[[], None]) -> Callable[[Event], None]:
    def on_event(event: Event) -> None:
        if isinstance(event, PhaseStarted) and event.phase is phase:
            then()

    return on_event


async def test_a_partitioned_agent_fences_itself_before_contract(dsn: str) -> None:
    """The agent behind a blackholed proxy keeps its socket open but hears nothing: it
    fences itself within a lease; CONTRACT runs only after its lease certainly expired; it
    resyncs once the partition heals; no query ever hit a dropped column."""
    make_items(dsn)
    marks: dict[str, float] = {}
    async with (
        open_coordinator(dsn, port=0, ack_timeout=30, lease_seconds=LEASE) as coord,
        open_tcp_proxy(coord.url) as proxy,
        open_agent(coord.url, agent_id="direct", lease_seconds=LEASE) as direct,
        open_agent(
            f"ws://127.0.0.1:{proxy.port}",
            agent_id="behind",
            lease_seconds=LEASE,
            connect_timeout=3,
            max_backoff=0.5,
        ) as behind,
        trio.open_nursery() as nursery,
    ):
        await coord.wait_for_agents(2, timeout=10)
        assert behind.ready and direct.ready

        def partition() -> None:
            marks.setdefault("partition", trio.current_time())
            proxy.blackhole()

        def contract() -> None:
            marks.setdefault("contract", trio.current_time())

        # The partition starts when EXECUTE does: "behind" never hears of APPLY and keeps
        # running the old query until it fences itself.
        coord.subscribe(phase_started(Phase.EXECUTE, partition))
        coord.subscribe(phase_started(Phase.CONTRACT, contract))

        async def watch_fence() -> None:
            while not behind.fenced:
                await trio.sleep(0.005)
            marks["fenced"] = trio.current_time()

        async with traffic_on(nursery, dsn, {"direct": direct, "behind": behind}) as traffic:
            nursery.start_soon(watch_fence)
            with trio.fail_after(30):
                result = await coord.run_migration(rename())
            assert result.status is MigrationStatus.COMPLETED, result.reason
            assert result.departed == ("behind",)
            assert traffic["behind"].failed == 0, traffic["behind"].errors
            assert "fenced" in marks, "CONTRACT ran while the partitioned agent was unfenced"
            fence_after = marks["fenced"] - marks["partition"]
            contract_after = marks["contract"] - marks["partition"]
            print(
                f"\npartition test (lease {LEASE:g} s): fenced {fence_after:.3f} s after the "
                f"partition; CONTRACT {contract_after:.3f} s after it (certain expiry "
                f"{certainly_expired_after(LEASE):.2f} s after the last grant)"
            )
            assert fence_after <= LEASE + 1.0
            assert marks["contract"] > marks["fenced"], "CONTRACT ran while it was unfenced"
            with pytest.raises(AgentFenced, match="lease"):
                behind.using(NAME)
            assert not behind.ready

            proxy.forward()
            with trio.fail_after(20):
                while not behind.ready:
                    await trio.sleep(0.02)
            assert behind.is_applied(NAME), "resynced: the migration completed meanwhile"
            served = traffic["behind"].ok
            await trio.sleep(0.3)
            assert traffic["behind"].ok > served, "the agent serves again after resyncing"
        assert traffic["direct"].failed == 0, traffic["direct"].errors
        assert traffic["behind"].failed == 0, traffic["behind"].errors
        assert traffic["behind"].fenced > 0


#: Short, so that the span between the agent's lapse and the coordinator's certain expiry
#: (0.1 L + 1 s, minus up to a renewal interval of phase) is wide next to the heal's timing.
LATE_LEASE = 0.9


async def test_a_grant_late_by_less_than_the_skew_margin_keeps_the_link(dsn: str) -> None:
    """Renewals held up for 1.3 s (longer than the 0.9 s lease, shorter than the 1.69 s the
    coordinator waits at least before counting it gone): the agent is fenced meanwhile, but
    it keeps its link and its fleet membership when the grants come: no reconnect, no
    Welcome, no resync, which at 10,000 agents would be a storm of them."""
    async with (
        open_coordinator(dsn, port=0, lease_seconds=LATE_LEASE) as coord,
        open_tcp_proxy(coord.url) as proxy,
        open_agent(
            f"ws://127.0.0.1:{proxy.port}", agent_id="slow", lease_seconds=LATE_LEASE
        ) as agent,
    ):
        await coord.wait_for_agents(1, timeout=10)
        left: list[Event] = []
        coord.subscribe(lambda e: left.append(e) if isinstance(e, AgentLeft) else None)
        assert agent.ready
        fenced = await proxy.partition_for(1.3, watch=lambda: agent.fenced)
        assert fenced, "the renewals were held for longer than the lease"
        with trio.fail_after(1):
            while not agent.ready:
                await trio.sleep(0.005)
        await trio.sleep(LATE_LEASE * 2)  # it renews normally again
        assert agent.ready
        assert agent.sessions == 1, "the agent reconnected instead of taking the late grant"
        assert left == [], "the coordinator counted the agent gone"
        result = await coord.run_migration(Migration("after_late_grant", sql=["SELECT 1"]))
        assert result.status is MigrationStatus.COMPLETED, result.reason


AGENT_SCRIPT = textwrap.dedent(
    """
    import sys, trio
    from agent import open_agent

    async def stall(info):
        print("announce", flush=True)
        await trio.sleep_forever()

    async def main():
        async with open_agent(sys.argv[1], agent_id="crasher", on_announce=stall,
                              lease_seconds=float(sys.argv[2])) as agent:
            print("ready", flush=True)
            await trio.sleep_forever()

    trio.run(main)
    """
)


async def test_an_agent_killed_mid_phase_departs_once_its_lease_expired(dsn: str) -> None:
    """A real agent process killed with SIGKILL while it owes its ANNOUNCE ack never comes
    back: the migration completes once its lease certainly expired, and says it departed."""
    make_items(dsn)
    proc: subprocess.Popen[str] | None = None
    try:
        async with (
            open_coordinator(dsn, port=0, ack_timeout=30, lease_seconds=LEASE) as coord,
            open_agent(coord.url, agent_id="steady", lease_seconds=LEASE) as steady,
            trio.open_nursery() as nursery,
        ):
            proc = subprocess.Popen(
                [sys.executable, "-c", AGENT_SCRIPT, coord.url, str(LEASE)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            await coord.wait_for_agents(2, timeout=30)
            killed: dict[str, float] = {}

            async def kill_when_stalled() -> None:
                assert proc is not None and proc.stdout is not None
                while (await trio.to_thread.run_sync(proc.stdout.readline)).strip() != "announce":
                    pass
                os.kill(proc.pid, signal.SIGKILL)  # dies owing its ANNOUNCE ack
                killed["at"] = time.monotonic()

            async with traffic_on(nursery, dsn, {"steady": steady}) as traffic:
                nursery.start_soon(kill_when_stalled)
                with trio.fail_after(30):
                    result = await coord.run_migration(rename())
            waited = time.monotonic() - killed["at"]
        print(f"\ncrash test: migration completed {waited:.2f} s after the SIGKILL")
        assert result.status is MigrationStatus.COMPLETED, result.reason
        assert result.departed == ("crasher",)
        assert traffic["steady"].failed == 0, traffic["steady"].errors
    finally:
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


async def test_a_rolling_restart_during_apply_completes(dsn: str) -> None:
    """Every agent is restarted, one after another, while APPLY waits for its acks: each
    comes back under its own id and acks APPLY, or (it released its lease when it stopped)
    is no longer waited for; no query fails."""
    make_items(dsn)
    ids = ["app-1", "app-2", "app-3"]
    slow_apply = trio.Event()

    async def slow(info: MigrationInfo) -> None:
        if not info.resynced:
            slow_apply.set()
            await trio.sleep(30)  # the first APPLY never finishes: the restart cuts it

    live: dict[str, Agent | None] = dict.fromkeys(ids)
    scopes: dict[str, trio.CancelScope] = {}

    async def instance(
        agent_id: str, *, hook: bool, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with trio.CancelScope() as scope:
            scopes[agent_id] = scope
            async with open_agent(
                coord.url,
                agent_id=agent_id,
                lease_seconds=LEASE,
                on_apply=slow if hook else None,
            ) as agent:
                live[agent_id] = agent
                task_status.started()
                try:
                    await trio.sleep_forever()
                finally:
                    live[agent_id] = None

    async with (
        open_coordinator(dsn, port=0, ack_timeout=30, lease_seconds=LEASE) as coord,
        trio.open_nursery() as nursery,
    ):
        for agent_id in ids:
            await nursery.start(lambda a=agent_id, **kw: instance(a, hook=True, **kw))
        await coord.wait_for_agents(3, timeout=10)

        async def restart_all() -> None:
            await slow_apply.wait()
            for agent_id in ids:
                scopes[agent_id].cancel()
                while agent_id in coord.agents:
                    await trio.sleep(0.01)
                await trio.sleep(0.1)  # the instance is down for a moment
                await nursery.start(lambda a=agent_id, **kw: instance(a, hook=False, **kw))

        async with traffic_on(nursery, dsn, live) as traffic:
            nursery.start_soon(restart_all)
            with trio.fail_after(30):
                result = await coord.run_migration(rename())
        assert result.status is MigrationStatus.COMPLETED, result.reason
        # Departed: an instance that had not come back yet when the migration completed.
        assert set(result.departed) <= set(ids)
        for agent_id in ids:
            assert traffic[agent_id].failed == 0, traffic[agent_id].errors
            assert traffic[agent_id].ok > 0
        nursery.cancel_scope.cancel()


async def _migrate_while_leaver_stops_in_apply(coord: Coordinator) -> MigrationResult:
    """Agents "steady" and "leaver" on `coord`; "leaver" is stopped cleanly (its scope
    cancelled) while its APPLY hook runs. Returns the migration's result (bounded: 20 s)."""
    stalled = trio.Event()

    async def stall(info: MigrationInfo) -> None:
        stalled.set()
        await trio.sleep_forever()

    scope = trio.CancelScope()

    async def leaver(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            async with open_agent(coord.url, agent_id="leaver", on_apply=stall):
                task_status.started()
                await trio.sleep_forever()

    async def stop_it() -> None:
        await stalled.wait()
        scope.cancel()

    async with open_agent(coord.url, agent_id="steady"), trio.open_nursery() as n:
        await n.start(leaver)
        await coord.wait_for_agents(2, timeout=5)
        n.start_soon(stop_it)
        with trio.fail_after(20):  # with a one-minute lease and no release: about 67 s
            return await coord.run_migration(rename())


async def test_rollback_mode_still_rolls_back_on_a_disconnect(dsn: str) -> None:
    make_items(dsn)
    async with open_coordinator(dsn, port=0, on_agent_loss="rollback") as coord:
        result = await _migrate_while_leaver_stops_in_apply(coord)
    assert result.status is MigrationStatus.FAILED
    assert result.reason == "agent leaver disconnected in APPLY before acking"
    assert result.departed == ()


async def test_durable_readers_make_contract_wait_one_lease_after_apply(dsn: str) -> None:
    """With durable_readers, CONTRACT starts only a certain-expiry after APPLY's checkpoint
    was written: every agent reading the database has re-read it (or fenced) by then."""
    make_items(dsn)
    starts: dict[Phase, float] = {}

    def mark(phase: Phase) -> Callable[[], None]:
        return lambda: starts.setdefault(phase, trio.current_time())

    async with (
        open_coordinator(dsn, port=0, lease_seconds=1.0, durable_readers=True) as coord,
        open_agent(coord.url, agent_id="a1", lease_seconds=1.0),
    ):
        coord.subscribe(phase_started(Phase.APPLY, mark(Phase.APPLY)))
        coord.subscribe(phase_started(Phase.CONTRACT, mark(Phase.CONTRACT)))
        await coord.wait_for_agents(1, timeout=10)
        with trio.fail_after(30):
            result = await coord.run_migration(rename())
    assert result.status is MigrationStatus.COMPLETED, result.reason
    waited = starts[Phase.CONTRACT] - starts[Phase.APPLY]
    assert waited >= certainly_expired_after(1.0)


async def test_an_agent_stopped_for_good_is_not_waited_for(dsn: str) -> None:
    """An instance stopped cleanly mid-APPLY (scaled down: it never comes back) releases its
    lease: the migration completes at once, not a lease's expiry later (a minute here, beyond
    the test's bound), and says it departed."""
    make_items(dsn)
    async with open_coordinator(dsn, port=0, ack_timeout=120, lease_seconds=ROLLING_LEASE) as coord:
        result = await _migrate_while_leaver_stops_in_apply(coord)
    assert result.status is MigrationStatus.COMPLETED, result.reason
    assert result.departed == ("leaver",)


async def test_an_agent_stopped_with_work_in_flight_keeps_its_lease(dsn: str) -> None:
    """A unit of work still running when the agent stops (a thread of the app) means the
    instance may still use the schema: it does not release, so the coordinator counts it
    departing (its lease may be valid) rather than gone; new work is refused meanwhile."""
    finish = threading.Event()
    entered = threading.Event()
    async with open_coordinator(dsn, port=0, lease_seconds=ROLLING_LEASE) as coord:
        scope = trio.CancelScope()
        stopped: list[Agent] = []

        def busy(agent: Agent) -> None:
            with agent.using(NAME):
                entered.set()
                finish.wait(30)

        async with trio.open_nursery() as n:

            async def instance() -> None:
                with scope:
                    async with open_agent(coord.url, agent_id="busy") as agent:
                        stopped.append(agent)
                        n.start_soon(trio.to_thread.run_sync, busy, agent)
                        await trio.to_thread.run_sync(entered.wait, 10)
                        await trio.sleep_forever()

            n.start_soon(instance)
            with trio.fail_after(10):
                await coord.wait_for_agents(1, timeout=10)
                while not entered.is_set():
                    await trio.sleep(0.01)
                scope.cancel()
                while "busy" in coord.agents:
                    await trio.sleep(0.01)
            assert "busy" in coord.fleet.departing, "closed with work in flight: not released"
            with pytest.raises(AgentFenced, match="stopped"), stopped[0].using(NAME):
                pass
            finish.set()


@pytest.mark.parametrize("how", ["released", "lease expired"])
async def test_an_agent_gone_while_the_start_is_recorded_is_not_waited_for(
    dsn: str, how: str
) -> None:
    """The run counts its fleet, then writes its start to PostgreSQL; an agent that leaves
    during that write (stopped cleanly, or gone and its lease certainly expired) must still
    reach the run as gone, or ANNOUNCE waits the whole ack timeout for it and rolls back."""
    make_items(dsn)
    async with open_coordinator(dsn, port=0, ack_timeout=20, lease_seconds=LEASE) as coord:
        record_start = coord.history.record_start
        counted, leave, gone = trio.Event(), trio.Event(), trio.Event()

        async def slow_start(*args: Any) -> None:
            counted.set()  # the run counted its fleet; the agent leaves before the write
            await gone.wait()
            await record_start(*args)

        async def leaver() -> None:
            if how == "released":
                async with open_agent(coord.url, agent_id="leaver"):
                    await leave.wait()
            else:
                async with raw_client(coord.url) as ws:  # no renewals, no Release
                    await say_hello(ws, "leaver")
                    await leave.wait()

        async def leave_once_counted() -> None:
            await counted.wait()
            leave.set()
            while "leaver" in coord.agents or "leaver" in coord.fleet.departing:
                await trio.sleep(0.01)
            gone.set()

        coord.history.record_start = slow_start  # type: ignore[method-assign,assignment]
        async with trio.open_nursery() as n, open_agent(coord.url, agent_id="stayer"):
            n.start_soon(leaver)
            n.start_soon(leave_once_counted)
            await coord.wait_for_agents(2, timeout=10)
            with trio.fail_after(15):
                result = await coord.run_migration(rename(contract_sql=None))
    assert result.status is MigrationStatus.COMPLETED, result.reason
    assert result.departed == ("leaver",)
