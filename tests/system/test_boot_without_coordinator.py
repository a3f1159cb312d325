"""An app boots while the coordinator is down, picks its query set from the durable state in
PostgreSQL, and joins the coordinator once it starts.

Each case writes what coordinators leave in ``lockstep.migrations`` at one point (nothing, a
run before EXECUTE, after EXECUTE, after CONTRACT, a completed run) on a real PostgreSQL; the
agent's coordinator URL is a real closed port, on which a real coordinator starts later.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import psycopg
import pytest
import trio

from agent import AgentFenced, ThreadedAgent, open_agent
from coordinator import Coordinator, open_coordinator, serve_coordinator
from coordinator.history import PostgresHistory
from statemachine import Migration, MigrationMachine, MigrationStatus, Phase
from statemachine.checkpoint import Checkpoint
from tests.support.asyncio_app import AsyncioApp
from tests.support.flow import execute, make_users

ADD_EMAIL = "ALTER TABLE users ADD COLUMN email text"
DROP_NAME = "ALTER TABLE users DROP COLUMN name"
MIGRATION = Migration("add_email", [ADD_EMAIL], contract_sql=[DROP_NAME])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _machine(until: str) -> MigrationMachine:
    m = MigrationMachine(MIGRATION.id, has_contract=True, connected=["app-1"])
    m.start()  # ANNOUNCE
    if until == "announce":
        return m
    m.receive_ack("app-1", MIGRATION.id, Phase.ANNOUNCE)  # -> EXECUTE
    m.sql_committed()  # -> APPLY, executed
    if until == "apply":
        return m
    m.receive_ack("app-1", MIGRATION.id, Phase.APPLY)  # -> CONTRACT
    m.sql_committed()  # -> CONFIRM, contracted
    return m


async def _leave_a_run(dsn: str, until: str) -> None:
    """What a coordinator that died with its run at `until` leaves behind."""
    if until != "announce":
        execute(dsn, ADD_EMAIL)
    if until == "confirm":
        execute(dsn, DROP_NAME)
    store = PostgresHistory(dsn)
    await store.ensure_schema()
    await store.record_start(MIGRATION, Checkpoint.of(_machine(until)))


async def _complete(dsn: str) -> None:
    async with open_coordinator(dsn, ack_timeout=5) as coord:
        result = await coord.run_migration(MIGRATION)
        assert result.status is MigrationStatus.COMPLETED, result.reason


async def _durable_state(dsn: str, state: str) -> None:
    make_users(dsn)
    if state == "completed":
        await _complete(dsn)
    elif state != "nothing":
        await _leave_a_run(dsn, state)


# state -> whether the app must boot on the new query set
STATES = {
    "nothing": False,  # no lockstep schema at all
    "announce": False,  # running, before EXECUTE
    "apply": True,  # running, EXECUTE committed
    "confirm": True,  # running, CONTRACT committed
    "completed": True,
}


async def _until(predicate: Callable[[], bool], timeout: float = 20) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


@pytest.mark.parametrize("state", list(STATES))
async def test_app_boots_on_the_durable_state_then_joins(dsn: str, state: str) -> None:
    await _durable_state(dsn, state)
    port = _free_port()
    url = f"ws://127.0.0.1:{port}"
    booting = trio.current_time()
    async with open_agent(url, agent_id="app-1", dsn=dsn, max_backoff=0.3) as agent:
        print(f"booted without a coordinator in {trio.current_time() - booting:.3f} s")
        assert trio.current_time() - booting < 5, "open_agent did not return at once"
        assert not agent.connected
        assert agent.synced and agent.synced_from == "database"
        assert agent.is_applied("add_email") is STATES[state]
        with agent.using("add_email") as new:
            assert new is STATES[state]
        async with trio.open_nursery() as nursery:
            coord: Coordinator = await nursery.start(
                # A short lease: resuming, it waits out its predecessor's leases first.
                lambda task_status: serve_coordinator(
                    dsn, port=port, lease_seconds=2.0, task_status=task_status
                )
            )
            joining = trio.current_time()
            await _until(lambda: agent.connected)
            print(f"joined {trio.current_time() - joining:.3f} s after the coordinator came up")
            assert coord.agents == {"app-1"}
            assert agent.synced_from == "coordinator"
            # The coordinator's Welcome agrees with what the database said (a run resumed from
            # ANNOUNCE may already be past EXECUTE by now: then it is applied, rightly).
            if state != "announce":
                assert agent.is_applied("add_email") is STATES[state]
            assert agent.sessions == 1
            if state in ("announce", "apply", "confirm"):  # the coordinator resumes it
                result = await coord.run_migration(MIGRATION)
                assert result.status is MigrationStatus.COMPLETED, result.reason
                assert agent.is_applied("add_email")
            nursery.cancel_scope.cancel()


async def test_threaded_agent_boots_from_a_connect_factory(dsn: str) -> None:
    await _durable_state(dsn, "apply")
    app = ThreadedAgent(
        f"ws://127.0.0.1:{_free_port()}",
        agent_id="django-1",
        connect=lambda: psycopg.connect(dsn),
    )
    await trio.to_thread.run_sync(app.start)
    try:
        assert app.synced and app.is_applied("add_email") and not app.connected
    finally:
        await trio.to_thread.run_sync(app.stop)


async def test_asyncio_agent_boots_from_a_dsn_then_joins(dsn: str) -> None:
    await _durable_state(dsn, "confirm")
    port = _free_port()
    app = AsyncioApp(f"ws://127.0.0.1:{port}", agent_id="fastapi-1", dsn=dsn, max_backoff=0.3)
    await trio.to_thread.run_sync(app.start)
    try:
        assert app.agent is not None
        assert app.agent.synced and app.agent.is_applied("add_email")
        async with trio.open_nursery() as nursery:
            await nursery.start(
                # A short lease: resuming, it waits out its predecessor's leases first.
                lambda task_status: serve_coordinator(
                    dsn, port=port, lease_seconds=2.0, task_status=task_status
                )
            )
            await _until(lambda: app.agent is not None and app.agent.connected)
            assert app.agent.synced_from == "coordinator" and app.agent.is_applied("add_email")
            nursery.cancel_scope.cancel()
    finally:
        await trio.to_thread.run_sync(app.stop)
    assert app.error is None


async def test_without_a_durable_source_the_agent_is_not_synced(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with open_agent(f"ws://127.0.0.1:{_free_port()}", agent_id="app-1") as agent:
        assert not agent.synced and agent.applied == frozenset()
        assert not agent.ready
        with pytest.raises(AgentFenced, match="no coordinator reached and no database to read"):
            agent.using("add_email")
    assert any("starting fenced" in r.getMessage() for r in caplog.records)


async def test_an_unreadable_database_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dead = f"postgresql://nobody@127.0.0.1:{_free_port()}/nothing"
    async with open_agent(f"ws://127.0.0.1:{_free_port()}", agent_id="app-1", dsn=dead) as agent:
        assert not agent.synced
    assert any("cannot connect to read the durable state" in r.getMessage() for r in caplog.records)


async def test_a_database_that_comes_up_after_the_boot_is_read_again(dsn: str) -> None:
    await _durable_state(dsn, "completed")
    target = {"dsn": f"postgresql://nobody@127.0.0.1:{_free_port()}/down"}  # refused, for now

    def connect() -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(target["dsn"], connect_timeout=2)

    url = f"ws://127.0.0.1:{_free_port()}"
    async with open_agent(url, agent_id="app-1", connect=connect, max_backoff=0.2) as agent:
        assert not agent.synced and not agent.is_applied("add_email")
        target["dsn"] = dsn  # the database is up; the coordinator still is not
        await _until(lambda: agent.synced, timeout=20)
        assert agent.synced_from == "database" and agent.is_applied("add_email")
        assert not agent.connected


async def test_a_durable_read_vouches_for_one_lease_only(dsn: str) -> None:
    """Booted on the durable state, the agent re-reads it every lease/3; when the reads fail
    for a whole lease it fences itself, and the next successful read vouches again."""
    await _durable_state(dsn, "completed")
    target = {"dsn": dsn}

    def connect() -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(target["dsn"], connect_timeout=2)

    url = f"ws://127.0.0.1:{_free_port()}"
    async with open_agent(url, agent_id="app-1", connect=connect, lease_seconds=0.9) as agent:
        await _until(lambda: agent.synced, timeout=20)
        assert agent.ready and agent.synced_from == "database"
        with agent.using("add_email") as new:
            assert new
        await trio.sleep(2.0)  # still readable: re-read every 0.3 s, so never fenced
        assert agent.ready
        target["dsn"] = f"postgresql://nobody@127.0.0.1:{_free_port()}/down"
        await _until(lambda: not agent.ready, timeout=10)
        with pytest.raises(AgentFenced, match="durable state was not re-read"):
            agent.using("add_email")
        target["dsn"] = dsn
        await _until(lambda: agent.ready, timeout=10)
