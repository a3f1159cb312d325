"""The agent embedded in each application instance, on trio.

It holds one WebSocket to the coordinator, turns each phase notice into a call of the app's hook
(through the pure `AgentMachine`), and answers Ack when the hook returns or Nack with the error
text when it raises. `agent.is_applied(name)` is what the app consults to pick its query set.

This module is the trio I/O only: what the agent decides lives in `agent/session.py`, which
URL to try and what to log in `agent/dialing.py`, the fallback while no coordinator answers
in `agent/durable.py`; the asyncio agent (`agent/aio.py`) shares all three.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Callable, Sequence

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from agent.connecting import keep_durable_fresh, stay_connected
from agent.dialing import (
    Dialer,
    coordinator_urls,
    describe_network_error,
)
from agent.durable import ConnectFn, DurableState, read_for_boot
from agent.errors import (
    AgentError,
    AgentFenced,
    CoordinatorUnreachable,
    HandshakeRejected,
)
from agent.leasing import renew_until_lapsed
from agent.session import LEAVE_DRAIN, AgentSession, HookFn, MigrationInfo, ResyncStep
from statemachine.exceptions import unwrap_single_group
from statemachine.lease import DEFAULT_LEASE_SECONDS
from statemachine.protocol import PhaseNotice, Welcome
from statemachine.text import printable

log = logging.getLogger("lockstep.agent")


class Agent(AgentSession):
    """One application instance's view of the migration protocol, on trio."""

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
        self.disconnected = trio.Event()
        #: The live connection, so that leaving (`open_agent`'s exit) can close it politely.
        self.link: WebSocketConnection | None = None

    # ------------------------------------------------------------ the protocol
    async def handshake(self, ws: WebSocketConnection, token: str | None = None) -> Welcome:
        try:
            await ws.send_message(self.hello(token))
            frame = await ws.get_message()
        except ConnectionClosed as exc:
            raise _closed_in_handshake(exc) from None
        msg = self.read_welcome(frame)
        await self._resync(self.adopt_welcome(msg))
        self.session_started()
        self.disconnected = trio.Event()
        return msg

    async def _resync(self, steps: list[ResyncStep]) -> None:
        """After a reconnect, switch or revert to match what the coordinator says is applied."""
        for step in steps:
            self.log_resync(step)
            fn = self.hooks[step.hook]
            if fn is None:
                continue
            try:
                await fn(step.info())
            except Exception:
                self.log_resync_failure(step)

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
        await self.serve_leased(ws)

    async def keep_lease(self, ws: WebSocketConnection) -> None:
        """Renew the lease until it lapsed and no late grant came, or return at once if the
        coordinator grants none (`agent.leasing.renew_until_lapsed`)."""

        async def send(frame: str) -> None:
            with contextlib.suppress(ConnectionClosed):
                await ws.send_message(frame)

        await renew_until_lapsed(self, send=send, sleep=trio.sleep)

    async def serve_leased(self, ws: WebSocketConnection) -> None:
        """`run` and `keep_lease` together: whichever ends first ends the connection."""
        async with trio.open_nursery() as nursery:

            async def answer() -> None:
                await self.run(ws)
                nursery.cancel_scope.cancel()

            nursery.start_soon(answer)
            await self.keep_lease(ws)
            if self.renew_every is not None:  # lapsed: drop the link, reconnect, resync
                nursery.cancel_scope.cancel()

    async def run(self, ws: WebSocketConnection) -> None:
        """Answer notices on an already handshaken `ws` until the connection closes."""
        try:
            while True:
                try:
                    frame = await ws.get_message()
                except ConnectionClosed as exc:
                    self.lost(exc.reason)
                    return
                msg = self.read_frame(frame)
                if isinstance(msg, PhaseNotice):
                    await self._handle_notice(ws, msg)
        finally:
            self.connected = False
            self.disconnected.set()

    async def _handle_notice(self, ws: WebSocketConnection, notice: PhaseNotice) -> None:
        step = self.begin_notice(notice)
        if step is None:  # a deposed coordinator's notice: not acted on, not acked
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
            await ws.send_message(self.reply(notice, error))

    async def _drain_previous_version(self, notice: PhaseNotice) -> str | None:
        """After switching (APPLY) or reverting (ROLLBACK), wait for work still using the other
        query set; past the ack timeout, NACK rather than let the schema move under it."""
        target = self.drain_target(notice)
        if target is None:
            return None
        with trio.move_on_after(notice.ack_timeout):
            await self.inflight.drained(*target)
            return None
        return self.drain_failure(notice)


def _closed_in_handshake(exc: ConnectionClosed) -> HandshakeRejected:
    reason = exc.reason
    code = None if reason is None else reason.code
    text = "" if reason is None or not reason.reason else reason.reason
    return HandshakeRejected("closed", text or f"connection closed ({reason})", close_code=code)


def _network_cause(exc: BaseException, timeout: float) -> str:
    """trio-websocket's errors (and what they wrap) as a plain cause."""
    if isinstance(exc, ConnectionRejected):
        body = (exc.body or b"")[:200].decode("utf-8", "replace")
        said = printable(body).strip()
        return f"handshake rejected: HTTP {exc.status_code}" + (f": {said}" if said else "")
    return describe_network_error(exc, timeout)


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
            # A short disconnect timeout: a link dropped because the lease lapsed is often a
            # partition, where waiting for the close handshake would only delay the resync.
            async with open_websocket_url(
                url, ssl_context, connect_timeout=connect_timeout, disconnect_timeout=2
            ) as ws:
                try:
                    with trio.fail_after(connect_timeout):
                        await agent.handshake(ws, token)
                except trio.TooSlowError:
                    raise HandshakeRejected("timeout", "no welcome from the coordinator") from None
                on_joined()
                agent.link = ws
                try:
                    await agent.serve_leased(ws)
                finally:
                    agent.link = None
    except (OSError, HandshakeError, trio.TooSlowError) as exc:
        raise CoordinatorUnreachable(url, _network_cause(exc, connect_timeout)) from exc
    except ConnectionClosed as exc:
        raise CoordinatorUnreachable(url, f"connection closed: {exc.reason}") from exc


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
        if isinstance(cause, ssl.SSLError):
            raise CoordinatorUnreachable(url, f"TLS error: {cause}") from exc
        raise CoordinatorUnreachable(url, describe_network_error(exc, timeout)) from exc


async def keep_connected(
    agent: Agent,
    url: str | Sequence[str],
    *,
    token: str | None = None,
    connect_timeout: float = 10.0,
    reconnect: bool = True,
    max_backoff: float = 5.0,
    ssl_context: ssl.SSLContext | None = None,
    durable: DurableState | None = None,
    wait_connected: bool = False,
    task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `agent` on the coordinator URLs, reconnecting whenever the link drops.

    `task_status.started` is called when the agent booted: it joined a coordinator, or the
    first round over every URL failed and it fell back to the durable state (see
    `agent/durable.py`). A boot-time rejection that retrying cannot fix (bad token, protocol
    version, not lockstep at all) is raised; with `wait_connected`, so is a failed first
    round (`CoordinatorUnreachable`). After the boot, failures are logged (rate-limited) and
    retried with backoff, except final rejections, after which the agent stays disconnected
    and keeps its last known schema.
    """
    dialer = Dialer(
        agent.agent_id,
        coordinator_urls(url),
        max_backoff=max_backoff,
        wait_connected=wait_connected,
    )

    async def attempt(to: str, joined: Callable[[], None]) -> None:
        await _connect_once(agent, to, token, connect_timeout, ssl_context, joined)

    async def read_durable() -> frozenset[str] | str | None:
        return await trio.to_thread.run_sync(read_for_boot, durable, abandon_on_cancel=True)

    with unwrap_single_group():  # what the boot raises reaches the app as itself
        async with trio.open_nursery() as nursery:
            if durable is not None:
                nursery.start_soon(keep_durable_fresh, agent, read_durable, trio.sleep)
            await stay_connected(
                agent,
                dialer,
                attempt=attempt,
                sleep=trio.sleep,
                read_durable=None if durable is None else read_durable,
                reconnect=reconnect,
                booted=lambda: task_status.started(agent),
            )
            nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def open_agent(
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
) -> AsyncIterator[Agent]:
    """Join the coordinator at `url` (or the first of several URLs that accepts) as
    `agent_id` and answer its phases in the background.

    The app boots whether or not a coordinator is up: `open_agent` returns once the first
    round over the URLs joined or failed (at once for a refused port), or after
    `join_grace` seconds if an attempt hangs, and keeps connecting in the background.
    Meanwhile the agent picks the query set from the durable state in PostgreSQL when given
    a `dsn` (psycopg) or a `connect` factory (any DB-API connection), re-read every
    `lease_seconds`/3 (each read vouches for `lease_seconds`: give the coordinator's lease);
    without either it starts *fenced*: `agent.using` raises `AgentFenced` and `agent.ready`
    is False until it reaches a coordinator.
    With `wait_connected=True` it raises `CoordinatorUnreachable` instead when the first
    round over the URLs fails. It always raises `HandshakeRejected` at boot for a refusal
    retrying cannot fix (bad token, protocol version, a server that is not lockstep).

    Hooks are async callables taking a `MigrationInfo`: returning acks the phase, raising
    NACKs it. If the connection drops later, the agent reconnects with backoff (unless
    `reconnect=False`) and, on rejoining, runs `on_rollback`/`on_apply` for migrations that
    were rolled back or completed while it was away (`info.resynced` is True then). For a
    ``wss://`` URL, `ssl_context` is the client context that trusts the coordinator's
    certificate (default: the system's trust store).

    Leases (docs/leases.md): the agent renews the coordinator's lease every lease/3 s. If
    it lapses (no renewal granted within the lease: a partition, a dead coordinator) the
    agent fences itself, `using` raises `AgentFenced` and `ready` is False, until it has
    reconnected and resynced.
    """
    urls = coordinator_urls(url)
    durable = DurableState.maybe(dsn, connect)
    agent = Agent(
        agent_id,
        on_announce=on_announce,
        on_apply=on_apply,
        on_confirm=on_confirm,
        on_rollback=on_rollback,
        lease_seconds=lease_seconds,
        has_durable=durable is not None,
    )
    with unwrap_single_group():
        async with trio.open_nursery() as nursery:
            booted = trio.Event()
            failed: list[BaseException] = []

            async def connected_in_background() -> None:
                try:
                    await nursery.start(
                        functools.partial(
                            keep_connected,
                            agent,
                            urls,
                            token=token,
                            connect_timeout=connect_timeout,
                            reconnect=reconnect,
                            max_backoff=max_backoff,
                            ssl_context=ssl_context,
                            durable=durable,
                            wait_connected=wait_connected,
                        )
                    )
                except (AgentError, RuntimeError) as exc:  # RuntimeError: ended before boot
                    if booted.is_set() and isinstance(exc, AgentError):  # the app runs already
                        log.error("agent %s: %s; not retrying", agent_id, exc)
                    failed.append(exc)
                finally:
                    booted.set()

            nursery.start_soon(connected_in_background)
            with trio.move_on_after(math.inf if wait_connected else join_grace):
                await booted.wait()
            booted.set()
            if failed and not isinstance(failed[0], RuntimeError):
                raise failed[0]
            try:
                yield agent
            finally:
                # Also when the app's scope is cancelled or it raised: it stopped serving.
                with trio.CancelScope(shield=True):
                    await _leave(agent)
            nursery.cancel_scope.cancel()


async def _leave(agent: Agent) -> None:
    """Stop serving, then close the connection with "going away".

    When no `using` block is left in flight (waited for up to `LEAVE_DRAIN` seconds) the
    agent first sends `Release`, so the coordinator counts it departed at once instead of
    holding the phase until its lease certainly expired (what a rolling restart needs).
    Bounded, so stopping an app never waits on a slow or vanished coordinator."""
    agent.stop_serving()
    link = agent.link
    if link is None:
        return
    drained = await _drained(agent, LEAVE_DRAIN)
    with trio.move_on_after(0.5), contextlib.suppress(ConnectionClosed, OSError):
        if drained:
            await link.send_message(agent.release_frame())
        await link.aclose(1001, "agent stopping")


async def _drained(agent: Agent, timeout: float) -> bool:
    """Whether nothing is in flight, waiting up to `timeout` seconds for that."""
    idle = trio.Event()
    token = trio.lowlevel.current_trio_token()
    if not agent.inflight.when_idle(lambda: token.run_sync_soon(idle.set)):
        return True
    with trio.move_on_after(timeout):
        await idle.wait()
    return idle.is_set()


__all__ = [
    "Agent",
    "AgentError",
    "AgentFenced",
    "CoordinatorUnreachable",
    "HandshakeRejected",
    "MigrationInfo",
    "keep_connected",
    "open_agent",
]
