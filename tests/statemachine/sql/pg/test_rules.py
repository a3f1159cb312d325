"""Every rule's claim, checked on a real server, and every rule's safe example, run on one.

For each rule a hazardous statement runs inside a transaction that is held open: the test reads
the lock it holds on the table (``pg_locks``), whether it rewrote the table (``relfilenode``),
whether it fails on the data, and whether a query the old code runs now fails. Then the example
migration the finding carries is filled in (``<...>`` are the author's choices), linted (no
finding may remain) and applied phase by phase on a fresh copy of the schema, and the old
code's query must still work after EXECUTE: the recipe avoids the hazard.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import psycopg
import pytest

from statemachine import Migration
from statemachine.sql import lint_migration, parse_migration_text
from statemachine.sql.locks import LockMode
from tests.statemachine.sql.pg import pgkit

_L = LockMode


@dataclasses.dataclass(frozen=True)
class Claim:
    rule: str
    statement: str
    table: str
    section: str = "sql"
    lock: LockMode | None = None  # the mode held on `table` while the statement is open
    rewrite: bool | None = None
    fails_on_data: bool = False
    breaks: str | None = None  # a query old (sql) or new (contract) code runs
    before: tuple[str, ...] = ()  # statements of the same section that come first
    fills: tuple[tuple[str, str], ...] = ()  # placeholder -> value for the example
    autocommit: bool = False  # the statement cannot run in a transaction block
    #: Whether `breaks` must work once the example's sql ran (False where the recipe's premise
    #: is that no running code does that any more, e.g. write NULL before a NOT NULL check).
    recipe_keeps_query: bool = True

    @property
    def id(self) -> str:
        return f"{self.rule}-{self.statement[:40]}"

    def migration(self) -> Migration:
        statements = [*self.before, self.statement]
        if self.section == "sql":
            return Migration("hazard", statements, rollback_sql=[])
        return Migration("hazard", [], contract_sql=statements)


CLAIMS = [
    Claim("LS101", "ALTER TABLE orders DROP COLUMN note", "orders", lock=_L.ACCESS_EXCLUSIVE,
          rewrite=False, breaks="SELECT note FROM orders"),
    Claim("LS102", "DROP TABLE part2", "part2", lock=_L.ACCESS_EXCLUSIVE,
          breaks="SELECT * FROM part2"),
    Claim("LS103", "ALTER TABLE customers RENAME COLUMN name TO full_name", "customers",
          lock=_L.ACCESS_EXCLUSIVE, rewrite=False, breaks="SELECT name FROM customers",
          fills=(("<type of column>", "text"),)),
    Claim("LS103", "ALTER TABLE customers RENAME COLUMN name TO full_name", "customers",
          section="contract_sql", lock=_L.ACCESS_EXCLUSIVE, breaks="SELECT name FROM customers",
          fills=(("<type of column>", "text"),)),
    Claim("LS104", "ALTER TABLE customers RENAME TO clients", "customers",
          lock=_L.ACCESS_EXCLUSIVE, breaks="INSERT INTO customers (id, name) VALUES (999, 'x')"),
    Claim("LS105", "ALTER TABLE orders ALTER COLUMN total TYPE bigint", "orders",
          lock=_L.ACCESS_EXCLUSIVE, rewrite=True, fills=(("<old type>", "integer"),)),
    Claim("LS106", "ALTER TABLE orders ADD COLUMN region text NOT NULL", "orders",
          fails_on_data=True, fills=(("<value>", "'eu'"),)),
    Claim("LS106", "ALTER TABLE orders ADD COLUMN region text NOT NULL", "orders",
          section="contract_sql", fails_on_data=True, fills=(("<value>", "'eu'"),)),
    Claim("LS107", "ALTER TABLE orders ALTER COLUMN customer_id SET NOT NULL", "orders",
          lock=_L.ACCESS_EXCLUSIVE, rewrite=False,
          breaks="INSERT INTO orders (id, total) VALUES (9999, 1)", recipe_keeps_query=False),
    Claim("LS108", "TRUNCATE orders CASCADE", "orders", lock=_L.ACCESS_EXCLUSIVE, rewrite=True),
    Claim("LS110", "DROP SCHEMA billing CASCADE", "billing.invoices", lock=_L.ACCESS_EXCLUSIVE,
          breaks="SELECT * FROM billing.invoices"),
    Claim("LS111", "DROP TYPE mood CASCADE", "feelings", lock=_L.ACCESS_EXCLUSIVE,
          breaks="SELECT 'sad'::mood"),
    Claim("LS112", "DROP FUNCTION double(int)", "orders", breaks="SELECT double(1)"),
    Claim("LS114", "ALTER SCHEMA billing RENAME TO money", "billing.invoices",
          breaks="SELECT * FROM billing.invoices"),
    Claim("LS115", "ALTER TYPE mood RENAME VALUE 'sad' TO 'blue'", "feelings",
          breaks="SELECT count(*) FROM feelings WHERE m = 'sad'"),
    Claim("LS116", "ALTER TABLE orders ALTER COLUMN status DROP DEFAULT", "orders",
          lock=_L.ACCESS_EXCLUSIVE, breaks="INSERT INTO orders (id, total) VALUES (9999, 1)"),
    Claim("LS201", "CREATE INDEX orders_customer_idx ON orders (customer_id)", "orders",
          lock=_L.SHARE),
    Claim("LS202", "ALTER TABLE orders ADD CONSTRAINT orders_customer_fk FOREIGN KEY "
          "(customer_id) REFERENCES customers (id)", "orders", lock=_L.SHARE_ROW_EXCLUSIVE),
    Claim("LS202", "ALTER TABLE orders ADD COLUMN buyer int REFERENCES customers (id)",
          "customers", lock=_L.SHARE_ROW_EXCLUSIVE),
    Claim("LS203", "ALTER TABLE orders ADD CONSTRAINT orders_id_positive CHECK (id > 0)",
          "orders", lock=_L.ACCESS_EXCLUSIVE, rewrite=False),
    Claim("LS204", "ALTER TABLE orders ADD COLUMN code text DEFAULT make_code()", "orders",
          lock=_L.ACCESS_EXCLUSIVE, rewrite=True),
    Claim("LS204", "ALTER TABLE orders ADD COLUMN seq bigserial", "orders",
          lock=_L.ACCESS_EXCLUSIVE, rewrite=True),
    Claim("LS204", "ALTER TABLE orders ADD COLUMN n int GENERATED ALWAYS AS IDENTITY", "orders",
          lock=_L.ACCESS_EXCLUSIVE, rewrite=True),
    Claim("LS204", "ALTER TABLE orders ADD COLUMN t2 int GENERATED ALWAYS AS (total * 2) STORED",
          "orders", lock=_L.ACCESS_EXCLUSIVE, rewrite=True),
    Claim("LS205", "VACUUM FULL orders", "orders", rewrite=True, autocommit=True),
    Claim("LS206", "CLUSTER orders USING orders_pkey", "orders", lock=_L.ACCESS_EXCLUSIVE,
          rewrite=True),
    Claim("LS207", "ALTER TABLE customers ADD CONSTRAINT customers_email_key UNIQUE (email)",
          "customers", lock=_L.ACCESS_EXCLUSIVE),
    Claim("LS208", "LOCK TABLE orders", "orders", lock=_L.ACCESS_EXCLUSIVE),
    Claim("LS209", "REINDEX TABLE orders", "orders", lock=_L.SHARE),
    Claim("LS210", "ALTER TABLE orders ALTER COLUMN total TYPE bigint", "orders",
          section="contract_sql", lock=_L.ACCESS_EXCLUSIVE, rewrite=True),
    Claim("LS211", "DROP INDEX orders_total_idx", "orders", lock=_L.ACCESS_EXCLUSIVE),
    Claim("LS212", "ALTER TABLE parent DETACH PARTITION part1", "parent",
          lock=_L.ACCESS_EXCLUSIVE),
    Claim("LS213", "ALTER DOMAIN positive ADD CONSTRAINT positive_check CHECK (VALUE > 0)",
          "feelings", lock=_L.SHARE),
    Claim("LS214", "UPDATE orders SET qty = 1", "orders", lock=_L.ACCESS_EXCLUSIVE,
          before=("ALTER TABLE orders ADD COLUMN qty int",)),
    Claim("LS215", "REFRESH MATERIALIZED VIEW mv", "mv", lock=_L.ACCESS_EXCLUSIVE, rewrite=True),
    Claim("LS216", "ALTER TABLE orders ADD CONSTRAINT no_twins EXCLUDE (id WITH =)", "orders",
          lock=_L.ACCESS_EXCLUSIVE),
    Claim("LS217", "ALTER TABLE orders ALTER COLUMN customer_id SET NOT NULL", "orders",
          section="contract_sql", lock=_L.ACCESS_EXCLUSIVE, rewrite=False),
]  # fmt: skip


@pytest.fixture
def conn(dsn: str) -> Any:
    with psycopg.connect(dsn) as c:
        pgkit.setup(c)
        yield c


def _hazard(claim: Claim) -> None:
    findings = lint_migration(claim.migration())
    assert claim.rule in [f.rule for f in findings], [str(f) for f in findings]


@pytest.mark.parametrize("claim", CLAIMS, ids=[c.id for c in CLAIMS])
def test_the_server_confirms_the_rule(
    conn: psycopg.Connection[Any], dsn: str, claim: Claim
) -> None:
    _hazard(claim)
    table_oid = pgkit.oid(conn, claim.table)
    before = pgkit.relfilenode(conn, table_oid)
    names = pgkit.relation_names(conn)
    if claim.breaks:
        assert pgkit.fails(conn, claim.breaks) is None, "the old query must work before"
    conn.rollback()
    if claim.autocommit:
        with psycopg.connect(dsn, autocommit=True) as auto:
            auto.execute(claim.statement.encode())
        assert (pgkit.relfilenode(conn, table_oid) != before) is claim.rewrite
        return
    for statement in claim.before:
        conn.execute(statement.encode())
    error = pgkit.fails(conn, claim.statement)
    if claim.fails_on_data:
        assert error == "NotNullViolation"
        return
    assert error is None
    held = pgkit.held_locks(conn, names)
    if claim.lock is not None:
        assert held.get(claim.table) is claim.lock, held
    if claim.rewrite is not None:
        assert (pgkit.relfilenode(conn, table_oid) != before) is claim.rewrite
    if claim.breaks:
        assert pgkit.fails(conn, claim.breaks) is not None, "the rule says this query breaks"
    conn.rollback()


def _example(claim: Claim) -> str | None:
    findings = [f for f in lint_migration(claim.migration()) if f.rule == claim.rule]
    example = findings[0].example
    if example is None:
        return None
    for placeholder, value in claim.fills:
        example = example.replace(placeholder, value)
    assert "<" not in example.replace("<>", "").replace("<=", ""), example
    return example


WITH_EXAMPLE = [c for c in CLAIMS if _example(c) is not None]


def test_most_rules_come_with_a_runnable_example() -> None:
    without = sorted({c.rule for c in CLAIMS} - {c.rule for c in WITH_EXAMPLE})
    # No lock-free equivalent exists for these: the recipe says what to do instead.
    assert without == ["LS114", "LS206", "LS208", "LS210", "LS216"]
    assert len(WITH_EXAMPLE) >= 25


@pytest.mark.parametrize("claim", WITH_EXAMPLE, ids=[c.id for c in WITH_EXAMPLE])
def test_the_example_passes_lint_and_runs(
    conn: psycopg.Connection[Any], dsn: str, claim: Claim
) -> None:
    text = _example(claim)
    assert text is not None
    migration = parse_migration_text(text, default_name="fix")
    assert lint_migration(migration) == [], text
    conn.close()
    pgkit.run_section(dsn, migration.sql)
    if claim.breaks and claim.section == "sql" and claim.recipe_keeps_query:
        with psycopg.connect(dsn) as after:
            assert pgkit.fails(after, claim.breaks) is None, "the recipe must not break old code"
    pgkit.apply(dsn, _rest(migration))


def _rest(migration: Migration) -> Migration:
    """The migration without its sql section (already run): backfills and contract."""
    return Migration(
        migration.name,
        [],
        contract_sql=list(migration.contract_sql) or ["SELECT 1"],
        backfills=migration.backfills,
    )
