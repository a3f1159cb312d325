"""`lockstep status` lists the history, read-only, and says when a run waits for a coordinator."""

from __future__ import annotations

import json
import subprocess

import psycopg
import trio

from coordinator.history import ADVISORY_LOCK_KEY, PostgresHistory
from statemachine import Migration, MigrationMachine
from statemachine.checkpoint import Checkpoint
from tests.support.cli import run_lockstep


def _status(dsn: str) -> subprocess.CompletedProcess[str]:
    return run_lockstep("status", "--dsn", dsn)


def _start_and_die(dsn: str, name: str, *, churn: bool = False) -> None:
    """What a coordinator killed right after it recorded the start leaves behind; with
    `churn`, in ANNOUNCE with agent b departing and agent c departed."""
    history = PostgresHistory(dsn)
    migration = Migration(name, "SELECT 1")

    async def start() -> None:
        await history.ensure_schema()
        machine = MigrationMachine(migration.id, has_contract=False)
        if churn:
            machine = MigrationMachine(migration.id, has_contract=False, connected=["a", "b", "c"])
            machine.start()
            machine.agent_disconnected("b")
            machine.lease_expired("c")
        await history.record_start(migration, Checkpoint.of(machine))

    trio.run(start)


def _table(dsn: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT name, status, checkpoint::text, updated_at FROM lockstep.migrations"
        ).fetchall()


def test_status_is_read_only_and_says_the_next_coordinator_resumes(dsn: str) -> None:
    _start_and_die(dsn, "crashed")
    before = _table(dsn)
    proc = _status(dsn)
    assert proc.returncode == 0, proc.stderr
    assert "crashed" in proc.stdout and "running" in proc.stdout
    assert "the next coordinator that starts on this database resumes" in proc.stdout
    assert _table(dsn) == before, "status must not write"


def test_status_names_departing_and_departed_agents(dsn: str) -> None:
    _start_and_die(dsn, "churned", churn=True)
    proc = run_lockstep("status", "--dsn", dsn, "--json")
    assert proc.returncode == 0, proc.stderr
    (flight,) = json.loads(proc.stdout)["in_flight"]
    assert flight["departing"] == ["b"] and flight["departed"] == ["c"]
    assert flight["pending"] == ["a", "b"], "a departed agent owes nothing"
    text = _status(dsn).stdout
    assert "departing (lease not expired yet): b" in text
    assert "departed (lease expired, fenced): c" in text


def test_status_leaves_a_live_coordinators_run_alone(dsn: str) -> None:
    _start_and_die(dsn, "alive")
    with psycopg.connect(dsn, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
        proc = _status(dsn)
    assert proc.returncode == 0, proc.stderr
    assert "resumes" not in proc.stdout
    assert "alive" in proc.stdout and "running" in proc.stdout


def test_status_on_a_database_lockstep_never_touched(dsn: str) -> None:
    proc = _status(dsn)
    assert proc.returncode == 0, proc.stderr
    assert "no migrations recorded yet" in proc.stdout
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT to_regnamespace('lockstep')").fetchone() == (None,)


def test_status_without_a_database_is_a_clear_error() -> None:
    proc = run_lockstep("status", env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1
    assert "error: status needs a database" in proc.stderr
