"""Which statements must run outside a transaction, and how scripts are grouped for execution."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from statemachine.sql import ExecutionGroup, classify, group_for_execution, needs_autocommit
from statemachine.sql.locks import lock_effect
from statemachine.sql.split import parse_statement


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE INDEX CONCURRENTLY i ON t (a)",
        "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS i ON s.t (a)",
        "DROP INDEX CONCURRENTLY i",
        "REINDEX INDEX CONCURRENTLY i",
        "REINDEX (CONCURRENTLY) TABLE t",
        "VACUUM",
        "VACUUM FULL t",
        "VACUUM (ANALYZE) t",
        "ALTER TYPE mood ADD VALUE 'meh'",
        "ALTER TYPE mood ADD VALUE IF NOT EXISTS 'meh' BEFORE 'sad'",
        "CREATE DATABASE other",
        "ALTER TABLE p DETACH PARTITION c CONCURRENTLY",
    ],
)
def test_non_transactional(sql: str) -> None:
    assert needs_autocommit(sql)
    assert not classify(sql).transactional


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE INDEX i ON t (a)",
        "DROP INDEX i",
        "REINDEX TABLE t",
        "REINDEX (CONCURRENTLY false) TABLE t",
        "ANALYZE t",
        "ALTER TYPE mood RENAME VALUE 'a' TO 'b'",
        "ALTER TABLE t ADD COLUMN c int",
        "CREATE TABLE t (id int)",
        "UPDATE t SET a = 1",
        "ALTER TABLE p DETACH PARTITION c",
    ],
)
def test_transactional(sql: str) -> None:
    assert not needs_autocommit(sql)


@pytest.mark.parametrize(
    ("sql", "kind", "target"),
    [
        ("ALTER TABLE s.users ADD COLUMN email text", "ALTER TABLE ADD COLUMN", "s.users"),
        (
            "ALTER TABLE t ADD COLUMN a int, ALTER COLUMN b SET DEFAULT 1",
            "ALTER TABLE ADD COLUMN, ALTER COLUMN SET DEFAULT",
            "t",
        ),
        ("ALTER TABLE t ALTER COLUMN a TYPE bigint", "ALTER TABLE ALTER COLUMN TYPE", "t"),
        ("CREATE INDEX CONCURRENTLY i ON t (a)", "CREATE INDEX CONCURRENTLY", "t"),
        ("CREATE UNIQUE INDEX i ON t (a)", "CREATE UNIQUE INDEX", "t"),
        ("DROP TABLE s.old", "DROP TABLE", "s.old"),
        ("DROP MATERIALIZED VIEW m", "DROP MATERIALIZED VIEW", "m"),
        ("ALTER TABLE t RENAME COLUMN a TO b", "ALTER TABLE RENAME COLUMN", "t"),
        ("ALTER TABLE t RENAME TO u", "ALTER TABLE RENAME", "t"),
        ('CREATE TABLE "Odd"."Name" (id int)', "CREATE TABLE", "Odd.Name"),
        ("CREATE SEQUENCE q", "CREATE SEQUENCE", "q"),
        (
            "CREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE sql AS 'select 1'",
            "CREATE OR REPLACE FUNCTION",
            "f",
        ),
        ("CREATE TYPE mood AS ENUM ('a')", "CREATE TYPE AS ENUM", "mood"),
        ("VACUUM FULL t", "VACUUM FULL", None),
        ("BEGIN", "BEGIN", None),
        ("TRUNCATE t", "TRUNCATE", None),
        ("CREATE MATERIALIZED VIEW m AS SELECT 1", "CREATE MATERIALIZED VIEW", "m"),
    ],
)
def test_kind_and_target(sql: str, kind: str, target: str | None) -> None:
    info = classify(sql)
    assert info.kind == kind
    assert info.target == target


def test_alter_table_actions() -> None:
    info = classify("ALTER TABLE t ADD COLUMN a int, DROP COLUMN b")
    assert info.actions == ("ADD COLUMN", "DROP COLUMN")


def test_classify_rejects_several_statements() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        classify("SELECT 1; SELECT 2")


def test_grouping_keeps_order_and_isolates_autocommit() -> None:
    groups = group_for_execution(
        [
            "ALTER TABLE t ADD COLUMN a int",
            "ALTER TABLE t ADD COLUMN b int",
            "CREATE INDEX CONCURRENTLY t_a ON t (a)",
            "CREATE INDEX CONCURRENTLY t_b ON t (b)",
            "ALTER TABLE t ADD CONSTRAINT c CHECK (a > 0) NOT VALID",
        ]
    )
    assert groups == [
        ExecutionGroup(
            True, ("ALTER TABLE t ADD COLUMN a int", "ALTER TABLE t ADD COLUMN b int"), (0, 1)
        ),
        ExecutionGroup(False, ("CREATE INDEX CONCURRENTLY t_a ON t (a)",), (2,)),
        ExecutionGroup(False, ("CREATE INDEX CONCURRENTLY t_b ON t (b)",), (3,)),
        ExecutionGroup(True, ("ALTER TABLE t ADD CONSTRAINT c CHECK (a > 0) NOT VALID",), (4,)),
    ]
    assert [g.autocommit for g in groups] == [False, True, True, False]


def test_grouping_splits_multi_statement_strings() -> None:
    groups = group_for_execution(
        ["CREATE TABLE n (id int); CREATE INDEX CONCURRENTLY n_id ON n (id); SELECT 1"]
    )
    assert [(g.transactional, g.statements, g.sources) for g in groups] == [
        (True, ("CREATE TABLE n (id int)",), (0,)),
        (False, ("CREATE INDEX CONCURRENTLY n_id ON n (id)",), (0,)),
        (True, ("SELECT 1",), (0,)),
    ]


def test_grouping_of_nothing() -> None:
    assert group_for_execution([]) == []


def test_validate_after_not_valid_runs_alone_after_the_add_committed() -> None:
    """The ACCESS EXCLUSIVE lock of ADD ... NOT VALID must not be held while VALIDATE scans."""
    groups = group_for_execution(
        [
            "ALTER TABLE users ADD CONSTRAINT c CHECK (age > 0) NOT VALID",
            "ALTER TABLE users VALIDATE CONSTRAINT c",
            "ALTER TABLE users ADD COLUMN x int",
        ]
    )
    assert [g.statements for g in groups] == [
        ("ALTER TABLE users ADD CONSTRAINT c CHECK (age > 0) NOT VALID",),
        ("ALTER TABLE users VALIDATE CONSTRAINT c",),
        ("ALTER TABLE users ADD COLUMN x int",),
    ]
    assert [g.transactional for g in groups] == [True, False, True]
    assert groups[1].reason is not None
    assert "ACCESS EXCLUSIVE lock on users" in groups[1].reason


@pytest.mark.parametrize(
    ("first", "scan"),
    [
        (
            "ALTER TABLE o ADD CONSTRAINT fk FOREIGN KEY (c) REFERENCES c (id) NOT VALID",
            "ALTER TABLE o VALIDATE CONSTRAINT fk",
        ),
        ("ALTER TABLE o ADD COLUMN n int", "UPDATE o SET n = 0"),
        ("CREATE TRIGGER t BEFORE UPDATE ON o FOR EACH ROW EXECUTE FUNCTION f()", "DELETE FROM o"),
        ("ALTER TABLE other ADD COLUMN n int", "ALTER TABLE o VALIDATE CONSTRAINT c"),
        ("LOCK TABLE o IN SHARE MODE", "INSERT INTO log SELECT * FROM o"),
        ("ALTER TABLE o DROP CONSTRAINT x", "ANALYZE o"),
    ],
)
def test_every_scan_under_a_weak_lock_leaves_a_write_blocking_group(first: str, scan: str) -> None:
    groups = group_for_execution([first, scan])
    assert [g.statements for g in groups] == [(first,), (scan,)]


@pytest.mark.parametrize(
    "statements",
    [
        # Nothing before the scan blocks writes: one transaction is fine.
        ["ALTER TABLE o VALIDATE CONSTRAINT a", "ALTER TABLE o VALIDATE CONSTRAINT b"],
        ["COMMENT ON TABLE o IS 'x'", "UPDATE o SET n = 0"],
        # A table created in the same transaction is invisible to everyone else.
        ["CREATE TABLE n (id int)", "INSERT INTO n SELECT id FROM o"],
        # Scans that take a strong lock themselves gain nothing from a split (lint warns).
        ["ALTER TABLE o ADD COLUMN n int", "CREATE INDEX i ON o (n)"],
        ["ALTER TABLE o ADD COLUMN n int", "INSERT INTO o (id) VALUES (1)"],
    ],
)
def test_no_split_without_a_held_write_blocking_lock(statements: list[str]) -> None:
    assert len(group_for_execution(statements)) == 1


_POOL = [
    "ALTER TABLE a ADD COLUMN x int",
    "ALTER TABLE a ADD CONSTRAINT c CHECK (x > 0) NOT VALID",
    "ALTER TABLE a VALIDATE CONSTRAINT c",
    "ALTER TABLE b ADD CONSTRAINT f FOREIGN KEY (x) REFERENCES a (id) NOT VALID",
    "ALTER TABLE b VALIDATE CONSTRAINT f",
    "UPDATE a SET x = 1",
    "INSERT INTO b SELECT * FROM a",
    "CREATE TABLE n (id int)",
    "INSERT INTO n SELECT id FROM a",
    "CREATE INDEX CONCURRENTLY i ON a (x)",
    "COMMENT ON TABLE a IS 'x'",
    "ANALYZE a",
    "CREATE TRIGGER t BEFORE UPDATE ON b FOR EACH ROW EXECUTE FUNCTION f()",
]


@given(st.lists(st.sampled_from(_POOL), max_size=12))
def test_no_transaction_scans_while_holding_a_write_blocking_lock(statements: list[str]) -> None:
    """The invariant behind the cut, stated from the lock table alone, for any order."""
    groups = group_for_execution(statements)
    assert [s for g in groups for s in g.statements] == statements
    for group in groups:
        if not group.transactional:
            continue
        held: set[str] = set()
        created: set[str] = set()
        for statement in group.statements:
            effect = lock_effect(parse_statement(statement))
            if effect.scans and not (effect.strongest and effect.strongest.blocks_writes):
                assert not held, f"{statement!r} scans while {held} are locked"
            created |= set(effect.creates)
            held |= {r for r, m in effect.locks if m.blocks_writes and r not in created}
