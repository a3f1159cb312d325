"""A threaded (non-trio) app joins the fleet with ordinary blocking hooks."""

from __future__ import annotations

import threading

import psycopg
import pytest
import trio

from agent import AgentFenced, CoordinatorUnreachable, MigrationInfo
from agent.threaded import ThreadedAgent
from coordinator import open_coordinator
from statemachine import Migration, MigrationStatus
from tests.support.flow import make_users


async def test_threaded_agent_switches_with_blocking_hooks(dsn: str) -> None:
    make_users(dsn)
    seen: list[tuple[str, str, bool]] = []

    def on_apply(info: MigrationInfo) -> None:
        # A blocking call on the app's own connection, as a Django view would make.
        with psycopg.connect(dsn) as conn:
            conn.execute("SELECT email FROM users").fetchall()
        seen.append((info.name, threading.current_thread().name, True))

    async with open_coordinator(dsn, ack_timeout=5) as coord:
        app = ThreadedAgent(coord.url, agent_id="django-1", on_apply=on_apply)
        await trio.to_thread.run_sync(app.start)
        try:
            await coord.wait_for_agents(1, timeout=5)
            assert not app.is_applied("add_email")
            result = await coord.run_migration(
                Migration("add_email", "ALTER TABLE users ADD COLUMN email TEXT")
            )
            assert result.status is MigrationStatus.COMPLETED, result.reason
            assert app.is_applied("add_email")
            assert [name for name, _, _ in seen] == ["add_email"]
            assert not seen[0][1].startswith("lockstep-agent-")  # ran in a worker thread
        finally:
            await trio.to_thread.run_sync(app.stop)
        assert not app.connected


async def test_threaded_agent_nack_from_a_raising_hook(dsn: str) -> None:
    make_users(dsn)

    def on_announce(info: MigrationInfo) -> None:
        raise RuntimeError("not today")

    async with open_coordinator(dsn, ack_timeout=5) as coord:
        app = ThreadedAgent(coord.url, agent_id="django-1", on_announce=on_announce)
        await trio.to_thread.run_sync(app.start)
        try:
            result = await coord.run_migration(
                Migration("add_email", "ALTER TABLE users ADD COLUMN email TEXT")
            )
        finally:
            await trio.to_thread.run_sync(app.stop)
    assert result.status is MigrationStatus.FAILED
    assert result.reason == "nack in ANNOUNCE from agent django-1: RuntimeError: not today"


def test_threaded_agent_start_raises_when_unreachable_if_asked_to_wait() -> None:
    app = ThreadedAgent("ws://127.0.0.1:1", agent_id="x", connect_timeout=2, wait_connected=True)
    with pytest.raises(CoordinatorUnreachable, match="connection refused"):
        app.start()


def test_threaded_agent_boots_without_a_coordinator() -> None:
    app = ThreadedAgent("ws://127.0.0.1:1", agent_id="x", connect_timeout=2)
    app.start()
    try:
        assert not app.connected and not app.synced
        assert not app.is_applied("anything")
        assert not app.ready
        assert app.health()["reason"] == app.fenced_reason()
        with pytest.raises(AgentFenced, match="no database to read"):
            app.using("anything")
    finally:
        app.stop()


async def test_threaded_agent_is_ready_while_its_lease_holds(dsn: str) -> None:
    async with open_coordinator(dsn, port=0) as coord:
        app = ThreadedAgent(coord.url, agent_id="t1")
        await trio.to_thread.run_sync(app.start)
        try:
            assert app.ready and app.health() == {
                "ready": True,
                "reason": None,
                "connected": True,
                "synced_from": "coordinator",
            }
            with app.using("anything") as new:
                assert not new
        finally:
            await trio.to_thread.run_sync(app.stop)
        assert not app.ready, "a stopped agent is fenced"


async def test_threaded_agent_takes_several_urls(dsn: str) -> None:
    async with open_coordinator(dsn) as coord:
        app = ThreadedAgent(["ws://127.0.0.1:1", coord.url], agent_id="django-1")
        await trio.to_thread.run_sync(app.start)
        try:
            assert app.connected and app.synced
            assert coord.agents == {"django-1"}
        finally:
            await trio.to_thread.run_sync(app.stop)
