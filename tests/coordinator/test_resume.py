"""A coordinator that starts after another one stopped finishes its migration, never guessing.

Each test writes the durable state a coordinator would have left at one point (the checkpoint,
and the journal of committed groups) on a real PostgreSQL, then opens a new coordinator on the
database and checks what it does: what reconnecting agents are told, what SQL runs again (none
that committed), and the final status. The SIGKILL versions with real processes are in
tests/system/test_crash_resume.py.
"""

from __future__ import annotations

import psycopg
import pytest
import trio

from agent import open_agent
from coordinator import open_coordinator
from coordinator.history import Deposed, PostgresHistory, PostgresJournal
from statemachine import Migration, MigrationMachine, MigrationStatus, Phase
from statemachine.checkpoint import Checkpoint
from tests.support.flow import columns, execute, history, make_users

ADD_EMAIL = "ALTER TABLE users ADD COLUMN email text"
DROP_NAME = "ALTER TABLE users DROP COLUMN name"

#: A resumed run waits out the leases its predecessor may have granted before CONTRACT
#: (1.1 x lease + 1 s): short here, the same behaviour.
LEASE = 1.0


def _migration(contract: bool = False) -> Migration:
    return Migration(
        "add_email",
        [ADD_EMAIL],
        rollback_sql=["ALTER TABLE users DROP COLUMN IF EXISTS email"],
        contract_sql=[DROP_NAME] if contract else [],
    )


async def _left_behind(
    dsn: str, migration: Migration, machine: MigrationMachine, journal: list[tuple[Phase, int]]
) -> None:
    """Write what a coordinator that died with `machine` in its state leaves in the database."""
    store = PostgresHistory(dsn)
    await store.ensure_schema()
    await store.record_start(migration, Checkpoint.of(machine))
    with psycopg.connect(dsn) as conn:
        marks = PostgresJournal(migration.id, 0, set())
        for phase, group in journal:
            marks.mark(conn, phase, group)


def _machine_in_apply(migration: Migration, agent: str) -> MigrationMachine:
    m = MigrationMachine(migration.id, has_contract=bool(migration.contract_sql), connected=[agent])
    m.start()
    m.receive_ack(agent, migration.id, Phase.ANNOUNCE)
    m.sql_committed()
    return m


async def test_a_run_left_in_announce_is_announced_again_and_completes(dsn: str) -> None:
    make_users(dsn)
    migration = _migration()
    machine = MigrationMachine(migration.id, has_contract=False, connected=["a1"])
    machine.start()
    await _left_behind(dsn, migration, machine, [])
    seen: list[Phase] = []

    async def on_announce(info: object) -> None:
        seen.append(Phase.ANNOUNCE)

    async with (
        open_coordinator(dsn, ack_timeout=10, lease_seconds=LEASE) as coord,
        open_agent(coord.url, agent_id="a1", on_announce=on_announce) as agent,
    ):
        result = await coord.run_migration(migration)  # the same file, run again
        assert result.status is MigrationStatus.COMPLETED, result.reason
        assert agent.is_applied("add_email")
    assert seen == [Phase.ANNOUNCE], "the resumed ANNOUNCE reached the agent that came back"
    assert "email" in columns(dsn)
    assert [row["status"] for row in history(dsn)] == ["completed"]


async def test_a_run_left_in_apply_does_not_run_its_committed_execute_again(dsn: str) -> None:
    make_users(dsn)
    migration = _migration(contract=True)
    execute(dsn, ADD_EMAIL)  # EXECUTE committed ...
    await _left_behind(dsn, migration, _machine_in_apply(migration, "a1"), [(Phase.EXECUTE, 0)])
    welcome_applied: list[bool] = []

    async with (
        open_coordinator(dsn, ack_timeout=10, lease_seconds=LEASE) as coord,
        open_agent(coord.url, agent_id="a1") as agent,
    ):
        welcome_applied.append(agent.is_applied("add_email"))
        result = await coord.run_migration(migration)
    assert welcome_applied == [True], "the Welcome said the expanded schema is live"
    assert result.status is MigrationStatus.COMPLETED, result.reason
    assert not any("already exists" in (a.error or "") for a in result.sql_attempts)
    assert [a.phase for a in result.sql_attempts] == [Phase.CONTRACT]
    assert "name" not in columns(dsn) and "email" in columns(dsn)
    assert any("resumed by a new coordinator" in w for w in result.warnings)


async def test_a_run_whose_contract_committed_only_goes_forward(dsn: str) -> None:
    make_users(dsn)
    migration = _migration(contract=True)
    execute(dsn, ADD_EMAIL, DROP_NAME)  # EXECUTE and CONTRACT committed
    machine = _machine_in_apply(migration, "a1")
    machine.receive_ack("a1", migration.id, Phase.APPLY)  # -> CONTRACT
    journal = [(Phase.EXECUTE, 0), (Phase.CONTRACT, 0)]
    await _left_behind(dsn, migration, machine, journal)
    async with (
        open_coordinator(dsn, ack_timeout=10, lease_seconds=LEASE) as coord,
        open_agent(coord.url, agent_id="a1") as agent,
    ):
        assert agent.is_applied("add_email"), "never send agents back to the dropped column"
        result = await coord.run_migration(migration)
    assert result.status is MigrationStatus.COMPLETED, result.reason
    assert result.sql_attempts == ()
    assert history(dsn)[0]["status"] == "completed"


async def test_a_new_epoch_fences_the_old_coordinators_writes(dsn: str) -> None:
    migration = _migration()
    old = PostgresHistory(dsn)
    await old.ensure_schema()
    machine = MigrationMachine(migration.id, has_contract=False)
    async with old.migration_lock():
        await old.record_start(migration, Checkpoint.of(machine))
        with psycopg.connect(dsn, autocommit=True) as conn:  # a takeover bumps the epoch
            conn.execute("UPDATE lockstep.leader SET epoch = epoch + 1")
        with pytest.raises(Deposed):
            await old.save(migration, Checkpoint.of(machine))
        journal = old.journal(migration)
        assert journal is not None
        with psycopg.connect(dsn) as conn, pytest.raises(Deposed):
            journal.mark(conn, Phase.EXECUTE, 0)


async def test_the_journal_commits_with_the_group_or_not_at_all(dsn: str) -> None:
    make_users(dsn)
    failing = Migration("bad", [ADD_EMAIL, "ALTER TABLE nope ADD COLUMN x int"], rollback_sql=[])
    async with open_coordinator(dsn, ack_timeout=5) as coord:
        result = await coord.run_migration(failing)
    assert result.status is MigrationStatus.FAILED
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT journal FROM lockstep.migrations").fetchone()
    assert row == ([],), "the failed transaction took its journal mark with it"
    ok = Migration("good", [ADD_EMAIL])
    async with open_coordinator(dsn, ack_timeout=5) as coord:
        assert (await coord.run_migration(ok)).status is MigrationStatus.COMPLETED
    with psycopg.connect(dsn) as conn:
        marks = conn.execute(
            "SELECT journal FROM lockstep.migrations WHERE name = 'good'"
        ).fetchone()
    assert marks == (["execute:0"],)


async def test_a_row_from_a_lockstep_without_checkpoints_is_marked_interrupted(dsn: str) -> None:
    store = PostgresHistory(dsn)
    await store.ensure_schema()
    execute(
        dsn,
        "INSERT INTO lockstep.migrations (id, name, checksum, status) "
        "VALUES ('x', 'old_style', 'c', 'running')",
    )
    async with open_coordinator(dsn):
        await trio.lowlevel.checkpoint()
    assert [(r.name, r.status) for r in await store.rows()] == [("old_style", "interrupted")]
