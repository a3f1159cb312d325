"""Migration files: sections, directives, backfills and every error with its file line."""

from __future__ import annotations

import pytest

from statemachine import Backfill
from statemachine.sql import (
    MigrationFileError,
    migration_name_from_filename,
    parse_migration_source,
    parse_migration_text,
    sort_migration_filenames,
)

FULL = """\
-- Adds users.full_name, filled from name.
-- lockstep:name add_full_name
-- lockstep:ack-timeout 12.5
-- lockstep:sql
ALTER TABLE users ADD COLUMN full_name text;
CREATE FUNCTION users_sync() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW.full_name := coalesce(NEW.full_name, NEW.name); -- keep both in step
  RETURN NEW;
END;
$$;

-- lockstep:backfill
-- copy existing rows in small batches
table=users set="full_name = name" key=id batch_size=500 where="full_name IS NULL" delay=0.01
table=orders set="note = 'x; y'"

-- lockstep:contract
ALTER TABLE users DROP COLUMN name;
-- lockstep:rollback
DROP FUNCTION IF EXISTS users_sync();
ALTER TABLE users DROP COLUMN IF EXISTS full_name;
"""


def test_full_file() -> None:
    source = parse_migration_source(FULL, default_name="0001_x")
    m = source.migration
    assert m.name == "add_full_name"
    assert m.ack_timeout == 12.5
    assert m.sql[0] == "ALTER TABLE users ADD COLUMN full_name text"
    assert m.sql[1].startswith("CREATE FUNCTION users_sync()") and m.sql[1].endswith("$$")
    assert m.backfills == (
        Backfill(
            "users",
            "full_name = name",
            key="id",
            where="full_name IS NULL",
            batch_size=500,
            delay=0.01,
        ),
        Backfill("orders", "note = 'x; y'"),
    )
    assert m.contract_sql == ("ALTER TABLE users DROP COLUMN name",)
    assert m.rollback_sql == (
        "DROP FUNCTION IF EXISTS users_sync()",
        "ALTER TABLE users DROP COLUMN IF EXISTS full_name",
    )
    assert dict(source.lines) == {"sql": (5, 6), "contract_sql": (19,), "rollback_sql": (21, 22)}


def test_plain_sql_file_is_all_sql() -> None:
    m = parse_migration_text("ALTER TABLE t ADD COLUMN a int;\nSELECT 1;\n", default_name="0002_a")
    assert m.name == "0002_a"
    assert m.sql == ("ALTER TABLE t ADD COLUMN a int", "SELECT 1")
    assert m.contract_sql == ()
    assert m.rollback_sql is None  # to be derived
    assert m.ack_timeout is None


def test_empty_rollback_section_means_nothing_to_undo() -> None:
    m = parse_migration_text("SELECT 1;\n-- lockstep:rollback\n-- nothing\n", default_name="x")
    assert m.rollback_sql == ()


def test_backfill_only_migration() -> None:
    m = parse_migration_text('-- lockstep:backfill\ntable=t set="a = b"\n', default_name="x")
    assert m.sql == () and len(m.backfills) == 1


def test_marker_without_space() -> None:
    m = parse_migration_text("SELECT 1;\n--lockstep:contract\nSELECT 2;\n", default_name="x")
    assert m.contract_sql == ("SELECT 2",)


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("SELECT 1;\n-- lockstep:contrakt\nSELECT 2;", 2, "unknown marker"),
        ("SELECT 1;\n-- lockstep:contract\n\n-- lockstep:contract\n", 4, "duplicate section"),
        ("SELECT 1;\n-- lockstep:sql\nSELECT 2;", 2, "duplicate section"),
        ("-- lockstep:name a\n-- lockstep:name b\nSELECT 1;", 2, "duplicate"),
        ("-- lockstep:name\nSELECT 1;", 1, "needs a value"),
        ("-- lockstep:contract now\nSELECT 1;", 1, "takes no value"),
        ("-- just a comment\n\n-- lockstep:rollback\nSELECT 1;", 1, "no statements"),
        ("-- lockstep:sql\n-- lockstep:contract\n", 1, "no statements"),
        ("-- LOCKSTEP:CONTRACT\nDROP TABLE t;", 1, "'-- lockstep:contract'"),
        ("SELECT 1;\n-- Lockstep:Rollback\n", 2, "lower case"),
        ("SELECT 1;\n-- lockstep :contract\n", 2, "no space before the colon"),
        ("-- lockstep:allow LS105\nSELECT 1;", 1, "needs a reason"),
        ("-- lockstep:allow LS999 why\nSELECT 1;", 1, "no such rule"),
        ("SELECT 1;\n-- lockstep:allow LS105 why\n", 2, "must come before the statement"),
        ("SELECT 1\nFROM WHERE;", 2, "syntax error at or near"),
        ("SELECT 1;\n-- lockstep:backfill\n\ntable=t\n", 4, "missing set="),
        ("SELECT 1;\n-- lockstep:backfill\ntable=t set=x colour=red\n", 3, "unknown key"),
        ("SELECT 1;\n-- lockstep:backfill\ntable=t set=x batch_size=lots\n", 3, "batch_size"),
        ("SELECT 1;\n-- lockstep:backfill\ntable=t set=x batch_size=0\n", 3, "batch_size"),
        ('SELECT 1;\n-- lockstep:backfill\ntable=t set="x\n', 3, "bad backfill"),
        ("SELECT 1;\n-- lockstep:backfill\ntable=t oops\n", 3, "not key=value"),
        ("SELECT 1;\n-- lockstep:backfill\ntable=t set=a set=b\n", 3, "twice"),
        ("SELECT 1;\n-- lockstep:contract\nSELECT 2;\n\nALTER TABLE;\n", 5, "syntax error"),
        ("SELECT 1;\n-- lockstep:rollback\nDROP TABLE;\n", 3, "syntax error"),
        ("-- lockstep:ack-timeout soon\nSELECT 1;", 1, "ack-timeout"),
        ("-- lockstep:ack-timeout -1\nSELECT 1;", 1, "ack-timeout"),
        ("\n-- lockstep:name bad name!\nSELECT 1;", 2, "migration name"),
    ],
)
def test_errors_name_the_line(text: str, line: int, fragment: str) -> None:
    with pytest.raises(MigrationFileError) as info:
        parse_migration_text(text, default_name="x")
    assert info.value.line == line, info.value
    assert fragment in info.value.message
    assert str(info.value).startswith(f"line {line}: ")


@pytest.mark.parametrize(
    ("filename", "name"),
    [
        ("0003_add_email.sql", "0003_add_email"),
        ("migrations/0003_add_email.sql", "0003_add_email"),
        ("C:\\m\\7_x.SQL", "7_x"),
        ("noext", "noext"),
    ],
)
def test_name_from_filename(filename: str, name: str) -> None:
    assert migration_name_from_filename(filename) == name


def test_natural_sort() -> None:
    names = [
        "10_x.sql",
        "2_x.sql",
        "1_b.sql",
        "1_a.sql",
        "0003_c.sql",
        "b.sql",
        "a10.sql",
        "a9.sql",
    ]
    assert sort_migration_filenames(names) == [
        "1_a.sql",
        "1_b.sql",
        "2_x.sql",
        "0003_c.sql",
        "10_x.sql",
        "a9.sql",
        "a10.sql",
        "b.sql",
    ]


def test_contract_only_migration_is_allowed() -> None:
    m = parse_migration_text("-- lockstep:contract\nDROP TABLE old;", default_name="c")
    assert m.sql == () and m.contract_sql == ("DROP TABLE old",)


def test_byte_order_mark_is_ignored() -> None:
    m = parse_migration_text("\ufeffALTER TABLE t ADD COLUMN c int;", default_name="b")
    assert m.sql == ("ALTER TABLE t ADD COLUMN c int",)


def test_syntax_error_message_has_no_doubled_words() -> None:
    with pytest.raises(MigrationFileError) as info:
        parse_migration_text("SELECT 1\nFROM WHERE;", default_name="x")
    assert "syntax error: syntax error" not in str(info.value)


def test_allow_markers_stay_with_their_statement_and_keep_lines() -> None:
    text = (
        "ALTER TABLE t ADD COLUMN a int;\n"
        "-- lockstep:allow LS105 the table has ten rows\n"
        "ALTER TABLE t ALTER COLUMN a TYPE bigint;\n"
        "-- lockstep:allow-file LS301 rolled back by hand\n"
    )
    source = parse_migration_source(text, default_name="a")
    assert source.migration.sql[1] == (
        "-- lockstep:allow LS105 the table has ten rows\nALTER TABLE t ALTER COLUMN a TYPE bigint"
    )
    assert source.lines["sql"] == (1, 2)
    assert dict(source.allow) == {"LS301": "rolled back by hand"}
