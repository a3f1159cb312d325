"""Each lint rule fires where it should, stays quiet where the statement is safe."""

from __future__ import annotations

import pytest

from statemachine import Migration
from statemachine.sql import RULES, Finding, lint_migration, lint_statements


def rules_for(sql: str, section: str = "sql", **kwargs: object) -> list[str]:
    findings = lint_statements(section, [sql], **kwargs)  # type: ignore[arg-type]
    return [f.rule for f in findings]


@pytest.mark.parametrize(
    ("sql", "rule"),
    [
        ("ALTER TABLE users DROP COLUMN name", "LS101"),
        ("DROP TABLE users", "LS102"),
        ("DROP VIEW IF EXISTS active_users", "LS102"),
        ("ALTER TABLE users RENAME COLUMN name TO full_name", "LS103"),
        ("ALTER TABLE users RENAME TO people", "LS104"),
        ("ALTER TABLE users ALTER COLUMN id TYPE bigint", "LS105"),
        ("ALTER TABLE users ADD COLUMN age int NOT NULL", "LS106"),
        ("ALTER TABLE users ADD COLUMN code int PRIMARY KEY", "LS106"),
        ("ALTER TABLE users ALTER COLUMN email SET NOT NULL", "LS107"),
        ("TRUNCATE users", "LS108"),
        ("BEGIN", "LS109"),
        ("COMMIT", "LS109"),
        ("CREATE INDEX users_email ON users (email)", "LS201"),
        ("ALTER TABLE users ADD CONSTRAINT fk FOREIGN KEY (org) REFERENCES orgs (id)", "LS202"),
        ("ALTER TABLE users ADD COLUMN org int REFERENCES orgs (id)", "LS202"),
        ("ALTER TABLE users ADD CONSTRAINT pos CHECK (age > 0)", "LS203"),
        ("ALTER TABLE users ADD COLUMN token uuid DEFAULT gen_random_uuid()", "LS204"),
        ("ALTER TABLE users ADD COLUMN r float DEFAULT random() * 10", "LS204"),
        ("ALTER TABLE users ADD COLUMN t timestamptz DEFAULT clock_timestamp()", "LS204"),
        ("ALTER TABLE users ADD COLUMN u uuid DEFAULT public.uuid_generate_v4()", "LS204"),
        ("ALTER TABLE users ADD COLUMN n bigint DEFAULT nextval('s')", "LS204"),
        ("ALTER TABLE users ADD COLUMN n bigserial", "LS204"),
        ("ALTER TABLE users ADD COLUMN n int GENERATED ALWAYS AS IDENTITY", "LS204"),
        ("ALTER TABLE users ADD COLUMN n int GENERATED ALWAYS AS (id * 2) STORED", "LS204"),
        ("VACUUM FULL users", "LS205"),
        ("CLUSTER users USING users_pkey", "LS206"),
        ("ALTER TABLE users ADD PRIMARY KEY (id)", "LS207"),
        ("ALTER TABLE users ADD CONSTRAINT users_email_key UNIQUE (email)", "LS207"),
        ("LOCK TABLE users IN ACCESS EXCLUSIVE MODE", "LS208"),
        ("REINDEX TABLE users", "LS209"),
    ],
)
def test_rule_fires_in_sql(sql: str, rule: str) -> None:
    assert rule in rules_for(sql)


@pytest.mark.parametrize(
    "sql",
    [
        "ALTER TABLE users ADD COLUMN age int NOT NULL DEFAULT 0",
        "ALTER TABLE users ADD COLUMN email text",
        "ALTER TABLE users ADD COLUMN created timestamptz NOT NULL DEFAULT now()",
        "ALTER TABLE users ADD COLUMN created timestamptz DEFAULT current_timestamp",
        "ALTER TABLE users ALTER COLUMN email DROP NOT NULL",
        "CREATE INDEX CONCURRENTLY users_email ON users (email)",
        "ALTER TABLE users ADD CONSTRAINT fk FOREIGN KEY (org) REFERENCES orgs (id) NOT VALID",
        "ALTER TABLE users ADD CONSTRAINT pos CHECK (age > 0) NOT VALID",
        "ALTER TABLE users VALIDATE CONSTRAINT pos",
        "ALTER TABLE users ADD CONSTRAINT users_email_key UNIQUE USING INDEX users_email",
        "VACUUM users",
        "REINDEX TABLE CONCURRENTLY users",
        "CREATE TABLE orgs (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text)",
        "CREATE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$",
        "SELECT 1",
    ],
)
def test_safe_statement_has_no_finding(sql: str) -> None:
    assert rules_for(sql) == []


@pytest.mark.parametrize(
    "sql",
    [
        "ALTER TABLE users DROP COLUMN name",
        "DROP TABLE users",
        "TRUNCATE users",
        "DROP SCHEMA billing CASCADE",
        "DROP TYPE mood",
        "DROP FUNCTION f()",
        "ALTER TABLE users ALTER COLUMN a DROP DEFAULT",
    ],
)
def test_destructive_is_fine_in_contract(sql: str) -> None:
    assert rules_for(sql, "contract_sql") == []
    assert rules_for(sql, "rollback_sql") == []


@pytest.mark.parametrize(
    ("sql", "rule"),
    [
        # New code is live in contract: a rename breaks it just as it breaks old code in sql.
        ("ALTER TABLE users RENAME COLUMN a TO b", "LS103"),
        ("ALTER TABLE users RENAME TO people", "LS104"),
        ("ALTER SCHEMA billing RENAME TO money", "LS114"),
        ("ALTER TYPE mood RENAME VALUE 'sad' TO 'blue'", "LS115"),
        # Fails on any populated table, whichever code is live.
        ("ALTER TABLE users ADD COLUMN age int NOT NULL", "LS106"),
        # Without a CHECK IS NOT NULL in the migration, SET NOT NULL scans under ACCESS EXCLUSIVE.
        ("ALTER TABLE users ALTER COLUMN email SET NOT NULL", "LS217"),
    ],
)
def test_hazards_of_the_contract_phase(sql: str, rule: str) -> None:
    assert rules_for(sql, "contract_sql") == [rule]


def test_lock_warnings_apply_in_contract_too() -> None:
    assert rules_for("CREATE INDEX i ON users (a)", "contract_sql") == ["LS201"]
    assert rules_for("ALTER TABLE users ALTER COLUMN a TYPE text", "contract_sql") == ["LS210"]
    assert rules_for("BEGIN", "rollback_sql") == ["LS109"]


def test_table_created_earlier_in_section_is_exempt() -> None:
    findings = lint_statements(
        "sql",
        [
            "CREATE TABLE orgs (id int)",
            "CREATE INDEX orgs_id ON orgs (id); ALTER TABLE orgs ADD COLUMN n int NOT NULL",
            "CREATE INDEX users_org ON users (org)",
        ],
    )
    assert [(f.rule, f.index) for f in findings] == [("LS201", 2)]


def test_existing_tables_narrows_index_warning() -> None:
    sql = "CREATE INDEX i ON audit (a)"
    assert rules_for(sql, existing_tables=frozenset({"users"})) == []
    assert rules_for(sql, existing_tables=frozenset({"audit"})) == ["LS201"]
    assert rules_for(sql, existing_tables=frozenset({"public.audit"})) == ["LS201"]
    assert rules_for(sql) == ["LS201"]


def test_finding_fields_and_concrete_recipe() -> None:
    m = Migration(
        "m",
        ["ALTER TABLE users ADD COLUMN x int", "ALTER TABLE app.users RENAME COLUMN name TO nm"],
        rollback_sql=[],
    )
    (finding,) = lint_migration(m)
    assert finding == Finding(
        rule="LS103",
        severity="error",
        section="sql",
        statement="ALTER TABLE app.users RENAME COLUMN name TO nm",
        index=1,
        line=None,
        message="renames app.users.name to nm: breaks old code",
        recipe=finding.recipe,
        example=finding.example,
    )
    assert "ALTER TABLE app.users ADD COLUMN nm" in finding.recipe
    assert finding.example is not None
    assert "ALTER TABLE app.users DROP COLUMN name;" in finding.example
    assert "<" in finding.recipe  # the type is unknown and shown as a placeholder
    assert str(finding).startswith("sql[1]: error LS103 (rename-column)")


def test_set_not_null_recipe_names_the_check() -> None:
    (finding,) = lint_statements("sql", ["ALTER TABLE users ALTER COLUMN email SET NOT NULL"])
    assert "CHECK (email IS NOT NULL) NOT VALID" in finding.recipe
    assert "users_email_not_null" in finding.recipe
    assert "contract_sql: ALTER TABLE users ALTER COLUMN email SET NOT NULL" in finding.recipe


def test_syntax_error_is_a_finding_with_file_line() -> None:
    findings = lint_statements("contract_sql", ["SELECT 1", "SELECT\nFROM WHERE"], lines=[3, 5])
    assert [(f.rule, f.severity, f.index, f.line) for f in findings] == [("LS000", "error", 1, 6)]
    (no_lines,) = lint_statements("sql", ["SELECT\nFROM WHERE"])
    assert no_lines.line is None and "line 2 of the statement" in no_lines.message


def test_rollback_not_derivable_is_a_warning_only_when_rollback_missing() -> None:
    sql = ["ALTER TABLE users ADD COLUMN a int", "CREATE INDEX CONCURRENTLY ON users (a)"]
    findings = lint_migration(Migration("m", sql))
    assert [(f.rule, f.severity, f.index) for f in findings] == [("LS301", "warning", 1)]
    assert "no name" in findings[0].message
    assert lint_migration(Migration("m", sql, rollback_sql=[])) == []


def test_lint_migration_maps_file_lines() -> None:
    m = Migration("m", ["SELECT 1", "ALTER TABLE t DROP COLUMN c"], rollback_sql=[])
    (finding,) = lint_migration(m, lines={"sql": (2, 7)})
    assert finding.line == 7


def test_registry_is_complete_and_stable() -> None:
    expected = {"LS000", "LS001", "LS301"} | {f"LS1{i:02d}" for i in range(1, 17)}
    expected |= {f"LS2{i:02d}" for i in range(1, 18)} | {f"LS40{i}" for i in range(1, 7)}
    assert set(RULES) == expected
    for rule_id, rule in RULES.items():
        assert rule.id == rule_id
        assert rule.severity in ("error", "warning")
        assert rule.name and rule.summary and rule.recipe
        rule.render_recipe()  # every template renders without names
    assert RULES["LS101"].name == "drop-column"
    assert list(RULES) == sorted(RULES)


def test_docs_list_every_rule() -> None:
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[3] / "docs" / "lint.md").read_text()
    assert [r for r in RULES if f"| {r} |" not in docs] == []


def test_allow_comment_in_a_statement_silences_only_that_rule() -> None:
    sql = "-- lockstep:allow LS105 ten rows\nALTER TABLE users ALTER COLUMN id TYPE bigint"
    assert rules_for(sql) == []
    (allowed,) = lint_statements("sql", [sql], include_allowed=True)
    assert allowed.rule == "LS105" and allowed.allowed == "ten rows"
    assert rules_for(sql.replace("LS105", "LS201")) == ["LS105"]
    assert rules_for(sql.replace(" ten rows", "")) == ["LS001", "LS105"]


def test_identifiers_are_quoted_in_messages_and_recipes() -> None:
    (finding,) = lint_statements(
        "sql", ['ALTER TABLE billing."User Accounts" ALTER COLUMN "Email" SET NOT NULL']
    )
    assert 'billing."User Accounts"."Email"' in finding.message
    assert 'ALTER TABLE billing."User Accounts" ADD CONSTRAINT' in finding.recipe


def test_known_type_fills_the_recipe() -> None:
    (finding,) = lint_statements("sql", ["ALTER TABLE users ADD COLUMN age integer NOT NULL"])
    assert "ADD COLUMN age integer NOT NULL DEFAULT <value>" in finding.recipe


def test_allow_comment_silences_the_rollback_finding_of_its_statement() -> None:
    sql = ["ALTER TABLE users ADD COLUMN a int", "CREATE INDEX CONCURRENTLY ON users (a)"]
    assert [f.rule for f in lint_migration(Migration("m", sql))] == ["LS301"]
    sql[1] = "-- lockstep:allow LS301 an index is harmless to leave\n" + sql[1]
    assert lint_migration(Migration("m", sql)) == []
    unnamed = Migration("m", ["CREATE INDEX CONCURRENTLY ON users (b)"])
    assert [f.rule for f in lint_migration(unnamed)] == ["LS301"]
    assert lint_migration(unnamed, allow={"LS301": "left in place on purpose"}) == []
