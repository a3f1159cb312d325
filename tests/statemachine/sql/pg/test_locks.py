"""`statemachine.sql.locks` against the server: every lock level it claims is what pg_locks shows.

Each statement runs in a transaction held open while this session's own locks are read, then is
rolled back. A difference is a wrong entry in the lock table, and with it a wrong execution
group or a wrong lint message.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from statemachine.sql.locks import LockMode, lock_effect
from statemachine.sql.split import parse_statement
from tests.statemachine.sql.pg import pgkit

#: The relations of `pgkit.SCHEMA` and those the statements create; indexes are left out.
TABLES = {
    "customers", "orders", "parent", "part1", "part2", "mv", "recent_orders", "feelings",
    "billing.invoices", "t2", "v2", "orders2", "people", "c2",
}  # fmt: skip

#: (statement, relations whose lock the AST cannot know: e.g. the table of a named index).
CASES: list[tuple[str, frozenset[str]]] = [
    (s, frozenset(u))
    for s, u in [
        ("ALTER TABLE orders ADD COLUMN x int", ()),
        ("ALTER TABLE orders ADD COLUMN x int DEFAULT 0 NOT NULL", ()),
        ("ALTER TABLE orders ADD COLUMN c int REFERENCES customers (id)", ()),
        ("ALTER TABLE orders DROP COLUMN note", ()),
        ("ALTER TABLE orders ALTER COLUMN total TYPE bigint", ()),
        ("ALTER TABLE orders ALTER COLUMN note TYPE varchar(40)", ()),
        ("ALTER TABLE orders ALTER COLUMN status SET DEFAULT 'x'", ()),
        ("ALTER TABLE orders ALTER COLUMN status DROP DEFAULT", ()),
        ("ALTER TABLE orders ALTER COLUMN total DROP NOT NULL", ()),
        ("ALTER TABLE orders ALTER COLUMN customer_id SET NOT NULL", ()),
        ("ALTER TABLE orders ALTER COLUMN total SET STATISTICS 200", ()),
        ("ALTER TABLE orders SET (fillfactor = 70)", ()),
        ("ALTER TABLE orders CLUSTER ON orders_pkey", ()),
        ("ALTER TABLE orders DISABLE TRIGGER USER", ()),
        (
            "ALTER TABLE orders ADD CONSTRAINT fk FOREIGN KEY (customer_id) "
            "REFERENCES customers (id) NOT VALID",
            (),
        ),
        (
            "ALTER TABLE orders ADD CONSTRAINT fk2 FOREIGN KEY (customer_id) REFERENCES customers",
            (),
        ),
        ("ALTER TABLE orders ADD CONSTRAINT pos CHECK (total > -1) NOT VALID", ()),
        ("ALTER TABLE orders ADD CONSTRAINT pos CHECK (total > -1)", ()),
        ("ALTER TABLE orders VALIDATE CONSTRAINT orders_total_check", ()),
        ("ALTER TABLE orders DROP CONSTRAINT orders_total_check", ()),
        ("ALTER TABLE customers ADD CONSTRAINT customers_name_key UNIQUE (name)", ()),
        (
            "ALTER TABLE orders ADD CONSTRAINT orders_id_note_key UNIQUE "
            "USING INDEX orders_note_key_idx",
            (),
        ),
        ("ALTER TABLE parent ATTACH PARTITION part2 FOR VALUES FROM (10) TO (20)", ()),
        ("ALTER TABLE parent DETACH PARTITION part1", ()),
        ("ALTER TABLE orders RENAME COLUMN note TO memo", ()),
        ("ALTER TABLE orders RENAME TO orders2", ()),
        ("ALTER TABLE orders RENAME CONSTRAINT orders_total_check TO c2", ()),
        ("ALTER INDEX orders_total_idx RENAME TO orders_total_idx2", ()),
        ("ALTER VIEW recent_orders RENAME TO v2", ()),
        ("CREATE INDEX orders_customer_idx ON orders (customer_id)", ()),
        ("CREATE UNIQUE INDEX customers_email_idx ON customers (email)", ()),
        ("DROP INDEX orders_total_idx", ("orders",)),
        ("REINDEX TABLE orders", ()),
        ("REINDEX INDEX orders_total_idx", ("orders",)),
        ("CLUSTER orders USING orders_pkey", ()),
        ("ANALYZE orders", ()),
        ("TRUNCATE orders", ()),
        ("LOCK TABLE orders IN SHARE MODE", ()),
        ("LOCK TABLE orders", ()),
        ("DROP TABLE orders CASCADE", ("recent_orders", "mv")),
        ("DROP VIEW recent_orders", ()),
        ("DROP MATERIALIZED VIEW mv", ()),
        ("REFRESH MATERIALIZED VIEW mv", ("orders",)),
        ("REFRESH MATERIALIZED VIEW CONCURRENTLY mv", ("orders",)),
        ("CREATE TABLE t2 (id int REFERENCES customers (id))", ()),
        ("CREATE TABLE t2 AS SELECT * FROM orders", ("orders",)),
        ("CREATE VIEW v2 AS SELECT * FROM orders", ("orders",)),
        ("CREATE TRIGGER t BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION touch()", ()),
        ("DROP TRIGGER IF EXISTS missing ON orders", ()),
        ("COMMENT ON TABLE orders IS 'x'", ()),
        ("COMMENT ON COLUMN orders.total IS 'x'", ()),
        ("UPDATE orders SET total = total + 1", ()),
        ("DELETE FROM orders WHERE id < 10", ()),
        ("INSERT INTO orders (id, total) VALUES (1000, 1)", ()),
        ("INSERT INTO orders (id, total) SELECT id + 1000, 1 FROM customers", ()),
        ("SELECT count(*) FROM orders", ()),
        ("GRANT SELECT ON orders TO PUBLIC", ()),
        ("ALTER TABLE billing.invoices ADD COLUMN x int", ()),
        ("ALTER TYPE mood RENAME VALUE 'sad' TO 'blue'", ()),
        ("ALTER DOMAIN positive ADD CONSTRAINT positive_check CHECK (VALUE > 0)", ("feelings",)),
        ("ALTER TABLE orders ALTER COLUMN payload TYPE jsonb", ()),
        ("ALTER TABLE orders ADD COLUMN g int GENERATED ALWAYS AS (total * 2) STORED", ()),
        ("ALTER TABLE orders ENABLE ROW LEVEL SECURITY", ()),
    ]
]


@pytest.fixture(scope="module")
def conn(pg_server_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    from tests.support.scratchdb import fresh_database

    with fresh_database(pg_server_dsn, "lockstep_locks") as dsn, psycopg.connect(dsn) as c:
        pgkit.setup(c)
        yield c


def _floor(mode: LockMode | None) -> LockMode:
    """ACCESS SHARE blocks nothing an application does; the table leaves it out."""
    return max(mode or LockMode.ACCESS_SHARE, LockMode.ACCESS_SHARE)


@pytest.mark.parametrize(("statement", "unknown"), CASES, ids=[c[0][:60] for c in CASES])
def test_lock_table_matches_pg_locks(
    conn: psycopg.Connection[Any], statement: str, unknown: frozenset[str]
) -> None:
    effect = lock_effect(parse_statement(statement))
    before = pgkit.relation_names(conn)
    try:
        conn.execute(statement.encode())
        held = pgkit.held_locks(conn, before)
    finally:
        conn.rollback()
    claimed = dict(effect.locks)
    relations = ({r for r in held if r in TABLES} | set(claimed)) - unknown
    actual = {r: _floor(held.get(r)).label for r in sorted(relations)}
    expected = {r: _floor(claimed.get(r)).label for r in sorted(relations)}
    assert expected == actual
