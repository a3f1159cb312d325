"""Connection floods: nobody who merely reaches the port can exhaust the coordinator.

The attacker connects from 127.0.0.2 (any 127/8 address is loopback on Linux), the real agent
from 127.0.0.1, so the per-address cap of `ConnectionLimits` is what keeps the agent's way in
open. Descriptors are counted in /proc/self/fd: the coordinator runs in this process, and the
attacker's own sockets are closed (or counted) by the test.
"""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest
import trio

from agent import open_agent
from coordinator import Coordinator, open_coordinator
from coordinator.admission import ConnectionLimits
from statemachine import Migration, MigrationStatus

ATTACKER = "127.0.0.2"
pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _port(coord: Coordinator) -> int:
    return int(coord.url.rsplit(":", 1)[1])


async def _connect_and_reset(port: int) -> None:
    sock = trio.socket.socket()
    try:
        await sock.bind((ATTACKER, 0))
        await sock.connect(("127.0.0.1", port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()  # linger 0: an RST, the attacker keeps nothing


async def _join_and_migrate(coord: Coordinator, name: str) -> float:
    """Seconds for a real agent to join; then a migration must complete with it."""
    started = time.monotonic()
    async with open_agent(coord.url, agent_id=f"real-{name}", connect_timeout=5) as agent:
        await coord.wait_for_agents(1, timeout=5)
        joined = time.monotonic() - started
        result = await coord.run_migration(
            Migration(
                name, sql=[f"CREATE TABLE {name} (id INT)"], rollback_sql=[f"DROP TABLE {name}"]
            )
        )
        assert result.status is MigrationStatus.COMPLETED, result.reason
        assert agent.is_applied(name)
    return joined


async def _fds_settle(baseline: int, timeout: float) -> int:
    with trio.move_on_after(timeout):
        while open_fds() > baseline + 2:
            await trio.sleep(0.05)
    return open_fds()


async def test_connect_and_reset_flood_frees_descriptors_at_once(dsn: str) -> None:
    async with open_coordinator(dsn, port=0) as coord:
        port = _port(coord)
        await trio.sleep(0.1)
        baseline = open_fds()
        sent = 0
        with trio.move_on_after(4):
            while sent < 2000:
                async with trio.open_nursery() as nursery:
                    for _ in range(50):
                        nursery.start_soon(_connect_and_reset, port)
                sent += 50
        assert sent >= 500
        # trio-websocket alone would hold each one for 60 s; here they go as soon as read.
        assert await _fds_settle(baseline, timeout=2) <= baseline + 2
        await _join_and_migrate(coord, "after_resets")


async def test_idle_sockets_are_capped_per_address_and_time_out(dsn: str) -> None:
    limits = ConnectionLimits(max_pending_per_address=16, upgrade_timeout=1.0)
    async with open_coordinator(dsn, port=0, limits=limits) as coord:
        port = _port(coord)
        idle: list[trio.socket.SocketType] = []
        try:
            for _ in range(100):
                sock = trio.socket.socket()
                await sock.bind((ATTACKER, 0))
                await sock.connect(("127.0.0.1", port))
                idle.append(sock)
            await trio.sleep(0.3)

            async def refused(sock: trio.socket.SocketType) -> bool:
                with trio.move_on_after(0.05):
                    try:
                        return await sock.recv(1) == b""
                    except OSError:
                        return True
                return False

            closed = [await refused(s) for s in idle]
            assert sum(closed) >= 100 - 16, "the excess must be refused at once"
            # The real agent, from another address, is not held up by the flood.
            joined = await _join_and_migrate(coord, "during_idle_flood")
            assert joined < 2
            await trio.sleep(limits.upgrade_timeout + 0.5)
            assert all([await refused(s) for s in idle]), "idle sockets must time out"
        finally:
            for sock in idle:
                sock.close()
