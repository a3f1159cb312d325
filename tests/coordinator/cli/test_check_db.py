"""`check_db` and the `lockstep check-db` command."""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from coordinator.cli import main
from coordinator.cli.dbcheck import STEP_CONNECT, STEP_CREATE_TABLE, DbCheckError, check_db
from tests.support.cli import run_lockstep

UNREACHABLE_DSN = "postgresql://nobody@127.0.0.1:1/x?connect_timeout=2"


def test_check_db_passes_and_leaves_nothing_behind(dsn: str) -> None:
    out = io.StringIO()
    check_db(dsn, out)
    text = out.getvalue()
    assert text.rstrip().endswith("All tests passed!")
    assert "Server version: PostgreSQL" in text
    assert "Server time:" in text
    assert "\x1b[" not in text  # plain text when not writing to a terminal
    with psycopg.connect(dsn) as conn:
        leftovers = conn.execute(
            "SELECT count(*) FROM pg_class WHERE relname LIKE 'lockstep_check_%'"
        ).fetchone()
    assert leftovers == (0,)


def test_check_db_unreachable_server_names_the_step() -> None:
    out = io.StringIO()
    with pytest.raises(DbCheckError) as info:
        check_db(UNREACHABLE_DSN, out)
    err = info.value
    assert err.step == STEP_CONNECT
    assert str(err).startswith("connect failed: ")
    assert "127.0.0.1" in err.message
    assert "\n" not in str(err)
    assert "All tests passed!" not in out.getvalue()


def test_check_db_reports_the_failing_ddl_step_and_postgres_message(
    dsn: str, pg_server_dsn: str
) -> None:
    """A role without CREATE on schema public (the default since PostgreSQL 15) fails at step 2."""
    role = f"lockstep_ro_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        with pytest.raises(DbCheckError) as info:
            check_db(make_conninfo(dsn, user=role), io.StringIO())
        assert info.value.step == STEP_CREATE_TABLE
        assert "permission denied for schema public" in info.value.message
        assert "SQLSTATE 42501" in info.value.message
    finally:
        with psycopg.connect(pg_server_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_help_works(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "check-db" in capsys.readouterr().out
    assert main(["check-db", "--help"]) == 0
    assert "--dsn" in capsys.readouterr().out


def test_missing_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().err


def test_keyboard_interrupt_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(dsn: str, out: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("coordinator.cli.commands.check_db.check_db", interrupted)
    assert main(["check-db", "--dsn", "postgresql://unused/db"]) == 130
    assert "interrupted" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_check_db_with_dsn(dsn: str) -> None:
    result = run_lockstep("check-db", "--dsn", dsn)
    assert result.returncode == 0, result.stderr
    assert "All tests passed!" in result.stdout.splitlines()
    assert result.stderr == ""


@pytest.mark.slow
def test_cli_check_db_unreachable_prints_one_error_line() -> None:
    result = run_lockstep("check-db", "--dsn", UNREACHABLE_DSN)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: connect failed: ")
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_cli_check_db_without_dsn_uses_a_temporary_embedded_server() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LOCKSTEP_DSN"}
    result = run_lockstep("check-db", env=env)
    assert result.returncode == 0, result.stderr
    assert "All tests passed!" in result.stdout.splitlines()
    # "Connected to database postgres as postgres on /tmp/lockstep-pg-xyz/pgdata:5432"
    where = result.stdout.split(" on ", 1)[1].split()[0].rsplit(":", 1)[0]
    assert where.startswith("/tmp/lockstep-pg-")
    assert not Path(where).parent.exists()  # removed on exit
