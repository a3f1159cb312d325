"""`lockstep serve`, `submit`, `status` and `abort` as users run them: real processes.

One `lockstep serve` process on a real PostgreSQL, a real agent in this test's process, the
other commands as subprocesses. Stopping serve with SIGTERM mid-migration must leave the run
durable (not rolled back, not lost), and a restarted serve must finish it.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import psycopg
import trio

from agent import MigrationInfo, open_agent
from tests.support.cli import run_lockstep
from tests.support.flow import columns, make_users
from tests.support.http_client import exchange
from tests.support.processes import (
    free_port,
    leading,
    listening,
    lockstep_process,
    reap,
    serve,
    stop,
)

MIGRATION = """\
-- lockstep:sql
ALTER TABLE users ADD COLUMN email text;
-- lockstep:contract
ALTER TABLE users DROP COLUMN name;
-- lockstep:rollback
ALTER TABLE users DROP COLUMN IF EXISTS email;
"""

#: A resumed run waits out its predecessor's leases before CONTRACT (1.1 x lease + 1 s plus
#: the lock probe's margin): a short lease keeps that wait short, the behaviour the same.
SHORT_LEASE = ("--lease", "2")


def _status(dsn: str) -> dict[str, object]:
    proc = run_lockstep("status", "--dsn", dsn, "--json")
    assert proc.returncode == 0, proc.stderr
    document: dict[str, object] = json.loads(proc.stdout)
    return document


async def test_serve_runs_what_submit_queues_and_stops_cleanly_on_sigterm(
    dsn: str, tmp_path: Path
) -> None:
    make_users(dsn)
    path = tmp_path / "001_add_email.sql"
    path.write_text(MIGRATION)
    port, http_port = free_port(), free_port()
    server = serve(dsn, port, "--http-port", str(http_port))
    try:
        with trio.fail_after(90):
            await listening(port)
            await leading(dsn)
            async with open_agent(f"ws://127.0.0.1:{port}", agent_id="app-1") as agent:
                submitted = await trio.to_thread.run_sync(
                    run_lockstep, "submit", str(path), "--dsn", dsn, "--wait"
                )
                assert submitted.returncode == 0, submitted.stdout + submitted.stderr
                assert "queued: 001_add_email" in submitted.stdout
                assert "001_add_email: completed" in submitted.stdout
                assert agent.is_applied("001_add_email")
            await listening(http_port)
            ready = await exchange(
                http_port, b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            assert b" 200 " in ready.split(b"\r\n", 1)[0], ready
            state = _status(dsn)
            leader = state["leader"]
            assert isinstance(leader, dict) and leader["alive"] is True
            assert [m["status"] for m in state["migrations"]] == ["completed"]  # type: ignore[index, union-attr]
            again = await trio.to_thread.run_sync(
                run_lockstep, "submit", str(path), "--dsn", dsn, "--json"
            )
            assert json.loads(again.stdout)["submitted"][0]["outcome"] == "already completed"
            out = await stop(server, signal.SIGTERM)
    finally:
        reap(server)
    assert server.returncode == 0, out
    assert "stopped" in out and "Traceback" not in out
    assert "name" not in columns(dsn)


async def test_sigterm_mid_apply_leaves_the_run_durable_and_a_restart_finishes_it(
    dsn: str, tmp_path: Path
) -> None:
    make_users(dsn)
    path = tmp_path / "001_add_email.sql"
    path.write_text(MIGRATION)
    port = free_port()
    in_apply, stopped = trio.Event(), trio.Event()

    async def on_apply(info: MigrationInfo) -> None:
        if not stopped.is_set():
            in_apply.set()
            await stopped.wait()

    first = serve(dsn, port, *SHORT_LEASE)
    second = None
    try:
        with trio.fail_after(90):
            await listening(port)
            await leading(dsn)
            async with open_agent(
                f"ws://127.0.0.1:{port}", agent_id="app-1", on_apply=on_apply, connect_timeout=20
            ) as agent:
                queued = await trio.to_thread.run_sync(
                    run_lockstep, "submit", str(path), "--dsn", dsn
                )
                assert queued.returncode == 0, queued.stdout + queued.stderr
                await in_apply.wait()
                out = await stop(first, signal.SIGTERM)
                assert first.returncode == 0 and "Traceback" not in out, out
                state = _status(dsn)
                assert state["waiting_for_a_coordinator"] is True
                [flight] = state["in_flight"]  # type: ignore[misc]
                assert flight["state"] == "apply" and flight["executed"] is True
                assert "email" in columns(dsn) and "name" in columns(dsn)  # not rolled back
                stopped.set()
                second = serve(dsn, port, *SHORT_LEASE)
                waited = await trio.to_thread.run_sync(
                    run_lockstep, "submit", str(path), "--dsn", dsn, "--wait"
                )
                assert waited.returncode == 0, waited.stdout + waited.stderr
                assert "already running" in waited.stdout and "completed" in waited.stdout
                assert agent.is_applied("001_add_email")
    finally:
        reap(first, second)
    assert "email" in columns(dsn) and "name" not in columns(dsn)


async def test_apply_while_serve_leads_submits_to_its_queue(dsn: str, tmp_path: Path) -> None:
    make_users(dsn)
    path = tmp_path / "001_add_email.sql"
    path.write_text(MIGRATION)
    port = free_port()
    server = serve(dsn, port)
    try:
        with trio.fail_after(90):
            await listening(port)
            await leading(dsn)
            async with open_agent(f"ws://127.0.0.1:{port}", agent_id="app-1") as agent:
                applied = await trio.to_thread.run_sync(
                    run_lockstep,
                    "apply", str(path), "--dsn", dsn, "--port", "0", "--allow-no-agents",
                )  # fmt: skip
                assert applied.returncode == 0, applied.stdout + applied.stderr
                assert "leads this database: submitting to its queue" in applied.stdout
                assert "completed 001_add_email (run by the leader)" in applied.stdout
                assert agent.is_applied("001_add_email")
    finally:
        reap(server)


async def test_apply_that_loses_its_lock_session_takes_the_lead_again_and_finishes(
    dsn: str, tmp_path: Path
) -> None:
    make_users(dsn)
    path = tmp_path / "001_add_email.sql"
    path.write_text(MIGRATION)
    port = free_port()
    in_apply, cut = trio.Event(), trio.Event()

    async def on_apply(info: MigrationInfo) -> None:
        if not cut.is_set():
            in_apply.set()
            await cut.wait()

    proc = lockstep_process(
        "apply", str(path), "--dsn", dsn, "--port", str(port), "--wait-agents", "1",
        "--ack-timeout", "30", *SHORT_LEASE,
    )  # fmt: skip
    try:
        with trio.fail_after(90):
            await listening(port)
            async with open_agent(
                f"ws://127.0.0.1:{port}", agent_id="app-1", on_apply=on_apply, connect_timeout=30
            ) as agent:
                await in_apply.wait()
                with psycopg.connect(dsn, autocommit=True) as admin:
                    row = admin.execute(
                        "SELECT epoch FROM lockstep.leader, pg_terminate_backend(backend_pid) t"
                    ).fetchone()
                    # The agent holds APPLY open until apply noticed and took the lead again.
                    while admin.execute("SELECT epoch FROM lockstep.leader").fetchone() == row:
                        await trio.sleep(0.1)
                cut.set()
                out, _ = await trio.to_thread.run_sync(proc.communicate)
                assert proc.returncode == 0, out
                assert agent.is_applied("001_add_email")
    finally:
        reap(proc)
    assert "taking the lead again to resume" in out and "Traceback" not in out
    assert "completed 001_add_email" in out
    assert "email" in columns(dsn) and "name" not in columns(dsn)
