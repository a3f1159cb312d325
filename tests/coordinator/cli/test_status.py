"""`lockstep status` lists the history and marks runs a dead coordinator left behind."""

from __future__ import annotations

import subprocess

import psycopg
import trio

from coordinator import open_coordinator
from coordinator.history import ADVISORY_LOCK_KEY, PostgresHistory
from statemachine import Migration
from tests.support.cli import run_lockstep


def _status(dsn: str) -> subprocess.CompletedProcess[str]:
    return run_lockstep("status", "--dsn", dsn)


def test_status_marks_a_dead_coordinators_run_interrupted(dsn: str) -> None:
    history = PostgresHistory(dsn)

    async def start_and_die() -> None:
        await history.ensure_schema()
        await history.record_start(Migration("crashed_mid_run", "SELECT 1"))

    trio.run(start_and_die)
    proc = _status(dsn)
    assert proc.returncode == 0, proc.stderr
    assert "marked interrupted: crashed_mid_run" in proc.stdout
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT status, reason FROM lockstep.migrations").fetchone()
    assert row is not None and row[0] == "interrupted" and "rollback did not run" in row[1]


def test_status_leaves_a_live_coordinators_run_alone(dsn: str) -> None:
    history = PostgresHistory(dsn)

    async def start() -> None:
        await history.ensure_schema()
        await history.record_start(Migration("still_running", "SELECT 1"))

    trio.run(start)
    with psycopg.connect(dsn, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
        proc = _status(dsn)
    assert proc.returncode == 0, proc.stderr
    assert "marked interrupted" not in proc.stdout
    assert "still_running" in proc.stdout and "running" in proc.stdout


def test_status_without_a_database_is_a_clear_error() -> None:
    proc = run_lockstep("status", env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1
    assert "error: status needs a database" in proc.stderr


async def test_a_new_coordinator_marks_a_dead_ones_run_interrupted(dsn: str) -> None:
    history = PostgresHistory(dsn)
    await history.ensure_schema()
    await history.record_start(Migration("crashed_mid_run", "SELECT 1"))
    async with open_coordinator(dsn):
        pass
    [row] = await history.rows()
    assert (row.name, row.status) == ("crashed_mid_run", "interrupted")
