"""`lockstep check-db`: prove a database can take the DDL lockstep will run, before a migration.

A migration that fails half-way because the role cannot create tables, or the server is
unreachable, should fail here first, with the step and PostgreSQL's own words. The check creates
a scratch table, adds a column, drops the column and drops the table, each in its own autocommit
transaction, exactly like the statements of a real EXECUTE/CONTRACT phase would commit.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from typing import Any, TextIO

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from rich.console import Console
from rich.markup import escape

from statemachine.exceptions import LockstepError

__all__ = [
    "DbCheckError",
    "check_db",
]

#: Used when neither the DSN nor $PGCONNECT_TIMEOUT sets one: a black-holed host must not hang.
DEFAULT_CONNECT_TIMEOUT = 10
#: The check never waits long for a lock or a statement; a busy catalog is reported, not waited on.
_STATEMENT_TIMEOUT = "15s"
_LOCK_TIMEOUT = "5s"

STEP_CONNECT = "connect"
STEP_SERVER_INFO = "read server time and version"
STEP_CREATE_TABLE = "create scratch table"
STEP_ADD_COLUMN = "add column"
STEP_DROP_COLUMN = "drop column"
STEP_DROP_TABLE = "drop scratch table"


class DbCheckError(LockstepError):
    """A step of `check_db` failed.

    ``step`` names the step, ``message`` is PostgreSQL's (or libpq's) text on one line.
    """

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step} failed: {message}")
        self.step = step
        self.message = message


def check_db(dsn: str, out: Console | TextIO) -> None:
    """Connect to `dsn`, report the server, and round-trip DDL on a scratch table.

    Prints progress to `out` (a rich `Console`, or any text stream, which gets plain text) and
    ends with ``All tests passed!``. Raises `DbCheckError` on the first failing step; the scratch
    table is dropped on a best-effort basis even then.
    """
    console = out if isinstance(out, Console) else Console(file=out, highlight=False)
    table = f"lockstep_check_{secrets.token_hex(4)}"
    ident = sql.Identifier(table)

    try:
        conn = psycopg.connect(dsn, autocommit=True, **_connect_kwargs(dsn))
    except psycopg.Error as exc:
        raise DbCheckError(STEP_CONNECT, _pg_message(exc)) from exc

    with conn:
        info = conn.info
        console.print(
            f"Connected to database [bold]{escape(info.dbname)}[/] as {escape(info.user)} "
            f"on {escape(info.host)}:{info.port}",
            soft_wrap=True,
        )
        created = False
        step = STEP_SERVER_INFO
        try:
            conn.execute(
                "SELECT set_config('statement_timeout', %s, false),"
                " set_config('lock_timeout', %s, false)",
                (_STATEMENT_TIMEOUT, _LOCK_TIMEOUT),
            )
            row = conn.execute("SELECT now(), version()").fetchone()
            assert row is not None
            console.print(f"Server time:    {row[0].isoformat()}", soft_wrap=True)
            console.print(f"Server version: {escape(str(row[1]))}", soft_wrap=True)

            step = STEP_CREATE_TABLE
            conn.execute(sql.SQL("CREATE TABLE {} (id integer PRIMARY KEY)").format(ident))
            created = True
            _ok(console, f"created table {table}")

            step = STEP_ADD_COLUMN
            conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN note text").format(ident))
            _ok(console, "added column note")

            step = STEP_DROP_COLUMN
            conn.execute(sql.SQL("ALTER TABLE {} DROP COLUMN note").format(ident))
            _ok(console, "dropped column note")

            step = STEP_DROP_TABLE
            conn.execute(sql.SQL("DROP TABLE {}").format(ident))
            created = False
            _ok(console, f"dropped table {table}")
        except psycopg.Error as exc:
            if created:
                _drop_quietly(conn, ident)
            raise DbCheckError(step, _pg_message(exc)) from exc

    console.print("[bold green]All tests passed![/]")


def _connect_kwargs(dsn: str) -> dict[str, Any]:
    # Keyword arguments override the DSN, so add a timeout only where none was asked for.
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        return {}  # let connect() report the malformed DSN
    if "connect_timeout" in params or os.environ.get("PGCONNECT_TIMEOUT"):
        return {}
    return {"connect_timeout": DEFAULT_CONNECT_TIMEOUT}


def _drop_quietly(conn: psycopg.Connection[Any], ident: sql.Identifier) -> None:
    if conn.closed:
        return
    with contextlib.suppress(psycopg.Error):
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident))


def _pg_message(exc: psycopg.Error) -> str:
    """PostgreSQL's primary message with its SQLSTATE, or libpq's text, on one line."""
    primary = exc.diag.message_primary
    if primary:
        text = primary if exc.sqlstate is None else f"{primary} (SQLSTATE {exc.sqlstate})"
    else:
        text = str(exc).removeprefix("connection failed: ")  # the step already says "connect"
    lines = (" ".join(line.split()) for line in text.splitlines())
    return "; ".join(line for line in lines if line) or type(exc).__name__


def _ok(console: Console, text: str) -> None:
    console.print(f"  [green]ok[/]  {escape(text)}", soft_wrap=True)
