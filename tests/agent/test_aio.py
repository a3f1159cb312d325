"""The asyncio agent joins a real coordinator and follows a migration to its end."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import trio
from trio_websocket import WebSocketRequest, serve_websocket

from agent import AgentFenced, CoordinatorUnreachable
from coordinator import open_coordinator
from statemachine import Migration, MigrationStatus
from statemachine.protocol import CLOSE_NOT_LEADER
from tests.support.asyncio_app import AsyncioApp
from tests.support.flow import columns, make_users


async def test_asyncio_agent_switches_through_a_migration_with_contract(dsn: str) -> None:
    make_users(dsn, "old_name TEXT")
    async with open_coordinator(dsn, ack_timeout=10) as coord:
        app = AsyncioApp(coord.url, agent_id="fastapi-1")
        await trio.to_thread.run_sync(app.start)
        try:
            await coord.wait_for_agents(1, timeout=10)
            assert app.agent is not None and app.agent.synced
            assert not app.agent.is_applied("add_email")
            result = await coord.run_migration(
                Migration(
                    "add_email",
                    "ALTER TABLE users ADD COLUMN email TEXT",
                    contract_sql="ALTER TABLE users DROP COLUMN old_name",
                )
            )
            assert result.status is MigrationStatus.COMPLETED, result.reason
            assert app.agent.is_applied("add_email")
            assert app.agent.applied == frozenset({"add_email"})
            with app.agent.using("add_email") as new:
                assert new
            assert [c[0] for c in app.calls] == ["on_announce", "on_apply", "on_confirm"]
        finally:
            await trio.to_thread.run_sync(app.stop)
    assert app.error is None
    assert "old_name" not in columns(dsn) and "email" in columns(dsn)


async def test_asyncio_agent_nacks_from_a_raising_hook(dsn: str) -> None:
    make_users(dsn)

    async def refuse(info: object) -> None:
        raise RuntimeError("not on asyncio")

    async with open_coordinator(dsn, ack_timeout=10) as coord:
        app = AsyncioApp(coord.url, agent_id="fastapi-1", on_announce=refuse)
        await trio.to_thread.run_sync(app.start)
        try:
            await coord.wait_for_agents(1, timeout=10)
            result = await coord.run_migration(
                Migration("add_email", "ALTER TABLE users ADD COLUMN email TEXT")
            )
        finally:
            await trio.to_thread.run_sync(app.stop)
    assert result.status is MigrationStatus.FAILED
    assert result.reason == "nack in ANNOUNCE from agent fastapi-1: RuntimeError: not on asyncio"


def test_importing_the_asyncio_agent_without_websockets_names_the_extra() -> None:
    # A real interpreter where `websockets` cannot be imported (as without the extra).
    script = (
        "import sys; sys.modules['websockets'] = None\n"
        "try:\n"
        "    import agent.aio\n"
        "except ImportError as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert "MissingExtra" in out.stdout
    assert "pip install 'lockstep[asyncio]'" in out.stdout


async def test_asyncio_agent_skips_a_standby_and_a_dead_url(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def standby(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.aclose(CLOSE_NOT_LEADER, "standby")

    async with trio.open_nursery() as nursery, open_coordinator(dsn) as coord:
        server = await nursery.start(serve_websocket, standby, "127.0.0.1", 0, None)
        urls = ["ws://127.0.0.1:1", f"ws://127.0.0.1:{server.port}", coord.url]
        app = AsyncioApp(urls, agent_id="fastapi-1")
        await trio.to_thread.run_sync(app.start)
        try:
            assert app.agent is not None and app.agent.connected
            assert coord.agents == {"fastapi-1"}
        finally:
            await trio.to_thread.run_sync(app.stop)
        nursery.cancel_scope.cancel()
    assert app.error is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "connection refused" in warnings[0]  # the dead URL only


async def test_asyncio_agent_boots_without_a_coordinator(caplog: pytest.LogCaptureFixture) -> None:
    app = AsyncioApp("ws://127.0.0.1:1", agent_id="fastapi-1")
    await trio.to_thread.run_sync(app.start)
    try:
        assert app.agent is not None and not app.agent.connected and not app.agent.synced
        assert not app.agent.ready
        with pytest.raises(AgentFenced, match="no coordinator reached and no database to read"):
            app.agent.using("anything")
    finally:
        await trio.to_thread.run_sync(app.stop)
    assert app.error is None
    assert any("starting fenced" in r.getMessage() for r in caplog.records)


def test_asyncio_agent_wait_connected_raises_when_unreachable() -> None:
    app = AsyncioApp("ws://127.0.0.1:1", agent_id="fastapi-1", wait_connected=True)
    with pytest.raises(CoordinatorUnreachable, match="connection refused"):
        app.start()
