"""The zero-downtime recipes as data: schema to start from, migration file, the queries old and
new application code run, and a check of the schema the migration must leave behind.

The migration itself lives in ``docs/recipes/<file>`` (a lockstep migration file), so the
documentation shows exactly the SQL that CI and the benchmark run. Queries take the named
parameters the application loop supplies on every call: ``%(id)s`` (an id of a seeded row,
1..`ROWS`), ``%(s)s`` (a fresh text) and ``%(n)s`` (a small integer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from statemachine.migration import Migration
from statemachine.sql.files import migration_name_from_filename, parse_migration_text

#: Rows seeded into every table, so backfills run in several batches and ids exist.
ROWS = 2000

#: Where the migration files live: ``docs/recipes`` of the source checkout.
RECIPES_DIR = Path(__file__).resolve().parents[2] / "docs" / "recipes"

Conn = psycopg.Connection[Any]
Check = Callable[[Conn], list[str]]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One recipe. `breaks_old_code` says whether its SQL, applied directly (expand and contract
    at once, no coordination) while old code keeps running, makes old queries fail."""

    key: str
    title: str
    file: str
    table: str  # the table the migration changes (the one the held-lock scenario locks)
    setup: tuple[str, ...]
    old_queries: tuple[str, ...]
    new_queries: tuple[str, ...]
    check: Check
    breaks_old_code: bool

    @property
    def path(self) -> Path:
        return RECIPES_DIR / self.file

    def source(self) -> str:
        """The migration file's text."""
        try:
            return self.path.read_text()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"recipe file {self.path} is missing: the recipes run from a lockstep source "
                "checkout (docs/recipes/*.sql)"
            ) from None

    def migration(self) -> Migration:
        """A fresh `Migration` (new id) parsed from the file; named after the file."""
        return parse_migration_text(
            self.source(), default_name=migration_name_from_filename(self.file)
        )


# ---------------------------------------------------------------------------- schema checks
def columns(conn: Conn, table: str) -> dict[str, tuple[str, bool, str | None]]:
    """``{column: (data_type, nullable, default)}`` of `table` in the current schema."""
    rows = conn.execute(
        "SELECT column_name, data_type, is_nullable = 'YES', column_default"
        " FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND table_name = %s",
        (table,),
    ).fetchall()
    return {name: (dtype, nullable, default) for name, dtype, nullable, default in rows}


def _expect_column(
    conn: Conn, table: str, column: str, dtype: str, *, nullable: bool, default: str | None = None
) -> list[str]:
    found = columns(conn, table).get(column)
    if found is None:
        return [f"{table}.{column} is missing"]
    want = (dtype, nullable, default)
    if found != want:
        return [f"{table}.{column} is (type, nullable, default)={found}, expected {want}"]
    return []


def _expect_no_column(conn: Conn, table: str, column: str) -> list[str]:
    return [f"{table}.{column} still exists"] if column in columns(conn, table) else []


def _expect_gone(conn: Conn, *, trigger: str, function: str, constraint: str) -> list[str]:
    problems = []
    if conn.execute("SELECT 1 FROM pg_trigger WHERE tgname = %s", (trigger,)).fetchone():
        problems.append(f"trigger {trigger} still exists")
    if conn.execute("SELECT 1 FROM pg_proc WHERE proname = %s", (function,)).fetchone():
        problems.append(f"function {function} still exists")
    if conn.execute("SELECT 1 FROM pg_constraint WHERE conname = %s", (constraint,)).fetchone():
        problems.append(f"constraint {constraint} still exists")
    return problems


def _seeded_rows_kept(conn: Conn, table: str) -> list[str]:
    row = conn.execute(f"SELECT count(*) FROM {table} WHERE id <= %s", (ROWS,)).fetchone()
    kept = row[0] if row else 0
    return [] if kept == ROWS else [f"{table} has {kept} of its {ROWS} seeded rows"]


def _check_add_column(conn: Conn) -> list[str]:
    return _expect_column(conn, "users", "email", "text", nullable=True) + _seeded_rows_kept(
        conn, "users"
    )


def _check_not_null_default(conn: Conn) -> list[str]:
    return _expect_column(
        conn, "users", "status", "text", nullable=False, default="'active'::text"
    ) + _seeded_rows_kept(conn, "users")


def _check_index(conn: Conn) -> list[str]:
    row = conn.execute(
        "SELECT i.indisvalid, i.indisready, pg_get_indexdef(i.indexrelid)"
        " FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " WHERE c.relname = 'users_email_idx'"
    ).fetchone()
    if row is None:
        return ["index users_email_idx is missing"]
    valid, ready, definition = row
    problems = [] if valid and ready else [f"index users_email_idx is not valid: {definition}"]
    if "(email)" not in definition:
        problems.append(f"index users_email_idx is on the wrong column: {definition}")
    return problems


def _check_foreign_key(conn: Conn) -> list[str]:
    row = conn.execute(
        "SELECT contype, convalidated, confrelid::regclass::text, conrelid::regclass::text"
        " FROM pg_constraint WHERE conname = 'orders_customer_id_fkey'"
    ).fetchone()
    if row is None:
        return ["foreign key orders_customer_id_fkey is missing"]
    if row != ("f", True, "customers", "orders"):
        return [f"orders_customer_id_fkey is (type, validated, references, on)={row}"]
    return []


def _check_rename(conn: Conn) -> list[str]:
    return (
        _expect_column(conn, "users", "full_name", "text", nullable=False)
        + _expect_no_column(conn, "users", "name")
        + _expect_gone(
            conn,
            trigger="users_sync_full_name",
            function="users_sync_full_name",
            constraint="users_full_name_not_null",
        )
        + _seeded_rows_kept(conn, "users")
    )


def _check_type_change(conn: Conn) -> list[str]:
    problems = (
        _expect_column(conn, "events", "payload_json", "jsonb", nullable=False)
        + _expect_no_column(conn, "events", "payload")
        + _expect_gone(
            conn,
            trigger="events_sync_payload_json",
            function="events_sync_payload_json",
            constraint="events_payload_json_not_null",
        )
        + _seeded_rows_kept(conn, "events")
    )
    if not problems:
        # Seeded rows that no query touched still hold exactly what the backfill converted.
        row = conn.execute(
            "SELECT count(*) FROM events"
            " WHERE id <= %s AND payload_json ? 'n' AND (payload_json ->> 'n')::int <> id",
            (ROWS,),
        ).fetchone()
        if row and row[0]:
            problems.append(f"{row[0]} seeded events lost their payload in the conversion")
    return problems


def _check_drop(conn: Conn) -> list[str]:
    return (
        _expect_no_column(conn, "users", "nickname")
        + _expect_column(conn, "users", "name", "text", nullable=False)
        + _seeded_rows_kept(conn, "users")
    )


# ---------------------------------------------------------------------------- the recipes
_USERS = (
    "CREATE TABLE users"
    " (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, name text NOT NULL{extra})"
)
_SEED_USERS = (
    "INSERT INTO users (name{cols}) SELECT 'user ' || g{vals} FROM generate_series(1, {rows}) g"
)

_BASE_USERS_SETUP = (
    _USERS.format(extra=""),
    _SEED_USERS.format(cols="", vals="", rows=ROWS),
)
_BASE_USERS_QUERIES = (
    "SELECT id, name FROM users WHERE id = %(id)s",
    "INSERT INTO users (name) VALUES (%(s)s)",
    "UPDATE users SET name = %(s)s WHERE id = %(id)s",
)

RECIPES: tuple[Recipe, ...] = (
    Recipe(
        key="add_column",
        title="Add a column",
        file="01_add_column.sql",
        table="users",
        setup=_BASE_USERS_SETUP,
        old_queries=_BASE_USERS_QUERIES,
        new_queries=(
            "SELECT id, name, email FROM users WHERE id = %(id)s",
            "INSERT INTO users (name, email) VALUES (%(s)s, %(s)s || '@example.com')",
            "UPDATE users SET email = %(s)s || '@example.com' WHERE id = %(id)s",
        ),
        check=_check_add_column,
        breaks_old_code=False,
    ),
    Recipe(
        key="add_not_null_default",
        title="Add a NOT NULL column with a default",
        file="02_add_not_null_column_with_default.sql",
        table="users",
        setup=_BASE_USERS_SETUP,
        old_queries=_BASE_USERS_QUERIES,
        new_queries=(
            "SELECT id, name, status FROM users WHERE id = %(id)s",
            "INSERT INTO users (name, status) VALUES (%(s)s, 'invited')",
            "UPDATE users SET status = 'blocked' WHERE id = %(id)s",
        ),
        check=_check_not_null_default,
        breaks_old_code=False,
    ),
    Recipe(
        key="add_index_concurrently",
        title="Add an index concurrently",
        file="03_add_index_concurrently.sql",
        table="users",
        setup=(
            _USERS.format(extra=", email text"),
            _SEED_USERS.format(cols=", email", vals=", 'user' || g || '@example.com'", rows=ROWS),
        ),
        old_queries=(
            "SELECT id, name, email FROM users WHERE id = %(id)s",
            "INSERT INTO users (name, email) VALUES (%(s)s, %(s)s || '@example.com')",
            "UPDATE users SET email = %(s)s || '@example.com' WHERE id = %(id)s",
        ),
        new_queries=(
            "SELECT id, name FROM users WHERE email = 'user' || %(id)s || '@example.com'",
            "INSERT INTO users (name, email) VALUES (%(s)s, %(s)s || '@example.com')",
            "UPDATE users SET email = %(s)s || '@example.com' WHERE id = %(id)s",
        ),
        check=_check_index,
        breaks_old_code=False,
    ),
    Recipe(
        key="add_foreign_key",
        title="Add a foreign key (NOT VALID, then VALIDATE)",
        file="04_add_foreign_key.sql",
        table="orders",
        setup=(
            "CREATE TABLE customers"
            " (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, name text NOT NULL)",
            "CREATE TABLE orders (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,"
            " customer_id bigint NOT NULL, amount integer NOT NULL)",
            "INSERT INTO customers (name)"
            f" SELECT 'customer ' || g FROM generate_series(1, {ROWS}) g",
            "INSERT INTO orders (customer_id, amount)"
            f" SELECT g, g % 100 FROM generate_series(1, {ROWS}) g",
        ),
        old_queries=(
            "SELECT id, customer_id, amount FROM orders WHERE id = %(id)s",
            "INSERT INTO orders (customer_id, amount) VALUES (%(id)s, %(n)s)",
            "UPDATE customers SET name = %(s)s WHERE id = %(id)s",
        ),
        new_queries=(
            "SELECT o.id, c.name FROM orders o JOIN customers c ON c.id = o.customer_id"
            " WHERE o.id = %(id)s",
            "INSERT INTO orders (customer_id, amount) VALUES (%(id)s, %(n)s)",
            "UPDATE customers SET name = %(s)s WHERE id = %(id)s",
        ),
        check=_check_foreign_key,
        breaks_old_code=False,
    ),
    Recipe(
        key="rename_column",
        title="Rename a column (expand/contract with a sync trigger)",
        file="05_rename_column.sql",
        table="users",
        setup=_BASE_USERS_SETUP,
        old_queries=_BASE_USERS_QUERIES,
        new_queries=(
            "SELECT id, full_name FROM users WHERE id = %(id)s",
            "INSERT INTO users (full_name) VALUES (%(s)s)",
            "UPDATE users SET full_name = %(s)s WHERE id = %(id)s",
        ),
        check=_check_rename,
        breaks_old_code=True,
    ),
    Recipe(
        key="change_column_type",
        title="Change a column's type via a new column",
        file="06_change_column_type.sql",
        table="events",
        setup=(
            "CREATE TABLE events"
            " (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, payload text NOT NULL)",
            "INSERT INTO events (payload)"
            f" SELECT json_build_object('n', g)::text FROM generate_series(1, {ROWS}) g",
        ),
        old_queries=(
            "SELECT id, payload FROM events WHERE id = %(id)s",
            "INSERT INTO events (payload) VALUES (json_build_object('s', %(s)s::text)::text)",
            "UPDATE events SET payload = json_build_object('s', %(s)s::text)::text"
            " WHERE id = %(id)s",
        ),
        new_queries=(
            "SELECT id, payload_json ->> 's' FROM events WHERE id = %(id)s",
            "INSERT INTO events (payload_json) VALUES (jsonb_build_object('s', %(s)s::text))",
            "UPDATE events SET payload_json = jsonb_build_object('s', %(s)s::text)"
            " WHERE id = %(id)s",
        ),
        check=_check_type_change,
        breaks_old_code=True,
    ),
    Recipe(
        key="drop_column",
        title="Drop a column",
        file="07_drop_column.sql",
        table="users",
        setup=(
            _USERS.format(extra=", nickname text NOT NULL"),
            _SEED_USERS.format(cols=", nickname", vals=", 'nick ' || g", rows=ROWS),
        ),
        old_queries=(
            "SELECT id, name, nickname FROM users WHERE id = %(id)s",
            "INSERT INTO users (name, nickname) VALUES (%(s)s, %(s)s)",
            "UPDATE users SET nickname = %(s)s WHERE id = %(id)s",
        ),
        new_queries=_BASE_USERS_QUERIES,
        check=_check_drop,
        breaks_old_code=True,
    ),
)

BY_KEY: dict[str, Recipe] = {r.key: r for r in RECIPES}


def get(key: str) -> Recipe:
    """The recipe called `key`; `KeyError` lists the known ones."""
    try:
        return BY_KEY[key]
    except KeyError:
        raise KeyError(f"unknown recipe {key!r} (known: {', '.join(BY_KEY)})") from None
