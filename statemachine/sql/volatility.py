"""Does a column default call something that changes per row (and so rewrites the table)?

Why a list of *safe* functions rather than of volatile ones: a default that PostgreSQL must
evaluate per row (a VOLATILE function) forces ``ADD COLUMN`` to rewrite the table, and user
functions are VOLATILE unless declared otherwise, so ``DEFAULT make_referral_code()`` is a
rewrite. Without a catalog, only the built-ins below are trusted; with one, ``pg_proc`` decides.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pglast import ast

from statemachine.sql.catalog import Catalog

#: Built-in functions that are STABLE or IMMUTABLE (one value per statement at most).
NON_VOLATILE_BUILTINS = frozenset(
    {
        "now", "statement_timestamp", "transaction_timestamp", "current_setting", "lower",
        "upper", "btrim", "ltrim", "rtrim", "trim", "length", "char_length", "concat",
        "concat_ws", "format", "to_char", "to_date", "to_timestamp", "to_number", "date_trunc",
        "date_part", "make_date", "make_time", "make_timestamp", "make_timestamptz",
        "make_interval", "md5", "sha256", "substr", "substring", "replace", "left", "right",
        "lpad", "rpad", "abs", "round", "floor", "ceil", "ceiling", "trunc", "mod", "power",
        "sqrt", "jsonb_build_object", "jsonb_build_array", "json_build_object",
        "json_build_array", "to_jsonb", "to_json", "array_length", "cardinality", "int4",
        "int8", "numeric", "text", "timezone", "age", "encode", "decode",
        "inet", "split_part", "initcap", "translate", "regexp_replace", "nullif",
    }
)  # fmt: skip

#: Kept for callers of the old API: built-ins known to be VOLATILE.
VOLATILE_FUNCTIONS = frozenset(
    {
        "random", "random_normal", "setseed", "clock_timestamp", "timeofday",
        "gen_random_uuid", "gen_random_bytes", "uuid_generate_v1", "uuid_generate_v1mc",
        "uuid_generate_v4", "uuidv4", "uuidv7", "nextval", "txid_current",
        "pg_current_xact_id",
    }
)  # fmt: skip


def _walk(node: Any) -> Iterator[Any]:
    if isinstance(node, tuple):
        for item in node:
            yield from _walk(item)
    elif isinstance(node, ast.Node):
        yield node
        for attr in node:
            yield from _walk(getattr(node, attr))


def volatile_call(expr: Any, catalog: Catalog | None = None) -> str | None:
    """The name of the first function in `expr` that may be VOLATILE, or None."""
    for sub in _walk(expr):
        if not isinstance(sub, ast.FuncCall) or not sub.funcname:
            continue
        parts = [str(p.sval).lower() for p in sub.funcname if isinstance(p, ast.String)]
        name = parts[-1]
        qualified = ".".join(parts)
        known = None
        if catalog is not None:
            known = catalog.volatility(qualified) or catalog.volatility(name)
        if known is not None:
            if known == "volatile":
                return qualified
            continue
        if name in NON_VOLATILE_BUILTINS and parts[0] in (name, "pg_catalog"):
            continue
        return qualified
    return None
