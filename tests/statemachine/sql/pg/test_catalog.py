"""Catalog-aware lint: the live database turns conservative guesses into facts.

Each pair below is one statement linted without a catalog (the dangerous case is assumed) and
with the catalog of a real database, where the fact is known; relfilenode confirms the type
changes lint now calls safe really rewrite nothing.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from coordinator.cli import main
from coordinator.pg.catalog import load_catalog, read_catalog
from statemachine.sql import lint_statements
from statemachine.sql.catalog import Catalog
from tests.statemachine.sql.pg import pgkit

EXTRA = """
CREATE TABLE empty_things (id int, name text);
CREATE TABLE people (id int PRIMARY KEY, email varchar(255), age int, nick text,
                     status text NOT NULL DEFAULT 'new', note text DEFAULT 'x');
INSERT INTO people
SELECT g, 'p' || g || '@example.com', 20, 'n', 'new' FROM generate_series(1, 100) g;
"""


@pytest.fixture
def catalog(dsn: str) -> Catalog:
    with psycopg.connect(dsn) as conn:
        pgkit.setup(conn)
        pgkit.setup(conn, EXTRA)
    return load_catalog(dsn)


def rules(sql: str, catalog: Catalog | None, section: str = "sql") -> list[str]:
    return [f.rule for f in lint_statements(section, [sql], catalog=catalog)]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("sql", "without", "with_catalog"),
    [
        # Metadata-only type changes (confirmed below with relfilenode) and real rewrites.
        ("ALTER TABLE people ALTER COLUMN email TYPE varchar(320)", ["LS105"], []),
        ("ALTER TABLE people ALTER COLUMN email TYPE text", ["LS105"], []),
        ("ALTER TABLE people ALTER COLUMN age TYPE bigint", ["LS105"], ["LS105"]),
        ("ALTER TABLE people ALTER COLUMN email TYPE varchar(100)", ["LS105"], ["LS105"]),
        # A lock on an empty table blocks nobody; one on a table with rows does.
        ("CREATE INDEX e_idx ON empty_things (name)", ["LS201"], []),
        ("CREATE INDEX p_idx ON people (nick)", ["LS201"], ["LS201"]),
        ("ALTER TABLE empty_things ADD CONSTRAINT c CHECK (id > 0)", ["LS203"], []),
        # A table that does not exist cannot be in use.
        ("CREATE INDEX m_idx ON missing_table (a)", ["LS201"], []),
        # Function volatility from pg_proc.
        ("ALTER TABLE people ADD COLUMN c text DEFAULT stable_code()", ["LS204"], []),
        ("ALTER TABLE people ADD COLUMN c text DEFAULT make_code()", ["LS204"], ["LS204"]),
        # Nullability: only a NOT NULL column breaks old INSERTs when it loses its default.
        ("ALTER TABLE people ALTER COLUMN note DROP DEFAULT", ["LS116"], []),
        ("ALTER TABLE people ALTER COLUMN status DROP DEFAULT", ["LS116"], ["LS116"]),
        # Code-breaking rules hold for an empty table too: old code still names it.
        ("ALTER TABLE empty_things DROP COLUMN name", ["LS101"], ["LS101"]),
    ],
)
def test_catalog_sharpens_findings(
    catalog: Catalog, sql: str, without: list[str], with_catalog: list[str]
) -> None:
    assert rules(sql, None) == without
    assert rules(sql, catalog) == with_catalog


def test_add_not_null_column_to_an_empty_table_is_fine_in_contract(catalog: Catalog) -> None:
    sql = "ALTER TABLE empty_things ADD COLUMN n int NOT NULL"
    assert rules(sql, catalog, "contract_sql") == []
    assert rules(sql.replace("empty_things", "people"), catalog, "contract_sql") == ["LS106"]


def test_the_metadata_only_changes_really_rewrite_nothing(dsn: str, catalog: Catalog) -> None:
    with psycopg.connect(dsn) as conn:
        table = pgkit.oid(conn, "people")
        before = pgkit.relfilenode(conn, table)
        conn.execute("ALTER TABLE people ALTER COLUMN email TYPE varchar(320)")
        conn.execute("ALTER TABLE people ALTER COLUMN email TYPE text")
        assert pgkit.relfilenode(conn, table) == before
        conn.execute("ALTER TABLE people ALTER COLUMN age TYPE bigint")
        assert pgkit.relfilenode(conn, table) != before
        conn.rollback()


def test_catalog_contents(dsn: str, catalog: Catalog) -> None:
    people = catalog.table("people")
    assert people is not None and not people.empty
    assert people.columns["email"].type == "character varying(255)"
    assert people.columns["status"].not_null and not people.columns["note"].not_null
    assert catalog.table("empty_things") is not None
    assert catalog.table("empty_things").empty  # type: ignore[union-attr]
    assert catalog.table("public.people") is people
    assert catalog.table("billing.invoices") is not None
    assert catalog.volatility("make_code") == "volatile"
    assert catalog.volatility("stable_code") == "stable"
    assert catalog.volatility("now") == "stable"
    with psycopg.connect(dsn) as conn:
        assert read_catalog(conn).tables.keys() == catalog.tables.keys()


def test_lint_dsn_on_the_command_line(
    dsn: str, catalog: Catalog, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "widen.sql"
    path.write_text(
        "ALTER TABLE people ALTER COLUMN email TYPE varchar(320);\n-- lockstep:rollback\n"
    )
    assert main(["lint", str(path)]) == 1
    assert main(["lint", "--dsn", dsn, str(path)]) == 0
    capsys.readouterr()
    assert main(["lint", "--dsn", "postgresql://127.0.0.1:1/nothing", str(path)]) == 3
    assert "cannot read the catalog" in capsys.readouterr().err
