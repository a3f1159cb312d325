"""`PostgresExecutor` on a real PostgreSQL: execution groups, autocommit statements, INVALID
index cleanup, timeouts; and the coordinator's rollback resolution and lint gate."""

from __future__ import annotations

import random

import psycopg
import pytest

from agent import MigrationInfo, open_agent
from coordinator import open_coordinator
from coordinator.events import Event, Reporter, SqlProgress
from coordinator.executor import PostgresExecutor
from coordinator.pg.attempts import RetryPolicy
from coordinator.pg.errors import SqlFailure
from statemachine import Migration, MigrationStatus, Phase
from statemachine.gate import MigrationRejected, rollback_note
from statemachine.sql import ExecutionGroup, Plan, build_plan, group_for_execution


# ----------------------------------------------------------------------------- helpers
def execute(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement.encode())


def query(dsn: str, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return list(conn.execute(sql.encode(), params).fetchall())


def make_users(dsn: str, rows: int = 6) -> None:
    execute(
        dsn,
        "CREATE TABLE users (id serial PRIMARY KEY, name text NOT NULL, team int NOT NULL)",
        f"INSERT INTO users (name, team) SELECT 'u' || g, g % 3 FROM generate_series(1, {rows}) g",
    )


def columns(dsn: str, table: str = "users") -> list[str]:
    rows = query(
        dsn,
        "SELECT column_name FROM information_schema.columns WHERE table_name = %s "
        "ORDER BY ordinal_position",
        (table,),
    )
    return [str(r[0]) for r in rows]


def indexes(dsn: str, table: str = "users") -> dict[str, bool]:
    """Index name -> indisvalid, for every index of `table`."""
    rows = query(
        dsn,
        "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE i.indrelid = %s::regclass",
        (table,),
    )
    return {str(name): bool(valid) for name, valid in rows}


def fail_concurrent_build(dsn: str, sql: str) -> None:
    """Run a CONCURRENTLY build that fails, leaving its INVALID index (the problem we fix)."""
    with pytest.raises(psycopg.errors.UniqueViolation):
        execute(dsn, sql)


# ------------------------------------------------------------------------ RetryPolicy
def test_backoff_is_full_jitter_under_an_exponential_cap() -> None:
    policy = RetryPolicy(base_delay=0.2, max_delay=5.0)
    rng = random.Random(7)
    for attempt in range(1, 12):
        ceiling = min(5.0, 0.2 * 2 ** (attempt - 1))
        delays = [policy.backoff(attempt, rng) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # it really uses the whole range...
        assert min(delays) < ceiling * 0.2  # ...from zero up ("full" jitter)
    assert policy.backoff(10_000, rng) <= 5.0  # no overflow for absurd attempt numbers


def test_retry_budget_is_attempts_or_seconds() -> None:
    policy = RetryPolicy(max_attempts=3, max_seconds=10.0)
    assert not policy.spent(2, 9.9)
    assert policy.spent(3, 0.0)
    assert policy.spent(1, 10.0)
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


def test_bad_timeouts_are_refused() -> None:
    with pytest.raises(ValueError, match="lock_timeout"):
        PostgresExecutor("postgresql:///x", lock_timeout=0)
    with pytest.raises(ValueError, match="statement_timeout"):
        PostgresExecutor("postgresql:///x", statement_timeout=-1)


# --------------------------------------------------------------------- execution groups
async def test_concurrent_index_runs_outside_the_transaction_and_is_valid(dsn: str) -> None:
    make_users(dsn)
    events: list[Event] = []
    executor = PostgresExecutor(dsn)
    attempts = await executor.run_phase_reporting(
        Phase.EXECUTE,
        group_for_execution(
            [
                "ALTER TABLE users ADD COLUMN email text",
                "CREATE INDEX CONCURRENTLY users_email ON users (email)",
                "ALTER TABLE users ADD COLUMN nick text",
            ]
        ),
        Reporter("m", events.append),
    )
    assert [(a.group, a.transactional, a.ok) for a in attempts] == [
        (0, True, True),
        (1, False, True),
        (2, True, True),
    ]
    assert attempts[1].statements == ("CREATE INDEX CONCURRENTLY users_email ON users (email)",)
    assert indexes(dsn)["users_email"] is True
    assert columns(dsn)[-2:] == ["email", "nick"]
    messages = [e.message for e in events if isinstance(e, SqlProgress)]
    assert "group 2/3 [autocommit, 1 statement] committed" in messages


async def test_a_string_with_several_statements_is_split_into_groups(dsn: str) -> None:
    make_users(dsn)
    attempts = await PostgresExecutor(dsn).run_phase(
        Phase.EXECUTE,
        group_for_execution(
            [
                "ALTER TABLE users ADD COLUMN email text; "
                "CREATE INDEX CONCURRENTLY ue ON users (email)"
            ]
        ),
    )
    assert [a.transactional for a in attempts] == [True, False]
    assert indexes(dsn)["ue"] is True


async def test_new_enum_value_is_usable_by_the_next_group(dsn: str) -> None:
    # ALTER TYPE ... ADD VALUE runs in autocommit, so the value is committed before it is used.
    execute(dsn, "CREATE TYPE mood AS ENUM ('ok')", "CREATE TABLE t (m mood)")
    attempts = await PostgresExecutor(dsn).run_phase(
        Phase.EXECUTE,
        group_for_execution(
            ["ALTER TYPE mood ADD VALUE 'great'", "INSERT INTO t VALUES ('great')"]
        ),
    )
    assert [a.transactional for a in attempts] == [False, True]
    assert query(dsn, "SELECT m::text FROM t") == [("great",)]


async def test_failed_concurrent_build_leaves_no_invalid_index(dsn: str) -> None:
    make_users(dsn)  # team has duplicates: a unique index on it cannot be built
    with pytest.raises(SqlFailure) as info:
        await PostgresExecutor(dsn).run_phase(
            Phase.EXECUTE,
            group_for_execution(
                [
                    "CREATE UNIQUE INDEX CONCURRENTLY users_team ON users (team)",
                ]
            ),
        )
    failure = info.value
    assert failure.sqlstate == "23505"
    assert failure.committed_groups == 0
    assert "dropped INVALID index users_team" in failure.message
    assert failure.attempts[0].transactional is False
    assert indexes(dsn) == {"users_pkey": True}


async def test_unnamed_failed_concurrent_build_is_cleaned_up_too(dsn: str) -> None:
    make_users(dsn)
    with pytest.raises(SqlFailure):
        await PostgresExecutor(dsn).run_phase(
            Phase.EXECUTE,
            group_for_execution(
                [
                    "CREATE UNIQUE INDEX CONCURRENTLY ON users (team)",
                ]
            ),
        )
    assert indexes(dsn) == {"users_pkey": True}


async def test_leftover_invalid_index_of_an_earlier_run_is_dropped_before_building(
    dsn: str,
) -> None:
    make_users(dsn)
    # An earlier, crashed run left an INVALID users_name (a duplicate name at the time).
    execute(dsn, "UPDATE users SET name = 'same'")
    fail_concurrent_build(dsn, "CREATE UNIQUE INDEX CONCURRENTLY users_name ON users (name)")
    assert indexes(dsn)["users_name"] is False
    execute(dsn, "UPDATE users SET name = 'u' || id")
    attempts = await PostgresExecutor(dsn).run_phase(
        Phase.EXECUTE,
        group_for_execution(
            [
                "CREATE UNIQUE INDEX CONCURRENTLY users_name ON users (name)",
            ]
        ),
    )
    assert (
        attempts[0].detail is not None and "dropped INVALID index users_name" in attempts[0].detail
    )
    assert indexes(dsn)["users_name"] is True


async def test_a_valid_index_of_the_same_name_is_never_dropped(dsn: str) -> None:
    make_users(dsn)
    execute(dsn, "CREATE INDEX users_name ON users (name)")
    with pytest.raises(SqlFailure) as info:
        await PostgresExecutor(dsn).run_phase(
            Phase.EXECUTE,
            group_for_execution(
                [
                    "CREATE INDEX CONCURRENTLY users_name ON users (team)",
                ]
            ),
        )
    assert info.value.sqlstate == "42P07"  # already exists
    assert indexes(dsn)["users_name"] is True


async def test_autocommit_failure_after_a_committed_group_reports_it(dsn: str) -> None:
    make_users(dsn)
    with pytest.raises(SqlFailure) as info:
        await PostgresExecutor(dsn).run_phase(
            Phase.EXECUTE,
            group_for_execution(
                [
                    "ALTER TABLE users ADD COLUMN email text",
                    "CREATE UNIQUE INDEX CONCURRENTLY users_team ON users (team)",
                ]
            ),
        )
    assert info.value.committed_groups == 1
    assert [(a.group, a.ok) for a in info.value.attempts] == [(0, True), (1, False)]
    assert "email" in columns(dsn)  # the first group stays committed


async def test_transactional_group_is_all_or_nothing(dsn: str) -> None:
    make_users(dsn)
    with pytest.raises(SqlFailure) as info:
        await PostgresExecutor(dsn).run_phase(
            Phase.EXECUTE,
            group_for_execution(
                ["ALTER TABLE users ADD COLUMN email text", "ALTER TABLE nope ADD COLUMN x int"]
            ),
        )
    assert info.value.statement == "ALTER TABLE nope ADD COLUMN x int"
    assert info.value.sqlstate == "42P01"
    assert "email" not in columns(dsn)


async def test_statement_timeout_stops_a_runaway_statement(dsn: str) -> None:
    executor = PostgresExecutor(dsn, statement_timeout=0.2)
    with pytest.raises(SqlFailure) as info:
        await executor.run_phase(
            Phase.EXECUTE,
            group_for_execution(
                [
                    "SELECT pg_sleep(30)",
                ]
            ),
        )
    assert info.value.sqlstate == "57014"
    assert "statement timeout" in info.value.message


async def test_invalid_sql_fails_with_postgresql_s_message(dsn: str) -> None:
    with pytest.raises(SqlFailure) as info:
        await PostgresExecutor(dsn).run_phase(
            Phase.EXECUTE,
            [ExecutionGroup(True, ("ALTER TABLE users ADD",), (0,))],
        )
    assert info.value.sqlstate == "42601"


# ------------------------------------------------------------- rollback and lint gate
def _rollback_statements(plan: Plan) -> tuple[str, ...]:
    return tuple(s for g in plan.rollback.phase.groups for s in g.statements)


def test_rollback_is_given_derived_or_explained() -> None:
    given = build_plan(
        Migration(
            "g",
            ["ALTER TABLE t ADD COLUMN a int"],
            rollback_sql=[
                "SELECT 1",
            ],
        )
    )
    assert _rollback_statements(given) == ("SELECT 1",)
    derived = build_plan(
        Migration(
            "d",
            [
                "ALTER TABLE t ADD COLUMN a int",
            ],
        )
    )
    assert derived.rollback.source == "derived"
    assert _rollback_statements(derived) == ("ALTER TABLE t DROP COLUMN IF EXISTS a",)
    assert rollback_note(derived) is None
    none = build_plan(
        Migration(
            "n",
            [
                "UPDATE t SET a = 1",
            ],
        )
    )
    assert _rollback_statements(none) == ()
    note = rollback_note(none)
    assert note is not None and "data changes cannot be undone" in note


async def test_derived_rollback_drops_the_added_column_after_an_apply_nack(dsn: str) -> None:
    make_users(dsn)

    async def refuse(info: MigrationInfo) -> None:
        raise RuntimeError("new code cannot start")

    migration = Migration(
        "add_email",
        [
            "ALTER TABLE users ADD COLUMN email text",
        ],
    )
    async with (
        open_coordinator(dsn, ack_timeout=10) as coordinator,
        open_agent(coordinator.url, agent_id="app-1", on_apply=refuse),
    ):
        await coordinator.wait_for_agents(1, timeout=10)
        result = await coordinator.run_migration(migration)
    assert result.status is MigrationStatus.FAILED
    assert "new code cannot start" in (result.reason or "")
    assert result.schema_restored is True
    rollback = [a for a in result.sql_attempts if a.phase is Phase.ROLLBACK]
    assert rollback[0].statements == ("ALTER TABLE users DROP COLUMN IF EXISTS email",)
    assert "email" not in columns(dsn)


async def test_underivable_rollback_leaves_schema_expanded_and_says_why(dsn: str) -> None:
    make_users(dsn)

    async def refuse(info: MigrationInfo) -> None:
        raise RuntimeError("no")

    migration = Migration(
        "touch", ["ALTER TABLE users ADD COLUMN email text", "UPDATE users SET email = name"]
    )
    async with (
        open_coordinator(dsn, ack_timeout=10) as coordinator,
        open_agent(coordinator.url, agent_id="app-1", on_apply=refuse),
    ):
        await coordinator.wait_for_agents(1, timeout=10)
        result = await coordinator.run_migration(migration)
    assert result.status is MigrationStatus.FAILED
    assert result.schema_restored is False
    assert any(
        "schema was left expanded" in w and "data changes cannot be undone" in w
        for w in result.warnings
    )
    assert "email" in columns(dsn)


async def test_failed_autocommit_group_rolls_back_what_earlier_groups_committed(
    dsn: str,
) -> None:
    make_users(dsn)
    migration = Migration(
        "email_unique_team",
        [
            "ALTER TABLE users ADD COLUMN email text",
            "CREATE UNIQUE INDEX CONCURRENTLY users_team ON users (team)",
        ],
    )
    async with open_coordinator(dsn, ack_timeout=10) as coordinator:
        result = await coordinator.run_migration(migration)
    assert result.status is MigrationStatus.FAILED
    assert "could not create unique index" in (result.reason or "")
    assert result.schema_restored is True  # derived: DROP INDEX ... IF EXISTS, DROP COLUMN
    assert "email" not in columns(dsn)
    assert indexes(dsn) == {"users_pkey": True}


async def test_lint_gate_rejects_drop_column_unless_forced(dsn: str) -> None:
    make_users(dsn)
    migration = Migration("drop_name", ["ALTER TABLE users DROP COLUMN name"], rollback_sql=[])
    async with open_coordinator(dsn, ack_timeout=10) as coordinator:
        with pytest.raises(MigrationRejected) as info:
            await coordinator.run_migration(migration)
        assert [f.rule for f in info.value.findings if f.severity == "error"] == ["LS101"]
        assert "LS101" in str(info.value) and "force=True" in str(info.value)
        assert "name" in columns(dsn)
        assert query(dsn, "SELECT count(*) FROM lockstep.migrations") == [(0,)]

        result = await coordinator.run_migration(migration, force=True)
    assert result.status is MigrationStatus.COMPLETED
    assert "name" not in columns(dsn)
    assert any("forced past error" in w and "LS101" in w for w in result.warnings)


async def test_lint_warnings_go_to_the_result(dsn: str) -> None:
    make_users(dsn)
    migration = Migration(
        "plain_index",
        [
            "CREATE INDEX users_name ON users (name)",
        ],
    )
    async with open_coordinator(dsn, ack_timeout=10) as coordinator:
        result = await coordinator.run_migration(migration)
    assert result.status is MigrationStatus.COMPLETED
    assert any("LS201" in w for w in result.warnings)
