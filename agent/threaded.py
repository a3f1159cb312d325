"""The agent for threaded (non-trio) applications: Django, Flask, plain scripts.

`ThreadedAgent` runs a trio event loop in one thread that the application starts and stops
explicitly (nothing starts behind its back). Hooks are ordinary functions: they run in a worker
thread, so they may block on the app's own database connection; returning acks the phase,
raising NACKs it, exactly like the async hooks of `open_agent`.
"""

from __future__ import annotations

import contextlib
import ssl
import threading
from collections.abc import Callable
from types import TracebackType

import trio

from agent.client import Agent, AgentError, HookFn, MigrationInfo, open_agent

SyncHook = Callable[[MigrationInfo], object]


def _in_worker_thread(hook: SyncHook | None) -> HookFn | None:
    if hook is None:
        return None

    async def run(info: MigrationInfo) -> object:
        return await trio.to_thread.run_sync(hook, info)

    return run


class ThreadedAgent:
    """An agent living in its own thread; use as a context manager or `start()`/`stop()`."""

    def __init__(
        self,
        url: str,
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
    ) -> None:
        self.url = url
        self.agent_id = agent_id
        self._hooks = {
            "on_announce": _in_worker_thread(on_announce),
            "on_apply": _in_worker_thread(on_apply),
            "on_confirm": _in_worker_thread(on_confirm),
            "on_rollback": _in_worker_thread(on_rollback),
        }
        self._token = token
        self._connect_timeout = connect_timeout
        self._reconnect = reconnect
        self._ssl_context = ssl_context
        self._agent: Agent | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ for the app
    def is_applied(self, name: str) -> bool:
        """Safe from any thread: which query set should this instance use?"""
        agent = self._agent
        return agent is not None and agent.is_applied(name)

    def using(self, name: str) -> contextlib.AbstractContextManager[bool]:
        """`Agent.using` for threaded apps: wrap each request that picks queries by `name`."""
        agent = self._agent
        if agent is None:
            raise RuntimeError("start() the ThreadedAgent before using it")
        return agent.using(name)

    @property
    def connected(self) -> bool:
        return self._agent is not None and self._agent.connected

    def start(self, timeout: float | None = None) -> ThreadedAgent:
        """Start the agent thread and wait until it joined the coordinator (or failed).

        Raises what `open_agent` raises (`CoordinatorUnreachable`, `HandshakeRejected`).
        """
        if self._thread is not None:
            raise RuntimeError("this ThreadedAgent was already started")
        self._thread = threading.Thread(
            target=trio.run, args=(self._main,), name=f"lockstep-agent-{self.agent_id}"
        )
        self._thread.start()
        wait = self._connect_timeout + 5 if timeout is None else timeout
        if not self._ready.wait(wait):
            raise AgentError(f"agent {self.agent_id} did not join within {wait:g} s")
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect and end the agent thread."""
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

    # ------------------------------------------------------------ the thread
    async def _main(self) -> None:
        self._trio_token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        try:
            async with open_agent(
                self.url,
                agent_id=self.agent_id,
                token=self._token,
                connect_timeout=self._connect_timeout,
                reconnect=self._reconnect,
                ssl_context=self._ssl_context,
                **self._hooks,
            ) as agent:
                self._agent = agent
                self._ready.set()
                await self._stop.wait()
        except Exception as exc:
            self._error = exc
        finally:
            self._ready.set()
