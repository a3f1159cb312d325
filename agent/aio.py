"""The agent for asyncio applications (FastAPI, Starlette, aiohttp...), natively on asyncio.

``async with open_asyncio_agent(url, agent_id=...) as agent:`` is `open_agent` for an asyncio
app: the same arguments, async hooks, `agent.is_applied`, `agent.using`, `agent.applied`,
`agent.synced`. It runs as a task on the app's own loop, over the `websockets` library
(``pip install 'lockstep[asyncio]'``), with no thread and no trio.

Only the I/O is written here. What the agent decides is shared with the trio agent: the
protocol (`statemachine/protocol.py`), the pure `AgentMachine`, the session logic
(`agent/session.py`: hello, Welcome and notice handling, the epoch fence, replies), the
in-flight counter (`agent/inflight.py`), the connect loop's decisions and logs
(`agent/dialing.py`) and the durable-state fallback (`agent/durable.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
from collections.abc import AsyncIterator, Callable, Sequence

from agent.connecting import keep_durable_fresh, stay_connected
from agent.dialing import (
    Dialer,
    coordinator_urls,
    describe_network_error,
)
from agent.durable import ConnectFn, DurableState, read_for_boot
from agent.errors import (
    AgentError,
    CoordinatorUnreachable,
    HandshakeRejected,
    MissingExtra,
    StaleLeader,
)
from agent.leasing import renew_until_lapsed
from agent.session import LEAVE_DRAIN, AgentSession, HookFn, MigrationInfo, ResyncStep
from statemachine.lease import DEFAULT_LEASE_SECONDS
from statemachine.protocol import MAX_FRAME_BYTES, PhaseNotice, Welcome

try:
    from websockets.asyncio.client import ClientConnection, connect
    from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
except ImportError:  # pragma: no cover - exercised in a subprocess without the extra
    raise MissingExtra(
        "the asyncio agent needs the websockets library: pip install 'lockstep[asyncio]'"
    ) from None

log = logging.getLogger("lockstep.agent")


class AsyncioAgent(AgentSession):
    """One application instance's view of the migration protocol, on asyncio."""

    def __init__(
        self,
        agent_id: str,
        *,
        on_announce: HookFn | None = None,
        on_apply: HookFn | None = None,
        on_confirm: HookFn | None = None,
        on_rollback: HookFn | None = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        has_durable: bool = False,
    ) -> None:
        super().__init__(
            agent_id,
            on_announce=on_announce,
            on_apply=on_apply,
            on_confirm=on_confirm,
            on_rollback=on_rollback,
            lease_seconds=lease_seconds,
            has_durable=has_durable,
        )
        self.disconnected = asyncio.Event()
        #: The live connection, so that leaving (`open_asyncio_agent`'s exit) can release.
        self.link: ClientConnection | None = None

    async def handshake(self, ws: ClientConnection, token: str | None = None) -> Welcome:
        try:
            await ws.send(self.hello(token))
            frame = await ws.recv()
        except ConnectionClosed as exc:
            raise _closed_in_handshake(exc) from None
        msg = self.read_welcome(frame)
        await self._resync(self.adopt_welcome(msg))
        self.session_started()
        self.disconnected = asyncio.Event()
        return msg

    async def _resync(self, steps: list[ResyncStep]) -> None:
        for step in steps:
            self.log_resync(step)
            fn = self.hooks[step.hook]
            if fn is None:
                continue
            try:
                await fn(step.info())
            except Exception:
                self.log_resync_failure(step)

    async def keep_lease(self, ws: ClientConnection) -> None:
        """Renew the lease until it lapsed and no late grant came (`Agent.keep_lease`)."""

        async def send(frame: str) -> None:
            with contextlib.suppress(ConnectionClosed):
                await ws.send(frame)

        await renew_until_lapsed(self, send=send, sleep=asyncio.sleep)
        if self.renew_every is None:
            await asyncio.Future()  # no leases: only the connection's end ends the session

    async def serve_leased(self, ws: ClientConnection) -> None:
        """`run` and `keep_lease` together: whichever ends first ends the connection."""
        answer = asyncio.create_task(self.run(ws))
        renew = asyncio.create_task(self.keep_lease(ws))
        try:
            await asyncio.wait((answer, renew), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (answer, renew):
                task.cancel()
            await asyncio.gather(answer, renew, return_exceptions=True)
        if answer.done() and not answer.cancelled() and answer.exception() is not None:
            raise answer.exception()  # type: ignore[misc]

    async def run(self, ws: ClientConnection) -> None:
        """Answer notices on an already handshaken `ws` until the connection closes."""
        try:
            while True:
                try:
                    frame = await ws.recv()
                except ConnectionClosed as exc:
                    self.lost(exc.rcvd or exc)
                    return
                msg = self.read_frame(frame)
                if isinstance(msg, PhaseNotice):
                    await self._handle_notice(ws, msg)
        finally:
            self.connected = False
            self.disconnected.set()

    async def _handle_notice(self, ws: ClientConnection, notice: PhaseNotice) -> None:
        step = self.begin_notice(notice)
        if step is None:
            return
        error: str | None = None
        if step.hook is not None:
            hook = self.hooks[step.hook]
            try:
                if hook is not None:
                    await hook(self.hook_info(notice))
            except Exception as exc:  # the app's own code: any failure is a NACK
                error = self.hook_raised(notice, step.hook, exc)
            else:
                self.hook_returned(notice)
                error = await self._drain_previous_version(notice)
        if not step.ack:
            return
        with contextlib.suppress(ConnectionClosed):
            await ws.send(self.reply(notice, error))

    async def _drain_previous_version(self, notice: PhaseNotice) -> str | None:
        target = self.drain_target(notice)
        if target is None:
            return None
        loop = asyncio.get_running_loop()
        drained = asyncio.Event()

        def wake() -> None:  # called from whichever thread ended the last unit of work
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(drained.set)

        if not self.inflight.when_drained(*target, wake):
            return None
        try:
            async with asyncio.timeout(notice.ack_timeout):
                await drained.wait()
        except TimeoutError:
            return self.drain_failure(notice)
        return None


def _closed_in_handshake(exc: ConnectionClosed) -> HandshakeRejected:
    close = exc.rcvd
    if close is None:
        return HandshakeRejected("closed", "connection closed without a close frame")
    return HandshakeRejected(
        "closed", close.reason or f"connection closed ({close.code})", close_code=close.code
    )


def _network_cause(exc: BaseException, timeout: float) -> str:
    """websockets' errors (and what they wrap) as a plain cause."""
    if isinstance(exc, InvalidStatus):
        return f"handshake rejected: HTTP {exc.response.status_code}"
    if isinstance(exc, InvalidHandshake) and not isinstance(exc.__cause__, OSError):
        return f"handshake failed: {exc}"
    return describe_network_error(exc, timeout)


async def _connect_once(
    agent: AsyncioAgent,
    url: str,
    token: str | None,
    connect_timeout: float,
    ssl_context: ssl.SSLContext | None,
    on_joined: Callable[[], None],
) -> None:
    """One connection: open, handshake, call `on_joined`, serve until it closes."""
    options = {"ssl": ssl_context} if url.startswith("wss:") and ssl_context else {}
    try:
        async with connect(
            url,
            open_timeout=connect_timeout,
            max_size=MAX_FRAME_BYTES,
            ping_interval=None,  # the coordinator pings; websockets answers on its own
            close_timeout=1.0,
            **options,  # type: ignore[arg-type]
        ) as ws:
            try:
                async with asyncio.timeout(connect_timeout):
                    await agent.handshake(ws, token)
            except TimeoutError:
                raise HandshakeRejected("timeout", "no welcome from the coordinator") from None
            on_joined()
            agent.link = ws
            try:
                await agent.serve_leased(ws)
            finally:
                agent.link = None
    except (HandshakeRejected, StaleLeader):
        raise
    except (OSError, InvalidHandshake, TimeoutError) as exc:
        raise CoordinatorUnreachable(url, _network_cause(exc, connect_timeout)) from exc


async def keep_connected(
    agent: AsyncioAgent,
    url: str | Sequence[str],
    *,
    token: str | None = None,
    connect_timeout: float = 10.0,
    reconnect: bool = True,
    max_backoff: float = 5.0,
    ssl_context: ssl.SSLContext | None = None,
    durable: DurableState | None = None,
    wait_connected: bool = False,
    booted: asyncio.Future[None] | None = None,
) -> None:
    """`agent.client.keep_connected` for asyncio; `booted` resolves when the agent booted
    (or fails with what the boot raises)."""
    dialer = Dialer(
        agent.agent_id,
        coordinator_urls(url),
        max_backoff=max_backoff,
        wait_connected=wait_connected,
    )

    def boot(error: BaseException | None = None) -> None:
        if booted is not None and not booted.done():
            if error is None:
                booted.set_result(None)
            else:
                booted.set_exception(error)

    async def attempt(to: str, joined: Callable[[], None]) -> None:
        await _connect_once(agent, to, token, connect_timeout, ssl_context, joined)

    async def read_durable() -> frozenset[str] | str | None:
        return await asyncio.to_thread(read_for_boot, durable)

    fresh = (
        None
        if durable is None
        else asyncio.create_task(keep_durable_fresh(agent, read_durable, asyncio.sleep))
    )
    try:
        await stay_connected(
            agent,
            dialer,
            attempt=attempt,
            sleep=asyncio.sleep,
            read_durable=None if durable is None else read_durable,
            reconnect=reconnect,
            booted=boot,
        )
    except AgentError as exc:  # raised at boot only: `open_asyncio_agent` raises it
        boot(exc)
    finally:
        if fresh is not None:
            fresh.cancel()
        boot()  # ended before booting (reconnect=False): let the app start anyway


@contextlib.asynccontextmanager
async def open_asyncio_agent(
    url: str | Sequence[str],
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
    dsn: str | None = None,
    connect: ConnectFn | None = None,
    wait_connected: bool = False,
    join_grace: float = 5.0,
    max_backoff: float = 5.0,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
) -> AsyncIterator[AsyncioAgent]:
    """`agent.open_agent` for asyncio apps: same arguments, same boot rules, async hooks,
    the same lease and fencing (`agent.ready`, `AgentFenced`)."""
    urls = coordinator_urls(url)
    durable = DurableState.maybe(dsn, connect)
    agent = AsyncioAgent(
        agent_id,
        on_announce=on_announce,
        on_apply=on_apply,
        on_confirm=on_confirm,
        on_rollback=on_rollback,
        lease_seconds=lease_seconds,
        has_durable=durable is not None,
    )
    booted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        keep_connected(
            agent,
            urls,
            token=token,
            connect_timeout=connect_timeout,
            reconnect=reconnect,
            max_backoff=max_backoff,
            ssl_context=ssl_context,
            durable=durable,
            wait_connected=wait_connected,
            booted=booted,
        ),
        name=f"lockstep-agent-{agent_id}",
    )
    try:
        try:
            await asyncio.wait_for(asyncio.shield(booted), None if wait_connected else join_grace)
        except TimeoutError:  # still connecting: the app starts now, the agent joins later
            booted.add_done_callback(functools.partial(_log_late_boot_failure, agent_id))
        yield agent
    finally:
        await _leave(agent)  # fenced from here on: the app is stopping
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if booted.done() and not booted.cancelled():
            booted.exception()  # retrieved: no "exception was never retrieved" warning


async def _leave(agent: AsyncioAgent) -> None:
    """Stop serving; `Release` once nothing is in flight (as `agent.client`'s leave does),
    then the task's cancellation closes the connection. Bounded."""
    agent.stop_serving()
    ws = agent.link
    if ws is None:
        return
    loop = asyncio.get_running_loop()
    idle = asyncio.Event()
    drained = True

    def wake() -> None:
        loop.call_soon_threadsafe(idle.set)

    if agent.inflight.when_idle(wake):
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LEAVE_DRAIN):
                await idle.wait()
        drained = idle.is_set()
    if drained:
        with contextlib.suppress(ConnectionClosed, OSError, TimeoutError):
            async with asyncio.timeout(0.5):
                await ws.send(agent.release_frame())


def _log_late_boot_failure(agent_id: str, booted: asyncio.Future[None]) -> None:
    """A boot-time refusal that came after `join_grace`: the app runs already, so log it."""
    if not booted.cancelled() and booted.exception() is not None:
        log.error("agent %s: %s; not retrying", agent_id, booted.exception())


__all__ = ["AsyncioAgent", "MigrationInfo", "keep_connected", "open_asyncio_agent"]
