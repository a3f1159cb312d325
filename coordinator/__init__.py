"""The lockstep coordinator: serves agents over WebSocket and drives migrations (trio)."""

from coordinator.core import Coordinator, open_coordinator, serve_coordinator
from coordinator.executor import Executor, PostgresExecutor, SqlFailure
from coordinator.history import AlreadyApplied, InMemoryHistory, PostgresHistory

__all__ = [
    "AlreadyApplied",
    "Coordinator",
    "Executor",
    "InMemoryHistory",
    "PostgresExecutor",
    "PostgresHistory",
    "SqlFailure",
    "open_coordinator",
    "serve_coordinator",
]
