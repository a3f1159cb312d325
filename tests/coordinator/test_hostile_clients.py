"""Hostile clients: deep nesting, binary and pipelined bad frames, forged identities.

Each test is one case of issue 11's hostile run: a client that sends what no agent would gets
a precise, documented answer, the logs hold no traceback, and a real agent still completes a
migration afterwards (`_migration_completes`).
"""

from __future__ import annotations

import logging

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from agent import HandshakeRejected, open_agent
from coordinator import Coordinator, open_coordinator
from statemachine import Migration, MigrationStatus, Phase, agent_credential
from statemachine.protocol import (
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_MANY_ERRORS,
    MAX_BAD_FRAMES,
    MAX_FRAME_DEPTH,
    PROTOCOL_VERSION,
    Ack,
    Error,
    Hello,
    PhaseNotice,
    ProtocolError,
    decode_agent_message,
    decode_coordinator_message,
    encode,
)
from tests.support.flow import next_error, raw_client, say_hello

DEEP = '{"type":"hello","x":' + "[" * 1000 + "]" * 1000 + "}"


async def _closed_with(ws: WebSocketConnection) -> int:
    with pytest.raises(ConnectionClosed) as info, trio.fail_after(5):
        while True:
            await ws.get_message()
    reason = info.value.reason
    assert reason is not None
    code: int = reason.code
    return code


async def _migration_completes(coord: Coordinator, name: str, **agent: object) -> None:
    async with open_agent(coord.url, agent_id="real", **agent) as real:  # type: ignore[arg-type]
        await coord.wait_for_agents(1, timeout=5)
        result = await coord.run_migration(
            Migration(
                name, sql=[f"CREATE TABLE {name} (id INT)"], rollback_sql=[f"DROP TABLE {name}"]
            )
        )
        assert result.status is MigrationStatus.COMPLETED, result.reason
        assert real.is_applied(name)


def _no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    logged = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not logged, [r.getMessage() for r in logged]


# ---------------------------------------------------------------- nesting depth
@pytest.mark.parametrize("levels", [MAX_FRAME_DEPTH + 1, 1000, 20000])
def test_deep_nesting_is_a_protocol_error_not_a_recursion_error(levels: int) -> None:
    frame = '{"x":' + "[" * levels + "]" * levels + ',"type":"ack"}'
    with pytest.raises(ProtocolError) as info:
        decode_agent_message(frame)
    assert info.value.code == "frame_too_deep"


def test_brackets_inside_strings_are_not_nesting() -> None:
    text = "[" * 500 + "]" * 500 + '\\"'
    nack = decode_agent_message(
        f'{{"type":"nack","migration_id":"m","phase":"apply","error":"{text}"}}'
    )
    assert nack.error.startswith("[[[")  # type: ignore[union-attr]


async def test_deep_nesting_before_hello_closes_4000_without_traceback(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with open_coordinator(dsn, port=0) as coord:
        async with raw_client(coord.url) as ws:
            await ws.send_message(DEEP)
            reply = decode_coordinator_message(await ws.get_message())
            assert isinstance(reply, Error)
            assert (reply.code, reply.fatal) == ("frame_too_deep", True)
            assert await _closed_with(ws) == CLOSE_PROTOCOL_ERROR
        await _migration_completes(coord, "after_deep")
    _no_tracebacks(caplog)


async def test_deep_nesting_after_hello_keeps_the_agent(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_coordinator(dsn, port=0) as coord, raw_client(coord.url) as ws:
        await say_hello(ws, "nested")
        await ws.send_message(DEEP)
        error = await next_error(ws)
        assert (error.code, error.fatal) == ("frame_too_deep", False)
        assert coord.agents == frozenset({"nested"}), "must not be dropped as internal error"
    _no_tracebacks(caplog)


# ---------------------------------------------------------------- binary frames
async def test_binary_frames_are_refused_as_documented(dsn: str) -> None:
    hello = encode(Hello(protocol=PROTOCOL_VERSION, agent_id="bin"))
    async with open_coordinator(dsn, port=0) as coord:
        async with raw_client(coord.url) as ws:  # a valid hello, but binary: refused
            await ws.send_message(hello.encode())
            reply = decode_coordinator_message(await ws.get_message())
            assert isinstance(reply, Error)
            assert (reply.code, reply.fatal) == ("binary_frame", True)
            assert await _closed_with(ws) == CLOSE_PROTOCOL_ERROR
        assert coord.agents == frozenset()
        async with raw_client(coord.url) as ws:
            await say_hello(ws, "bin")
            await ws.send_message(encode(Ack(migration_id="m", phase=Phase.APPLY)).encode())
            error = await next_error(ws)
            assert (error.code, error.fatal) == ("binary_frame", False)


# ------------------------------------------------------------ pipelined garbage
async def test_pipelined_bad_frames_get_an_accurate_reason(dsn: str) -> None:
    async with open_coordinator(dsn, port=0) as coord, raw_client(coord.url) as ws:
        await say_hello(ws, "spammer")
        with trio.move_on_after(5):
            for _ in range(500):  # never reads a reply
                try:
                    await ws.send_message("{")
                except ConnectionClosed:
                    break
        errors: list[Error] = []
        with pytest.raises(ConnectionClosed) as info, trio.fail_after(5):
            while True:
                msg = decode_coordinator_message(await ws.get_message())
                assert not isinstance(msg, PhaseNotice)
                errors.append(msg)  # type: ignore[arg-type]
        assert info.value.reason is not None
        assert info.value.reason.code == CLOSE_TOO_MANY_ERRORS
        assert "outbox overflow" not in (info.value.reason.reason or "")
        # Replies still queued when the budget ran out may be dropped; the reason never is.
        assert {e.code for e in errors[:-1]} <= {"malformed_frame"}
        assert len(errors) <= MAX_BAD_FRAMES + 1
        assert errors[-1].code == "too_many_errors"
        assert errors[-1].fatal


async def test_bad_frames_in_a_row_are_bounded_even_when_read(dsn: str) -> None:
    async with (
        open_coordinator(dsn, port=0, lease_seconds=1.0) as coord,
        raw_client(coord.url) as ws,
    ):
        await say_hello(ws, "clumsy")
        for _ in range(MAX_BAD_FRAMES):
            await ws.send_message("{")
            error = await next_error(ws)
            assert (error.code, error.fatal) == ("malformed_frame", False)
        await ws.send_message("{")
        error = await next_error(ws)
        assert (error.code, error.fatal) == ("too_many_errors", True)
        assert await _closed_with(ws) == CLOSE_TOO_MANY_ERRORS
        await _migration_completes(coord, "after_clumsy")


# ------------------------------------------------------------------ identities
@pytest.mark.parametrize(
    "agent_id", ["victim-9\n", "v\u0456ctim", "victim\u200b", "\uff56ictim", ""]
)
def test_agent_ids_are_ascii_and_fully_matched(agent_id: str) -> None:
    frame = encode(Hello(protocol=PROTOCOL_VERSION, agent_id=agent_id))
    with pytest.raises(ProtocolError) as info:
        decode_agent_message(frame)
    assert info.value.code == "invalid_message"


async def test_one_agent_cannot_answer_for_another(dsn: str) -> None:
    secret = "fleet-secret"
    async with open_coordinator(dsn, port=0, token=secret) as coord:
        # The thief holds its own credential (and even knows the old shared token).
        for stolen in (agent_credential(secret, "thief"), secret):
            with pytest.raises(HandshakeRejected) as info:
                async with open_agent(coord.url, agent_id="victim", token=stolen):
                    pytest.fail("joined under another agent's id")
            assert info.value.code == "unauthorized"
        assert coord.agents == frozenset()
        await _migration_completes(coord, "own_ids", token=agent_credential(secret, "real"))


async def test_shared_token_only_when_asked_for(dsn: str) -> None:
    async with (
        open_coordinator(dsn, port=0, token="s3cret", shared_token=True) as coord,
        open_agent(coord.url, agent_id="legacy", token="s3cret") as agent,
    ):
        assert agent.connected
