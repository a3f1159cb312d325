"""The plan shows each phase's groups, the rollback that would run, and lint findings."""

from __future__ import annotations

from statemachine import Backfill, Migration, Phase
from statemachine.sql import build_plan


def test_plan_with_derived_rollback() -> None:
    m = Migration(
        "add_full_name",
        [
            "ALTER TABLE users ADD COLUMN full_name text",
            "CREATE INDEX CONCURRENTLY users_full_name ON users (full_name)",
        ],
        contract_sql=["ALTER TABLE users DROP COLUMN name"],
        backfills=[Backfill("users", "full_name = name", where="full_name IS NULL")],
    )
    plan = build_plan(m)
    assert plan.execute.phase is Phase.EXECUTE
    assert [g.transactional for g in plan.execute.groups] == [True, False]
    assert plan.contract.statement_count == 1
    assert plan.rollback.source == "derived"
    assert plan.rollback.phase.groups[0].statements == (
        "DROP INDEX CONCURRENTLY IF EXISTS users_full_name",
    )
    assert plan.findings == ()
    assert not plan.has_errors
    text = plan.to_text()
    assert "EXECUTE (old code live): 2 statement(s)" in text
    assert "group 2 [autocommit]" in text
    assert "UPDATE users SET full_name = name WHERE full_name IS NULL" in text
    assert "ROLLBACK (derived): 2 statement(s)" in text
    assert "FINDINGS (0)" in text


def test_plan_without_rollback_says_schema_left_expanded() -> None:
    plan = build_plan(Migration("m", ["ALTER TABLE t RENAME COLUMN a TO b"]))
    assert plan.rollback.source == "none"
    assert plan.rollback.leaves_schema_expanded
    assert plan.has_errors  # LS103
    text = plan.to_text()
    assert "schema would be left expanded" in text
    assert "LS103" in text and "LS301" in text


def test_plan_with_given_rollback_and_syntax_error() -> None:
    plan = build_plan(
        Migration("m", ["ALTER TABLE t ADD COLUMN a int"], rollback_sql=["DROP TABL t"])
    )
    assert plan.rollback.source == "given"
    assert plan.rollback.phase.error is not None
    assert plan.has_errors
    assert [f.rule for f in plan.findings] == ["LS000"]
    assert "cannot plan: syntax error" in plan.to_text()


def test_plan_existing_tables_passed_to_lint() -> None:
    m = Migration("m", ["CREATE INDEX i ON fresh (a)"], rollback_sql=[])
    assert [f.rule for f in build_plan(m).findings] == ["LS201"]
    assert build_plan(m, existing_tables=frozenset({"users"})).findings == ()
