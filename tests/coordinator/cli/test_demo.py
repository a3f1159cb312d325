"""`lockstep demo`: the command end to end (subprocesses), plus the pieces it proves things with.

The subprocess tests parse the demo's plain-text output (stdout is a pipe, so rich prints no
colours and no live table) the way a reader of a CI log would: the ``users columns:`` line and
the per-agent rows of the query table.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import psycopg
import pytest
import trio
from rich.console import Console

from coordinator.cli import main
from coordinator.cli.demo import (
    MISSING_TABLE,
    NEW_COLUMNS,
    ORIGINAL_COLUMNS,
    check_outcome,
    run_demo,
)
from coordinator.cli.demo_app import AppStats, run_app
from statemachine.failure import Failure, FailureKind
from statemachine.phases import MigrationStatus, Phase
from statemachine.result import MigrationResult, PhaseRecord
from tests.support.cli import run_lockstep

#: One row of the "queries per agent" table: agent, set at end, old-set ok, new-set ok, reads,
#: writes, failed (box characters and spaces in between are non-word characters).
AGENT_ROW = re.compile(
    r"^\W*(?P<agent>app-\d+)\W+(?P<set>old|new)\W+(?P<old>\d+)\W+(?P<new>\d+)"
    r"\W+(?P<reads>\d+)\W+(?P<writes>\d+)\W+(?P<failed>\d+)\W*$"
)
COLUMNS_LINE = re.compile(r"^users columns: (?P<columns>.+?)(?P<unchanged> \(unchanged\))?$")


def _columns(output: str) -> tuple[tuple[str, ...], bool]:
    """The final users columns the demo printed, and whether it called them unchanged."""
    found = [m for line in output.splitlines() if (m := COLUMNS_LINE.match(line))]
    assert len(found) == 1, output
    return tuple(found[0]["columns"].split(", ")), found[0]["unchanged"] is not None


def _agent_rows(output: str) -> dict[str, dict[str, str]]:
    rows = {}
    for line in output.splitlines():
        match = AGENT_ROW.match(line)
        if match:
            rows[match["agent"]] = match.groupdict()
    return rows


def _db_columns(dsn: str) -> tuple[str, ...]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = 'users'::regclass "
            "AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
        ).fetchall()
    return tuple(name for (name,) in rows)


# ------------------------------------------------------------------ the command, as users run it


@pytest.mark.slow
def test_demo_success_switches_every_agent_with_zero_failed_queries(dsn: str) -> None:
    result = run_lockstep("demo", "--dsn", dsn)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    columns, unchanged = _columns(out)
    assert columns == NEW_COLUMNS
    assert not unchanged
    rows = _agent_rows(out)
    assert sorted(rows) == ["app-1", "app-2", "app-3"], out
    for agent, row in rows.items():
        assert row["failed"] == "0", (agent, out)
        assert row["set"] == "new", (agent, out)
        assert int(row["old"]) > 0 and int(row["new"]) > 0, (agent, out)  # both sides of APPLY
        assert int(row["reads"]) > 0 and int(row["writes"]) > 0, (agent, out)
    for phase in ("ANNOUNCE", "EXECUTE", "APPLY", "CONFIRM"):
        assert f"{phase} " in out
    for agent in rows:
        assert f"{agent} acked APPLY" in out
    assert "status: COMPLETED" in out
    assert _db_columns(dsn) == NEW_COLUMNS
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_demo_timeout_names_the_silent_agent_and_leaves_users_unchanged(dsn: str) -> None:
    result = run_lockstep("demo", "--dsn", dsn, "--scenario", "timeout", "--ack-timeout", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "ack timeout 1 s" in out
    reason = [line for line in out.splitlines() if line.startswith("reason: ")]
    assert len(reason) == 1, out
    assert "timeout in ANNOUNCE" in reason[0]
    assert "app-3" in reason[0]
    assert "app-1" not in reason[0] and "app-2" not in reason[0]
    assert "ROLLBACK" in out
    assert "status: FAILED" in out
    assert _columns(out) == (ORIGINAL_COLUMNS, True)
    assert _db_columns(dsn) == ORIGINAL_COLUMNS
    rows = _agent_rows(out)
    assert sorted(rows) == ["app-1", "app-2", "app-3"], out
    assert all(row["failed"] == "0" and row["new"] == "0" for row in rows.values()), out


@pytest.mark.slow
def test_demo_sql_error_shows_postgres_message_and_leaves_users_unchanged(dsn: str) -> None:
    result = run_lockstep("demo", "--dsn", dsn, "--scenario", "sql-error", "--agents", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    reason = [line for line in out.splitlines() if line.startswith("reason: ")]
    assert len(reason) == 1, out
    assert f'relation "{MISSING_TABLE}" does not exist' in reason[0]
    assert "EXECUTE" in reason[0]
    # The first statement ran inside the same transaction: email must not be left behind.
    assert _columns(out) == (ORIGINAL_COLUMNS, True)
    assert _db_columns(dsn) == ORIGINAL_COLUMNS
    rows = _agent_rows(out)
    assert sorted(rows) == ["app-1", "app-2"], out
    assert all(row["failed"] == "0" for row in rows.values()), out


@pytest.mark.slow
def test_demo_without_dsn_uses_a_temporary_embedded_server() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LOCKSTEP_DSN"}
    result = run_lockstep("demo", "--agents", "2", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "Starting a temporary embedded PostgreSQL server" in out
    assert _columns(out) == (NEW_COLUMNS, False)
    rows = _agent_rows(out)
    assert sorted(rows) == ["app-1", "app-2"], out
    assert all(row["failed"] == "0" for row in rows.values()), out
    # "Database: PostgreSQL 18.6, database postgres on socket /tmp/lockstep-pg-xyz/pgdata"
    socket = out.split(" on socket ", 1)[1].split()[0]
    assert socket.startswith("/tmp/lockstep-pg-")
    assert not Path(socket).parent.exists()  # removed on exit


def test_demo_help_documents_the_options_and_the_drop(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--dsn", "--agents", "--scenario", "--ack-timeout"):
        assert option in text
    for scenario in ("success", "timeout", "sql-error"):
        assert scenario in text
    assert "DROPS table users and schema lockstep" in " ".join(text.split())
    assert main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--agents", "0"], "must be between 1 and"),
        (["--agents", "many"], "not an integer"),
        (["--ack-timeout", "-1"], "must be > 0"),
        (["--scenario", "chaos"], "invalid choice"),
    ],
)
def test_demo_rejects_bad_arguments(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--dsn", "postgresql://unused/db", *args]) == 2
    assert message in capsys.readouterr().err


def test_demo_unreachable_database_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--dsn", "postgresql://nobody@127.0.0.1:1/x?connect_timeout=2"])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot prepare the demo database: ")
    assert "Traceback" not in err


# ------------------------------------------------------- in process: reruns, terminals, the app


async def test_rerun_on_the_same_database_drops_what_the_first_run_left(dsn: str) -> None:
    first = io.StringIO()
    second = io.StringIO()
    for out in (first, second):
        code = await run_demo(
            dsn,
            agents=1,
            scenario="success",
            ack_timeout=10.0,
            console=Console(file=out),
            warmup=0.2,
            cooldown=0.2,
        )
        assert code == 0, out.getvalue()
    assert "Dropped" not in first.getvalue()
    assert "Dropped what an earlier run left: table users, schema lockstep" in second.getvalue()


async def test_terminal_output_draws_the_live_fleet_table(dsn: str) -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120)
    code = await run_demo(
        dsn, agents=2, scenario="success", ack_timeout=10.0, console=console, warmup=0.3
    )
    assert code == 0
    text = buffer.getvalue()
    assert "fleet (live)" in text
    assert "\x1b[" in text


async def test_plain_output_has_no_live_table_or_escape_codes(dsn: str) -> None:
    buffer = io.StringIO()
    code = await run_demo(
        dsn, agents=1, scenario="success", ack_timeout=10.0, console=Console(file=buffer)
    )
    assert code == 0
    text = buffer.getvalue()
    assert "fleet (live)" not in text
    assert "\x1b[" not in text


async def test_app_counts_a_failing_query_and_keeps_going(dsn: str) -> None:
    """An app on the new query set before the columns exist fails every query, and survives."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE users (id SERIAL PRIMARY KEY, name TEXT, created_at TIMESTAMP)")
    stats = AppStats("app-1")
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: run_app(
                dsn,
                stats,
                schema_lease=lambda: contextlib.nullcontext(True),
                stop=stop,
                pause=(0, 0.01),
            )
        )
        with trio.fail_after(30):
            while stats.failed < 6:
                await trio.sleep(0.01)
        stop.set()
    assert stats.reads == stats.writes == 0
    assert stats.new_queries == 0
    assert any('column "email" of relation "users" does not exist' in e for e in stats.errors)
    assert any('column "email" does not exist' in e for e in stats.errors)


async def test_app_switches_query_set_between_queries(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE users (id SERIAL PRIMARY KEY, name TEXT, created_at TIMESTAMP, "
            "email TEXT, email_verified BOOLEAN DEFAULT FALSE)"
        )
    stats = AppStats("app-1")
    stop = trio.Event()
    switched = False
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: run_app(
                dsn,
                stats,
                schema_lease=lambda: contextlib.nullcontext(switched),
                stop=stop,
                pause=(0, 0.01),
            )
        )
        with trio.fail_after(30):
            while stats.old_queries < 4:
                await trio.sleep(0.01)
            switched = True
            while stats.new_queries < 4:
                await trio.sleep(0.01)
        stop.set()
    assert stats.failed == 0
    assert stats.query_set == "new"
    with psycopg.connect(dsn) as conn:
        with_email = conn.execute("SELECT count(*) FROM users WHERE email IS NOT NULL").fetchone()
        without = conn.execute("SELECT count(*) FROM users WHERE email IS NULL").fetchone()
    assert with_email is not None and with_email[0] >= 2
    assert without is not None and without[0] >= 2


# --------------------------------------------------------------- the judge of each scenario


def _result(
    status: MigrationStatus, phases: list[Phase], failure: Failure | None
) -> MigrationResult:
    records = tuple(PhaseRecord(p, 0.0, 1.0) for p in phases)
    return MigrationResult("id", "add_user_email", status, records, failure=failure)


def _stats(*, failed: int = 0, new: int = 5, agents: int = 2) -> list[AppStats]:
    return [
        AppStats(f"app-{i}", reads=5, writes=5, failed=failed, old_queries=5, new_queries=new)
        for i in range(1, agents + 1)
    ]


COMPLETED = _result(
    MigrationStatus.COMPLETED, [Phase.ANNOUNCE, Phase.EXECUTE, Phase.APPLY, Phase.CONFIRM], None
)
TIMED_OUT = _result(
    MigrationStatus.FAILED,
    [Phase.ANNOUNCE, Phase.ROLLBACK],
    Failure(FailureKind.TIMEOUT, Phase.ANNOUNCE, "no ack within 1 s", agents=("app-2",)),
)


def test_check_outcome_accepts_what_each_scenario_promises() -> None:
    assert (
        check_outcome(
            "success",
            COMPLETED,
            columns_before=ORIGINAL_COLUMNS,
            columns_after=NEW_COLUMNS,
            stats=_stats(),
        )
        == []
    )
    assert (
        check_outcome(
            "timeout",
            TIMED_OUT,
            columns_before=ORIGINAL_COLUMNS,
            columns_after=ORIGINAL_COLUMNS,
            stats=_stats(new=0),
            silent_agent="app-2",
        )
        == []
    )


def test_check_outcome_rejects_a_failed_query() -> None:
    problems = check_outcome(
        "success",
        COMPLETED,
        columns_before=ORIGINAL_COLUMNS,
        columns_after=NEW_COLUMNS,
        stats=_stats(failed=1),
    )
    assert problems and "failed queries" in problems[0]


def test_check_outcome_rejects_a_rollback_that_changed_the_columns() -> None:
    problems = check_outcome(
        "timeout",
        TIMED_OUT,
        columns_before=ORIGINAL_COLUMNS,
        columns_after=(*ORIGINAL_COLUMNS, "email"),
        stats=_stats(new=0),
        silent_agent="app-2",
    )
    assert problems == ["the users columns changed although the migration rolled back"]


def test_check_outcome_rejects_the_wrong_cause() -> None:
    problems = check_outcome(
        "timeout",
        TIMED_OUT,
        columns_before=ORIGINAL_COLUMNS,
        columns_after=ORIGINAL_COLUMNS,
        stats=_stats(new=0),
        silent_agent="app-1",
    )
    assert problems and "expected app-1 to time out in ANNOUNCE" in problems[0]
    problems = check_outcome(
        "sql-error",
        TIMED_OUT,
        columns_before=ORIGINAL_COLUMNS,
        columns_after=ORIGINAL_COLUMNS,
        stats=_stats(new=0),
    )
    assert problems and "expected a failed statement" in problems[0]
    problems = check_outcome(
        "timeout",
        COMPLETED,
        columns_before=ORIGINAL_COLUMNS,
        columns_after=NEW_COLUMNS,
        stats=_stats(),
        silent_agent="app-2",
    )
    assert any("expected ROLLBACK then FAILED" in p for p in problems)
