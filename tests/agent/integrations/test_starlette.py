"""lockstep_lifespan: the asyncio agent for the app's lifetime, composed with the app's own."""

from __future__ import annotations

import asyncio
import types
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from agent import AgentConfigError
from agent.integrations.starlette import lockstep_lifespan
from coordinator import open_coordinator


async def test_the_agent_is_on_app_state_before_the_apps_own_lifespan(dsn: str) -> None:
    async with open_coordinator(dsn) as coord:
        seen: dict[str, Any] = {}

        @asynccontextmanager
        async def own(app: Any) -> AsyncIterator[dict[str, str]]:
            seen["agent in own lifespan"] = app.state.lockstep.connected
            yield {"db": "pool"}
            seen["agent at own shutdown"] = app.state.lockstep.connected

        lifespan = lockstep_lifespan(coord.url, agent_id="api-{pid}", lifespan=own)
        app = types.SimpleNamespace(state=types.SimpleNamespace())

        async def serve() -> None:
            async with lifespan(app) as state:
                seen["state"] = state
                seen["id"] = app.state.lockstep.agent_id

        await trio.to_thread.run_sync(asyncio.run, serve())
        assert seen["agent in own lifespan"] is True and seen["agent at own shutdown"] is True
        assert seen["state"] == {"db": "pool"}
        assert seen["id"].startswith("api-") and seen["id"] != "api-{pid}"
        with trio.fail_after(10):  # the agent left when the app stopped
            while coord.agents:
                await trio.sleep(0.02)


def test_an_unknown_option_fails_where_the_app_is_built() -> None:
    with pytest.raises(AgentConfigError, match=r"unknown agent option\(s\) dns"):
        lockstep_lifespan("ws://127.0.0.1:1", dns="postgresql://")
