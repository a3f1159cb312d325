"""One agent's WebSocket connection: handshake, frame parsing, heartbeat, outbox.

Every frame an agent sends is parsed here (`statemachine.protocol.decode_agent_message`).
`serve_connection` never lets an exception escape: trio-websocket would otherwise cancel the
whole server (see docs/design.md), so one bad client can only ever close its own connection.

The connection knows the coordinator only through the `ConnectionHost` protocol (the fleet,
the events, the settings and where answers go), so this module does not import
`coordinator.core` and the two cannot grow into each other.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from coordinator.events import AgentJoined, AgentLeft, BadFrame, EventBus
from coordinator.fleet import OUTBOX_SIZE, AgentLink, DuplicateAgent, Fleet
from statemachine.credentials import credential_ok
from statemachine.ledger import AckOutcome
from statemachine.protocol import (
    CLOSE_DUPLICATE_AGENT,
    CLOSE_HANDSHAKE_TIMEOUT,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_MANY_ERRORS,
    CLOSE_UNAUTHORIZED,
    CLOSE_VERSION_MISMATCH,
    MAX_BAD_FRAMES,
    PROTOCOL_VERSION,
    Ack,
    Error,
    Hello,
    LeaseGrant,
    Nack,
    ProtocolError,
    Release,
    Renew,
    Welcome,
    decode_agent_message,
    encode,
)
from statemachine.text import printable

log = logging.getLogger("lockstep.coordinator")

_M = TypeVar("_M")


class ConnectionHost(Protocol):
    """What a connection needs from the coordinator that accepted it."""

    fleet: Fleet
    events: EventBus
    heartbeat_interval: float

    @property
    def epoch(self) -> int: ...

    handshake_timeout: float
    token: str | None
    shared_token: bool

    def applied_names(self) -> list[str]:
        """Migrations a joining agent must treat as applied (the Welcome's list)."""
        ...

    def welcome(self, agent_id: str) -> str | None:
        """The Welcome frame to send `agent_id` now, or None when it comes another way (a
        relay: the leader's Welcome arrives in the agent's outbox)."""
        ...

    def agent_joined(self, agent_id: str) -> None: ...

    def agent_left(self, agent_id: str) -> None: ...

    def is_active_migration(self, migration_id: str) -> bool: ...

    def route_ack(self, agent_id: str, ack: Ack) -> AckOutcome: ...

    def route_nack(self, agent_id: str, nack: Nack) -> AckOutcome: ...


class _Refused(Exception):
    def __init__(self, close_code: int, code: str, message: str) -> None:
        super().__init__(message)
        self.close_code = close_code
        self.code = code
        self.message = message


def _remote(ws: WebSocketConnection) -> str:
    try:
        return str(ws.remote)
    except Exception:
        return "?"


async def _refuse(ws: WebSocketConnection, refused: _Refused) -> None:
    with trio.move_on_after(2):
        await ws.send_message(encode(Error(code=refused.code, message=refused.message, fatal=True)))
        await ws.aclose(refused.close_code, refused.message[:120])


async def serve_connection(
    coordinator: ConnectionHost,
    ws: WebSocketConnection,
    admitted: Callable[[], None] | None = None,
) -> None:
    """Handle one accepted connection until it closes; never raises (except Cancelled).

    `admitted` is called once the hello is accepted: the server's admission ticket (see
    `coordinator.admission`) stops counting this connection as pending.
    """
    remote = _remote(ws)
    try:
        hello = await _handshake(coordinator, ws)
    except _Refused as refused:
        coordinator.events.emit(BadFrame(None, remote, refused.code, refused.message))
        log.info("refused connection from %s: %s", remote, printable(refused.message, limit=300))
        with contextlib.suppress(Exception):
            await _refuse(ws, refused)
        return
    except ConnectionClosed:
        return
    except Exception:  # a bug of ours: nothing a client sends should get here
        log.exception("handshake with %s failed", remote)
        with trio.move_on_after(1):
            await ws.aclose(1011, "internal error")
        return

    if admitted is not None:
        admitted()
    send, receive = trio.open_memory_channel[str](OUTBOX_SIZE)
    link = AgentLink(hello.agent_id, remote, time.time(), send)
    try:
        coordinator.fleet.add(link)
    except DuplicateAgent as exc:
        with trio.move_on_after(2):
            await _refuse(ws, _Refused(CLOSE_DUPLICATE_AGENT, "duplicate_agent", str(exc)))
        return
    reason = "connection closed"
    try:
        # The Welcome is the first grant: counted from now, after the agent sent its hello.
        coordinator.fleet.grant(hello.agent_id)
        coordinator.agent_joined(hello.agent_id)
        coordinator.events.emit(AgentJoined(hello.agent_id, remote))
        welcome = coordinator.welcome(hello.agent_id)
        if welcome is not None:  # None: a relay's agent, welcomed by the leader (outbox)
            await ws.send_message(welcome)
        async with trio.open_nursery() as nursery:

            async def reader() -> None:
                await _read_frames(coordinator, ws, link)
                nursery.cancel_scope.cancel()

            async def kicker() -> None:
                await link.kick.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(reader)
            nursery.start_soon(_send_frames, ws, receive)
            nursery.start_soon(_heartbeat, coordinator.heartbeat_interval, ws)
            nursery.start_soon(kicker)
        if link.kick.is_set():
            reason = link.kick_reason
            with trio.move_on_after(2):
                if link.kick_code == CLOSE_TOO_MANY_ERRORS:
                    # Straight to the socket: the outbox may be full of unread error replies.
                    await ws.send_message(
                        encode(Error(code="too_many_errors", message=reason, fatal=True))
                    )
                await ws.aclose(link.kick_code, link.kick_reason[:120])
    except* ConnectionClosed:
        pass
    except* trio.TooSlowError:
        reason = "heartbeat timed out"
    except* Exception as group:
        reason = f"internal error: {group.exceptions[0]!r}"
        log.error("connection of agent %s failed", hello.agent_id, exc_info=group)
    finally:
        with trio.CancelScope(shield=True):
            if coordinator.fleet.remove(link):
                coordinator.agent_left(hello.agent_id)
                coordinator.events.emit(AgentLeft(hello.agent_id, reason))
            with trio.move_on_after(1):
                await ws.aclose()


def welcome_frame(coordinator: ConnectionHost) -> str:
    """The encoded Welcome an agent joining now gets (what is applied, the epoch, the
    lease): built at the instant the agent joined the fleet, so it tells the truth."""
    welcome = Welcome(
        protocol=PROTOCOL_VERSION,
        applied=coordinator.applied_names(),
        # JSON has no infinity (msgspec writes null, which agents reject): 0 = no pings.
        heartbeat_interval=_wire_interval(coordinator.heartbeat_interval),
        epoch=coordinator.epoch,
        lease_seconds=coordinator.fleet.lease_seconds,
    )
    return encode(welcome)


def _wire_interval(interval: float) -> float:
    return interval if math.isfinite(interval) and interval > 0 else 0.0


async def _first_frame(
    ws: WebSocketConnection, timeout: float, decode: Callable[[str | bytes], _M], name: str
) -> _M:
    """The first frame of a connection, decoded; `_Refused` when it does not come within
    `timeout` or does not decode. Shared with the relay links' handshake."""
    try:
        with trio.fail_after(timeout):
            frame = await ws.get_message()
    except trio.TooSlowError:
        raise _Refused(
            CLOSE_HANDSHAKE_TIMEOUT, "handshake_timeout", f"no {name} within the handshake timeout"
        ) from None
    try:
        return decode(frame)
    except ProtocolError as exc:
        raise _Refused(CLOSE_PROTOCOL_ERROR, exc.code, exc.message) from None


async def _handshake(coordinator: ConnectionHost, ws: WebSocketConnection) -> Hello:
    msg = await _first_frame(ws, coordinator.handshake_timeout, _decode, "hello")
    if not isinstance(msg, Hello):
        raise _Refused(
            CLOSE_PROTOCOL_ERROR, "expected_hello", f"the first frame must be hello, got {msg!r}"
        )
    if msg.protocol != PROTOCOL_VERSION:
        raise _Refused(
            CLOSE_VERSION_MISMATCH,
            "version_mismatch",
            f"protocol {msg.protocol} is not supported; this coordinator speaks {PROTOCOL_VERSION}",
        )
    if coordinator.token is not None and not credential_ok(
        coordinator.token, msg.agent_id, msg.token, shared_token=coordinator.shared_token
    ):
        raise _Refused(
            CLOSE_UNAUTHORIZED, "unauthorized", f"missing or wrong token for agent {msg.agent_id}"
        )
    return msg


async def _read_frames(
    coordinator: ConnectionHost, ws: WebSocketConnection, link: AgentLink
) -> None:
    agent_id = link.agent_id
    while True:
        try:
            frame = await ws.get_message()
        except ConnectionClosed:
            return
        try:
            msg = _decode(frame)
        except ProtocolError as exc:
            _reply_error(coordinator, link, exc.code, exc.message)
            continue
        if isinstance(msg, Hello):
            _reply_error(coordinator, link, "unexpected_hello", "hello was already received")
            continue
        if isinstance(msg, Renew):
            # No grant once the lease certainly expired: the sweeper is closing this link,
            # and the agent, fenced already, must reconnect and resync.
            if coordinator.fleet.grant(agent_id):
                # Sent from here, not queued in the outbox: idle, renewals are all the fleet
                # does (10,000 agents renew 2,000 times a second), and the outbox would wake
                # the sender task once more per renewal. trio-websocket serializes the two
                # writers. An agent that stops reading blocks only its own reader, so it
                # stops being renewed and the sweeper closes it when its lease expires.
                await ws.send_message(encode(LeaseGrant(msg.seq, coordinator.fleet.lease_seconds)))
            continue
        if isinstance(msg, Release):
            # The agent stopped serving: its lease is over now, so the close that follows
            # makes it departed at once instead of departing until the lease's expiry.
            coordinator.fleet.release(agent_id)
            return
        assert isinstance(msg, Ack | Nack)
        route_answer(coordinator, link, msg)


def route_answer(coordinator: ConnectionHost, link: AgentLink, msg: Ack | Nack) -> None:
    """Count an agent's ack or nack; tell the agent when it cannot count. Shared by the
    agents' own connections and the leader's side of a relay (`coordinator.relay`)."""
    if isinstance(msg, Ack):
        outcome = coordinator.route_ack(link.agent_id, msg)
    else:
        outcome = coordinator.route_nack(link.agent_id, msg)
    if outcome is AckOutcome.RECORDED:
        link.bad_frames = 0
    if outcome is AckOutcome.STRANGER or (
        outcome in (AckOutcome.STALE, AckOutcome.CLOSED)
        and not coordinator.is_active_migration(msg.migration_id)
    ):
        # A late answer for the running migration's previous phase is a normal race and
        # stays quiet; an answer nobody could have asked for is worth telling the agent.
        _reply_error(
            coordinator,
            link,
            f"{outcome.value}_answer",
            f"{type(msg).__name__.lower()} for migration {msg.migration_id} phase "
            f"{msg.phase.value} does not count: {outcome.value}",
        )


def _decode(frame: str | bytes) -> Hello | Ack | Nack | Renew | Release:
    """`decode_agent_message`, refusing binary frames: the protocol is text frames only."""
    if not isinstance(frame, str):
        raise ProtocolError(
            "binary_frame", f"binary frame of {len(frame)} bytes refused: send JSON text frames"
        )
    return decode_agent_message(frame)


def _reply_error(coordinator: ConnectionHost, link: AgentLink, code: str, message: str) -> None:
    """Answer a bad frame; past MAX_BAD_FRAMES in a row, close the connection instead.

    The budget keeps an agent that pipelines bad frames without reading the replies from
    being kicked for an "outbox overflow" it did not cause by being slow: it is told the
    real reason (close code 4008, error ``too_many_errors``).
    """
    coordinator.events.emit(BadFrame(link.agent_id, link.remote, code, message))
    log.info("agent %s: %s: %s", link.agent_id, code, printable(message, limit=300))
    link.bad_frames += 1
    if link.bad_frames > MAX_BAD_FRAMES:
        link.close(
            f"too many bad frames: {link.bad_frames} in a row (last: {code})",
            code=CLOSE_TOO_MANY_ERRORS,
        )
        return
    coordinator.fleet.send(link.agent_id, encode(Error(code=code, message=message)))


async def _send_frames(ws: WebSocketConnection, outbox: trio.MemoryReceiveChannel[str]) -> None:
    async for frame in outbox:
        await ws.send_message(frame)


async def _heartbeat(interval: float, ws: WebSocketConnection) -> None:
    """Detect dead peers: a ping must be answered within `interval` seconds. Off by default
    (interval 0): an agent's liveness is its lease (`Fleet.sweep_leases`, one task for the
    fleet, which also closes the link of an agent that stopped renewing), so no task per
    connection wakes up, and a closed link only makes an agent departing, never decides a
    migration."""
    if not math.isfinite(interval) or interval <= 0:
        return
    while True:
        await trio.sleep(interval)
        with trio.fail_after(interval):
            await ws.ping()
