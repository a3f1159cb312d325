"""Where migration SQL runs: one PostgreSQL transaction per phase.

The runner only sees the `Executor` protocol, so the property tests can drive the real runner with
a fake executor while every integration test uses `PostgresExecutor` on a real server.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

import psycopg

from coordinator import pgthread
from statemachine.phases import Phase
from statemachine.result import SqlAttempt


class SqlFailure(Exception):
    """A phase's SQL failed; the transaction was rolled back, nothing of it is left."""

    def __init__(
        self,
        statement: str | None,
        message: str,
        *,
        sqlstate: str | None = None,
        attempts: Sequence[SqlAttempt] = (),
    ) -> None:
        super().__init__(f"{statement!r}: {message}" if statement else message)
        self.statement = statement
        self.message = message
        self.sqlstate = sqlstate
        self.attempts = tuple(attempts)


class Executor(Protocol):
    async def run_phase(self, phase: Phase, statements: Sequence[str]) -> list[SqlAttempt]:
        """Run `statements` all-or-nothing for `phase`; raise `SqlFailure` on error."""
        ...


def _pg_message(exc: psycopg.Error) -> str:
    diag = exc.diag
    text = diag.message_primary or str(exc).strip()
    if diag.message_detail:
        text += f" (DETAIL: {diag.message_detail})"
    if exc.sqlstate:
        text += f" [SQLSTATE {exc.sqlstate}]"
    return text


class PostgresExecutor:
    """Runs each phase's statements in one transaction on a fresh connection."""

    def __init__(
        self,
        dsn: str,
        *,
        lock_timeout: float = 0.5,
        statement_timeout: float | None = None,
    ) -> None:
        self.dsn = dsn
        self.lock_timeout = lock_timeout
        self.statement_timeout = statement_timeout

    async def run_phase(self, phase: Phase, statements: Sequence[str]) -> list[SqlAttempt]:
        if not statements:
            return []
        started = time.monotonic()
        conn = await pgthread.connect(self.dsn)
        current: list[str | None] = [None]

        def transaction() -> None:
            with conn.transaction():
                conn.execute(
                    "SELECT set_config('lock_timeout', %s, true)",
                    (f"{int(self.lock_timeout * 1000)}ms",),
                )
                if self.statement_timeout is not None:
                    conn.execute(
                        "SELECT set_config('statement_timeout', %s, true)",
                        (f"{int(self.statement_timeout * 1000)}ms",),
                    )
                for statement in statements:
                    current[0] = statement
                    conn.execute(statement.encode())

        try:
            await pgthread.run_in_thread(conn, transaction)
        except psycopg.Error as exc:
            attempt = SqlAttempt(phase, 1, False, time.monotonic() - started, _pg_message(exc))
            raise SqlFailure(
                current[0], _pg_message(exc), sqlstate=exc.sqlstate, attempts=[attempt]
            ) from exc
        finally:
            await pgthread.close(conn)
        return [SqlAttempt(phase, 1, True, time.monotonic() - started)]


__all__ = ["Executor", "PostgresExecutor", "SqlFailure"]
