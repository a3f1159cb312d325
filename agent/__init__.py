"""The lockstep agent: embed it in each application instance (trio)."""

from agent.client import (
    Agent,
    AgentError,
    CoordinatorUnreachable,
    HandshakeRejected,
    MigrationInfo,
    open_agent,
)

__all__ = [
    "Agent",
    "AgentError",
    "CoordinatorUnreachable",
    "HandshakeRejected",
    "MigrationInfo",
    "open_agent",
]
