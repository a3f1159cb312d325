"""The lockstep coordinator: serves agents over WebSocket and drives migrations (trio)."""

from coordinator.backfill import BackfillProgress
from coordinator.core import Coordinator, open_coordinator, serve_coordinator
from coordinator.executor import Executor, LockRetry, PostgresExecutor, RetryPolicy, SqlFailure
from coordinator.history import AlreadyApplied, InMemoryHistory, PostgresHistory
from coordinator.runner import MigrationRejected

__all__ = [
    "AlreadyApplied",
    "BackfillProgress",
    "Coordinator",
    "Executor",
    "InMemoryHistory",
    "LockRetry",
    "MigrationRejected",
    "PostgresExecutor",
    "PostgresHistory",
    "RetryPolicy",
    "SqlFailure",
    "open_coordinator",
    "serve_coordinator",
]
