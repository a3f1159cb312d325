"""The agent embedded in each application instance.

It holds one WebSocket to the coordinator, turns each phase notice into a call of the app's hook
(through the pure `AgentMachine`), and answers Ack when the hook returns or Nack with the error
text when it raises. `agent.is_applied(name)` is what the app consults to pick its query set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from statemachine.agent_fsm import AgentMachine, AgentState, Hook
from statemachine.exceptions import unwrap_single_group
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

    migration_id: str
    name: str
    phase: Phase
    ack_timeout: float


HookFn = Callable[[MigrationInfo], Awaitable[object]]


class AgentError(Exception):
    """Base class of the errors `open_agent` raises at connect time."""


class CoordinatorUnreachable(AgentError):
    """The coordinator could not be reached (nothing listening, DNS, HTTP refusal...)."""


class HandshakeRejected(AgentError):
    """The coordinator answered the hello with an error (version, token, duplicate id)."""

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

    # ------------------------------------------------------------ for the app
    def is_applied(self, name: str) -> bool:
        """True once this instance switched to the schema of migration `name`."""
        return self.machine.is_applied(name)

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
    async def handshake(self, ws: WebSocketConnection, token: str | None = None) -> None:
        await ws.send_message(
            encode(Hello(protocol=PROTOCOL_VERSION, agent_id=self.agent_id, token=token))
        )
        try:
            frame = await ws.get_message()
        except ConnectionClosed as exc:
            raise HandshakeRejected("closed", f"connection closed: {exc.reason}") from None
        msg = decode_coordinator_message(frame)
        if isinstance(msg, Error):
            raise HandshakeRejected(msg.code, msg.message)
        if not isinstance(msg, Welcome):
            raise HandshakeRejected("protocol", f"expected welcome, got {msg!r}")
        self.machine.applied.update(msg.applied)
        self.connected = True

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
            else:
                self.machine.hook_succeeded(notice.phase)
        if not step.ack:
            return
        reply: Ack | Nack
        if error is None:
            reply = Ack(migration_id=notice.migration_id, phase=notice.phase)
        else:
            reply = Nack(migration_id=notice.migration_id, phase=notice.phase, error=error[:4000])
        with contextlib.suppress(ConnectionClosed):
            await ws.send_message(encode(reply))


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
) -> AsyncIterator[Agent]:
    """Connect to the coordinator at `url` as `agent_id` and answer its phases in the background.

    Raises `CoordinatorUnreachable` or `HandshakeRejected` if it cannot join. Hooks are async
    callables taking a `MigrationInfo`: returning acks the phase, raising NACKs it.
    """
    agent = Agent(
        agent_id,
        on_announce=on_announce,
        on_apply=on_apply,
        on_confirm=on_confirm,
        on_rollback=on_rollback,
    )
    joined = False
    try:
        with unwrap_single_group():
            async with open_websocket_url(url, connect_timeout=connect_timeout) as ws:
                joined = True
                try:
                    with trio.fail_after(connect_timeout):
                        await agent.handshake(ws, token)
                except trio.TooSlowError:
                    raise HandshakeRejected("timeout", "no welcome from the coordinator") from None
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(agent.run, ws)
                    yield agent
                    nursery.cancel_scope.cancel()
    except (OSError, HandshakeError, trio.TooSlowError) as exc:
        if joined:
            raise
        raise CoordinatorUnreachable(f"cannot reach the coordinator at {url}: {exc!r}") from exc
