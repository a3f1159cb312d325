"""The lockstep agent: embed it in each application instance (trio, or threaded apps via
`ThreadedAgent`)."""

from agent.client import (
    Agent,
    AgentError,
    CoordinatorUnreachable,
    HandshakeRejected,
    MigrationInfo,
    open_agent,
)
from agent.threaded import ThreadedAgent

__all__ = [
    "Agent",
    "AgentError",
    "CoordinatorUnreachable",
    "HandshakeRejected",
    "MigrationInfo",
    "ThreadedAgent",
    "open_agent",
]
