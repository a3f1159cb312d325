"""Style rules (the ``strict`` profile): column types that are legal and safe but regretted.

Kept apart from the hazard checks because they are matters of taste: the default profile must
raise no false alarm on a safe migration, so these run only when asked for.
"""

from __future__ import annotations

from collections.abc import Iterator

from pglast import ast, enums

from statemachine.sql._nodes import quote

_CT = enums.ConstrType
_AT = enums.AlterTableType
_SERIAL = {"serial", "serial2", "serial4", "serial8", "smallserial", "bigserial"}
_SMALL_KEYS = {"int4", "int2", "serial", "serial4", "serial2", "smallserial", "int", "integer"}


def _columns(node: ast.Node) -> Iterator[tuple[ast.ColumnDef, bool]]:
    """Each column a statement defines, and whether it is (part of) the primary key."""
    if isinstance(node, ast.CreateStmt):
        keys: set[str] = set()
        for elt in node.tableElts or ():
            if isinstance(elt, ast.Constraint) and elt.contype is _CT.CONSTR_PRIMARY:
                keys |= {str(k.sval) for k in elt.keys or () if isinstance(k, ast.String)}
        for elt in node.tableElts or ():
            if isinstance(elt, ast.ColumnDef):
                yield elt, _inline_pk(elt) or str(elt.colname) in keys
    elif isinstance(node, ast.AlterTableStmt):
        for cmd in node.cmds or ():
            if not isinstance(cmd, ast.AlterTableCmd) or not isinstance(cmd.def_, ast.ColumnDef):
                continue
            if cmd.subtype is _AT.AT_AddColumn:
                yield cmd.def_, _inline_pk(cmd.def_)
            elif cmd.subtype is _AT.AT_AlterColumnType:
                cmd.def_.colname = cmd.name
                yield cmd.def_, False


def _inline_pk(column: ast.ColumnDef) -> bool:
    return any(
        isinstance(c, ast.Constraint) and c.contype is _CT.CONSTR_PRIMARY
        for c in column.constraints or ()
    )


def style_hits(node: ast.Node) -> list[tuple[str, str, dict[str, str]]]:
    """(rule, message, params) for every style rule `node` breaks."""
    hits: list[tuple[str, str, dict[str, str]]] = []
    for column, primary in _columns(node):
        if column.typeName is None:
            continue
        names = [
            str(n.sval).lower() for n in column.typeName.names or () if isinstance(n, ast.String)
        ]
        name = names[-1] if names else ""
        builtin = len(names) == 1 or names[0] == "pg_catalog"
        label = quote(str(column.colname))
        params = {"column": label}
        if not builtin:
            continue
        if name == "json":
            hits.append(("LS401", f"column {label} is json", params))
        if name == "varchar" and column.typeName.typmods:
            hits.append(("LS402", f"column {label} is varchar(n)", params))
        if name == "timestamp":
            hits.append(("LS403", f"column {label} is timestamp without time zone", params))
        if name in _SERIAL:
            hits.append(("LS404", f"column {label} is {name}", params))
        if name == "bpchar":
            hits.append(("LS405", f"column {label} is char(n)", params))
        if primary and name in _SMALL_KEYS:
            shown = {"int4": "integer", "int2": "smallint"}.get(name, name)
            hits.append(("LS406", f"primary key {label} is {shown}", params))
    return hits
