"""`make fault`: the serving leader dies, loses its lock or its database, at every point.

Real ``lockstep serve`` processes, a real application process with a query loop per agent,
real PostgreSQL (tests/support/failover.py). Each case prints its outcome; the module prints
the table of docs/durability.md at the end (and writes it to $LOCKSTEP_FAULT_REPORT if set).

- SIGKILL of the leader at each of the seven points, five runs each: three with a standby
  that takes over, two with the leader restarted on its port;
- ``pg_terminate_backend`` of the leader's lock session while it waits for APPLY acks and
  while its EXECUTE statement runs: the process lives on, must stop acting, and the standby
  must finish the migration exactly once;
- two replicas started at the same moment on a database with a queued migration;
- the database server restarted mid-migration.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.support.failover import POINTS, Outcome, leader_epoch, run_fault, summary_table
from tests.support.flow import history, make_users
from tests.support.pgrestart import RestartUnavailable, restart_postgres
from tests.support.processes import free_port, lockstep_process, reap, serve

pytestmark = pytest.mark.fault

RUNS = 5
OUTCOMES: list[Outcome] = []


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    if OUTCOMES:
        table = summary_table(OUTCOMES)
        print("\n" + table)
        target = os.environ.get("LOCKSTEP_FAULT_REPORT")
        if target:
            Path(target).write_text(table + "\n")


def _record(outcome: Outcome) -> Outcome:
    OUTCOMES.append(outcome)
    print(outcome)
    for name, text in outcome.logs.items():
        print(f"---- {name}\n{text}")
    return outcome


@pytest.mark.parametrize("run", range(RUNS))
@pytest.mark.parametrize("point", list(POINTS))
async def test_sigkill_of_the_leader(dsn: str, tmp_path: Path, point: str, run: int) -> None:
    mode = "standby" if run < 3 else "restart"
    outcome = _record(await run_fault(dsn, POINTS[point], tmp_path, mode=mode))
    assert outcome.ok, outcome.problems
    assert outcome.queries_ok > 0


@pytest.mark.parametrize("run", range(2))
@pytest.mark.parametrize("point", ["apply-wait", "execute-statement"])
async def test_the_leader_losing_its_lock_session(
    dsn: str, tmp_path: Path, point: str, run: int
) -> None:
    outcome = _record(await run_fault(dsn, POINTS[point], tmp_path, fault="lock-session"))
    assert outcome.ok, outcome.problems


@pytest.mark.parametrize("point", ["apply-wait", "execute-statement"])
async def test_the_database_restarted_mid_migration(dsn: str, tmp_path: Path, point: str) -> None:
    try:
        restart_postgres(dsn)  # the server can be restarted here at all (and is warm)
    except RestartUnavailable as exc:
        pytest.skip(str(exc))
    outcome = _record(await run_fault(dsn, POINTS[point], tmp_path, fault="database-restart"))
    assert outcome.ok, outcome.problems


@pytest.mark.parametrize("run", range(3))
async def test_two_replicas_racing_for_a_queued_migration(
    dsn: str, tmp_path: Path, run: int
) -> None:
    make_users(dsn)
    path = tmp_path / "001_add_email.sql"
    path.write_text(POINTS["apply-wait"].migration_text())
    submitted = lockstep_process("submit", str(path), "--dsn", dsn)
    out, _ = await trio.to_thread.run_sync(submitted.communicate)
    assert submitted.returncode == 0, out
    ports = [free_port(), free_port()]
    replicas = [serve(dsn, port, "--poll-interval", "0.5") for port in ports]
    try:
        with trio.fail_after(60):
            while not (rows := history(dsn)) or rows[-1]["status"] not in ("completed", "failed"):
                await trio.sleep(0.1)
        # One takeover at most: the loser stood by the whole time, the winner led once.
        epoch = await leader_epoch(dsn)
        for proc in replicas:
            proc.send_signal(signal.SIGTERM)
        outputs = [(await trio.to_thread.run_sync(proc.communicate))[0] for proc in replicas]
    finally:
        reap(*replicas)
    print(outputs)
    assert [r["status"] for r in history(dsn)] == ["completed"]
    assert epoch == 1, f"the leadership changed hands {epoch} times"
    assert sum("leading with epoch" in o for o in outputs) == 1, outputs
    assert "Traceback" not in "".join(outputs)
