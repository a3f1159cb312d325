"""The agent for threaded (non-trio) applications: Django, Flask, gunicorn workers, scripts.

`ThreadedAgent` runs a trio event loop in one daemon thread. Hooks are ordinary functions:
they run in a worker thread, so they may block on the app's own database connection;
returning acks the phase, raising NACKs it, exactly like the async hooks of `open_agent`.

Lifecycle, as app servers need it:

- `start()` returns within `join_grace` seconds even when no coordinator is up (the agent
  keeps connecting in the background and meanwhile uses the durable state of `dsn=` /
  `connect=`); ``wait_connected=True`` restores the strict boot that raises
  `CoordinatorUnreachable`;
- the thread is a daemon and an `atexit` hook stops every running agent, so a script that
  never calls `stop()` still exits, after closing its socket cleanly;
- fork safety: an agent started before ``os.fork()`` refuses to be used in the child
  (`AgentForked`). Restarting it there would put two processes under one agent id (the
  coordinator refuses the second, or worse, one ack would answer for both); each worker must
  start its own agent, with its own id, in gunicorn's ``post_fork``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import ssl
import threading
import weakref
from collections.abc import Callable, Sequence
from types import TracebackType

import trio

from agent.client import Agent, open_agent
from agent.dialing import coordinator_urls
from agent.durable import ConnectFn
from agent.errors import AgentError, AgentForked
from agent.session import HookFn, MigrationInfo
from statemachine.lease import DEFAULT_LEASE_SECONDS

SyncHook = Callable[[MigrationInfo], object]

#: Started agents not stopped yet: the `atexit` hook stops them.
_RUNNING: weakref.WeakSet[ThreadedAgent] = weakref.WeakSet()


def _in_worker_thread(hook: SyncHook | None) -> HookFn | None:
    if hook is None:
        return None

    async def run(info: MigrationInfo) -> object:
        # Abandoned only when the agent stops: stop() must not wait on a slow hook.
        return await trio.to_thread.run_sync(hook, info, abandon_on_cancel=True)

    return run


class ThreadedAgent:
    """An agent living in its own thread; use as a context manager or `start()`/`stop()`."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        agent_id: str,
        on_announce: SyncHook | None = None,
        on_apply: SyncHook | None = None,
        on_confirm: SyncHook | None = None,
        on_rollback: SyncHook | None = None,
        token: str | None = None,
        connect_timeout: float = 10.0,
        reconnect: bool = True,
        ssl_context: ssl.SSLContext | None = None,
        dsn: str | None = None,
        connect: ConnectFn | None = None,
        wait_connected: bool = False,
        join_grace: float = 5.0,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
    ) -> None:
        self.urls = coordinator_urls(url)
        self.url = self.urls[0]
        self.agent_id = agent_id
        self._on_announce = _in_worker_thread(on_announce)
        self._on_apply = _in_worker_thread(on_apply)
        self._on_confirm = _in_worker_thread(on_confirm)
        self._on_rollback = _in_worker_thread(on_rollback)
        self._token = token
        self._connect_timeout = connect_timeout
        self._reconnect = reconnect
        self._ssl_context = ssl_context
        self._dsn = dsn
        self._connect = connect
        self._wait_connected = wait_connected
        self._join_grace = join_grace
        self._lease_seconds = lease_seconds
        self._agent: Agent | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread: threading.Thread | None = None
        self._pid: int | None = None

    # ------------------------------------------------------------ for the app
    def is_applied(self, name: str) -> bool:
        """Safe from any thread: which query set should this instance use?"""
        self._check_process()
        agent = self._agent
        return agent is not None and agent.is_applied(name)

    def using(self, name: str) -> contextlib.AbstractContextManager[bool]:
        """`Agent.using` for threaded apps: wrap each request that picks queries by `name`."""
        self._check_process()
        agent = self._agent
        if agent is None:
            raise AgentError("start() the ThreadedAgent before using it")
        return agent.using(name)

    def fenced_reason(self) -> str | None:
        """Why `using` would raise `AgentFenced` now, or None (see `Agent.fenced_reason`)."""
        self._check_process()
        agent = self._agent
        return "the agent was not started" if agent is None else agent.fenced_reason()

    @property
    def ready(self) -> bool:
        """For readiness probes: True only while `using` would not raise `AgentFenced`."""
        return self.fenced_reason() is None

    def health(self) -> dict[str, object]:
        """`Agent.health` from any thread: what a readiness endpoint may show."""
        self._check_process()
        agent = self._agent
        if agent is None:
            return {"ready": False, "reason": "the agent was not started", "connected": False}
        return agent.health()

    @property
    def applied(self) -> frozenset[str]:
        self._check_process()
        agent = self._agent
        return frozenset() if agent is None else agent.applied

    @property
    def connected(self) -> bool:
        self._check_process()
        return self._agent is not None and self._agent.connected

    @property
    def synced(self) -> bool:
        """True once a Welcome or the durable state said which migrations are applied."""
        self._check_process()
        return self._agent is not None and self._agent.synced

    @property
    def agent(self) -> Agent | None:
        """The trio agent inside the thread (read-only use: its state, `sessions`...)."""
        return self._agent

    def start(self, timeout: float | None = None) -> ThreadedAgent:
        """Start the agent thread; returns once it booted (joined, or fell back to the durable
        state), within `join_grace` seconds unless ``wait_connected=True``.

        Raises what `open_agent` raises at boot (`HandshakeRejected`; `CoordinatorUnreachable`
        with ``wait_connected=True``).
        """
        self._check_process()
        if self._thread is not None:
            raise AgentError("this ThreadedAgent was already started")
        self._pid = os.getpid()
        self._thread = threading.Thread(
            target=trio.run,
            args=(self._main,),
            name=f"lockstep-agent-{self.agent_id}",
            daemon=True,  # never keeps the process alive; the atexit hook closes it cleanly
        )
        _RUNNING.add(self)
        self._thread.start()
        if timeout is not None:
            wait = timeout
        elif self._wait_connected:
            wait = self._connect_timeout * len(self.urls) + 5
        else:
            wait = self._join_grace + 5
        if not self._ready.wait(wait):
            raise AgentError(f"agent {self.agent_id} did not start within {wait:g} s")
        if self._error is not None:
            self._thread.join()
            _RUNNING.discard(self)
            raise self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect and end the agent thread (a no-op in a forked child, and when stopped)."""
        if self._pid is not None and self._pid != os.getpid():
            return  # the thread belongs to the parent process; nothing of it runs here
        _RUNNING.discard(self)
        thread, token, stop = self._thread, self._trio_token, self._stop
        if thread is None:
            return
        if token is not None and stop is not None and thread.is_alive():
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(stop.set, trio_token=token)
        thread.join(timeout)

    def __enter__(self) -> ThreadedAgent:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _check_process(self) -> None:
        if self._pid is not None and self._pid != os.getpid():
            raise AgentForked(
                f"ThreadedAgent {self.agent_id!r} was started in process {self._pid}, before a "
                f"fork; this is process {os.getpid()}. Start a ThreadedAgent in each worker "
                "after the fork (gunicorn: the post_fork hook), with its own agent_id"
            )

    # ------------------------------------------------------------ the thread
    async def _main(self) -> None:
        self._trio_token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        try:
            async with open_agent(
                self.urls,
                agent_id=self.agent_id,
                token=self._token,
                connect_timeout=self._connect_timeout,
                reconnect=self._reconnect,
                ssl_context=self._ssl_context,
                dsn=self._dsn,
                connect=self._connect,
                wait_connected=self._wait_connected,
                join_grace=self._join_grace,
                lease_seconds=self._lease_seconds,
                on_announce=self._on_announce,
                on_apply=self._on_apply,
                on_confirm=self._on_confirm,
                on_rollback=self._on_rollback,
            ) as agent:
                self._agent = agent
                self._ready.set()
                await self._stop.wait()
        except Exception as exc:
            self._error = exc
        finally:
            self._ready.set()


def _stop_all_at_exit() -> None:
    """The interpreter is exiting: close every agent still running, briefly."""
    for agent in list(_RUNNING):
        agent.stop(timeout=1.0)


atexit.register(_stop_all_at_exit)
