"""The database is a dependency that fails: lost connections mid-migration, broken state.

Real PostgreSQL: the executor's session is terminated with `pg_terminate_backend` while its
statement runs (what a failover, a restart of a pooler or an operator does to one session).
The group is retried once the database answers, not rolled back, and the migration completes;
SQL that committed is never run twice (the journal is read back).
"""

from __future__ import annotations

import psycopg
import pytest
import trio

from agent import open_agent
from coordinator import open_coordinator
from coordinator.events import Reporter
from coordinator.pg.attempts import AttemptOutcome, DatabaseUnreachable, LockSafeSession
from coordinator.pg.errors import DatabaseFailed
from statemachine import Migration, MigrationStatus, Phase
from tests.support.flow import EventLog, columns, make_users

SLOW = "SELECT pg_sleep(3)"


def _terminate(dsn: str, like: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE query LIKE %s AND pid <> pg_backend_pid()",
            (like,),
        ).fetchall()
    return len(rows)


async def test_a_terminated_executor_session_is_retried_and_the_migration_completes(
    dsn: str,
) -> None:
    make_users(dsn)
    migration = Migration(
        "add_email",
        ["ALTER TABLE users ADD COLUMN email text", SLOW],
        rollback_sql=["ALTER TABLE users DROP COLUMN IF EXISTS email"],
    )
    events = EventLog()
    async with open_coordinator(dsn) as coord, open_agent(coord.url, agent_id="a1"):
        coord.subscribe(events)
        async with trio.open_nursery() as nursery:
            results = []

            async def run() -> None:
                results.append(await coord.run_migration(migration, force=True))

            nursery.start_soon(run)
            with trio.fail_after(20):
                while not await trio.to_thread.run_sync(_terminate, dsn, "SELECT pg_sleep(3)%"):
                    await trio.sleep(0.05)
    [result] = results
    assert result.status is MigrationStatus.COMPLETED, result.reason
    outages = [e for e in events.events if isinstance(e, DatabaseUnreachable)]
    assert outages, "the lost connection was not reported"
    assert "terminat" in outages[0].message
    assert any(not a.ok and "database unreachable" in (a.detail or "") for a in result.sql_attempts)
    assert columns(dsn).count("email") == 1


async def test_bookkeeping_that_cannot_be_written_is_a_clear_error(dsn: str) -> None:
    make_users(dsn)
    async with open_coordinator(dsn) as coord:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute("DROP TABLE lockstep.migrations")
        with pytest.raises(DatabaseFailed, match="could not be read or written"):
            await coord.run_migration(Migration("m", ["ALTER TABLE users ADD COLUMN x int"]))
    assert "x" not in columns(dsn)


async def test_an_attempt_whose_commit_the_journal_shows_is_not_run_again() -> None:
    """The connection died after COMMIT reached the server: the journal, read back, says
    the group committed, so it is not run a second time."""
    session = LockSafeSession("postgresql://unused")
    calls: list[int] = []

    async def attempt() -> AttemptOutcome[None]:
        calls.append(1)
        return AttemptOutcome(error=psycopg.errors.AdminShutdown("terminated"), statement="x")

    async def committed() -> bool:
        return True

    def record(*args: object) -> None:
        pass

    events = EventLog()
    await session.with_lock_retries(
        Phase.EXECUTE,
        "group 1/1",
        ["x"],
        attempt,
        record,
        Reporter("m", events),
        committed=committed,
    )
    assert calls == [1]
    assert any(isinstance(e, DatabaseUnreachable) for e in events.events)
