"""The lockstep coordinator: serves agents over WebSocket and drives migrations (trio).

Needs the ``coordinator`` extra (``pip install 'lockstep[coordinator]'``): psycopg, pglast
and rich are not installed for applications that only embed an agent. The public names are
imported lazily so that `coordinator.cli` can say exactly what is missing instead of failing
with an ImportError traceback.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from coordinator.backfill import BackfillProgress
    from coordinator.core import Coordinator, open_coordinator, serve_coordinator
    from coordinator.executor import Executor, PostgresExecutor
    from coordinator.history import InMemoryHistory, PostgresHistory
    from coordinator.leader import Deposed, LeadershipLost
    from coordinator.pg.attempts import LockRetry, RetryPolicy
    from coordinator.pg.errors import DatabaseFailed, SqlFailure
    from coordinator.queue import request_abort, submit, watch
    from coordinator.service import Service, open_service
    from coordinator.snapshot import read_snapshot
    from statemachine.exceptions import AlreadyApplied
    from statemachine.gate import MigrationRejected

#: Public name -> the module that defines it.
_EXPORTS = {
    "AlreadyApplied": "statemachine.exceptions",
    "BackfillProgress": "coordinator.backfill",
    "Coordinator": "coordinator.core",
    "Executor": "coordinator.executor",
    "InMemoryHistory": "coordinator.history",
    "LockRetry": "coordinator.pg.attempts",
    "MigrationRejected": "statemachine.gate",
    "PostgresExecutor": "coordinator.executor",
    "PostgresHistory": "coordinator.history",
    "RetryPolicy": "coordinator.pg.attempts",
    "SqlFailure": "coordinator.pg.errors",
    "open_coordinator": "coordinator.core",
    "open_service": "coordinator.service",
    "Service": "coordinator.service",
    "submit": "coordinator.queue",
    "watch": "coordinator.queue",
    "request_abort": "coordinator.queue",
    "read_snapshot": "coordinator.snapshot",
    "Deposed": "coordinator.leader",
    "LeadershipLost": "coordinator.leader",
    "DatabaseFailed": "coordinator.pg.errors",
    "serve_coordinator": "coordinator.core",
}

__all__ = [
    "AlreadyApplied",
    "BackfillProgress",
    "Coordinator",
    "DatabaseFailed",
    "Deposed",
    "Executor",
    "InMemoryHistory",
    "LeadershipLost",
    "LockRetry",
    "MigrationRejected",
    "PostgresExecutor",
    "PostgresHistory",
    "RetryPolicy",
    "Service",
    "SqlFailure",
    "open_coordinator",
    "open_service",
    "read_snapshot",
    "request_abort",
    "serve_coordinator",
    "submit",
    "watch",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'coordinator' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
