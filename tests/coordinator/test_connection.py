"""Clients that break the protocol: each gets a precise error, and nobody else notices.

Raw `trio_websocket` clients send what no real agent would. Before the hello, any bad frame is
fatal for that connection (an `error` frame, then a close code from `statemachine.protocol`);
after it, a bad frame gets a non-fatal `error` and the connection keeps working. Either way the
server keeps serving real agents and completing migrations (invariant 6 in docs/design.md).
"""

from __future__ import annotations

import contextlib
import json
import uuid

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    open_websocket_url,
)

from agent import CoordinatorUnreachable, open_agent
from coordinator import Coordinator, open_coordinator
from coordinator.events import BadFrame
from statemachine import Migration, MigrationStatus, Phase
from statemachine.protocol import (
    CLOSE_PROTOCOL_ERROR,
    CLOSE_VERSION_MISMATCH,
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    Ack,
    Error,
    Hello,
    Welcome,
    decode_coordinator_message,
    encode,
)
from tests.support.flow import (
    EventLog,
    answer_phases,
    columns,
    coordinator_in_thread,
    fleet_becomes,
    make_users,
    next_error,
    raw_client,
    say_hello,
    until,
)

#: Every code the coordinator may answer a bad frame with.
ERROR_CODES = {
    "binary_frame",
    "frame_too_deep",
    "malformed_frame",
    "unknown_type",
    "invalid_message",
    "frame_too_large",
    "expected_hello",
    "version_mismatch",
    "unexpected_hello",
    "stale_answer",
    "stranger_answer",
    "closed_answer",
}
#: Close code that follows each fatal (pre-hello) error.
CLOSE_FOR = {
    "binary_frame": CLOSE_PROTOCOL_ERROR,
    "frame_too_deep": CLOSE_PROTOCOL_ERROR,
    "malformed_frame": CLOSE_PROTOCOL_ERROR,
    "unknown_type": CLOSE_PROTOCOL_ERROR,
    "invalid_message": CLOSE_PROTOCOL_ERROR,
    "frame_too_large": CLOSE_PROTOCOL_ERROR,
    "expected_hello": CLOSE_PROTOCOL_ERROR,
    "version_mismatch": CLOSE_VERSION_MISMATCH,
}


async def _closed_with(ws: WebSocketConnection) -> int:
    """Wait for the server to close `ws`; returns the close code."""
    with pytest.raises(ConnectionClosed) as info, trio.fail_after(5):
        await ws.get_message()
    reason = info.value.reason
    assert reason is not None
    code: int = reason.code
    return code


async def _migration_completes(coord: Coordinator, name: str) -> None:
    """A real agent can still join and a migration still runs to the end."""
    async with open_agent(coord.url, agent_id="real") as agent:
        assert "real" in coord.agents
        result = await coord.run_migration(
            Migration(
                name, sql=[f"CREATE TABLE {name} (id INT)"], rollback_sql=[f"DROP TABLE {name}"]
            )
        )
        assert result.status is MigrationStatus.COMPLETED, result.reason
        assert agent.is_applied(name)


# ------------------------------------------------------------------ before hello
@pytest.mark.parametrize(
    ("frame", "code", "names"),
    [
        (b"\xff\x00garbage\x81", "binary_frame", "text frames"),
        ("hello?", "malformed_frame", "not valid JSON"),
        ('{"type": "bogus"}', "unknown_type", "'bogus'"),
        ('{"type": "hello", "protocol": 1}', "invalid_message", "`agent_id`"),
        (encode(Ack(migration_id="m", phase=Phase.APPLY)), "expected_hello", "must be hello"),
        (" " * (MAX_FRAME_BYTES + 1), "frame_too_large", str(MAX_FRAME_BYTES)),
    ],
    ids=["binary", "text", "unknown-type", "missing-field", "ack-first", "too-large"],
)
async def test_bad_first_frame_gets_an_error_then_close_4000(
    dsn: str, frame: str | bytes, code: str, names: str
) -> None:
    async with open_coordinator(dsn, port=0) as coord:
        events = EventLog()
        coord.subscribe(events)
        async with raw_client(coord.url) as ws:
            await ws.send_message(frame)
            reply = decode_coordinator_message(await ws.get_message())
            assert isinstance(reply, Error)
            assert reply.code == code
            assert names in reply.message
            assert reply.fatal
            assert await _closed_with(ws) == CLOSE_PROTOCOL_ERROR
        assert coord.agents == frozenset()
        assert [e.code for e in events.events if isinstance(e, BadFrame)] == [code]


async def test_wrong_protocol_version_closes_4002(dsn: str) -> None:
    async with open_coordinator(dsn, port=0) as coord, raw_client(coord.url) as ws:
        await ws.send_message(encode(Hello(protocol=PROTOCOL_VERSION + 1, agent_id="future")))
        reply = decode_coordinator_message(await ws.get_message())
        assert isinstance(reply, Error)
        assert reply.code == "version_mismatch"
        assert f"protocol {PROTOCOL_VERSION + 1} is not supported" in reply.message
        assert reply.fatal
        assert await _closed_with(ws) == CLOSE_VERSION_MISMATCH
        assert coord.agents == frozenset()


# ------------------------------------------------------------------- after hello
async def test_garbage_after_hello_keeps_connection_and_server_up(dsn: str) -> None:
    make_users(dsn)
    async with (
        open_coordinator(dsn, port=0, ack_timeout=10) as coord,
        raw_client(coord.url) as ws,
    ):
        welcome = await say_hello(ws, "raw-1")
        assert welcome.applied == []
        await ws.send_message("\x00\xffnot json at all")
        error = await next_error(ws)
        assert error.code == "malformed_frame"
        assert not error.fatal
        assert coord.agents == frozenset({"raw-1"}), "the connection must stay registered"

        # The same raw connection now behaves and takes part in a real migration.
        seen: list[Phase] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer_phases, ws, seen)
            async with open_agent(coord.url, agent_id="real") as agent:
                await coord.wait_for_agents(2, timeout=5)
                result = await coord.run_migration(
                    Migration("after_garbage", sql=["ALTER TABLE users ADD COLUMN e TEXT"])
                )
                assert result.status is MigrationStatus.COMPLETED, result.reason
                assert agent.is_applied("after_garbage")
                await until(lambda: Phase.CONFIRM in seen)  # CONFIRM is not waited for
            nursery.cancel_scope.cancel()
        # No EXECUTE notice: informational notices are no longer sent.
        assert seen == [Phase.ANNOUNCE, Phase.APPLY, Phase.CONFIRM]
    assert "e" in columns(dsn)


@pytest.mark.parametrize(
    ("frame", "code", "names"),
    [
        ('{"type": "bogus", "x": 1}', "unknown_type", "'bogus'"),
        ('{"type": "welcome", "protocol": 1}', "unknown_type", "'welcome'"),
        ('{"type": "ack", "phase": "apply"}', "invalid_message", "`migration_id`"),
        ('{"type": "nack", "migration_id": "m", "phase": "apply"}', "invalid_message", "`error`"),
        ('{"type": "ack", "migration_id": "m", "phase": "soon"}', "invalid_message", "`$.phase`"),
        ("[]", "invalid_message", "Expected `object`"),
        ("x" * (MAX_FRAME_BYTES + 1), "frame_too_large", str(MAX_FRAME_BYTES + 1)),
        (encode(Hello(protocol=1, agent_id="raw")), "unexpected_hello", "already received"),
        (encode(Ack(migration_id="nope", phase=Phase.APPLY)), "stale_answer", "nope"),
    ],
    ids=[
        "unknown-type",
        "coordinator-type",
        "missing-migration_id",
        "missing-error",
        "bad-phase",
        "array",
        "too-large",
        "second-hello",
        "answer-for-nothing",
    ],
)
async def test_bad_frame_after_hello_gets_a_precise_error(
    dsn: str, frame: str, code: str, names: str
) -> None:
    async with open_coordinator(dsn, port=0) as coord, raw_client(coord.url) as ws:
        await say_hello(ws, "raw")
        await ws.send_message(frame)
        error = await next_error(ws)
        assert error.code == code
        assert names in error.message
        assert not error.fatal
        # Still connected and still parsed: a second bad frame gets its own answer.
        await ws.send_message("{")
        assert (await next_error(ws)).code == "malformed_frame"
        assert coord.agents == frozenset({"raw"})


async def test_frame_over_the_websocket_limit_only_closes_that_client(dsn: str) -> None:
    # A short lease: the closed client leaves the fleet once its lease certainly expired.
    async with open_coordinator(dsn, port=0, lease_seconds=1.0) as coord:
        async with raw_client(coord.url) as ws:
            await say_hello(ws, "hog")
            with contextlib.suppress(ConnectionClosed):  # closed while we were still sending
                await ws.send_message(b"x" * (2 * 1024 * 1024))
            assert await _closed_with(ws) == 1009  # MESSAGE_TOO_BIG, from trio-websocket
        await fleet_becomes(coord, set())
        await _migration_completes(coord, "after_hog")


# -------------------------------------------------------------- random frames
_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
_message_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["hello", "ack", "nack", "welcome", "phase", "error", "", "x"])},
    optional={
        "protocol": st.integers(-1, 3) | st.text(max_size=3),
        "agent_id": st.text(max_size=12),
        "migration_id": st.text(max_size=12) | st.integers(),
        "phase": st.sampled_from([p.value for p in Phase]) | st.text(max_size=6),
        "error": st.text(max_size=12),
        "token": st.none() | st.text(max_size=4),
        "extra": _json,
    },
)
_frames = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200),
    _json.map(json.dumps),
    _message_like.map(json.dumps),
    _message_like.map(lambda m: json.dumps(m).encode()),
)


async def _garbage_session(url: str, frames: list[str | bytes]) -> None:
    """One client misbehaves before its hello, another after it."""
    async with raw_client(url) as ws:
        await ws.send_message(frames[0])
        reply = decode_coordinator_message(await ws.get_message())
        if isinstance(reply, Error):  # anything but a valid hello is refused
            assert reply.fatal
            assert reply.code in CLOSE_FOR, reply
            assert await _closed_with(ws) == CLOSE_FOR[reply.code]
        else:
            assert isinstance(reply, Welcome), "only a real hello may be welcomed"

    async with raw_client(url) as ws:
        await say_hello(ws, f"fuzz-{uuid.uuid4().hex[:12]}")
        for frame in frames:
            await ws.send_message(frame)
            error = await next_error(ws)  # exactly one answer per frame, never a close
            assert error.code in ERROR_CODES, error
            assert not error.fatal


def test_random_frames_never_stop_the_coordinator(dsn: str) -> None:
    """One coordinator takes every Hypothesis example, then still completes a migration."""
    make_users(dsn)
    # Short leases: fuzz clients that just left stay departing (in the next cohort) until
    # their lease certainly expired (1.55 s here), then the migration goes on without them.
    with coordinator_in_thread(dsn, port=0, ack_timeout=10, lease_seconds=0.5) as served:

        @settings(
            max_examples=30,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )
        @given(frames=st.lists(_frames, min_size=1, max_size=6))
        def misbehave(frames: list[str | bytes]) -> None:
            trio.run(_garbage_session, served.url, frames)

        misbehave()

        async def real_agent_still_served() -> None:
            # Fuzz clients still leaving would join the cohort, then "disconnect" from it.
            await served.call(fleet_becomes, served.coordinator, set())
            async with open_agent(served.url, agent_id="survivor") as agent:
                result = await served.run_migration(
                    Migration("after_fuzz", sql=["ALTER TABLE users ADD COLUMN f INT"])
                )
                assert result.status is MigrationStatus.COMPLETED, result.reason
                assert agent.seen[-1] == ("after_fuzz", Phase.CONFIRM)
                assert agent.is_applied("after_fuzz")

        trio.run(real_agent_still_served)
    assert "f" in columns(dsn)


async def test_an_upgrade_for_an_unknown_path_is_refused_with_404_and_a_reason(
    dsn: str,
) -> None:
    async with open_coordinator(dsn, port=0) as coord:
        with pytest.raises(ConnectionRejected) as raw:
            async with open_websocket_url(coord.url + "/ws"):
                pass
        assert raw.value.status_code == 404
        assert b"connect to the path /" in (raw.value.body or b"")
        with pytest.raises(CoordinatorUnreachable, match="HTTP 404: lockstep agents connect"):
            async with open_agent(coord.url + "/ws", agent_id="a1", wait_connected=True):
                pass
        async with open_agent(coord.url + "/?x=1", agent_id="a2", wait_connected=True) as ok:
            assert ok.synced  # the root path, with or without a query string, is served
