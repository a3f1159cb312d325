"""The asyncio agent end to end: over TLS, through a coordinator restart, and its stop time.

Real coordinators on loopback, a real PostgreSQL, the asyncio app in its own thread with its
own event loop (`tests/support/asyncio_app.py`).
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable

import pytest
import trio
import trustme

from agent import CoordinatorUnreachable
from coordinator import Coordinator, open_coordinator, serve_coordinator
from statemachine import Migration, MigrationStatus
from tests.support.asyncio_app import AsyncioApp
from tests.support.flow import make_users
from tests.support.tcp_proxy import open_tcp_proxy


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


@pytest.fixture
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def _until(predicate: Callable[[], bool], timeout: float = 20) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


async def test_asyncio_agent_over_wss(
    dsn: str, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    make_users(dsn)
    async with open_coordinator(dsn, ssl_context=server_context, ack_timeout=10) as coord:
        assert coord.url.startswith("wss://")
        app = AsyncioApp(coord.url, agent_id="fastapi-1", ssl_context=client_context)
        await trio.to_thread.run_sync(app.start)
        try:
            result = await coord.run_migration(
                Migration("add_email", "ALTER TABLE users ADD COLUMN email TEXT")
            )
            assert result.status is MigrationStatus.COMPLETED, result.reason
            assert app.agent is not None and app.agent.is_applied("add_email")
        finally:
            await trio.to_thread.run_sync(app.stop)
    assert app.error is None


async def test_an_untrusted_certificate_is_named_in_the_error(
    dsn: str, server_context: ssl.SSLContext
) -> None:
    async with open_coordinator(dsn, ssl_context=server_context) as coord:
        app = AsyncioApp(
            coord.url,
            agent_id="fastapi-1",
            ssl_context=ssl.create_default_context(),
            wait_connected=True,
        )
        with pytest.raises(CoordinatorUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
            await trio.to_thread.run_sync(app.start)


async def test_asyncio_agent_resyncs_after_a_coordinator_restart(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lockstep.agent")
    make_users(dsn)
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()
        stopped = trio.Event()

        async def first_coordinator(task_status: trio.TaskStatus[Coordinator]) -> None:
            with scope:
                await serve_coordinator(dsn, task_status=task_status)
            stopped.set()

        coord: Coordinator = await nursery.start(first_coordinator)
        port = int(coord.url.rsplit(":", 1)[1])
        app = AsyncioApp(coord.url, agent_id="fastapi-1", max_backoff=0.3)
        await trio.to_thread.run_sync(app.start)
        try:
            agent = app.agent
            assert agent is not None and agent.connected
            scope.cancel()
            await stopped.wait()
            await _until(lambda: not agent.connected)
            async with open_coordinator(dsn) as elsewhere:  # completes without our agent
                result = await elsewhere.run_migration(
                    Migration("add_email", "ALTER TABLE users ADD COLUMN email TEXT")
                )
                assert result.status is MigrationStatus.COMPLETED
            assert not agent.is_applied("add_email")
            again: Coordinator = await nursery.start(
                lambda task_status: serve_coordinator(dsn, port=port, task_status=task_status)
            )
            await _until(lambda: agent.sessions == 2)
            assert again.agents == {"fastapi-1"}
            assert agent.is_applied("add_email")
            assert ("on_apply", "add_email", True) in app.calls  # resynced
            started = time.perf_counter()
        finally:
            await trio.to_thread.run_sync(app.stop)
        took = time.perf_counter() - started
        print(f"asyncio agent stop (cancel + close handshake) took {took * 1000:.1f} ms")
        assert took < 3
        nursery.cancel_scope.cancel()
    assert app.error is None
    back = [r for r in caplog.records if "reconnected to the coordinator" in r.getMessage()]
    assert len(back) == 1 and back[0].levelno == logging.INFO


async def test_a_stopped_asyncio_agent_releases_its_lease(dsn: str) -> None:
    """The asyncio agent stops as the trio one does: with nothing in flight it sends
    `Release`, so the coordinator counts it gone at once rather than departing for the
    rest of its (here one-minute) lease."""
    async with open_coordinator(dsn, lease_seconds=60.0) as coord:
        app = AsyncioApp(coord.url, agent_id="fastapi-1")
        await trio.to_thread.run_sync(app.start)
        await _until(lambda: "fastapi-1" in coord.agents)
        await trio.to_thread.run_sync(app.stop)
        await _until(lambda: "fastapi-1" not in coord.agents)
        assert "fastapi-1" not in coord.fleet.departing
    assert app.error is None


async def test_the_asyncio_agent_keeps_its_link_through_a_late_grant(dsn: str) -> None:
    """As the trio agent does (`test_leases`): renewals held up for longer than its lease
    but less than the coordinator's skew margin fence it, then the late grants revive it on
    the same link."""
    lease = 0.9
    async with (
        open_coordinator(dsn, lease_seconds=lease) as coord,
        open_tcp_proxy(coord.url) as proxy,
    ):
        app = AsyncioApp(f"ws://127.0.0.1:{proxy.port}", agent_id="slow-aio", lease_seconds=lease)
        await trio.to_thread.run_sync(app.start)
        try:
            agent = app.agent
            assert agent is not None
            await _until(lambda: "slow-aio" in coord.agents)
            await _until(lambda: agent.ready)
            fenced = await proxy.partition_for(1.3, watch=lambda: agent.fenced)
            assert fenced, "the renewals were held for longer than the lease"
            await _until(lambda: agent.ready, timeout=1)
            await trio.sleep(lease * 2)
            assert agent.ready
            assert agent.sessions == 1, "the agent reconnected instead of taking the late grant"
            assert "slow-aio" in coord.agents
        finally:
            await trio.to_thread.run_sync(app.stop)
    assert app.error is None
