"""Migration files on disk and the `plan`, `lint` and `apply` commands (run as subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import psycopg
import pytest

from coordinator.cli.files import MigrationLoadError, load_path, load_paths
from statemachine.sql import build_plan
from tests.support.cli import run_lockstep

#: A DSN nothing listens on: commands that must not touch a database still work with it set.

ADD_EMAIL = """\
-- lockstep:name add_email
-- lockstep:sql
ALTER TABLE users ADD COLUMN email text;
CREATE INDEX CONCURRENTLY users_email ON users (email);
-- lockstep:backfill
table=users set="email = name || '@example.com'" where="email IS NULL" batch_size=2 pacing=fixed
"""

ADD_NICK = """\
ALTER TABLE users ADD COLUMN nick text;
"""

DROP_NAME = """\
-- a comment line first, so the finding is on line 2
ALTER TABLE users DROP COLUMN name;
"""


def lockstep(*args: str, dsn: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("LOCKSTEP_DSN", None)
    if dsn is not None:
        env["LOCKSTEP_DSN"] = dsn
    env["COLUMNS"] = "200"
    return run_lockstep(*args, env=env)


def write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


def make_users(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE users (id serial PRIMARY KEY, name text NOT NULL)")
        conn.execute("INSERT INTO users (name) SELECT 'u' || g FROM generate_series(1, 5) g")


def columns(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'users' "
            "ORDER BY ordinal_position"
        ).fetchall()
    return [str(r[0]) for r in rows]


# ---------------------------------------------------------------------- loading files
def test_directory_is_loaded_in_natural_order_and_skips_other_files(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "10_last.sql": ADD_NICK.replace("nick", "c10"),
            "2_second.sql": ADD_NICK.replace("nick", "c2"),
            "1_first.SQL": ADD_NICK.replace("nick", "c1"),
            "README.md": "not a migration",
        },
    )
    (tmp_path / "nested.sql").mkdir()  # a directory named like a file is not read
    files = load_path(tmp_path)
    assert [f.migration.name for f in files] == ["1_first", "2_second", "10_last"]
    assert files[0].migration.sql == ("ALTER TABLE users ADD COLUMN c1 text",)


def test_file_errors_name_the_path_and_line(tmp_path: Path) -> None:
    bad = write(tmp_path, {"0001_bad.sql": "ALTER TABLE users ADD COLUMN x int;\nSELEC 1;\n"})
    with pytest.raises(MigrationLoadError) as info:
        load_path(bad / "0001_bad.sql")
    assert str(info.value).startswith(f"{bad / '0001_bad.sql'}:2: syntax error")
    with pytest.raises(MigrationLoadError, match="no such file or directory"):
        load_path(tmp_path / "missing.sql")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MigrationLoadError, match=r"no \.sql migration files"):
        load_path(empty)
    (tmp_path / "latin1.sql").write_bytes(b"SELECT '\xe9';")
    with pytest.raises(MigrationLoadError, match="not UTF-8"):
        load_path(tmp_path / "latin1.sql")


def test_two_files_with_one_migration_name_are_refused(tmp_path: Path) -> None:
    write(
        tmp_path,
        {"a.sql": "-- lockstep:name same\nSELECT 1;", "b.sql": "-- lockstep:name same\nSELECT 2;"},
    )
    with pytest.raises(MigrationLoadError, match="'same' is also used by"):
        load_path(tmp_path)
    one = write(tmp_path / "one", {"x.sql": ADD_NICK})
    two = write(tmp_path / "two", {"x.sql": ADD_NICK})
    with pytest.raises(MigrationLoadError, match="'x' is also used by"):
        load_paths([one, two])


# ------------------------------------------------------------------------------ plan
def test_plan_shows_groups_backfill_rollback_and_lint_without_a_database(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, {"0001_add_email.sql": ADD_EMAIL}) / "0001_add_email.sql"
    # No --dsn (nor LOCKSTEP_DSN, which now configures --dsn like any option): no catalog.
    proc = lockstep("plan", str(path))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "migration add_email" in out
    # EXECUTE: the ALTER in a transaction, the CONCURRENTLY build alone in autocommit.
    execute = out[out.index("EXECUTE") : out.index("BACKFILL")]
    assert execute.index("in one transaction") < execute.index("ALTER TABLE users ADD COLUMN")
    assert execute.index("autocommit") < execute.index("CREATE INDEX CONCURRENTLY users_email")
    assert "UPDATE users SET email = name || '@example.com' WHERE email IS NULL" in out
    assert "batches of 2 ordered by id" in out
    # The derived rollback, in reverse order, with IF EXISTS.
    rollback = out[out.index("ROLLBACK on failure (derived)") : out.index("LINT")]
    assert rollback.index("DROP INDEX CONCURRENTLY IF EXISTS users_email") < rollback.index(
        "ALTER TABLE users DROP COLUMN IF EXISTS email"
    )
    assert "LINT: OK: no findings" in out
    assert proc.stderr == ""


def test_plan_says_when_no_rollback_can_be_derived_and_shows_lint_errors(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, {"drop.sql": DROP_NAME}) / "drop.sql"
    proc = lockstep("plan", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "none - the schema would be left expanded" in proc.stdout
    assert "not purely additive" in proc.stdout
    assert "LINT: REJECTED: 1 error(s)" in proc.stdout
    assert f"{path}:2: error LS101 drop-column" in proc.stdout


def test_plan_of_a_broken_file_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, {"x.sql": "-- lockstep:nonsense\nSELECT 1;"}) / "x.sql"
    proc = lockstep("plan", str(path))
    assert proc.returncode == 1
    assert f"error: {path}:1: unknown marker 'lockstep:nonsense'" in proc.stderr


# ------------------------------------------------------------------------------ lint
def test_lint_exit_codes_and_findings(tmp_path: Path) -> None:
    clean = write(tmp_path / "clean", {"a.sql": ADD_NICK})
    proc = lockstep("lint", str(clean))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK: 1 migration(s), 0 error(s), 0 warning(s)" in proc.stdout

    warn = write(tmp_path / "warn", {"w.sql": "CREATE INDEX users_name ON users (name);"})
    proc = lockstep("lint", str(warn))
    assert proc.returncode == 0
    assert "warning LS201 create-index-non-concurrently" in proc.stdout

    bad = write(tmp_path / "bad", {"d.sql": DROP_NAME})
    proc = lockstep("lint", str(clean / "a.sql"), str(bad))
    assert proc.returncode == 1
    out = proc.stdout
    assert f"{bad / 'd.sql'}:2: error LS101 drop-column (sql[0])" in out
    assert "statement: ALTER TABLE users DROP COLUMN name" in out
    assert "fix: Keep name while old code runs" in out
    assert "contract_sql: ALTER TABLE users DROP COLUMN name" in out
    assert "FAIL: 2 migration(s), 1 error(s)" in out


def test_lint_lists_its_rules_and_needs_a_path() -> None:
    proc = lockstep("lint", "--rules")
    assert proc.returncode == 0
    assert "LS101" in proc.stdout and "drop-column" in proc.stdout
    proc = lockstep("lint")
    assert proc.returncode == 1
    assert "lint needs at least one migration file or directory" in proc.stderr


# ----------------------------------------------------------------------------- apply
def test_apply_runs_a_directory_in_order_and_skips_what_completed(tmp_path: Path, dsn: str) -> None:
    make_users(dsn)
    migrations = write(tmp_path, {"0001_add_email.sql": ADD_EMAIL, "0002_add_nick.sql": ADD_NICK})
    proc = lockstep("apply", str(migrations), "--allow-no-agents", "--dsn", dsn, "--port", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.index("completed add_email") < out.index("completed 0002_add_nick")
    assert "backfill users: 5 rows in 3 batches" in out
    assert "done: 2 applied, 0 already completed" in out
    assert columns(dsn) == ["id", "name", "email", "nick"]
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM users WHERE email LIKE '%@example.com'").fetchone()
    assert row == (5,)

    again = lockstep(
        "apply", str(migrations), "--allow-no-agents", "--port", "0", dsn=dsn
    )  # DSN from the env
    assert again.returncode == 0, again.stdout + again.stderr
    assert "skipped add_email (already completed)" in again.stdout
    assert "done: 0 applied, 2 already completed" in again.stdout


def test_apply_stops_at_lint_errors_unless_forced(tmp_path: Path, dsn: str) -> None:
    make_users(dsn)
    migrations = write(tmp_path, {"1_nick.sql": ADD_NICK, "2_drop.sql": DROP_NAME})
    proc = lockstep("apply", str(migrations), "--allow-no-agents", "--dsn", dsn, "--port", "0")
    assert proc.returncode == 1
    assert "completed 1_nick" in proc.stdout
    assert "rejected 2_drop: lint found errors" in proc.stdout
    assert f"{migrations / '2_drop.sql'}:2: error LS101" in proc.stdout
    assert "name" in columns(dsn)

    forced = lockstep(
        "apply", str(migrations), "--allow-no-agents", "--dsn", dsn, "--port", "0", "--force"
    )
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert "completed 2_drop" in forced.stdout
    assert "forced past error" in forced.stdout
    assert "name" not in columns(dsn)


def test_apply_reports_a_failed_migration_and_exits_1(tmp_path: Path, dsn: str) -> None:
    make_users(dsn)
    path = write(tmp_path, {"bad.sql": "ALTER TABLE nope ADD COLUMN x int;"}) / "bad.sql"
    proc = lockstep("apply", str(path), "--allow-no-agents", "--dsn", dsn, "--port", "0")
    assert proc.returncode == 1
    assert "failed bad" in proc.stdout
    assert 'relation "nope" does not exist' in proc.stdout


def test_apply_needs_a_database_and_its_agents(tmp_path: Path, dsn: str) -> None:
    path = write(tmp_path, {"a.sql": ADD_NICK}) / "a.sql"
    proc = lockstep("apply", str(path), "--allow-no-agents")
    assert proc.returncode == 1
    assert "apply needs a database: pass --dsn or set LOCKSTEP_DSN" in proc.stderr

    make_users(dsn)
    proc = lockstep(
        "apply",
        str(path),
        "--dsn",
        dsn,
        "--port",
        "0",
        "--wait-agents",
        "1",
        "--wait-timeout",
        "0.5",
    )
    assert proc.returncode == 1
    assert "only 0 of 1 agent(s) connected within 0.5 s" in proc.stderr
    assert "nick" not in columns(dsn)


def test_plan_json_is_the_plan_the_executor_runs(tmp_path: Path) -> None:
    path = write(tmp_path, {"0001_add_email.sql": ADD_EMAIL}) / "0001_add_email.sql"
    proc = lockstep("plan", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    [plan] = json.loads(proc.stdout)["migrations"]
    expected = build_plan(load_path(path)[0].migration)
    groups = [(g["transactional"], tuple(g["statements"])) for g in plan["execute"]["groups"]]
    assert groups == [(g.transactional, g.statements) for g in expected.execute.groups]
    assert plan["rollback"]["source"] == expected.rollback.source
