"""Derived rollbacks: exact inverses for additive statements, refusal (with a reason) otherwise."""

from __future__ import annotations

import pytest

from statemachine.sql import (
    CannotDeriveRollback,
    SqlSyntaxError,
    derive_rollback,
    try_derive_rollback,
)


@pytest.mark.parametrize(
    ("sql", "inverse"),
    [
        (
            "ALTER TABLE users ADD COLUMN email text",
            ["ALTER TABLE users DROP COLUMN IF EXISTS email"],
        ),
        (
            'ALTER TABLE app."Users" ADD COLUMN a int, ADD COLUMN "Select" text DEFAULT \'x\'',
            [
                'ALTER TABLE app."Users" DROP COLUMN IF EXISTS "Select"',
                'ALTER TABLE app."Users" DROP COLUMN IF EXISTS a',
            ],
        ),
        ("CREATE TABLE s.t (id int PRIMARY KEY)", ["DROP TABLE IF EXISTS s.t"]),
        ("CREATE INDEX i ON t (a)", ["DROP INDEX IF EXISTS i"]),
        ("CREATE INDEX i ON s.t (a)", ["DROP INDEX IF EXISTS s.i"]),
        (
            'CREATE UNIQUE INDEX CONCURRENTLY "Idx" ON t (a)',
            ['DROP INDEX CONCURRENTLY IF EXISTS "Idx"'],
        ),
        (
            "ALTER TABLE t ADD CONSTRAINT t_a_fk FOREIGN KEY (a) REFERENCES u (id) NOT VALID",
            ["ALTER TABLE t DROP CONSTRAINT IF EXISTS t_a_fk"],
        ),
        (
            "ALTER TABLE t ADD CONSTRAINT c CHECK (a > 0) NOT VALID, VALIDATE CONSTRAINT c",
            ["ALTER TABLE t DROP CONSTRAINT IF EXISTS c"],
        ),
        (
            "CREATE TRIGGER sync BEFORE INSERT OR UPDATE ON s.users "
            "FOR EACH ROW EXECUTE FUNCTION s.sync_name()",
            ["DROP TRIGGER IF EXISTS sync ON s.users"],
        ),
        (
            "CREATE FUNCTION s.f(a int, OUT b text, VARIADIC c int[]) "
            "LANGUAGE sql AS $$ SELECT 'x' $$",
            ["DROP FUNCTION IF EXISTS s.f (integer, integer[])"],
        ),
        (
            "CREATE FUNCTION sync_name() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN NEW.full_name := NEW.name; RETURN NEW; END $$",
            ["DROP FUNCTION IF EXISTS sync_name ()"],
        ),
        ("CREATE SEQUENCE s.q", ["DROP SEQUENCE IF EXISTS s.q"]),
        ("CREATE VIEW v AS SELECT 1", ["DROP VIEW IF EXISTS v"]),
        ("CREATE MATERIALIZED VIEW m AS SELECT 1", ["DROP MATERIALIZED VIEW IF EXISTS m"]),
        ("CREATE TYPE s.mood AS ENUM ('a', 'b')", ["DROP TYPE IF EXISTS s.mood"]),
        ("CREATE SCHEMA app", ["DROP SCHEMA IF EXISTS app"]),
        ("SET lock_timeout = '1s'", []),
        ("ANALYZE t", []),
    ],
)
def test_supported_inverse(sql: str, inverse: list[str]) -> None:
    assert derive_rollback([sql]) == inverse


def test_inverses_run_in_reverse_order() -> None:
    rollback = derive_rollback(
        [
            "CREATE TABLE n (id int)",
            "ALTER TABLE users ADD n_id int; CREATE INDEX CONCURRENTLY users_n ON users(n_id)",
            "ALTER TABLE users ADD CONSTRAINT users_n_fk FOREIGN KEY (n_id) REFERENCES n NOT VALID",
        ]
    )
    assert rollback == [
        "ALTER TABLE users DROP CONSTRAINT IF EXISTS users_n_fk",
        "DROP INDEX CONCURRENTLY IF EXISTS users_n",
        "ALTER TABLE users DROP COLUMN IF EXISTS n_id",
        "DROP TABLE IF EXISTS n",
    ]


def test_constraint_using_index_created_in_same_migration() -> None:
    rollback = derive_rollback(
        [
            "CREATE UNIQUE INDEX CONCURRENTLY t_email ON t (email)",
            "ALTER TABLE t ADD CONSTRAINT t_email_key UNIQUE USING INDEX t_email",
        ]
    )
    assert rollback == [
        "ALTER TABLE t DROP CONSTRAINT IF EXISTS t_email_key",
        "DROP INDEX CONCURRENTLY IF EXISTS t_email",
    ]


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("CREATE INDEX ON t (a)", "no name"),
        ("ALTER TABLE t ADD CHECK (a > 0)", "no name"),
        ("ALTER TABLE t ADD PRIMARY KEY (id)", "no name"),
        ("CREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE sql AS 'select 1'", "OR REPLACE"),
        ("CREATE OR REPLACE VIEW v AS SELECT 1", "OR REPLACE"),
        ("CREATE OR REPLACE TRIGGER g AFTER INSERT ON t EXECUTE FUNCTION f()", "OR REPLACE"),
        ("CREATE TABLE IF NOT EXISTS t (id int)", "may have existed"),
        ("CREATE INDEX IF NOT EXISTS i ON t (a)", "may have existed"),
        ("ALTER TABLE t ADD COLUMN IF NOT EXISTS c int", "may have existed"),
        ("ALTER TABLE t ADD CONSTRAINT k UNIQUE USING INDEX old_idx", "did not create"),
        ("ALTER TABLE t ADD COLUMN c int, ALTER COLUMN d SET DEFAULT 0", "not purely additive"),
        ("ALTER TABLE t DROP COLUMN c", "not purely additive"),
        ("ALTER TYPE mood ADD VALUE 'x'", "cannot remove a value"),
        ("UPDATE t SET a = 1", "data changes"),
        ("INSERT INTO t VALUES (1)", "data changes"),
        ("DROP TABLE t", "cannot be recreated"),
        ("ALTER TABLE t RENAME COLUMN a TO b", "RENAME COLUMN on t"),
        ("CREATE EXTENSION pgcrypto", "CREATE EXTENSION"),
    ],
)
def test_refusals_name_statement_and_reason(sql: str, reason: str) -> None:
    with pytest.raises(CannotDeriveRollback) as info:
        derive_rollback(["ALTER TABLE ok ADD COLUMN x int", sql])
    assert info.value.statement == sql
    assert reason in info.value.reason
    assert sql in str(info.value)


def test_try_derive_collects_every_reason() -> None:
    result = try_derive_rollback(
        ["ALTER TABLE t ADD COLUMN a int", "DROP TABLE x", "CREATE INDEX ON t (a)"]
    )
    assert not result.ok
    assert result.statements is None
    assert [(f.index, f.statement) for f in result.failures] == [
        (1, "DROP TABLE x"),
        (2, "CREATE INDEX ON t (a)"),
    ]
    assert len(result.reasons) == 2 and "DROP TABLE x" in result.reasons[0]


def test_try_derive_success_and_syntax_error() -> None:
    ok = try_derive_rollback(["ALTER TABLE t ADD COLUMN a int"])
    assert ok.ok and ok.statements == ("ALTER TABLE t DROP COLUMN IF EXISTS a",)
    bad = try_derive_rollback(["ALTER TABLE t ADD COLUM a int"])
    assert not bad.ok and bad.failures[0].syntax_error
    with pytest.raises(SqlSyntaxError):
        derive_rollback(["ALTER TABLE t ADD COLUM a int"])


def test_nothing_to_derive() -> None:
    assert derive_rollback([]) == []


def test_defaults_of_added_columns_comments_and_own_sequences_need_no_inverse() -> None:
    assert derive_rollback(
        [
            "CREATE SEQUENCE s",
            "ALTER TABLE t ADD COLUMN c int",
            "ALTER TABLE t ALTER COLUMN c SET DEFAULT nextval('s')",
            "ALTER SEQUENCE s OWNED BY t.c",
            "COMMENT ON COLUMN t.c IS 'why'",
        ]
    ) == ["ALTER TABLE t DROP COLUMN IF EXISTS c", "DROP SEQUENCE IF EXISTS s"]
    with pytest.raises(CannotDeriveRollback, match="not purely additive"):
        derive_rollback(["ALTER TABLE t ALTER COLUMN c SET DEFAULT 0"])
