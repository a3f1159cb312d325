"""Every lockstep exception derives from `LockstepError`; this module holds the base and the
errors of the pure core that several packages raise.

Why one base: a host program embedding the coordinator or an agent can ``except LockstepError``
to tell lockstep's own, expected failures (bad input, a refused migration, an unreachable
coordinator) from bugs. Each class says when it is raised. Errors that belong to one layer
live beside the code that raises them and derive from this base too:

- `statemachine.gate.MigrationRejected`, `statemachine.migration.InvalidMigration`,
  `statemachine.protocol.ProtocolError`,
  `statemachine.diagrams.DiagramError`, and the SQL analysis errors in `statemachine.sql`;
- `coordinator.pg.errors.SqlFailure` (and `coordinator.backfill.BackfillFailed`),
  `coordinator.fleet.DuplicateAgent`;
- `agent.client.AgentError` (`CoordinatorUnreachable`, `HandshakeRejected`);
- the command line's `coordinator.cli.commands.CommandError` and the errors it wraps.

`unwrap_single_group` lives here too: it is how those errors reach users as themselves
instead of inside one of trio's exception groups.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class LockstepError(Exception):
    """Base of every exception lockstep raises on purpose."""


class AlreadyApplied(LockstepError):
    """Raised by `run_migration` when a migration of that name already completed on this
    database (the message says whether its SQL changed since)."""


@contextlib.contextmanager
def unwrap_single_group() -> Iterator[None]:
    """Re-raise the lone exception of an `ExceptionGroup` as itself.

    trio's strict exception groups wrap even a single error raised in a nursery; users of
    `open_coordinator`/`open_agent` should see their own `ValueError`, not a group around it.
    Groups of several errors are left alone: nothing would be honest to pick.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        inner: BaseException = group
        while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
            inner = inner.exceptions[0]
        if inner is group:
            raise
        raise inner from None
