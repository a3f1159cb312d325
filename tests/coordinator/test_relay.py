"""Relaying replicas in-process: a leader and a relay of `lockstep serve` on one database.

Real PostgreSQL, real loopback WebSockets; agents given only the relay's URL. The versions
with real processes and SIGKILL are in tests/system/test_relay_processes.py and
tests/fault/test_relay_faults.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio
from trio_websocket import ConnectionClosed

from agent import Agent, MigrationInfo, open_agent
from coordinator.admission import ConnectionLimits
from coordinator.events import AnswerReceived, Event
from coordinator.fleet import AgentLink
from coordinator.queue import submit
from coordinator.relay import Relay, RelayedLink, RelayFleet
from coordinator.service import Service, open_service
from statemachine import Migration, Phase
from statemachine.lease import AgentLease
from statemachine.protocol import CLOSE_NOT_LEADER, CLOSE_UNAUTHORIZED
from statemachine.relay import (
    MAX_RELAY_FRAME_BYTES,
    RELAY_PATH,
    RELAY_PROTOCOL_VERSION,
    RelayHello,
    encode_relay,
)
from tests.support.failover import terminate_lock_session
from tests.support.flow import columns, history, make_users, raw_client, say_hello
from tests.support.http_client import scrape, value

LEASE = 2.0
FAST = {
    "leader_poll_interval": 0.05,
    "probe_interval": 0.2,
    "poll_interval": 0.5,
    "lease_seconds": LEASE,
}


def _migration(name: str = "add_email") -> Migration:
    return Migration(
        name,
        ["ALTER TABLE users ADD COLUMN email text"],
        rollback_sql=["ALTER TABLE users DROP COLUMN IF EXISTS email"],
        contract_sql=["ALTER TABLE users DROP COLUMN name"],
        ack_timeout=10,
    )


def _status(dsn: str, name: str) -> str | None:
    return next((str(row["status"]) for row in history(dsn) if row["name"] == name), None)


async def _until(predicate: object, timeout: float = 20) -> None:
    assert callable(predicate)
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)


@asynccontextmanager
async def _replicas(dsn: str, **options: object) -> AsyncIterator[tuple[Service, Service]]:
    """A leader, then a relaying standby linked to it."""
    settings = {**FAST, **options}
    async with open_service(dsn, **settings) as leader:  # type: ignore[arg-type]
        with trio.fail_after(10):
            await leader.wait_until_leader()
        async with open_service(dsn, relay=True, **settings) as relay:  # type: ignore[arg-type]
            assert relay.relay is not None
            await _until(lambda: relay.relay is not None and relay.relay.linked, 10)
            yield leader, relay


async def test_a_relays_metrics_count_the_agents_it_serves(dsn: str) -> None:
    """The relay's own /metrics show its agents and their leases; the leader's count every
    agent, relayed or not."""
    async with (
        _replicas(dsn, http_port=0) as (leader, relay),
        open_agent(relay.url, agent_id="r1"),
        open_agent(relay.url, agent_id="r2"),
        open_agent(leader.url, agent_id="l1"),
    ):
        assert leader.http_port is not None and relay.http_port is not None
        await leader.coordinator.wait_for_agents(3, timeout=10)
        on_relay = await scrape(relay.http_port)
        on_leader = await scrape(leader.http_port)
        assert value(on_relay, "lockstep_agents_connected") == 2
        assert value(on_relay, "lockstep_is_leader") == 0
        assert value(on_leader, "lockstep_agents_connected") == 3
        # What the relay grants: the leader's lease, never more than the relay holds.
        relay_lease = value(on_relay, "lockstep_lease_seconds")
        assert 0 < relay_lease <= value(on_leader, "lockstep_lease_seconds")


def test_relay_frames_fit_the_leaders_websocket_message_limit() -> None:
    assert ConnectionLimits().max_message_bytes > MAX_RELAY_FRAME_BYTES


async def test_relayed_agents_are_the_leaders_cohort_and_the_migration_completes(
    dsn: str,
) -> None:
    make_users(dsn)
    answers: list[AnswerReceived] = []
    async with _replicas(dsn) as (leader, relay), AsyncExitStack() as stack:

        def seen(event: Event) -> None:
            if isinstance(event, AnswerReceived):
                answers.append(event)

        leader.coordinator.subscribe(seen)
        agents: list[Agent] = []
        for i in range(4):
            url = relay.url if i % 2 else leader.url
            agents.append(await stack.enter_async_context(open_agent(url, agent_id=f"a{i}")))
        await leader.coordinator.wait_for_agents(4, timeout=10)
        relayed = {a.agent_id for a in leader.coordinator.fleet if isinstance(a, RelayedLink)}
        assert relayed == {"a1", "a3"}
        assert relay.relay is not None and relay.relay.fleet.agent_ids == {"a1", "a3"}
        await submit(dsn, [_migration()])
        await _until(lambda: _status(dsn, "add_email") == "completed")
        assert all(agent.is_applied("add_email") for agent in agents)
    assert "email" in columns(dsn) and "name" not in columns(dsn)
    acked = {(e.agent_id, e.phase) for e in answers if e.ok}
    for agent_id in ("a1", "a3"):
        assert (agent_id, Phase.APPLY) in acked, "a relayed agent's APPLY ack was not counted"


async def test_a_relayed_agents_nack_rolls_the_migration_back(dsn: str) -> None:
    make_users(dsn)

    async def refuse(info: MigrationInfo) -> None:
        raise RuntimeError("this instance cannot switch")

    async with (
        _replicas(dsn) as (leader, relay),
        open_agent(leader.url, agent_id="direct"),
        open_agent(relay.url, agent_id="relayed", on_apply=refuse) as relayed,
    ):
        await leader.coordinator.wait_for_agents(2, timeout=10)
        await submit(dsn, [_migration()])
        await _until(lambda: _status(dsn, "add_email") == "failed")
        assert not relayed.is_applied("add_email")
    assert "email" not in columns(dsn) and "name" in columns(dsn)


async def test_a_relay_link_needs_the_fleet_secret_and_an_unlinked_relay_sends_agents_on(
    dsn: str,
) -> None:
    async with _replicas(dsn, token="s3cret") as (leader, relay):
        hello = RelayHello(RELAY_PROTOCOL_VERSION, "intruder", "ls1.not-the-secret")
        async with raw_client(leader.url + RELAY_PATH) as ws:
            await ws.send_message(encode_relay(hello))
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await ws.get_message()
        reason = closed.value.reason
        assert reason is not None and reason.code == CLOSE_UNAUTHORIZED
        assert "fleet secret" in (reason.reason or "")
        assert relay.relay is not None
        relay.relay.pause("test: unlinked")
        async with raw_client(relay.url) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await say_hello(ws, "a1")
        reason = closed.value.reason
        assert reason is not None and reason.code == CLOSE_NOT_LEADER


async def test_the_leader_stopping_mid_apply_lets_the_relay_lead_and_finish(dsn: str) -> None:
    make_users(dsn)
    entered = trio.Event()

    async def noted(info: MigrationInfo) -> None:
        entered.set()

    stop_leader = trio.Event()
    linked = trio.Event()
    leader_epoch: list[int] = []

    async def first_leader() -> None:
        async with open_service(dsn, **FAST) as leader:  # type: ignore[arg-type]
            await leader.wait_until_leader()
            leader_epoch.append(leader.epoch())
            await stop_leader.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first_leader)
        await _until(lambda: bool(leader_epoch), 10)
        async with open_service(dsn, relay=True, **FAST) as relay:  # type: ignore[arg-type]
            assert relay.relay is not None
            await _until(lambda: relay.relay is not None and relay.relay.linked, 10)
            linked.set()
            async with open_agent(relay.url, agent_id="r1", on_apply=noted) as r1:
                await submit(dsn, [_migration()])
                with trio.fail_after(20):
                    await entered.wait()
                stop_leader.set()  # mid-APPLY (or just after its ack): the run stays durable
                with trio.fail_after(20):
                    await relay.wait_until_leader()
                assert relay.epoch() > leader_epoch[0]
                await _until(lambda: _status(dsn, "add_email") == "completed", 40)
                assert r1.is_applied("add_email")
                assert relay.relay.links_made >= 1 and not relay.relay.linked
    assert "name" not in columns(dsn)


async def test_a_leader_that_loses_its_lock_closes_its_relay_links(dsn: str) -> None:
    """A relay that cannot lead itself (a bare `Relay`): when the leader's term ends, its
    link must end too, and the relay links again under the next term's epoch."""
    async with open_service(dsn, **FAST) as leader:  # type: ignore[arg-type]
        await leader.wait_until_leader()
        first_epoch = leader.epoch()
        relay = Relay(
            dsn,
            url="ws://127.0.0.1:1",
            token=None,
            shared_token=False,
            handshake_timeout=5.0,
            heartbeat_interval=0.0,
            lease_seconds=LEASE,
            poll_interval=0.05,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(relay.run)
            await _until(lambda: relay.linked, 10)
            assert relay.epoch == first_epoch and len(leader.hub.sessions) == 1
            await trio.to_thread.run_sync(terminate_lock_session, dsn)
            await _until(lambda: leader.epoch() > first_epoch, 15)
            await _until(lambda: relay.linked and relay.epoch == leader.epoch(), 15)
            assert relay.links_made == 2 and len(leader.hub.sessions) == 1
            nursery.cancel_scope.cancel()


async def test_a_relay_grants_only_within_its_lease_and_to_agents_of_its_current_link() -> None:
    lease = AgentLease()
    fleet = RelayFleet(LEASE, lease)
    send, _receive = trio.open_memory_channel[str](1)
    fleet.add(AgentLink("a1", "test", 0.0, send))
    fleet.link_number = fleet.announced_on["a1"] = 1
    assert not fleet.grant("a1"), "granted without a lease of its own"
    now = trio.current_time()
    lease.welcomed(LEASE, now)
    assert fleet.grant("a1")
    assert 0 < fleet.lease_seconds <= LEASE
    fleet.link_number = 2  # relinked: a1 was announced to the previous link's leader
    assert not fleet.grant("a1"), "granted a lease the new leader does not know of"
    fleet.announced_on["a1"] = 2
    assert fleet.grant("a1")
    lease.lapse()
    assert not fleet.grant("a1")


async def test_a_relayed_agent_stopped_cleanly_mid_apply_is_not_waited_for(dsn: str) -> None:
    """Its `release` crosses the relay: the leader counts it departed when it leaves, not a
    lease's expiry later (a minute here: beyond the test's bound)."""
    make_users(dsn)
    stalled = trio.Event()

    async def stall(info: MigrationInfo) -> None:
        stalled.set()
        await trio.sleep_forever()

    async with _replicas(dsn, lease_seconds=60.0) as (leader, relay):
        scope = trio.CancelScope()

        async def leaver(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                async with open_agent(relay.url, agent_id="leaver", on_apply=stall):
                    task_status.started()
                    await trio.sleep_forever()

        async with open_agent(leader.url, agent_id="steady"), trio.open_nursery() as nursery:
            await nursery.start(leaver)
            await leader.coordinator.wait_for_agents(2, timeout=10)
            await submit(dsn, [_migration()])
            with trio.fail_after(20):
                await stalled.wait()
            scope.cancel()
            await _until(lambda: _status(dsn, "add_email") == "completed", 20)
