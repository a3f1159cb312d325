"""Split a SQL script into statements with PostgreSQL's own parser, keeping line numbers.

Why not split on ``;``: dollar-quoted function bodies, string literals and comments all contain
semicolons. pglast uses the real PostgreSQL grammar, so what we split is exactly what the server
will see. Line numbers are kept so every later error (lint, file parsing, execution) can point at
the line the user wrote.
"""

from __future__ import annotations

import dataclasses
import re

from pglast import ast
from pglast.parser import ParseError, parse_sql, split

from statemachine.exceptions import LockstepError

_NON_ASCII = re.compile(r"[^\x00-\x7f]")


class SqlSyntaxError(LockstepError, ValueError):
    """Raised by the splitter and parser when the text is not valid PostgreSQL; `line` is
    1-based within the text that was parsed."""

    def __init__(self, message: str, line: int) -> None:
        super().__init__(f"line {line}: {message}")
        self.message = message
        self.line = line


@dataclasses.dataclass(frozen=True)
class Statement:
    """One statement: its text without the trailing semicolon, and the line where it starts."""

    text: str
    line: int


def _line_of(text: str, index: int) -> int:
    return text.count("\n", 0, max(0, min(index, len(text)))) + 1


def _error_index(text: str, exc: ParseError) -> int | None:
    """The 0-based character index of a parse error.

    pglast 8.7 converts PostgreSQL's error position as if it were a byte offset, but it already is
    a character offset, so the index is wrong after any non-ASCII character. Replacing every
    non-ASCII character by an ASCII letter keeps all character positions (and the tokenization:
    PostgreSQL treats high-bit characters as identifier letters), so parsing that copy yields the
    right index.
    """
    location = exc.args[1] if len(exc.args) > 1 else None
    if not _NON_ASCII.search(text):
        return location if isinstance(location, int) else None
    try:
        parse_sql(_NON_ASCII.sub("x", text))
    except ParseError as ascii_exc:
        fixed = ascii_exc.args[1] if len(ascii_exc.args) > 1 else None
        if isinstance(fixed, int):
            return fixed
    return location if isinstance(location, int) else None


def _syntax_error(text: str, exc: ParseError) -> SqlSyntaxError:
    message = str(exc.args[0]) if exc.args else str(exc)
    index = _error_index(text, exc)
    return SqlSyntaxError(message, _line_of(text, index) if index is not None else 1)


def split_statements(text: str) -> list[Statement]:
    """Split `text` into statements; empty statements and comment-only text give nothing.

    Raises `SqlSyntaxError` naming the line of the first syntax error.
    """
    try:
        slices = split(text, with_parser=True, only_slices=True)
    except ParseError as exc:
        raise _syntax_error(text, exc) from None
    out: list[Statement] = []
    for piece in slices:
        start = piece.start or 0
        out.append(Statement(text=text[piece], line=_line_of(text, start)))
    return out


def parse_statement(sql: str) -> ast.Node:
    """The AST of exactly one statement (the node inside pglast's `RawStmt`).

    Raises `SqlSyntaxError` for invalid SQL and `ValueError` when `sql` holds no statement or
    more than one: callers that accept scripts split them first.
    """
    try:
        raw = parse_sql(sql)
    except ParseError as exc:
        raise _syntax_error(sql, exc) from None
    if len(raw) != 1:
        raise ValueError(f"expected exactly one SQL statement, got {len(raw)}: {sql!r}")
    stmt = raw[0].stmt
    if stmt is None:  # pragma: no cover - pglast always fills it
        raise ValueError(f"no statement in {sql!r}")
    return stmt
