"""SIGKILL the coordinator mid-migration, start it again: the migration finishes, nobody guesses.

A real ``lockstep apply`` process coordinates one real agent (in this test's process, with
reconnects on) on a real PostgreSQL. The agent's hook for one phase holds the phase open
until the test has killed the coordinator with SIGKILL; then the same ``lockstep apply`` is
started again on the same database and file. It must resume the migration (not fail on
"already exists", not send the agent back to a schema that no longer exists) and exit 0.
The longer suite with several runs per point and an application query loop is
``make fault``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from agent import MigrationInfo, open_agent
from tests.support.flow import columns, history, make_users
from tests.support.processes import free_port, listening

MIGRATION = """\
-- lockstep:sql
ALTER TABLE users ADD COLUMN email text;
-- lockstep:contract
ALTER TABLE users DROP COLUMN name;
-- lockstep:rollback
ALTER TABLE users DROP COLUMN IF EXISTS email;
"""


def _apply(dsn: str, path: Path, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "coordinator.cli",
            "apply",
            str(path),
            "--dsn",
            dsn,
            "--port",
            str(port),
            "--wait-agents",
            "1",
            "--wait-timeout",
            "30",
            "--ack-timeout",
            "20",
            "--lease",  # the restarted coordinator waits out its predecessor's leases
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
    )


@pytest.mark.slow
@pytest.mark.parametrize("held", ["on_announce", "on_apply", "on_confirm"])
async def test_sigkill_in_a_phase_then_restart_completes(
    dsn: str, tmp_path: Path, held: str
) -> None:
    make_users(dsn)
    path = tmp_path / "001_add_email.sql"
    path.write_text(MIGRATION)
    port = free_port()
    in_phase, killed = trio.Event(), trio.Event()
    calls: list[tuple[str, bool]] = []

    def hook(name: str):  # type: ignore[no-untyped-def]
        async def run(info: MigrationInfo) -> None:
            calls.append((name, info.resynced))
            if name == held and not killed.is_set():
                in_phase.set()
                await killed.wait()

        return run

    first = _apply(dsn, path, port)
    second: subprocess.Popen[str] | None = None
    try:
        with trio.fail_after(60):
            await listening(port)
            async with open_agent(
                f"ws://127.0.0.1:{port}",
                agent_id="app-1",
                connect_timeout=20,
                on_announce=hook("on_announce"),
                on_apply=hook("on_apply"),
                on_confirm=hook("on_confirm"),
            ) as agent:
                await in_phase.wait()
                first.send_signal(signal.SIGKILL)
                await trio.to_thread.run_sync(first.wait)
                killed.set()
                second = _apply(dsn, path, port)
                out, _ = await trio.to_thread.run_sync(second.communicate)
                assert second.returncode == 0, out
                assert agent.is_applied("001_add_email"), calls
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "already exists" not in out
    assert "email" in columns(dsn) and "name" not in columns(dsn), out
    assert [row["status"] for row in history(dsn)] == ["completed"]
