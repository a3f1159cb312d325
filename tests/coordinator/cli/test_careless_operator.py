"""The CLI cases of issue 11: every expected failure is a message and a documented exit code."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
import trio

from coordinator.history import PostgresHistory
from statemachine import Migration, MigrationMachine, agent_credential
from statemachine.checkpoint import Checkpoint
from tests.support import REPO_ROOT
from tests.support.cli import run_lockstep

NASTY = "RuntimeError: [/] [bold]x\x1b[2J\rcompleted everything :-1:"


def _clean(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "\x1b" not in proc.stdout + proc.stderr
    assert "\U0001f44e" not in proc.stdout + proc.stderr  # :-1: as an emoji


def test_status_shows_markup_and_escapes_from_the_database_as_text(dsn: str) -> None:
    history = PostgresHistory(dsn)

    async def record() -> None:
        await history.ensure_schema()
        migration = Migration("m1", "SELECT 1")
        machine = MigrationMachine(migration.id, has_contract=False)
        await history.record_start(migration, Checkpoint.of(machine))

    trio.run(record)
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE lockstep.migrations SET status = 'failed', reason = %s", (NASTY,))
    proc = run_lockstep("status", "--dsn", dsn, env={**os.environ, "COLUMNS": "300"})
    assert proc.returncode == 0, proc.stderr
    _clean(proc)
    assert "[/]" in proc.stdout and "\\x1b[2J" in proc.stdout
    js = run_lockstep("status", "--dsn", dsn, "--json")
    assert js.returncode == 0
    import json

    assert json.loads(js.stdout)["migrations"][0]["reason"] == NASTY


@pytest.mark.parametrize(
    "args",
    [
        ["--port", "99999"],
        ["--port", "-1"],
        ["--lock-retries", "0"],
        ["--lock-retry-seconds", "-1"],
        ["--ack-timeout", "nan"],
        ["--lease", "0"],
        ["--lease", "inf"],
        ["--on-agent-loss", "shrug"],
    ],
)
def test_bad_numbers_are_usage_errors(tmp_path: Path, args: list[str]) -> None:
    (tmp_path / "m.sql").write_text("SELECT 1;")
    proc = run_lockstep("apply", str(tmp_path / "m.sql"), "--allow-no-agents", *args)
    assert proc.returncode == 2, proc.stderr
    _clean(proc)


def test_bad_numbers_from_the_environment_are_usage_errors(tmp_path: Path) -> None:
    env = {**os.environ, "LOCKSTEP_PORT": "99999"}
    proc = run_lockstep("apply", "x.sql", env=env)
    assert proc.returncode == 2
    assert "$LOCKSTEP_PORT" in proc.stderr
    _clean(proc)


def test_a_bad_lease_from_the_environment_says_why(tmp_path: Path) -> None:
    env = {**os.environ, "LOCKSTEP_LEASE": "0.01", "LOCKSTEP_ON_AGENT_LOSS": "rollback"}
    proc = run_lockstep("apply", "x.sql", env=env)
    assert proc.returncode == 2
    assert "$LOCKSTEP_LEASE" in proc.stderr and "lease must be at least 0.3 s" in proc.stderr
    _clean(proc)


def test_a_symlink_to_dev_zero_is_refused_not_read(tmp_path: Path) -> None:
    link = tmp_path / "zero.sql"
    link.symlink_to("/dev/zero")
    proc = run_lockstep("lint", str(link), timeout=20)
    assert proc.returncode == 3, "lint's exit status for a file it could not load"
    assert "not a regular file" in proc.stdout + proc.stderr
    _clean(proc)


def test_a_database_that_never_answers_times_out() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        dsn = f"postgresql://x@127.0.0.1:{silent.getsockname()[1]}/x"
        started = time.monotonic()
        proc = run_lockstep("status", "--dsn", dsn, "--connect-timeout", "2", timeout=60)
    assert proc.returncode == 1
    assert time.monotonic() - started < 30
    assert "error:" in proc.stderr
    _clean(proc)


def test_apply_without_a_fleet_needs_allow_no_agents(tmp_path: Path) -> None:
    (tmp_path / "m.sql").write_text("SELECT 1;")
    proc = run_lockstep("apply", str(tmp_path / "m.sql"))
    assert proc.returncode == 2
    assert "--allow-no-agents" in proc.stderr


def test_serving_off_loopback_without_a_token_needs_insecure(tmp_path: Path) -> None:
    (tmp_path / "m.sql").write_text("SELECT 1;")
    proc = run_lockstep("apply", str(tmp_path / "m.sql"), "--allow-no-agents", "--host", "0.0.0.0")
    assert proc.returncode == 2
    assert "--insecure" in proc.stderr


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_sigterm_is_reported_like_sigint(tmp_path: Path, dsn: str, sigint: str) -> None:
    """Also when started with SIGINT ignored, as a shell's background job is (`cmd &`)."""
    (tmp_path / "m.sql").write_text("SELECT 1;")

    def start() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN if sigint == "ignored" else signal.SIG_DFL)

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "coordinator.cli",
            "apply",
            str(tmp_path / "m.sql"),
            "--dsn",
            dsn,
            "--port",
            "0",
            "--wait-agents",
            "1",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=start,
    )
    try:
        assert proc.stdout is not None
        assert "waiting for" in proc.stdout.readline() + proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143
    assert "terminated" in err and "Traceback" not in err


def test_version_and_agent_token(tmp_path: Path) -> None:
    proc = run_lockstep("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("lockstep ")
    secret = tmp_path / "secret"
    secret.write_text("fleet-secret\n")
    proc = run_lockstep("agent-token", "app-1", "--token-file", str(secret))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == agent_credential("fleet-secret", "app-1")


def test_validate_reports_a_changed_completed_migration(tmp_path: Path, dsn: str) -> None:
    path = tmp_path / "add_t.sql"
    path.write_text("CREATE TABLE t (id INT);")
    applied = run_lockstep("apply", str(path), "--allow-no-agents", "--dsn", dsn, "--port", "0")
    assert applied.returncode == 0, applied.stderr
    assert run_lockstep("validate", str(path), "--dsn", dsn).returncode == 0
    path.write_text("CREATE TABLE t (id BIGINT);")
    proc = run_lockstep("validate", str(path), "--dsn", dsn)
    assert proc.returncode == 1
    assert "changed add_t" in proc.stdout


def test_two_applies_of_one_file_at_once_both_end_cleanly(tmp_path: Path, dsn: str) -> None:
    """The loser of the race waits on the migration lock, then reports the migration done by
    the other run: no AlreadyApplied traceback, no CREATE SCHEMA duplicate-key error."""
    path = tmp_path / "add_t.sql"
    path.write_text("CREATE TABLE t (id INT);\nSELECT pg_sleep(0.5);")
    command = [
        sys.executable, "-m", "coordinator.cli", "apply", str(path),
        "--allow-no-agents", "--dsn", dsn, "--port", "0",
    ]  # fmt: skip
    runs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=120) for run in runs]
    for run, (out, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, out + err
        assert "Traceback" not in out + err
    joined = " ".join(out for out, _ in outputs)
    assert "completed add_t" in joined
    assert "skipped add_t" in joined


def test_a_reader_that_closes_the_pipe_gets_no_traceback() -> None:
    """`lockstep lint --json | head -c 10`: the pipe closes before lockstep wrote it all."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before lockstep writes a byte
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "coordinator.cli", "lint", "docs/recipes", "--json"],
            cwd=REPO_ROOT,
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 141
