"""PostgreSQL errors as lockstep reports them: one line of text, and `SqlFailure`.

Every layer that talks to PostgreSQL (executor, backfill, history, lock diagnosis, the
command line's db check) turns a psycopg error into text with `pg_message`, so an operator
reads the same wording wherever the failure surfaced.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import psycopg

from statemachine.exceptions import LockstepError
from statemachine.result import SqlAttempt

if TYPE_CHECKING:
    from coordinator.pg.locks import BlockingSession


def pg_message(exc: psycopg.Error) -> str:
    """PostgreSQL's primary message, its DETAIL and SQLSTATE, or libpq's text, on one line."""
    diag = exc.diag
    primary = diag.message_primary
    if primary:
        text = primary
        if diag.message_detail:
            text += f" (DETAIL: {diag.message_detail})"
        if exc.sqlstate:
            text += f" [SQLSTATE {exc.sqlstate}]"
    else:
        text = str(exc).removeprefix("connection failed: ")
    lines = (" ".join(line.split()) for line in text.splitlines())
    return "; ".join(line for line in lines if line) or type(exc).__name__


#: SQLSTATEs that mean "the session went away", not "the statement is wrong": the server
#: terminated it (57P01, pg_terminate_backend or a fast shutdown), crashed (57P02), is
#: starting (57P03), or the connection failed (class 08).
_CONNECTION_LOST = frozenset({"57P01", "57P02", "57P03"})


def is_connection_failure(exc: BaseException) -> bool:
    """True for an error that says nothing about the SQL: the database or the network
    failed. Such an attempt is retried once the database answers again, never rolled back
    (rolling back needs the database as much as going forward does)."""
    if not isinstance(exc, psycopg.OperationalError):
        return False
    state = exc.sqlstate
    return state is None or state.startswith("08") or state in _CONNECTION_LOST


class DatabaseFailed(LockstepError):
    """Raised by `Coordinator.run_migration` when lockstep's own bookkeeping in the database
    (history, checkpoints) failed with an error that waiting does not fix (permissions, a
    dropped schema, or the database unreachable before the run started). The run stopped
    where its durable state says; the next coordinator resumes it from there."""


class SqlFailure(LockstepError):
    """Raised by an executor when a phase's SQL failed; the failing group was rolled back (or
    dropped what it left), so the runner can decide what ROLLBACK must undo.

    `committed_groups` counts the execution groups of the phase that committed before the
    failure: 0 means nothing of the phase is left in the database.
    """

    def __init__(
        self,
        statement: str | None,
        message: str,
        *,
        sqlstate: str | None = None,
        attempts: Sequence[SqlAttempt] = (),
        committed_groups: int = 0,
        blockers: Sequence[BlockingSession] = (),
    ) -> None:
        super().__init__(f"{statement!r}: {message}" if statement else message)
        self.statement = statement
        self.message = message
        self.sqlstate = sqlstate
        self.attempts = tuple(attempts)
        self.committed_groups = committed_groups
        self.blockers = tuple(blockers)

    def with_attempts(
        self, attempts: Sequence[SqlAttempt], *, committed_groups: int | None = None
    ) -> SqlFailure:
        """The same failure carrying the attempts (and commit count) the caller knows of: the
        executor adds them as the failure travels up from an attempt to the phase."""
        return SqlFailure(
            self.statement,
            self.message,
            sqlstate=self.sqlstate,
            attempts=attempts,
            committed_groups=self.committed_groups
            if committed_groups is None
            else committed_groups,
            blockers=self.blockers,
        )


__all__ = ["DatabaseFailed", "SqlFailure", "is_connection_failure", "pg_message"]
