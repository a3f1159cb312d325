"""Several coordinator URLs, standbys that send the agent on, and deposed leaders ignored.

The stand-in coordinators here are real WebSocket servers on loopback speaking the lockstep
protocol frame by frame, so a test can play a standby or a deposed leader exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import pytest
import trio
from trio_websocket import WebSocketConnection, WebSocketRequest, serve_websocket

from agent import MigrationInfo, open_agent
from coordinator import open_coordinator
from statemachine import Phase
from statemachine.protocol import (
    CLOSE_NOT_LEADER,
    PROTOCOL_VERSION,
    Ack,
    PhaseNotice,
    Welcome,
    decode_agent_message,
    encode,
)

Handler = Callable[[WebSocketConnection, int], Awaitable[None]]


async def _serve(nursery: trio.Nursery, handler: Handler) -> str:
    """A loopback WebSocket server calling `handler(ws, n)` for its n-th connection."""
    count = 0

    async def accept(request: WebSocketRequest) -> None:
        nonlocal count
        ws = await request.accept()
        count += 1
        await handler(ws, count)

    server = await nursery.start(serve_websocket, accept, "127.0.0.1", 0, None)
    return f"ws://127.0.0.1:{server.port}"


def _welcome(epoch: int, applied: list[str]) -> str:
    return encode(
        Welcome(protocol=PROTOCOL_VERSION, applied=applied, heartbeat_interval=0, epoch=epoch)
    )


def _notice(epoch: int, phase: Phase, migration_id: str = "m-1") -> str:
    return encode(
        PhaseNotice(
            migration_id=migration_id,
            migration="add_email",
            phase=phase,
            ack_required=True,
            ack_timeout=5,
            epoch=epoch,
        )
    )


async def _until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def standby(ws: WebSocketConnection, n: int) -> None:
    await ws.aclose(CLOSE_NOT_LEADER, "standby")


async def test_a_standby_sends_the_agent_to_the_next_url_at_once_without_a_warning(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="lockstep.agent")
    async with trio.open_nursery() as nursery, open_coordinator(dsn) as coord:
        first = await _serve(nursery, standby)
        second = await _serve(nursery, standby)
        started = trio.current_time()
        async with open_agent([first, second, coord.url], agent_id="app-1") as agent:
            took = trio.current_time() - started
            print(f"joined the leader behind two standbys in {took:.3f} s")
            assert agent.connected and coord.agents == {"app-1"}
            assert took < 2  # no backoff between standbys (the first backoff alone is 0.1 s)
        nursery.cancel_scope.cancel()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [], [r.getMessage() for r in warnings]
    assert sum("is a standby" in r.getMessage() for r in caplog.records) == 2


async def test_the_agent_tries_every_url_in_turn_until_one_accepts(dsn: str) -> None:
    async with open_coordinator(dsn) as coord:
        down = "ws://127.0.0.1:1"
        async with open_agent([down, coord.url], agent_id="app-1") as agent:
            assert agent.connected and coord.agents == {"app-1"}


async def test_notices_of_a_lower_epoch_are_ignored_and_not_acked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="lockstep.agent")
    acks: list[tuple[str, Phase]] = []
    done = trio.Event()
    calls: list[Phase] = []

    async def leader(ws: WebSocketConnection, n: int) -> None:
        decode_agent_message(await ws.get_message())  # hello
        await ws.send_message(_welcome(7, []))
        await ws.send_message(_notice(7, Phase.ANNOUNCE))
        acks.append(_ack(await ws.get_message()))
        # A deposed leader's frames, twice (logged once), then the real leader's APPLY.
        await ws.send_message(_notice(6, Phase.APPLY))
        await ws.send_message(_notice(6, Phase.ROLLBACK))
        await ws.send_message(_notice(0, Phase.EXECUTE))  # epoch 0: an old peer, accepted
        acks.append(_ack(await ws.get_message()))
        await ws.send_message(_notice(8, Phase.APPLY))  # a newer leader: accepted
        acks.append(_ack(await ws.get_message()))
        done.set()
        await trio.sleep_forever()

    async def on_hook(info: MigrationInfo) -> None:
        calls.append(info.phase)

    async with trio.open_nursery() as nursery:
        url = await _serve(nursery, leader)
        async with open_agent(
            url, agent_id="app-1", on_apply=on_hook, on_rollback=on_hook, on_announce=on_hook
        ) as agent:
            with trio.fail_after(10):
                await done.wait()
            assert agent.is_applied("add_email")
            assert agent.epochs.highest == 8
        nursery.cancel_scope.cancel()
    assert acks == [("m-1", Phase.ANNOUNCE), ("m-1", Phase.EXECUTE), ("m-1", Phase.APPLY)]
    assert calls == [Phase.ANNOUNCE, Phase.APPLY]  # the stale APPLY and ROLLBACK did nothing
    ignored = [r for r in caplog.records if "deposed coordinator" in r.getMessage()]
    assert len(ignored) == 1 and ignored[0].levelno == logging.INFO


def _ack(frame: str | bytes) -> tuple[str, Phase]:
    msg = decode_agent_message(frame)
    assert isinstance(msg, Ack), msg
    return msg.migration_id, msg.phase


async def test_a_welcome_of_a_lower_epoch_is_ignored_and_the_agent_moves_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="lockstep.agent")

    async def fleet(ws: WebSocketConnection, n: int) -> None:
        await ws.get_message()  # hello
        if n == 1:  # the leader, which then goes away
            await ws.send_message(_welcome(5, []))
            await ws.aclose()
        elif n == 2:  # a deposed leader still answering: it would send the agent back
            await ws.send_message(_welcome(4, ["rolled_back_elsewhere"]))
            await trio.sleep_forever()
        else:  # the new leader
            await ws.send_message(_welcome(6, ["add_email"]))
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        url = await _serve(nursery, fleet)
        async with open_agent(url, agent_id="app-1", max_backoff=0.2) as agent:
            await _until(lambda: agent.sessions == 2)
            assert agent.applied == frozenset({"add_email"})
            assert agent.epochs.highest == 6
        nursery.cancel_scope.cancel()
    ignored = [r for r in caplog.records if "deposed coordinator" in r.getMessage()]
    assert len(ignored) == 1 and ignored[0].levelno == logging.INFO
