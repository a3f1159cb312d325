"""Splitting must follow PostgreSQL's grammar, not semicolons, and keep the lines users wrote."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from statemachine.sql import SqlSyntaxError, Statement, parse_statement, split_statements


def test_dollar_quoted_body_is_one_statement() -> None:
    text = (
        "CREATE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS $body$\n"
        "BEGIN\n  NEW.a := 1; RETURN NEW;\nEND;\n$body$;\n"
        "SELECT 2;"
    )
    stmts = split_statements(text)
    assert [s.line for s in stmts] == [1, 6]
    assert stmts[0].text.endswith("$body$")
    assert "NEW.a := 1; RETURN NEW;" in stmts[0].text
    assert stmts[1] == Statement("SELECT 2", 6)


def test_semicolons_in_strings_and_comments() -> None:
    text = "SELECT 'a;b';\n-- comment; with semicolon\nSELECT \"x;y\" FROM t /* ; */;\n"
    assert split_statements(text) == [
        Statement("SELECT 'a;b'", 1),
        Statement('SELECT "x;y" FROM t /* ; */', 3),
    ]


def test_empty_and_comment_only_text() -> None:
    assert split_statements("") == []
    assert split_statements("  -- nothing\n/* here */\n;;") == []


def test_last_statement_without_semicolon() -> None:
    assert split_statements("SELECT 1;\n\n\nSELECT 2") == [
        Statement("SELECT 1", 1),
        Statement("SELECT 2", 4),
    ]


def test_syntax_error_names_line_and_message() -> None:
    with pytest.raises(SqlSyntaxError) as info:
        split_statements("SELECT 1;\n\nSELECT FROM WHERE;")
    assert info.value.line == 3
    assert 'syntax error at or near "WHERE"' in info.value.message
    assert str(info.value).startswith("line 3:")


def test_syntax_error_line_after_non_ascii_text() -> None:
    # pglast mistakes PostgreSQL's character offset for a byte offset; we correct it.
    text = "SELECT 'ééééééééééééééééééééé';\nSELECT 1;\nSELECT FROM WHERE;"
    with pytest.raises(SqlSyntaxError) as info:
        split_statements(text)
    assert info.value.line == 3


def test_unterminated_dollar_quote() -> None:
    with pytest.raises(SqlSyntaxError) as info:
        split_statements("SELECT 1;\nSELECT $$ never closed")
    assert info.value.line == 2
    assert "dollar-quoted" in info.value.message


def test_parse_statement_wants_exactly_one() -> None:
    assert type(parse_statement("SELECT 1")).__name__ == "SelectStmt"
    with pytest.raises(ValueError, match="exactly one"):
        parse_statement("SELECT 1; SELECT 2")
    with pytest.raises(SqlSyntaxError):
        parse_statement("SELEC 1")


_identifier = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True).map(lambda s: f"c_{s}")
_literal = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=12
)
_statement = st.one_of(
    st.builds(lambda c: f"ALTER TABLE t ADD COLUMN {c} int", _identifier),
    st.builds(lambda s: "SELECT '" + s.replace("'", "''") + "'", _literal),
    st.builds(lambda s: f"SELECT $q${s.replace('$', '')}$q$", _literal),
    st.builds(lambda c: f"CREATE INDEX CONCURRENTLY i_{c} ON t ({c})", _identifier),
)


@given(
    st.lists(_statement, min_size=1, max_size=6),
    st.lists(st.sampled_from([";\n", "; ", ";\n-- note; here\n", ";\n\n/* x; */ "]), min_size=6),
)
def test_split_of_joined_statements_gives_them_back(
    statements: list[str], separators: list[str]
) -> None:
    text = ""
    starts = []
    for stmt, sep in zip(statements, separators, strict=False):
        starts.append(text.count("\n") + 1)
        text += stmt + sep
    result = split_statements(text)
    assert [s.text for s in result] == statements
    assert [s.line for s in result] == starts
