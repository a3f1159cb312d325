"""The embedded server wrapper and the per-test database fixtures."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest

from coordinator.cli.embedded import (
    HANDLE_PIDS_FILE,
    EmbeddedPostgresError,
    embedded_postgres_server,
    prune_dead_handle_pids,
    resolve_dsn,
)
from tests.support import REPO_ROOT

# Databases seen by the `dsn` fixture so far in this session, in order.
_seen_databases: list[str] = []


def _socket_dir(uri: str) -> Path:
    return Path(parse_qs(urlsplit(uri).query)["host"][0])


def _reaped_pid() -> int:
    """The PID of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _postmaster_pid(pgdata: Path) -> int | None:
    """The PID of the server running on `pgdata`, or None."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split()[0])
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, ValueError, IndexError):
        return None
    return None if state == "Z" else pid


def _postmaster_running(pgdata: Path) -> bool:
    return _postmaster_pid(pgdata) is not None


def _stop_leaked_server(pgdata: Path) -> None:
    """So that a failing test does not leave a server behind (SIGINT: fast shutdown)."""
    pid = _postmaster_pid(pgdata)
    if pid is not None:
        os.kill(pid, signal.SIGINT)


@pytest.mark.parametrize("run", ["first", "second"])
def test_each_test_gets_a_fresh_empty_database(dsn: str, pg_server_dsn: str, run: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT current_database()").fetchone()
        assert row is not None
        name = row[0]
        assert name.startswith("lockstep_test_")
        # Empty: if the two runs shared a database, the second would find the first's table.
        assert conn.execute("SELECT to_regclass('public.marker')").fetchone() == (None,)
        conn.execute("CREATE TABLE marker (id int)")
    assert name not in _seen_databases
    with psycopg.connect(pg_server_dsn, autocommit=True) as admin:
        for previous in _seen_databases:  # earlier tests' databases were dropped
            found = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (previous,))
            assert found.fetchone() is None, previous
    _seen_databases.append(name)


def test_temporary_server_is_stopped_and_removed_on_exit() -> None:
    locale_before = (os.environ.get("LC_ALL"), os.environ.get("LANG"))
    with embedded_postgres_server() as uri:
        # C.UTF-8 is forced only while starting.
        assert (os.environ.get("LC_ALL"), os.environ.get("LANG")) == locale_before
        pgdata = _socket_dir(uri)
        temp_root = pgdata.parent
        assert temp_root.parent == Path("/tmp")
        assert temp_root.name.startswith("lockstep-pg-")
        with psycopg.connect(uri) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert _postmaster_running(pgdata)
    assert not temp_root.exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(uri, connect_timeout=2)


def test_prune_dead_handle_pids_keeps_live_ones(tmp_path: Path) -> None:
    dead = _reaped_pid()
    (tmp_path / HANDLE_PIDS_FILE).write_text(json.dumps([os.getpid(), dead]))
    assert prune_dead_handle_pids(tmp_path) == [dead]
    assert json.loads((tmp_path / HANDLE_PIDS_FILE).read_text()) == [os.getpid()]
    assert prune_dead_handle_pids(tmp_path) == []


def test_prune_dead_handle_pids_without_file_or_with_garbage(tmp_path: Path) -> None:
    assert prune_dead_handle_pids(tmp_path) == []
    assert not (tmp_path / HANDLE_PIDS_FILE).exists()
    (tmp_path / HANDLE_PIDS_FILE).write_text("{not json")
    assert prune_dead_handle_pids(tmp_path) == []
    assert json.loads((tmp_path / HANDLE_PIDS_FILE).read_text()) == []


@pytest.mark.slow
def test_dead_pid_left_by_a_killed_parent_does_not_keep_the_server_running(
    tmp_path: Path,
) -> None:
    """Without pruning, embedded_postgres sees two holders and never stops the server."""
    pgdata = tmp_path / "pgdata"
    with embedded_postgres_server(pgdata):
        pass
    assert (pgdata / "PG_VERSION").exists()  # a given data_dir is kept
    assert not _postmaster_running(pgdata)
    handle_pids = pgdata / HANDLE_PIDS_FILE
    # What a parent killed while holding the server leaves behind.
    handle_pids.write_text(json.dumps([_reaped_pid()]))

    try:
        with embedded_postgres_server(pgdata) as uri:
            assert json.loads(handle_pids.read_text()) == [os.getpid()]
            with psycopg.connect(uri) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
        assert not _postmaster_running(pgdata)
        assert json.loads(handle_pids.read_text()) == []
    finally:
        _stop_leaked_server(pgdata)


def test_start_failure_raises_a_clear_error(tmp_path: Path) -> None:
    missing_parent = tmp_path / "does-not-exist" / "pgdata"
    with (
        pytest.raises(EmbeddedPostgresError, match="could not start embedded PostgreSQL"),
        embedded_postgres_server(missing_parent),
    ):
        pytest.fail("the block must not run")


@pytest.mark.slow
def test_sigterm_stops_the_server_and_removes_the_directory() -> None:
    script = textwrap.dedent(
        """
        import sys, time
        from coordinator.cli.embedded import embedded_postgres_server
        with embedded_postgres_server() as uri:
            print(uri, flush=True)
            time.sleep(60)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    uri = child.stdout.readline().strip()
    pgdata = _socket_dir(uri)
    try:
        assert _postmaster_running(pgdata)
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == -signal.SIGTERM  # dies of the signal, as by default
        assert not _postmaster_running(pgdata)
        assert not pgdata.parent.exists()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(uri, connect_timeout=2)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        _stop_leaked_server(pgdata)
        shutil.rmtree(pgdata.parent, ignore_errors=True)


def test_resolve_dsn_prefers_the_argument_then_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LOCKSTEP_DSN", "postgresql://from-env/db")
    with resolve_dsn("postgresql://given/db") as chosen:
        assert chosen == "postgresql://given/db"
    with resolve_dsn(None) as chosen:
        assert chosen == "postgresql://from-env/db"
