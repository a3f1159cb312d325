"""The lockstep agent: embed it in each application instance (trio `open_agent`, threaded apps
via `ThreadedAgent`, asyncio apps via `agent.aio.open_asyncio_agent`)."""

from agent.client import Agent, open_agent
from agent.errors import (
    AgentConfigError,
    AgentError,
    AgentFenced,
    AgentForked,
    CoordinatorUnreachable,
    HandshakeRejected,
)
from agent.session import MigrationInfo
from agent.threaded import ThreadedAgent

__all__ = [
    "Agent",
    "AgentConfigError",
    "AgentError",
    "AgentFenced",
    "AgentForked",
    "CoordinatorUnreachable",
    "HandshakeRejected",
    "MigrationInfo",
    "ThreadedAgent",
    "open_agent",
]
