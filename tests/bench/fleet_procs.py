"""The other processes of `make bench-fleet`: agent workers and the raw baseline server.

    python -m tests.bench.fleet_procs agents --coordinator URL --raw URL --count N --prefix P
    python -m tests.bench.fleet_procs raw

Why separate processes: with agents in the coordinator's own process, the coordinator's
CPU cannot be told from theirs and every agent slows it down. Each worker holds `--count`
real `open_agent` agents on the coordinator and as many on the raw server; it prints one
JSON line when they joined and runs until its stdin closes.

The raw server is the baseline: a minimal trio-websocket broadcast-and-collect server that
speaks just enough of the wire protocol for the same agents (hello, welcome, phase notices,
acks) and does the rounds of a migration with nothing else: ANNOUNCE then APPLY, each sent
to every agent with direct ``send_message`` calls from one task and collected until every
agent acked, then CONFIRM sent without waiting (as lockstep does). It is driven by JSON
lines on stdin (``{"wait": N}``, ``{"round": NAME}``) and answers one JSON line each; a
round's answer holds its wall times, its CPU, and the CPU of its sends alone (the transport
floor: what moving the frames costs a server that does nothing else).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from agent import open_agent
from statemachine.phases import Phase
from statemachine.protocol import (
    PROTOCOL_VERSION,
    Ack,
    Hello,
    PhaseNotice,
    Welcome,
    decode_agent_message,
    encode,
)
from tests.bench import scaffold

#: Agents of one worker connecting at the same time (a burst of thousands of handshakes
#: would only measure the listen backlog).
CONNECT_CONCURRENCY = 100
ACK_TIMEOUT = 120.0


def _say(data: dict[str, Any]) -> None:
    print(json.dumps(data), flush=True)


async def _lines() -> Any:
    """Lines of stdin, read without blocking the event loop; ends at EOF."""
    stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buffer = b""
    async with stream:
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                yield line.decode()


# ------------------------------------------------------------------ agent worker
async def _hold(url: str, agent_id: str, joining: trio.Semaphore, stop: trio.Event) -> None:
    """One application instance: joined (at most `CONNECT_CONCURRENCY` joining at once),
    answering phases, until `stop` is set."""
    await joining.acquire()
    released = False
    try:
        async with open_agent(url, agent_id=agent_id, connect_timeout=ACK_TIMEOUT, join_grace=60):
            joining.release()
            released = True
            await stop.wait()
    finally:
        if not released:
            joining.release()


async def run_agents(coordinator: str, raw: str | None, count: int, prefix: str) -> None:
    """`count` agents on each server (the coordinator alone without `raw`) until stdin
    closes."""
    stop = trio.Event()
    joined = trio.Semaphore(CONNECT_CONCURRENCY)
    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(_hold, coordinator, f"{prefix}{i}", joined, stop)
            if raw is not None:
                nursery.start_soon(_hold, raw, f"{prefix}{i}", joined, stop)
        _say({"started": count})
        async for _ in _lines():
            pass
        stop.set()


# ------------------------------------------------------------------- raw server
class RawServer:
    """The baseline (module docstring): connections by agent id, one round at a time."""

    def __init__(self) -> None:
        self.conns: dict[str, WebSocketConnection] = {}
        self.changed = trio.Event()
        self.waiting: set[str] = set()
        self.expected: tuple[str, Phase] | None = None
        self.done = trio.Event()

    async def handle(self, request: WebSocketRequest) -> None:
        ws = await request.accept()
        agent_id = None
        try:
            hello = decode_agent_message(await ws.get_message())
            if not isinstance(hello, Hello):
                return
            agent_id = hello.agent_id
            welcome = Welcome(protocol=PROTOCOL_VERSION, applied=[], heartbeat_interval=0.0)
            await ws.send_message(encode(welcome))
            self.conns[agent_id] = ws
            self.changed.set()
            while True:
                msg = decode_agent_message(await ws.get_message())
                if isinstance(msg, Ack) and (msg.migration_id, msg.phase) == self.expected:
                    self.waiting.discard(agent_id)
                    if not self.waiting:
                        self.done.set()
        except ConnectionClosed:
            pass
        finally:
            if agent_id is not None and self.conns.get(agent_id) is ws:
                del self.conns[agent_id]

    async def wait_for(self, count: int) -> None:
        while len(self.conns) < count:
            self.changed = trio.Event()
            await self.changed.wait()

    async def _broadcast(self, migration_id: str, name: str, phase: Phase, ack: bool) -> float:
        """Send the notice to everybody with direct sends; returns their CPU seconds."""
        frame = encode(
            PhaseNotice(migration_id, name, phase, ack_required=ack, ack_timeout=ACK_TIMEOUT)
        )
        if ack:
            self.waiting = set(self.conns)
            self.expected = (migration_id, phase)
            self.done = trio.Event()
        cpu = time.process_time()
        for ws in list(self.conns.values()):
            with contextlib.suppress(ConnectionClosed):
                await ws.send_message(frame)
        return time.process_time() - cpu

    async def round(self, name: str) -> dict[str, Any]:
        """ANNOUNCE and APPLY, each broadcast and collected, then CONFIRM without waiting."""
        migration_id = str(uuid.uuid4())
        out: dict[str, Any] = {"agents": len(self.conns)}
        with scaffold.GcClock() as clock:
            cpu0, t0 = time.process_time(), time.perf_counter()
            send_cpu = 0.0
            for phase in (Phase.ANNOUNCE, Phase.APPLY):
                started = time.perf_counter()
                send_cpu += await self._broadcast(migration_id, name, phase, True)
                with trio.fail_after(ACK_TIMEOUT):
                    await self.done.wait()
                out[phase.name] = time.perf_counter() - started
            send_cpu += await self._broadcast(migration_id, name, Phase.CONFIRM, True)
            out["total_s"] = time.perf_counter() - t0
            # Not timed, as lockstep does not wait for them, but received before the next
            # step and counted in the CPU (the floor).
            with trio.fail_after(ACK_TIMEOUT):
                await self.done.wait()
            self.expected = None
            out["cpu_s"] = time.process_time() - cpu0
        out["send_cpu_s"] = send_cpu
        out["gc_s"] = clock.total
        return out


async def run_raw() -> None:
    server = RawServer()
    async with trio.open_nursery() as nursery:
        ws_server = await nursery.start(serve_websocket, server.handle, "127.0.0.1", 0, None)
        _say({"url": f"ws://127.0.0.1:{ws_server.port}"})
        async for line in _lines():
            command = json.loads(line)
            if "wait" in command:
                with trio.fail_after(float(command.get("timeout", 300))):
                    await server.wait_for(int(command["wait"]))
                _say({"connected": len(server.conns)})
            elif "round" in command:
                _say(await server.round(str(command["round"])))
            elif "cpu" in command:
                _say({"cpu_s": time.process_time()})
        nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.fleet_procs")
    sub = parser.add_subparsers(dest="what", required=True)
    agents = sub.add_parser("agents", help="hold agents on the coordinator and the raw server")
    agents.add_argument("--coordinator", required=True)
    agents.add_argument("--raw", help="the raw server's URL (none: the coordinator only)")
    agents.add_argument("--count", type=int, required=True)
    agents.add_argument("--prefix", required=True)
    sub.add_parser("raw", help="the raw baseline server")
    args = parser.parse_args(argv)
    if args.what == "agents":
        trio.run(run_agents, args.coordinator, args.raw, args.count, args.prefix)
    else:
        trio.run(run_raw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
