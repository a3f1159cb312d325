"""Small helpers over pglast AST nodes shared by classify, rollback and lint.

Kept in one place so every module names relations the same way (``schema.name`` as written,
unquoted) and turns enum members into the same readable words.
"""

from __future__ import annotations

import re
from typing import Any

from pglast import ast, enums
from pglast.stream import RawStream, maybe_double_quote_name

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def relation_name(rv: ast.RangeVar | None) -> str | None:
    """``schema.table`` (or ``table``) as written, without quotes; None when absent."""
    if rv is None or rv.relname is None:
        return None
    if rv.schemaname:
        return f"{rv.schemaname}.{rv.relname}"
    return str(rv.relname)


def dotted(names: tuple[Any, ...] | None) -> str:
    """Join a tuple of `ast.String` name parts (e.g. a function or type name) with dots."""
    return ".".join(str(n.sval) for n in names or () if isinstance(n, ast.String))


def object_words(objtype: enums.ObjectType | None) -> str:
    """``ObjectType.OBJECT_MATVIEW`` -> ``"MATERIALIZED VIEW"``, for statement kinds."""
    if objtype is None:
        return "OBJECT"
    special = {
        enums.ObjectType.OBJECT_MATVIEW: "MATERIALIZED VIEW",
        enums.ObjectType.OBJECT_FOREIGN_TABLE: "FOREIGN TABLE",
        enums.ObjectType.OBJECT_TABCONSTRAINT: "CONSTRAINT",
        enums.ObjectType.OBJECT_DOMCONSTRAINT: "CONSTRAINT",
    }
    if objtype in special:
        return special[objtype]
    return objtype.name.removeprefix("OBJECT_").replace("_", " ")


def camel_words(name: str) -> str:
    """``"CreateSeqStmt"`` -> ``"CREATE SEQ"``: the fallback kind for unmapped node classes."""
    return _CAMEL.sub(" ", name.removesuffix("Stmt")).upper()


def to_sql(node: ast.Node) -> str:
    """Print an AST back to SQL; pglast quotes identifiers wherever PostgreSQL needs it."""
    return RawStream()(node)


def def_elem_true(elems: tuple[Any, ...] | None, name: str) -> bool:
    """Whether an option list such as REINDEX's ``(CONCURRENTLY)`` turns `name` on."""
    for elem in elems or ():
        if isinstance(elem, ast.DefElem) and elem.defname == name:
            arg = elem.arg
            if arg is None:
                return True
            value = getattr(arg, "sval", None) or getattr(arg, "ival", None)
            return str(value).lower() not in ("false", "off", "0")
    return False


def quote(name: str) -> str:
    """One identifier as PostgreSQL needs it written (``User Accounts`` -> ``"User Accounts"``)."""
    return str(maybe_double_quote_name(name))


def quoted_relation(rv: ast.RangeVar | None) -> str | None:
    """``schema.table`` with each part quoted where PostgreSQL needs it; None when absent."""
    if rv is None or rv.relname is None:
        return None
    parts = [rv.schemaname, rv.relname] if rv.schemaname else [rv.relname]
    return ".".join(quote(str(p)) for p in parts)


def quoted_dotted(names: tuple[Any, ...] | None) -> str:
    """`dotted`, each part quoted where needed."""
    return ".".join(quote(str(n.sval)) for n in names or () if isinstance(n, ast.String))
