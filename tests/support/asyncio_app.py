"""An asyncio application in its own thread, embedding the asyncio agent.

The tests run under trio (the coordinator is trio); an asyncio app needs a loop of its own,
so `AsyncioApp` runs ``asyncio.run`` in a thread, as a real FastAPI worker would run its loop.
Hooks are recorded; `call` runs a coroutine function on the app's loop and returns its result.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from agent import MigrationInfo
from agent.aio import AsyncioAgent, open_asyncio_agent

T = TypeVar("T")


class AsyncioApp:
    def __init__(self, url: str | Sequence[str], *, agent_id: str, **options: Any) -> None:
        self.url = url
        self.agent_id = agent_id
        self.options = options
        self.calls: list[tuple[str, str, bool]] = []  # (hook, migration, resynced)
        self.agent: AsyncioAgent | None = None
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"asyncio-{agent_id}", daemon=True)

    def hook(self, name: str) -> Callable[[MigrationInfo], Awaitable[None]]:
        async def record(info: MigrationInfo) -> None:
            await asyncio.sleep(0)  # a real await on the app's loop
            self.calls.append((name, info.name, info.resynced))

        return record

    def start(self, timeout: float = 30) -> AsyncioApp:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the asyncio app did not start")
        if self.error is not None:
            raise self.error
        return self

    def stop(self, timeout: float = 10) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and self._thread.is_alive():
            loop.call_soon_threadsafe(stop.set)
        self._thread.join(timeout)

    def call(self, fn: Callable[[], Awaitable[T]], timeout: float = 30) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(fn(), self._loop).result(timeout)  # type: ignore[arg-type]

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self.error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        hooks = {h: self.hook(h) for h in ("on_announce", "on_apply", "on_confirm", "on_rollback")}
        options = {**hooks, **self.options}
        async with open_asyncio_agent(self.url, agent_id=self.agent_id, **options) as agent:
            self.agent = agent
            self._ready.set()
            await self._stop.wait()
