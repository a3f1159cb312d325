"""The agent embedded in each application instance.

It holds one WebSocket to the coordinator, turns each phase notice into a call of the app's hook
(through the pure `AgentMachine`), and answers Ack when the hook returns or Nack with the error
text when it raises. `agent.is_applied(name)` is what the app consults to pick its query set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import random
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable

import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from agent.inflight import InFlight
from statemachine.agent_fsm import AgentMachine, AgentState, Hook
from statemachine.exceptions import LockstepError, unwrap_single_group
from statemachine.phases import Phase
from statemachine.protocol import (
    PROTOCOL_VERSION,
    Ack,
    Error,
    Hello,
    Nack,
    PhaseNotice,
    ProtocolError,
    Welcome,
    decode_coordinator_message,
    encode,
)

log = logging.getLogger("lockstep.agent")


@dataclasses.dataclass(frozen=True)
class MigrationInfo:
    """What a hook is told about the migration that reached it."""

    migration_id: str  # "" when `resynced` (the Welcome names migrations, not ids)
    name: str
    phase: Phase
    ack_timeout: float
    #: True when the hook runs because a reconnect found the fleet had moved on without us.
    resynced: bool = False


HookFn = Callable[[MigrationInfo], Awaitable[object]]


class AgentError(LockstepError):
    """Base class of the errors `open_agent` raises at connect time (see the subclasses)."""


class CoordinatorUnreachable(AgentError):
    """Raised by `open_agent` when the coordinator cannot be reached on the first connect
    (nothing listening, DNS, TLS, an HTTP refusal of the upgrade...)."""


class HandshakeRejected(AgentError):
    """Raised by `open_agent` when the coordinator answered the hello with an error (protocol
    version, token, duplicate id); retrying would be refused the same way."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"coordinator rejected the handshake: {code}: {message}")
        self.code = code
        self.message = message


class Agent:
    """One application instance's view of the migration protocol."""

    def __init__(
        self,
        agent_id: str,
        *,
        on_announce: HookFn | None = None,
        on_apply: HookFn | None = None,
        on_confirm: HookFn | None = None,
        on_rollback: HookFn | None = None,
    ) -> None:
        self.agent_id = agent_id
        self.hooks: dict[Hook, HookFn | None] = {
            Hook.ON_ANNOUNCE: on_announce,
            Hook.ON_APPLY: on_apply,
            Hook.ON_CONFIRM: on_confirm,
            Hook.ON_ROLLBACK: on_rollback,
        }
        self.machine = AgentMachine()
        self.errors: list[Error] = []
        self.connected = False
        self.disconnected = trio.Event()
        self.inflight = InFlight()
        #: Completed handshakes; more than one means the agent reconnected.
        self.sessions = 0

    # ------------------------------------------------------------ for the app
    def is_applied(self, name: str) -> bool:
        """True once this instance switched to the schema of migration `name`."""
        return self.machine.is_applied(name)

    def using(self, name: str) -> contextlib.AbstractContextManager[bool]:
        """Wrap one unit of work (a request, a job) that picks its queries by migration `name`.

        ``with agent.using("add_email") as new: ...`` yields whether to use the new query set,
        and holds that choice until the block ends: the agent acks APPLY only when no block
        that chose the old set is still running (and ROLLBACK only when no block on the new
        set is), so CONTRACT or rollback SQL never runs under work that still needs the old
        (or new) schema. Safe to use from any thread.
        """
        return self.inflight.using(name, self.machine.is_applied)

    @property
    def applied(self) -> frozenset[str]:
        return frozenset(self.machine.applied)

    @property
    def state(self) -> AgentState:
        return self.machine.state

    @property
    def phase(self) -> Phase | None:
        return self.machine.phase

    @property
    def seen(self) -> list[tuple[str, Phase]]:
        """(migration name, phase) of every notice received, in order."""
        return list(self.machine.seen)

    # ------------------------------------------------------------ the protocol
    async def handshake(self, ws: WebSocketConnection, token: str | None = None) -> Welcome:
        await ws.send_message(
            encode(Hello(protocol=PROTOCOL_VERSION, agent_id=self.agent_id, token=token))
        )
        try:
            frame = await ws.get_message()
        except ConnectionClosed as exc:
            raise HandshakeRejected("closed", f"connection closed: {exc.reason}") from None
        try:
            msg = decode_coordinator_message(frame)
        except ProtocolError as exc:
            raise HandshakeRejected(exc.code, f"unreadable answer to hello: {exc}") from None
        if isinstance(msg, Error):
            raise HandshakeRejected(msg.code, msg.message)
        if not isinstance(msg, Welcome):
            raise HandshakeRejected("protocol", f"expected welcome, got {msg!r}")
        if self.sessions == 0:
            self.machine.applied.update(msg.applied)
        else:
            await self._resync(msg.applied)
        self.sessions += 1
        self.connected = True
        self.disconnected = trio.Event()
        return msg

    async def _resync(self, applied: list[str]) -> None:
        """After a reconnect, switch or revert to match what the coordinator says is applied."""
        added, removed = self.machine.resync(applied)
        for name, phase, hook in [
            *((n, Phase.ROLLBACK, Hook.ON_ROLLBACK) for n in sorted(removed)),
            *((n, Phase.APPLY, Hook.ON_APPLY) for n in sorted(added)),
        ]:
            log.warning("agent %s: resync after reconnect: %s %s", self.agent_id, phase.name, name)
            fn = self.hooks[hook]
            if fn is None:
                continue
            try:
                await fn(MigrationInfo("", name, phase, 0.0, resynced=True))
            except Exception:
                log.exception("agent %s: %s hook failed during resync", self.agent_id, hook.value)

    async def serve(
        self,
        ws: WebSocketConnection,
        token: str | None = None,
        *,
        task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Handshake on `ws`, then answer notices until the connection closes."""
        await self.handshake(ws, token)
        task_status.started(self)
        await self.run(ws)

    async def run(self, ws: WebSocketConnection) -> None:
        """Answer notices on an already handshaken `ws` until the connection closes."""
        try:
            while True:
                try:
                    frame = await ws.get_message()
                except ConnectionClosed as exc:
                    log.warning(
                        "agent %s: coordinator closed the connection: %s", self.agent_id, exc.reason
                    )
                    return
                try:
                    msg = decode_coordinator_message(frame)
                except ProtocolError as exc:
                    log.error("agent %s: bad frame from coordinator: %s", self.agent_id, exc)
                    continue
                if isinstance(msg, PhaseNotice):
                    await self._handle_notice(ws, msg)
                elif isinstance(msg, Error):
                    log.warning(
                        "agent %s: coordinator error %s: %s", self.agent_id, msg.code, msg.message
                    )
                    self.errors.append(msg)
        finally:
            self.connected = False
            self.disconnected.set()

    async def _handle_notice(self, ws: WebSocketConnection, notice: PhaseNotice) -> None:
        step = self.machine.on_notice(
            notice.migration_id, notice.migration, notice.phase, notice.ack_required
        )
        if step.problem:
            log.warning("agent %s: %s", self.agent_id, step.problem)
        error: str | None = None
        if step.hook is not None:
            hook = self.hooks[step.hook]
            info = MigrationInfo(
                notice.migration_id, notice.migration, notice.phase, notice.ack_timeout
            )
            try:
                if hook is not None:
                    await hook(info)
            except Exception as exc:  # the app's own code: any failure is a NACK
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                log.warning("agent %s: %s hook failed: %s", self.agent_id, step.hook.value, error)
                self.machine.hook_failed(notice.phase)
            else:
                self.machine.hook_succeeded(notice.phase)
                error = await self._drain_previous_version(notice)
        if not step.ack:
            return
        reply: Ack | Nack
        if error is None:
            reply = Ack(migration_id=notice.migration_id, phase=notice.phase)
        else:
            reply = Nack(migration_id=notice.migration_id, phase=notice.phase, error=error[:4000])
        with contextlib.suppress(ConnectionClosed):
            await ws.send_message(encode(reply))

    async def _drain_previous_version(self, notice: PhaseNotice) -> str | None:
        """After switching (APPLY) or reverting (ROLLBACK), wait for work still using the other
        query set; past the ack timeout, NACK rather than let the schema move under it."""
        if notice.phase not in (Phase.APPLY, Phase.ROLLBACK):
            return None
        previous = notice.phase is Phase.ROLLBACK  # work on the version we just left
        with trio.move_on_after(notice.ack_timeout):
            await self.inflight.drained(notice.migration, previous)
            return None
        left = self.inflight.count(notice.migration, previous)
        return (
            f"{left} unit(s) of work on the {'new' if previous else 'old'} query set of "
            f"{notice.migration!r} still running after {notice.ack_timeout:g} s"
        )


#: Rejections that retrying cannot fix: stop reconnecting and say why in the log.
_FINAL_REJECTIONS = frozenset({"unauthorized", "version_mismatch", "invalid_message"})


def _backoff(attempt: int, cap: float) -> float:
    """Exponential backoff with jitter, so a restarted coordinator is not stampeded."""
    return float(min(cap, 0.1 * 2**attempt) * random.uniform(0.5, 1.0))


async def _connect_once(
    agent: Agent,
    url: str,
    token: str | None,
    connect_timeout: float,
    ssl_context: ssl.SSLContext | None,
    on_joined: Callable[[], None],
) -> None:
    """One connection: open, handshake, call `on_joined`, serve until it closes."""
    await _check_tls(url, ssl_context, connect_timeout)
    try:
        with unwrap_single_group():
            async with open_websocket_url(url, ssl_context, connect_timeout=connect_timeout) as ws:
                try:
                    with trio.fail_after(connect_timeout):
                        await agent.handshake(ws, token)
                except trio.TooSlowError:
                    raise HandshakeRejected("timeout", "no welcome from the coordinator") from None
                on_joined()
                await agent.run(ws)
    except (OSError, HandshakeError, trio.TooSlowError) as exc:
        raise CoordinatorUnreachable(f"cannot reach the coordinator at {url}: {exc!r}") from exc
    except ConnectionClosed as exc:
        raise CoordinatorUnreachable(f"connection to {url} closed: {exc.reason}") from exc


async def _check_tls(url: str, ssl_context: ssl.SSLContext | None, timeout: float) -> None:
    """For ``wss://``, complete one TLS handshake first and report why it fails.

    trio-websocket turns a refused certificate into a bare connection timeout after the whole
    `connect_timeout`; an operator needs "certificate verify failed" at once instead.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "wss" or parts.hostname is None:
        return
    context = ssl_context or ssl.create_default_context()
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_ssl_over_tcp_stream(
                parts.hostname, parts.port or 443, ssl_context=context
            )
            try:
                await stream.do_handshake()
            finally:
                await stream.aclose()
    except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
        cause = exc.__cause__ or exc
        raise CoordinatorUnreachable(f"TLS with the coordinator at {url} failed: {cause}") from exc


async def keep_connected(
    agent: Agent,
    url: str,
    *,
    token: str | None = None,
    connect_timeout: float = 10.0,
    reconnect: bool = True,
    max_backoff: float = 5.0,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `agent` on `url`; after the first handshake, reconnect whenever the link drops.

    The first connection's failure is raised (`CoordinatorUnreachable`, `HandshakeRejected`):
    an app should not start believing it is coordinated. Later failures are logged and
    retried with backoff, except final rejections (bad token, protocol version), after which
    the agent stays disconnected and keeps its last known schema.
    """
    started = False
    attempt = 0

    def joined() -> None:
        nonlocal started, attempt
        attempt = 0
        if not started:
            started = True
            task_status.started(agent)

    while True:
        try:
            await _connect_once(agent, url, token, connect_timeout, ssl_context, joined)
        except (CoordinatorUnreachable, HandshakeRejected) as exc:
            if not started:
                raise
            final = isinstance(exc, HandshakeRejected) and exc.code in _FINAL_REJECTIONS
            log.warning("agent %s: %s%s", agent.agent_id, exc, "" if not final else "; giving up")
            if final:
                return
        if not reconnect:
            return
        attempt += 1
        await trio.sleep(_backoff(attempt, max_backoff))


@contextlib.asynccontextmanager
async def open_agent(
    url: str,
    *,
    agent_id: str,
    on_announce: HookFn | None = None,
    on_apply: HookFn | None = None,
    on_confirm: HookFn | None = None,
    on_rollback: HookFn | None = None,
    token: str | None = None,
    connect_timeout: float = 10.0,
    reconnect: bool = True,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[Agent]:
    """Connect to the coordinator at `url` as `agent_id` and answer its phases in the background.

    Raises `CoordinatorUnreachable` or `HandshakeRejected` if it cannot join. Hooks are async
    callables taking a `MigrationInfo`: returning acks the phase, raising NACKs it. If the
    connection drops later, the agent reconnects with backoff (unless `reconnect=False`) and,
    on rejoining, runs `on_rollback`/`on_apply` for migrations that were rolled back or
    completed while it was away (`info.resynced` is True then). For a ``wss://`` URL,
    `ssl_context` is the client context that trusts the coordinator's certificate (default:
    the system's trust store).
    """
    agent = Agent(
        agent_id,
        on_announce=on_announce,
        on_apply=on_apply,
        on_confirm=on_confirm,
        on_rollback=on_rollback,
    )
    with unwrap_single_group():
        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(
                    keep_connected,
                    agent,
                    url,
                    token=token,
                    connect_timeout=connect_timeout,
                    reconnect=reconnect,
                    ssl_context=ssl_context,
                )
            )
            yield agent
            nursery.cancel_scope.cancel()
