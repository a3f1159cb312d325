"""A lifespan for Starlette and FastAPI apps that embeds the asyncio agent.

``FastAPI(lifespan=lockstep_lifespan(URLS, dsn=DSN))`` opens `open_asyncio_agent` when the
app starts and closes it when the app stops; requests find it on ``app.state.lockstep``.
Each uvicorn worker process (``--workers N``, or gunicorn's uvicorn workers) runs the
lifespan once, so each gets its own agent, its id naming its process (``{pid}``). An app's
own lifespan composes: pass it as `lifespan=` and it runs inside, with the agent already
there; what it yields (Starlette's lifespan state) is passed on.

Starlette itself is not imported: the helper needs only ``app.state``. The asyncio agent
needs the ``asyncio`` extra; importing this module without it raises `MissingExtra`.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from agent.aio import AsyncioAgent, open_asyncio_agent
from agent.errors import AgentConfigError
from agent.integrations.common import agent_id_for_this_process

#: The keyword arguments `open_asyncio_agent` takes besides the URL and the id.
AGENT_OPTIONS = frozenset(inspect.signature(open_asyncio_agent).parameters) - {"url", "agent_id"}

Lifespan = Callable[[Any], AbstractAsyncContextManager[Any]]


def lockstep_lifespan(
    urls: str | Sequence[str],
    *,
    agent_id: str = "asgi-{hostname}-{pid}",
    state_name: str = "lockstep",
    lifespan: Lifespan | None = None,
    **options: Any,
) -> Lifespan:
    """A lifespan that runs the asyncio agent for the app's lifetime.

    `options` are `open_asyncio_agent`'s (``dsn=``, ``token=``, async hooks...); `agent_id`
    may contain ``{hostname}`` and ``{pid}``. The agent is set as ``app.state.<state_name>``
    before `lifespan` (the app's own, optional) starts.
    """
    unknown = sorted(set(options) - AGENT_OPTIONS)
    if unknown:  # fail where the app is built, not at its first startup
        known = ", ".join(sorted(AGENT_OPTIONS))
        raise AgentConfigError(f"unknown agent option(s) {', '.join(unknown)}; known: {known}")
    agent_id_for_this_process(agent_id)

    @contextlib.asynccontextmanager
    async def run(app: Any) -> AsyncIterator[Any]:
        async with open_asyncio_agent(
            urls, agent_id=agent_id_for_this_process(agent_id), **options
        ) as agent:
            setattr(app.state, state_name, agent)
            if lifespan is None:
                yield None
            else:
                async with lifespan(app) as state:
                    yield state

    return run


__all__ = ["AsyncioAgent", "lockstep_lifespan"]
