"""Read the live catalog into `statemachine.sql.Catalog`, for catalog-aware lint.

Why a snapshot read in three queries: lint stays pure and fast (it never queries per
statement), and the same snapshot serves every file of a run. Emptiness is exact, not an
estimate: a table is empty only when its main fork has no pages (``pg_relation_size = 0``), so
a table never vacuumed or analyzed is not mistaken for an empty one; partitioned tables and
views are never called empty.
"""

from __future__ import annotations

from typing import Any

import psycopg
import trio

from coordinator.pg.held import HeldConnection
from statemachine.sql.catalog import Catalog, ColumnInfo, TableInfo, Volatility

_TABLES = """
SELECT c.oid, n.nspname, c.relname, c.relkind IN ('r', 'm') AND pg_relation_size(c.oid) = 0
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'm', 'v', 'f')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'
"""
_COLUMNS = """
SELECT a.attrelid, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'm', 'v', 'f')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'
"""
_FUNCTIONS = """
SELECT n.nspname, p.proname, p.provolatile FROM pg_proc p
JOIN pg_namespace n ON n.oid = p.pronamespace
"""
_VOLATILITY: dict[str, Volatility] = {"i": "immutable", "s": "stable", "v": "volatile"}
_ORDER = {"immutable": 0, "stable": 1, "volatile": 2}


#: Changes whenever a function is created, replaced, altered or dropped: a new row version
#: has a new xmin, a dropped one leaves the count and the sum. Cheaper than reading the
#: thousands of rows of pg_proc (a few ms) before each migration.
_FUNCTIONS_VERSION = (
    "SELECT count(*), coalesce(sum(xmin::text::bigint), 0), coalesce(max(oid::bigint), 0) "
    "FROM pg_proc"
)


def read_functions(conn: psycopg.Connection[Any]) -> dict[str, Volatility]:
    """Every function's volatility by qualified and bare name (the most volatile wins)."""
    functions: dict[str, Volatility] = {}
    for schema, name, code in conn.execute(_FUNCTIONS).fetchall():
        volatility = _VOLATILITY.get(str(code), "volatile")
        for key in (f"{schema}.{name}", str(name)):
            known = functions.get(key)
            if known is None or _ORDER[volatility] > _ORDER[known]:
                functions[key] = volatility
    return functions


def read_catalog(
    conn: psycopg.Connection[Any], functions: dict[str, Volatility] | None = None
) -> Catalog:
    """The catalog as `conn` sees it (its search path resolves unqualified names); with
    `functions` already read, pg_proc is not read again. The queries go out together (a
    pipeline: one round trip, not four)."""
    with conn.pipeline():
        queued = _queue_catalog(conn)
    return _catalog_of(conn, queued, functions)


_Queued = tuple["psycopg.Cursor[Any]", "psycopg.Cursor[Any]", "psycopg.Cursor[Any]"]


def _queue_catalog(conn: psycopg.Connection[Any]) -> _Queued:
    """Send the catalog's queries (in a pipeline, their results are read later)."""
    return (
        conn.execute(_COLUMNS),
        conn.execute(_TABLES),
        conn.execute("SELECT current_schemas(false)"),
    )


def _catalog_of(
    conn: psycopg.Connection[Any], queued: _Queued, functions: dict[str, Volatility] | None
) -> Catalog:
    column_rows, table_rows, path_row = queued
    columns: dict[int, dict[str, ColumnInfo]] = {}
    for relid, name, type_, not_null in column_rows.fetchall():
        columns.setdefault(int(relid), {})[str(name)] = ColumnInfo(str(type_), bool(not_null))
    tables = {
        f"{schema}.{name}": TableInfo(bool(empty), columns.get(int(relid), {}))
        for relid, schema, name, empty in table_rows.fetchall()
    }
    if functions is None:
        functions = read_functions(conn)
    row = path_row.fetchone()
    search_path = tuple(str(s) for s in (row[0] if row else ["public"]))
    return Catalog(tables, functions, search_path)


def _limit(conn: psycopg.Connection[Any], lock_timeout: float, timeout: float, local: bool) -> None:
    conn.execute(
        "SELECT set_config('lock_timeout', %s, %s), set_config('statement_timeout', %s, %s)",
        (f"{round(lock_timeout * 1000)}ms", local, f"{round(timeout * 1000)}ms", local),
    )


class CatalogReader:
    """Reads the live catalog before each migration on one held connection (a coordinator's).

    Why: the lint gate reads the catalog before every migration; a fresh connection and the
    whole of pg_proc each time were most of a small migration's fixed cost. Tables and
    columns are read afresh every time (emptiness must be exact: a table that got its first
    row must lose the empty-table allowances at once); the functions' volatility is reused
    while pg_proc's version (`_FUNCTIONS_VERSION`) is unchanged. Limits as `load_catalog`.
    """

    def __init__(self, dsn: str, *, lock_timeout: float = 0.2, timeout: float = 5.0) -> None:
        self.held = HeldConnection(dsn)
        self.lock_timeout = lock_timeout
        self.timeout = timeout
        self._functions: tuple[tuple[Any, ...], dict[str, Volatility]] | None = None

    async def read(self) -> Catalog:
        """The catalog now; `trio.TooSlowError` past `timeout`, psycopg errors as they are."""
        with trio.fail_after(self.timeout):
            return await self.held.run(self._read)

    def _read(self, conn: psycopg.Connection[Any]) -> Catalog:
        # One round trip: the limits, pg_proc's version and the catalog's queries go out in
        # one pipeline (pg_proc itself is read only when its version changed). The limits
        # are the session's (the held connection is the reader's alone); no transaction is
        # needed for them, and at READ COMMITTED one would not share a snapshot either.
        with conn.pipeline():
            _limit(conn, self.lock_timeout, self.timeout, local=False)
            versions = conn.execute(_FUNCTIONS_VERSION)
            queued = _queue_catalog(conn)
        version = versions.fetchone() or ()
        cached = self._functions
        if cached is not None and cached[0] == tuple(version):
            functions = cached[1]
        else:
            functions = read_functions(conn)
            self._functions = (tuple(version), functions)
        return _catalog_of(conn, queued, functions)

    async def aclose(self) -> None:
        await self.held.aclose()


def load_catalog(dsn: str, *, lock_timeout: float = 0.2, timeout: float = 5.0) -> Catalog:
    """Connect, read the catalog, disconnect (blocking: from trio, run it in a thread).

    Table sizes need a share lock on each table, so a session holding an exclusive lock
    would stall the read: `lock_timeout` (and `timeout` for the whole read, in seconds) make
    it fail fast instead, and callers fall back to conservative lint.
    """
    with psycopg.connect(dsn, autocommit=True, connect_timeout=max(1, round(timeout))) as conn:
        _limit(conn, lock_timeout, timeout, local=False)
        return read_catalog(conn)
