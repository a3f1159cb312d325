"""Coordinator replicas that relay: a non-leading ``lockstep serve`` serves agents for the leader.

Two halves, one per side of the link (docs/replicas.md; the frames are `statemachine.relay`):

- `serve_relay_link` runs on the leader for each relay: it makes every agent of the relay a
  `RelayedLink` in the leader's own `Fleet`, so the run, the state machine and the lease
  sweeper see it exactly as a connected agent (cohorts, acks, departing, departed: every
  decision stays in statemachine/). Frames queued to such an agent cross the link batched
  (`Deliver`: one copy of a notice per relay, with its agents' ids).
- `Relay` runs on a replica that does not lead: it finds the leader's URL in
  ``lockstep.leader``, holds one WebSocket to it, and serves agents with the ordinary
  `serve_connection` (the same handshake and frames; the Welcome is the leader's, relayed),
  forwarding their membership and answers and granting their renewals itself, but only
  with lease time it holds from the leader (`statemachine.relay.relay_grant_seconds`).

A relay that loses its leader link, or whose own lease lapses, closes its agents with
`CLOSE_NOT_LEADER`: their leases run out no later than the relay's, and they reconnect to
another URL or to this relay once it linked again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
import ssl
import time

import psycopg
import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    WebSocketRequest,
    open_websocket_url,
)

from coordinator.admission import Ticket
from coordinator.connection import (
    ConnectionHost,
    _first_frame,
    _refuse,
    _Refused,  # the same refusal as an agent's handshake: an error frame, then the close
    route_answer,
    serve_connection,
)
from coordinator.core import CollectorHold
from coordinator.events import AgentJoined, AgentLeft, EventBus
from coordinator.fleet import AgentLink, DuplicateAgent, Fleet
from coordinator.leader import LEADER_LOCK_ROWS
from coordinator.pg import thread as pgthread
from coordinator.pg.errors import pg_message
from statemachine.exceptions import LockstepError, unwrap_single_group
from statemachine.lease import AgentLease, certainly_expired_after, renew_interval
from statemachine.ledger import AckOutcome
from statemachine.phases import Phase
from statemachine.protocol import (
    CLOSE_DUPLICATE_AGENT,
    CLOSE_NOT_LEADER,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_UNAUTHORIZED,
    CLOSE_VERSION_MISMATCH,
    Ack,
    Error,
    Nack,
    ProtocolError,
    encode,
)
from statemachine.relay import (
    RELAY_PATH,
    RELAY_PROTOCOL_VERSION,
    Answered,
    Deliver,
    Drop,
    Joined,
    Left,
    RelayedNack,
    RelayGrant,
    RelayHello,
    RelayRenew,
    RelayWelcome,
    Released,
    chunks,
    decode_relay_down,
    decode_relay_up,
    deliver_room,
    encode_relay,
    relay_grant_seconds,
    relay_hello_ok,
)
from statemachine.text import printable

log = logging.getLogger("lockstep.coordinator")

#: Frames queued to one relay's agents, per agent it holds, before the leader gives up on a
#: relay that stopped reading (the same bound as one agent's outbox).
QUEUED_PER_AGENT = 64
#: Seconds without a frame from the leader after which a relay lets the collector run again.
QUIET_SECONDS = 2.0


# ------------------------------------------------------------------ the leader's side
@dataclasses.dataclass
class _Batch:
    """One agent frame and the agents it is queued for, in queue order."""

    frame: str
    agents: list[str]


class _RelayOutbox:
    """A relayed agent's outbox: frames go to its relay's link queue (`Fleet._put`)."""

    __slots__ = ("agent_id", "session")

    def __init__(self, session: RelaySession, agent_id: str) -> None:
        self.session = session
        self.agent_id = agent_id

    def send_nowait(self, value: str) -> None:
        self.session.deliver(self.agent_id, value)


@dataclasses.dataclass(eq=False)
class RelayedLink(AgentLink):
    """An agent connected to a relay, as the leader's fleet sees it. Closing it asks the
    relay to close the agent's connection (`Drop`)."""

    session: RelaySession | None = None

    def close(self, reason: str, *, code: int = 1008) -> None:
        if not self.kick.is_set():
            super().close(reason, code=code)
            if self.session is not None:
                self.session.drop(self.agent_id, code, reason)


class RelaySession:
    """The leader's state of one relay link: its agents and the frames queued to it."""

    def __init__(self, host: ConnectionHost, ws: WebSocketConnection, relay_id: str) -> None:
        self.host = host
        self.ws = ws
        self.relay_id = relay_id
        self.links: dict[str, RelayedLink] = {}
        self._queue: list[_Batch | Drop | RelayGrant] = []
        self._queued = 0
        self._wake = trio.Event()
        self.closed = False
        #: The scope serving the link (`close` cancels it).
        self.scope: trio.CancelScope | None = None
        #: When the relay last renewed (trio clock): its agents' leases were renewed then.
        self.renewed_at = trio.current_time()

    def close(self) -> None:
        """End the link (this coordinator stopped leading)."""
        self.closed = True
        if self.scope is not None:
            self.scope.cancel()

    # ---------------------------------------------------------- queued to the relay
    def deliver(self, agent_id: str, frame: str) -> None:
        if self.closed:
            raise trio.BrokenResourceError
        last = self._queue[-1] if self._queue else None
        # A broadcast puts the same string object for every agent: one batch per relay.
        if isinstance(last, _Batch) and last.frame is frame:
            last.agents.append(agent_id)
        else:
            self._queue.append(_Batch(frame, [agent_id]))
        self._count()

    def drop(self, agent_id: str, code: int, reason: str) -> None:
        if not self.closed:
            self._queue.append(Drop(agents=[agent_id], code=code, reason=reason[:120]))
            self._count()

    def _count(self) -> None:
        self._queued += 1
        self._wake.set()
        if self._queued > QUEUED_PER_AGENT * (len(self.links) + 1):
            log.warning("relay %s is not reading its frames; closing its link", self.relay_id)
            self.close()

    async def send_queued(self) -> None:
        """Forever: send what was queued since the last send (batched by arrival)."""
        while not self.closed:
            await self._wake.wait()
            self._wake = trio.Event()
            queue, self._queue, self._queued = self._queue, [], 0
            for item in queue:
                if isinstance(item, _Batch):
                    room = deliver_room(item.frame)
                    for ids in chunks(item.agents, room):
                        await self.ws.send_message(encode_relay(Deliver(item.frame, ids)))
                else:
                    await self.ws.send_message(encode_relay(item))

    # ---------------------------------------------------------- from the relay
    def joined(self, agent_ids: list[str]) -> None:
        host = self.host
        fleet = host.fleet
        for agent_id in agent_ids:
            link = RelayedLink(
                agent_id,
                f"relay {self.relay_id}",
                time.time(),
                _RelayOutbox(self, agent_id),
                session=self,
            )
            try:
                fleet.add(link)
            except DuplicateAgent as exc:
                error = Error(code="duplicate_agent", message=str(exc), fatal=True)
                self.deliver(agent_id, encode(error))
                self.drop(agent_id, CLOSE_DUPLICATE_AGENT, str(exc))
                continue
            self.links[agent_id] = link
            fleet.grant(agent_id)  # the link's first grant: a fresh lease
            # The Welcome first (built now, so it tells the truth), then whatever joining
            # queues for the agent (the notice of a phase it missed).
            welcome = host.welcome(agent_id)
            if welcome is not None:
                link.outbox.send_nowait(welcome)
            host.agent_joined(agent_id)
            host.events.emit(AgentJoined(agent_id, link.remote))

    def left(self, agent_ids: list[str], reason: str) -> None:
        for agent_id in agent_ids:
            link = self.links.pop(agent_id, None)
            if link is not None and self.host.fleet.remove(link):
                self.host.agent_left(agent_id)
                self.host.events.emit(AgentLeft(agent_id, reason))

    def released(self, agent_ids: list[str]) -> None:
        """These agents gave their lease back (`Release`); their `Left` follows."""
        for agent_id in agent_ids:
            if agent_id in self.links:
                self.host.fleet.release(agent_id)

    def answered(self, agent_ids: list[str], migration_id: str, phase: Phase) -> None:
        ack = Ack(migration_id=migration_id, phase=phase)
        for agent_id in agent_ids:
            link = self.links.get(agent_id)
            if link is not None:
                route_answer(self.host, link, ack)

    def nacked(self, nack: RelayedNack) -> None:
        link = self.links.get(nack.agent_id)
        if link is not None:
            answer = Nack(migration_id=nack.migration_id, phase=nack.phase, error=nack.error)
            route_answer(self.host, link, answer)

    def renewed(self, seq: int) -> None:
        """The relay renewed its lease: so are the leases of every agent it holds."""
        self.renewed_at = trio.current_time()
        fleet = self.host.fleet
        for agent_id, link in list(self.links.items()):
            if not fleet.grant(agent_id):
                link.close("lease expired: no renewal", code=1001)
        self._queue.append(RelayGrant(seq=seq, seconds=fleet.lease_seconds))
        self._count()


async def _relay_hello(host: ConnectionHost, ws: WebSocketConnection) -> RelayHello:
    msg = await _first_frame(ws, host.handshake_timeout, decode_relay_up, "relay_hello")
    if not isinstance(msg, RelayHello):
        raise _Refused(
            CLOSE_PROTOCOL_ERROR, "expected_relay_hello", "the first frame must be relay_hello"
        )
    if msg.protocol != RELAY_PROTOCOL_VERSION:
        raise _Refused(
            CLOSE_VERSION_MISMATCH,
            "version_mismatch",
            f"relay protocol {msg.protocol} is not supported; "
            f"this coordinator speaks {RELAY_PROTOCOL_VERSION}",
        )
    if not relay_hello_ok(host.token, msg.token):
        raise _Refused(
            CLOSE_UNAUTHORIZED,
            "unauthorized",
            f"relay {msg.relay_id}: a relay must present the fleet secret itself",
        )
    return msg


async def serve_relay_link(
    host: ConnectionHost, ws: WebSocketConnection, sessions: set[RelaySession] | None = None
) -> None:
    """Serve one relay's link on the leader until it closes; never raises (but Cancelled).

    Its agents leave the fleet when the link ends (they are *departing*: their leases,
    renewed with the relay's, run until the leader's sweeper counts them gone). The session
    is in `sessions` while it is served (`RelayHub`).
    """
    try:
        hello = await _relay_hello(host, ws)
    except _Refused as refused:
        log.warning("refused a relay link: %s", printable(refused.message, limit=300))
        with contextlib.suppress(Exception):
            await _refuse(ws, refused)
        return
    except ConnectionClosed:
        return
    session = RelaySession(host, ws, hello.relay_id)
    lease = host.fleet.lease_seconds
    reason = "the relay's link closed"
    log.info("relay %s linked", hello.relay_id)
    try:
        welcome = RelayWelcome(RELAY_PROTOCOL_VERSION, host.epoch, lease)
        await ws.send_message(encode_relay(welcome))
        async with trio.open_nursery() as nursery:
            session.scope = nursery.cancel_scope
            if sessions is not None:
                sessions.add(session)

            async def read() -> None:
                await _read_relay(session)
                nursery.cancel_scope.cancel()

            async def watch() -> None:
                # A relay that stopped renewing (a partition): its lease, and so every
                # agent's, certainly expired; the sweeper counts the agents, this the link.
                while True:
                    await trio.sleep_until(session.renewed_at + certainly_expired_after(lease))
                    if trio.current_time() >= session.renewed_at + certainly_expired_after(lease):
                        nursery.cancel_scope.cancel()
                        return

            async def send() -> None:
                await session.send_queued()
                nursery.cancel_scope.cancel()

            nursery.start_soon(read)
            nursery.start_soon(watch)
            nursery.start_soon(send)
    except* ConnectionClosed:
        pass
    except* ProtocolError as group:
        reason = f"the relay sent a bad frame: {group.exceptions[0]}"
        log.error("relay %s: %s", hello.relay_id, reason)
    except* Exception as group:  # a bug of ours: it must not stop the leader's server
        reason = f"internal error: {group.exceptions[0]!r}"
        log.error("relay link %s failed", hello.relay_id, exc_info=group)
    finally:
        session.closed = True
        if sessions is not None:
            sessions.discard(session)
        with trio.CancelScope(shield=True):
            session.left(list(session.links), reason)
            with trio.move_on_after(1):
                await ws.aclose()
        log.info("relay %s unlinked: %s", hello.relay_id, reason)


async def _read_relay(session: RelaySession) -> None:
    while True:
        try:
            frame = await session.ws.get_message()
        except ConnectionClosed:
            return
        msg = decode_relay_up(frame)  # a bad frame from a trusted peer is a bug: unlink
        if isinstance(msg, Joined):
            session.joined(msg.agents)
        elif isinstance(msg, Left):
            session.left(msg.agents, "left its relay")
        elif isinstance(msg, Released):
            session.released(msg.agents)
        elif isinstance(msg, Answered):
            session.answered(msg.agents, msg.migration_id, msg.phase)
        elif isinstance(msg, RelayedNack):
            session.nacked(msg)
        elif isinstance(msg, RelayRenew):
            session.renewed(msg.seq)
        else:
            raise ProtocolError("unexpected_relay_hello", "relay_hello was already received")


# ------------------------------------------------------------------- the relay's side
class RelayFleet(Fleet):
    """The relay's registry of its agents: grants only within the relay's own lease, and
    only to agents announced to the leader of the current link.

    Why the second rule: an agent announced on an earlier link is unknown to the leader of
    this one (which therefore does not hold its lease); the unlink closes such agents, and
    until their connections are gone a renewal from one must not be granted.
    """

    def __init__(self, lease_seconds: float, lease: AgentLease) -> None:
        super().__init__(lease_seconds)
        self.own_lease = lease
        #: Which link (`Relay.links_made`) each agent was announced on, and the current one.
        self.announced_on: dict[str, int] = {}
        self.link_number = 0

    @property
    def lease_seconds(self) -> float:
        seconds = self.own_lease.seconds or self.leases.seconds
        return relay_grant_seconds(seconds, self.own_lease.valid_until, trio.current_time())

    def grant(self, agent_id: str) -> bool:
        return (
            self.announced_on.get(agent_id) == self.link_number
            and self.own_lease.valid(trio.current_time())
            and super().grant(agent_id)
        )


def relay_id_for(url: str) -> str:
    """A relay's id on the link, from the URL it serves agents on (agent-id characters)."""
    return re.sub(r"[^A-Za-z0-9_.@:\-]", "_", url.split("://", 1)[-1])[:128] or "relay"


class LinkLost(LockstepError):
    """Raised inside `Relay` when its leader link can no longer vouch for its agents (the
    link closed, its lease lapsed, or the leader refused it)."""


class Relay:
    """A non-leading replica's relay (module docstring); a `ConnectionHost` for its agents.

    `run` links to whoever leads the database, again after each loss, while not paused
    (`pause` while this replica itself leads). `handle_request` serves an agent while
    `linked`.
    """

    def __init__(
        self,
        dsn: str,
        *,
        url: str,
        token: str | None,
        shared_token: bool,
        handshake_timeout: float,
        heartbeat_interval: float,
        lease_seconds: float,
        poll_interval: float = 1.0,
    ) -> None:
        self.dsn = dsn
        self.url = url
        self.relay_id = relay_id_for(url)
        self.token = token
        self.shared_token = shared_token
        self.handshake_timeout = handshake_timeout
        self.heartbeat_interval = heartbeat_interval
        self.poll_interval = poll_interval
        self.own_lease = AgentLease()
        self.relay_fleet = RelayFleet(lease_seconds, self.own_lease)
        self.fleet: Fleet = self.relay_fleet
        self.events = EventBus()
        #: The leader's epoch, from its RelayWelcome (0: not linked).
        self.epoch = 0
        self.leader_url: str | None = None
        self.linked = False
        self.links_made = 0
        self._up: list[Joined | Left | Released | Answered | RelayedNack | RelayRenew] = []
        self._up_changed = trio.Event()
        self._paused = False
        self._resumed = trio.Event()
        #: The collector is held off while the leader's frames flow, as the leader holds
        #: it during a migration (`CollectorHold`): at fleet scale collections traversing
        #: the relay's connections would cost more than the relaying itself.
        self.collector = CollectorHold()
        self._busy_at = -math.inf
        self._busy = trio.Event()
        self._left_since_hold = 0
        self._scope: trio.CancelScope | None = None

    # ------------------------------------------------------- ConnectionHost
    def applied_names(self) -> list[str]:
        return []  # the leader's Welcome says it

    def welcome(self, agent_id: str) -> str | None:
        return None  # the leader's Welcome arrives in the agent's outbox

    def agent_joined(self, agent_id: str) -> None:
        if not self.linked:  # unlinked during its handshake: no leader will welcome it
            link = self.fleet.link(agent_id)
            if link is not None:
                link.close("relay: not linked to a leader", code=CLOSE_NOT_LEADER)
            return
        self.relay_fleet.announced_on[agent_id] = self.links_made
        self._send_up(agent_id, Joined)

    def agent_left(self, agent_id: str) -> None:
        self._left_since_hold += 1
        self.relay_fleet.announced_on.pop(agent_id, None)
        if agent_id in self.relay_fleet.released:  # it said `release` before closing
            self.relay_fleet.released.discard(agent_id)
            self._send_up(agent_id, Released)
        self._send_up(agent_id, Left)

    def is_active_migration(self, migration_id: str) -> bool:
        return True  # the leader judges answers, and tells the agent

    def route_ack(self, agent_id: str, ack: Ack) -> AckOutcome:
        self._busy_at = trio.current_time()  # answers still flowing: keep the collector held
        last = self._up[-1] if self._up else None
        if (
            isinstance(last, Answered)
            and last.migration_id == ack.migration_id
            and last.phase is ack.phase
        ):
            last.agents.append(agent_id)
            self._up_changed.set()
        else:
            self._queue_up(Answered(ack.migration_id, ack.phase, [agent_id]))
        return AckOutcome.RECORDED

    def route_nack(self, agent_id: str, nack: Nack) -> AckOutcome:
        self._queue_up(RelayedNack(agent_id, nack.migration_id, nack.phase, nack.error))
        return AckOutcome.RECORDED

    def _send_up(self, agent_id: str, kind: type[Joined] | type[Left] | type[Released]) -> None:
        if not self.linked:
            return
        last = self._up[-1] if self._up else None
        if type(last) is kind:
            assert isinstance(last, Joined | Left | Released)
            last.agents.append(agent_id)
            self._up_changed.set()
        else:
            self._queue_up(kind([agent_id]))

    def _queue_up(
        self, msg: Joined | Left | Released | Answered | RelayedNack | RelayRenew
    ) -> None:
        if self.linked:
            self._up.append(msg)
            self._up_changed.set()

    # ------------------------------------------------------- agents
    async def handle_request(self, request: WebSocketRequest, ticket: Ticket | None) -> None:
        """Serve one agent for the leader (the caller checked the path), or send it on."""
        try:
            ws = await request.accept()
        except Exception:
            return
        if not self.linked:
            with trio.move_on_after(2):
                await ws.aclose(CLOSE_NOT_LEADER, "relay: not linked to a leader")
            return
        await serve_connection(self, ws, None if ticket is None else ticket.release)

    def _drop_agents(self, reason: str) -> None:
        for link in self.fleet:
            link.close(reason, code=CLOSE_NOT_LEADER)

    # ------------------------------------------------------- the link
    def pause(self, reason: str) -> None:
        """Stop relaying (this replica leads now): unlink and send the agents on."""
        self._paused = True
        self._resumed = trio.Event()
        if self._scope is not None:
            self._scope.cancel()
        self._unlink(reason)

    def resume(self) -> None:
        self._paused = False
        self._resumed.set()

    def _unlink(self, reason: str) -> None:
        if self.linked:
            log.warning("relay: unlinked from the leader (%s); closing its agents", reason)
        self.linked = False
        self.epoch = 0
        self._up = []
        self.own_lease.lapse()
        self._drop_agents(f"relay: {reason}")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Forever: link to the leader when not paused; after a loss, link again."""
        task_status.started()
        delay = self.poll_interval
        while True:
            if self._paused:
                await self._resumed.wait()
                continue
            with trio.CancelScope() as self._scope:
                reason = "no leader to link to"
                try:
                    url = await self._leader_url()
                    if url is not None:
                        self.leader_url = url
                        await self._link(url)
                        delay = self.poll_interval
                except LinkLost as exc:
                    reason = str(exc)
                except (OSError, HandshakeError, ConnectionClosed, trio.TooSlowError) as exc:
                    reason = f"cannot link to the leader at {self.leader_url}: {exc!r}"
                except ProtocolError as exc:
                    reason = f"the leader sent a bad frame: {exc}"
                except psycopg.Error as exc:
                    reason = f"cannot read the leader's URL: {pg_message(exc)}"
                finally:
                    self._scope = None
                self._unlink(reason)
                log.info("relay: %s; retrying in %.1f s", reason, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _leader_url(self) -> str | None:
        """The URL the live leader advertises (None: no live leader, or it is this one)."""
        rows, _ = await pgthread.query(
            self.dsn,
            f"SELECT url FROM lockstep.leader WHERE id = 1 AND EXISTS ({LEADER_LOCK_ROWS})",
        )
        url = rows[0][0] if rows else None
        return url if isinstance(url, str) and url and url != self.url else None

    async def _link(self, url: str) -> None:
        ssl_context = ssl.create_default_context() if url.startswith("wss:") else None
        async with open_websocket_url(
            url.rstrip("/") + RELAY_PATH, ssl_context=ssl_context, connect_timeout=5
        ) as ws:
            sent = trio.current_time()
            await ws.send_message(
                encode_relay(RelayHello(RELAY_PROTOCOL_VERSION, self.relay_id, self.token))
            )
            with trio.fail_after(self.handshake_timeout):
                frame = await ws.get_message()
            welcome = decode_relay_down(frame)
            if not isinstance(welcome, RelayWelcome):
                raise LinkLost(f"the leader at {url} answered {type(welcome).__name__}")
            self.own_lease.welcomed(welcome.lease_seconds, sent)
            self.epoch = welcome.epoch
            self._up = []
            self.links_made += 1
            self.relay_fleet.link_number = self.links_made
            self.linked = True
            log.info("relay: linked to the leader at %s (epoch %d)", url, welcome.epoch)
            with unwrap_single_group():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read_down, ws)
                    nursery.start_soon(self._send_up_frames, ws)
                    nursery.start_soon(self._renew, welcome.lease_seconds)
                    nursery.start_soon(self._watch_lease)
                    nursery.start_soon(self._release_collector_when_quiet)

    async def _read_down(self, ws: WebSocketConnection) -> None:
        while True:
            try:
                frame = await ws.get_message()
            except ConnectionClosed as exc:
                raise LinkLost(f"the leader's link closed ({exc.reason})") from None
            msg = decode_relay_down(frame)
            if isinstance(msg, Deliver):
                self._busy_at = trio.current_time()
                if not self.collector.held:
                    self.collector.hold()
                    self._busy.set()
                send = self.fleet.send
                for agent_id in msg.agents:
                    send(agent_id, msg.frame)
            elif isinstance(msg, Drop):
                for agent_id in msg.agents:
                    link = self.fleet.link(agent_id)
                    if link is not None:
                        link.close(msg.reason, code=msg.code)
            elif isinstance(msg, RelayGrant):
                self.own_lease.granted(msg.seq, msg.seconds)
            else:
                raise ProtocolError("unexpected_relay_welcome", "relay_welcome came twice")

    async def _send_up_frames(self, ws: WebSocketConnection) -> None:
        while True:
            await self._up_changed.wait()
            self._up_changed = trio.Event()
            queue, self._up = self._up, []
            for msg in queue:
                if isinstance(msg, Joined | Left | Released | Answered):
                    for ids in chunks(msg.agents):
                        await ws.send_message(encode_relay(_with_agents(msg, ids)))
                else:
                    await ws.send_message(encode_relay(msg))

    async def _renew(self, seconds: float) -> None:
        while True:
            await trio.sleep(renew_interval(seconds))
            self._queue_up(RelayRenew(self.own_lease.request(trio.current_time())))

    async def _release_collector_when_quiet(self) -> None:
        """Let the collector run again once the leader sent nothing for `QUIET_SECONDS`
        (the migration's answers are in); unfreeze the heap only if agents left meanwhile
        (their connections are the cyclic garbage), as the leader does."""
        try:
            while True:
                await self._busy.wait()
                while trio.current_time() < self._busy_at + QUIET_SECONDS:
                    await trio.sleep_until(self._busy_at + QUIET_SECONDS)
                self._busy = trio.Event()
                left, self._left_since_hold = self._left_since_hold, 0
                self.collector.release(unfreeze=left > 0)
        finally:
            self.collector.release(unfreeze=True)

    async def _watch_lease(self) -> None:
        while True:
            await trio.sleep_until(self.own_lease.valid_until)
            if not self.own_lease.valid(trio.current_time()):
                raise LinkLost("the relay's own lease lapsed: the leader stopped renewing it")


def _with_agents(
    msg: Joined | Left | Released | Answered, agents: list[str]
) -> Joined | Left | Released | Answered:
    if isinstance(msg, Answered):
        return Answered(msg.migration_id, msg.phase, agents)
    return type(msg)(agents)


class RelayHub:
    """The leader's relay links: `serve` is `Coordinator.relay_handler`; `close_all` ends
    them when the term ends, so no relay keeps relaying for a coordinator that stopped
    leading (each relay then links to the next leader)."""

    def __init__(self, host: ConnectionHost) -> None:
        self.host = host
        self.sessions: set[RelaySession] = set()

    async def serve(self, ws: WebSocketConnection) -> None:
        await serve_relay_link(self.host, ws, self.sessions)

    def close_all(self) -> None:
        for session in list(self.sessions):
            session.close()


__all__ = [
    "LinkLost",
    "Relay",
    "RelayFleet",
    "RelayHub",
    "RelaySession",
    "RelayedLink",
    "relay_id_for",
    "serve_relay_link",
]
