"""Throwaway databases on a PostgreSQL server, for the tests and the benchmark.

Each test or benchmark run gets its own empty database, so nothing one leaves behind can
change what the next one measures; `WITH (FORCE)` ends sessions a failed run left open, which
would otherwise block the drop.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo


@contextlib.contextmanager
def fresh_database(server_dsn: str, prefix: str) -> Iterator[str]:
    """A new empty database ``<prefix>_<hex>`` on `server_dsn`'s server; yields its DSN."""
    name = f"{prefix}_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(server_dsn, dbname=name)
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
