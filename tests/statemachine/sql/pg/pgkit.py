"""Helpers for the experiments on a real server: hold a statement open, read what it did.

Each experiment runs the statement inside a transaction that is rolled back, so one database
serves every case; `held_locks` reads ``pg_locks`` for that transaction's own backend while
the statement's locks are still held, `relfilenode` shows whether a table was rewritten.
"""

from __future__ import annotations

from typing import Any

import psycopg

from statemachine import Migration
from statemachine.sql import group_for_execution
from statemachine.sql.locks import LockMode

_BY_PG_NAME = {mode.pg_name: mode for mode in LockMode}

SCHEMA = """
CREATE TABLE customers (id int PRIMARY KEY, name text, email varchar(255));
CREATE TABLE orders (
    id int PRIMARY KEY, customer_id int, total int NOT NULL DEFAULT 0, note varchar(20),
    status text NOT NULL DEFAULT 'new', payload json
);
INSERT INTO customers SELECT g, 'c' || g, 'c' || g || '@example.com' FROM generate_series(1, 50) g;
INSERT INTO orders (id, customer_id, total) SELECT g, 1 + g % 50, g FROM generate_series(1, 200) g;
ALTER TABLE orders ADD CONSTRAINT orders_total_check CHECK (total >= 0) NOT VALID;
CREATE INDEX orders_total_idx ON orders (total);
CREATE UNIQUE INDEX orders_note_key_idx ON orders (id, note);
CREATE TABLE parent (id int, k int) PARTITION BY RANGE (k);
CREATE TABLE part1 PARTITION OF parent FOR VALUES FROM (0) TO (10);
CREATE TABLE part2 (id int, k int);
CREATE MATERIALIZED VIEW mv AS SELECT id FROM orders;
CREATE UNIQUE INDEX mv_id ON mv (id);
CREATE VIEW recent_orders AS SELECT id, customer_id FROM orders;
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
CREATE TYPE mood AS ENUM ('sad', 'happy');
CREATE DOMAIN positive AS int;
CREATE TABLE feelings (id int, m mood, p positive);
CREATE SCHEMA billing;
CREATE TABLE billing.invoices (id int);
CREATE TABLE "User Accounts" (id int PRIMARY KEY, "Email" text);
INSERT INTO "User Accounts" VALUES (1, 'a@example.com');
CREATE FUNCTION double(x int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT x * 2';
CREATE FUNCTION make_code() RETURNS text LANGUAGE sql AS 'SELECT md5(random()::text)';
CREATE FUNCTION stable_code() RETURNS text LANGUAGE sql STABLE AS 'SELECT ''x''';
INSERT INTO feelings VALUES (1, 'sad', 1);
"""


def setup(conn: psycopg.Connection[Any], sql: str = SCHEMA) -> None:
    conn.execute(sql.encode())
    conn.commit()


_NAMES = """
SELECT c.oid, CASE WHEN n.nspname = 'public' THEN c.relname ELSE n.nspname || '.' || c.relname END
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
"""


def relation_names(conn: psycopg.Connection[Any]) -> dict[int, str]:
    """oid -> name (schema-qualified outside ``public``) of every user relation."""
    return {int(oid): str(name) for oid, name in conn.execute(_NAMES).fetchall()}


def held_locks(conn: psycopg.Connection[Any], before: dict[int, str]) -> dict[str, LockMode]:
    """The strongest lock this session holds on each relation, by the name it had in `before`
    (so a renamed or dropped table is still found under the name the statement used)."""
    names = {**relation_names(conn), **before}
    rows = conn.execute(
        "SELECT relation, mode FROM pg_locks WHERE pid = pg_backend_pid() "
        "AND locktype = 'relation' AND granted AND database = "
        "(SELECT oid FROM pg_database WHERE datname = current_database())"
    ).fetchall()
    out: dict[str, LockMode] = {}
    for oid, mode in rows:
        name = names.get(int(oid))
        if name is None:
            continue  # a catalog relation
        level = _BY_PG_NAME[mode]
        out[name] = max(level, out.get(name, level))
    return out


def oid(conn: psycopg.Connection[Any], table: str) -> int:
    row = conn.execute("SELECT %s::regclass::oid", (table,)).fetchone()
    assert row is not None
    return int(row[0])


def relfilenode(conn: psycopg.Connection[Any], table_oid: int) -> int:
    """The file holding the table's rows: a new one means the table was rewritten."""
    row = conn.execute("SELECT relfilenode FROM pg_class WHERE oid = %s", (table_oid,)).fetchone()
    assert row is not None
    return int(row[0])


def fails(conn: psycopg.Connection[Any], sql: str) -> str | None:
    """Run `sql` inside a savepoint of the open transaction (one is opened if needed, and
    stays open); the error class name, or None."""
    conn.execute("SELECT 1")  # psycopg opens the transaction, so the block is a savepoint
    try:
        with conn.transaction():
            conn.execute(sql.encode())
    except psycopg.Error as exc:
        return type(exc).__name__
    return None


def run_section(dsn: str, statements: tuple[str, ...]) -> None:
    """Run a section the way lockstep's executor does: group by group, each transactional
    group in one transaction and each other statement alone in autocommit."""
    for group in group_for_execution(statements):
        with psycopg.connect(dsn, autocommit=not group.transactional) as conn:
            for statement in group.statements:
                conn.execute(statement.encode())


def apply(dsn: str, migration: Migration) -> None:
    """EXECUTE, the backfills (as single UPDATEs: batching changes nothing here), CONTRACT."""
    run_section(dsn, migration.sql)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for b in migration.backfills:
            where = f" WHERE {b.where}" if b.where else ""
            conn.execute(f"UPDATE {b.table} SET {b.set}{where}".encode())
    run_section(dsn, migration.contract_sql)
