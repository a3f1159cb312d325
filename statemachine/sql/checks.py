"""The hazard checks: one function per kind of statement, each returning the rules it breaks.

Phase awareness lives in the rule registry (`Rule.sections`) and in the `Context`
(`statemachine.sql.context`); ALTER TABLE has its own module (`statemachine.sql.checks_alter`).
Each hit carries the parameters of its recipe (names quoted as PostgreSQL needs) and, where one
exists, a complete safe migration file (`statemachine.sql.fixes`).
"""

from __future__ import annotations

from pglast import ast, enums

from statemachine.sql import fixes
from statemachine.sql._nodes import (
    def_elem_true,
    dotted,
    object_words,
    quote,
    quoted_dotted,
    quoted_relation,
    relation_name,
    to_sql,
)
from statemachine.sql.checks_alter import check_alter_table
from statemachine.sql.context import Context, Hit, short
from statemachine.sql.locks import lock_effect

_AT = enums.AlterTableType
_CT = enums.ConstrType
_OT = enums.ObjectType

_DROP_RELATIONS = {
    _OT.OBJECT_TABLE,
    _OT.OBJECT_VIEW,
    _OT.OBJECT_MATVIEW,
    _OT.OBJECT_SEQUENCE,
    _OT.OBJECT_FOREIGN_TABLE,
}
_DROP_CODE_OBJECTS = {
    _OT.OBJECT_SCHEMA: "LS110",
    _OT.OBJECT_TYPE: "LS111",
    _OT.OBJECT_DOMAIN: "LS111",
    _OT.OBJECT_FUNCTION: "LS112",
    _OT.OBJECT_PROCEDURE: "LS112",
    _OT.OBJECT_ROUTINE: "LS112",
}


def _check_rename(node: ast.RenameStmt, ctx: Context) -> list[Hit]:
    breaks = "old code" if ctx.section == "sql" else "the new code, live since APPLY"
    if node.renameType is _OT.OBJECT_SCHEMA:
        old, new = quote(str(node.subname)), quote(str(node.newname))
        return [Hit("LS114", f"renames schema {old} to {new}: breaks {breaks}", {"new": new})]
    table = relation_name(node.relation)
    qtable = quoted_relation(node.relation)
    if table is None or qtable is None or not ctx.visible(table):
        return []
    if node.renameType is _OT.OBJECT_COLUMN:
        column, new = quote(str(node.subname)), quote(str(node.newname))
        params = {"table": qtable, "column": column, "new": new, "type": "<type of column>"}
        info = ctx.info(table)
        current = info.columns.get(str(node.subname)) if info is not None else None
        if current is not None:
            params["type"] = current.type
        example = fixes.rename_column(qtable, short(table), column, new, params["type"])
        return [
            Hit("LS103", f"renames {qtable}.{column} to {new}: breaks {breaks}", params, example)
        ]
    if node.renameType in (_OT.OBJECT_TABLE, _OT.OBJECT_VIEW, _OT.OBJECT_MATVIEW):
        new = quote(str(node.newname))
        schema = node.relation.schemaname if node.relation else None
        qualified = f"{quote(schema)}.{new}" if schema else new
        if ctx.section == "sql" and table in ctx.views:
            return []  # renamed and replaced by a view with the old name: the LS104 recipe
        params = {"table": qtable, "new": new, "new_qualified": qualified}
        old_short = quote(short(table))
        example = fixes.rename_table(qtable, new, qualified, old_short)
        return [Hit("LS104", f"renames {qtable} to {new}: breaks {breaks}", params, example)]
    return []


def _check_drop(node: ast.DropStmt, ctx: Context, statement: str) -> list[Hit]:
    what = object_words(node.removeType)
    if node.removeType in _DROP_RELATIONS:
        hits = []
        for obj in node.objects or ():
            name = dotted(obj) if isinstance(obj, tuple) else None
            if name and ctx.visible(name):
                params = {"table": quoted_dotted(obj), "object": what}
                hits.append(
                    Hit(
                        "LS102",
                        f"drops {what.lower()} {params['table']} while old code runs",
                        params,
                        fixes.move_to_contract(statement),
                    )
                )
        return hits
    if node.removeType is _OT.OBJECT_INDEX and not node.concurrent:
        fixed = _fixed(node, "concurrent", True)
        indexes = ", ".join(quoted_dotted(o) for o in node.objects or () if isinstance(o, tuple))
        return [
            Hit(
                "LS211",
                f"drops index {indexes} without CONCURRENTLY",
                {"fixed": fixed},
                fixes.replace_statement(fixed, ctx.section),
            )
        ]
    rule = _DROP_CODE_OBJECTS.get(node.removeType) if node.removeType else None
    if rule is None:
        return []
    names: list[str] = []
    for obj in node.objects or ():
        if isinstance(obj, ast.ObjectWithArgs):
            names.append(quoted_dotted(obj.objname))
        elif isinstance(obj, ast.TypeName):
            names.append(quoted_dotted(obj.names))
        elif isinstance(obj, tuple):
            names.append(quoted_dotted(obj))
        elif isinstance(obj, ast.String):
            names.append(quote(str(obj.sval)))
    label = ", ".join(names)
    params = {"name": label, "statement": " ".join(statement.split())}
    message = f"drops {what.lower()} {label} while old code runs"
    return [Hit(rule, message, params, fixes.move_to_contract(statement))]


def _fixed(node: ast.Node, attr: str, value: object) -> str:
    """The statement printed with one attribute changed (e.g. ``concurrent=True``)."""
    before = getattr(node, attr)
    setattr(node, attr, value)
    try:
        return to_sql(node)
    finally:
        setattr(node, attr, before)


def _check_dml(node: ast.Node, ctx: Context) -> list[Hit]:
    effect = lock_effect(node)
    target = relation_name(getattr(node, "relation", None))
    touched = [t for t in (target, *effect.scans) if t and t in ctx.locked and ctx.busy(t)]
    if not effect.scans or not touched:
        return []
    qtable = quoted_relation(getattr(node, "relation", None)) or touched[0]
    backfill = "<a backfill line>"
    example = None
    if isinstance(node, ast.UpdateStmt) and node.targetList:
        sets = ", ".join(
            f"{quote(str(t.name))} = {to_sql(t.val)}"
            for t in node.targetList
            if isinstance(t, ast.ResTarget) and t.val is not None
        )
        where = to_sql(node.whereClause) if node.whereClause is not None else None
        backfill = fixes.backfill_line(qtable, sets, where)
        example = fixes.ddl_then_backfill(ctx.locked[touched[0]], backfill)
    return [
        Hit(
            "LS214",
            f"changes the rows of {qtable} after DDL on {touched[0]} in the same section",
            {"table": qtable, "backfill": backfill},
            example,
        )
    ]


def check_node(node: ast.Node, ctx: Context, statement: str) -> list[Hit]:
    """Every hit for one statement (the caller filters by section and profile)."""
    if isinstance(node, ast.AlterTableStmt):
        return check_alter_table(node, ctx, statement)
    if isinstance(node, ast.RenameStmt):
        return _check_rename(node, ctx)
    if isinstance(node, ast.DropStmt):
        return _check_drop(node, ctx, statement)
    if isinstance(node, ast.DropdbStmt):
        return [Hit("LS113", f"drops database {quote(str(node.dbname))}")]
    if isinstance(node, ast.AlterEnumStmt) and node.oldVal is not None:
        old, new = _literal(str(node.oldVal)), _literal(str(node.newVal))
        params = {"type": quoted_dotted(node.typeName), "old": old, "new": new}
        message = f"renames label {old} of {params['type']} to {new}"
        return [Hit("LS115", message, params, fixes.add_enum_value(params["type"], new))]
    if isinstance(node, ast.AlterDomainStmt) and node.subtype == "C":
        constraint = node.def_
        if not isinstance(constraint, ast.Constraint) or constraint.skip_validation:
            return []
        domain = quoted_dotted(node.typeName)
        cname = quote(constraint.conname or f"{dotted(node.typeName)}_check")
        params = {"domain": domain, "constraint": cname}
        example = None
        if constraint.conname:
            constraint.skip_validation = True
            try:
                fixed = to_sql(node)
            finally:
                constraint.skip_validation = False
            example = fixes.domain_validate_later(domain, cname, fixed)
        return [Hit("LS213", f"adds a validated constraint to domain {domain}", params, example)]
    if isinstance(node, ast.TruncateStmt):
        names = [(relation_name(rv), quoted_relation(rv)) for rv in node.relations or ()]
        live = [q for n, q in names if n and q and ctx.visible(n)]
        if live:
            example = fixes.move_to_contract(to_sql(node))
            return [Hit("LS108", f"truncates {', '.join(live)}", {"table": live[0]}, example)]
        return []
    if isinstance(node, ast.TransactionStmt):
        kind = node.kind.name.removeprefix("TRANS_STMT_") if node.kind is not None else "?"
        return [Hit("LS109", f"{kind} inside a migration", {"kind": kind})]
    if isinstance(node, ast.IndexStmt):
        table = relation_name(node.relation)
        if node.concurrent or not ctx.busy(table):
            return []
        qtable = quoted_relation(node.relation) or "<table>"
        index = quote(node.idxname) if node.idxname else f"{short(table or 'table')}_idx"
        fixed = _fixed(node, "concurrent", True)
        params = {"table": qtable, "index": index, "fixed": fixed}
        return [
            Hit(
                "LS201",
                f"builds index {index} on {qtable} without CONCURRENTLY",
                params,
                fixes.replace_statement(fixed, ctx.section),
            )
        ]
    if isinstance(node, ast.VacuumStmt) and node.is_vacuumcmd:
        if not def_elem_true(node.options, "full"):
            return []
        rels = [r.relation for r in node.rels or () if isinstance(r, ast.VacuumRelation)]
        live = [quoted_relation(r) or "" for r in rels if ctx.busy(relation_name(r))]
        if rels and not live:
            return []
        label = ", ".join(live) or "every table"
        example = fixes.replace_statement(f"VACUUM {label}" if live else "VACUUM", ctx.section)
        params = {"table": live[0] if live else ""}
        return [Hit("LS205", f"VACUUM FULL rewrites {label}", params, example)]
    if isinstance(node, ast.ClusterStmt):
        table = relation_name(node.relation)
        if table is not None and not ctx.busy(table):
            return []
        label = quoted_relation(node.relation) or "every clustered table"
        return [Hit("LS206", f"CLUSTER rewrites {label}", {})]
    if isinstance(node, ast.LockStmt):
        pairs = [(relation_name(rv), quoted_relation(rv)) for rv in node.relations or ()]
        live = [q for n, q in pairs if n and q and ctx.busy(n)]
        if not live:
            return []
        return [Hit("LS208", f"explicitly locks {', '.join(live)}", {"table": live[0]})]
    if isinstance(node, ast.ReindexStmt) and not def_elem_true(node.params, "concurrently"):
        target = relation_name(node.relation) or node.name or ""
        if node.relation is not None and not ctx.busy(target):
            return []
        concurrently = ast.DefElem(defname="concurrently")
        fixed = _fixed(node, "params", (*(node.params or ()), concurrently))
        kind = node.kind.name.removeprefix("REINDEX_OBJECT_") if node.kind is not None else ""
        label = quoted_relation(node.relation) or quote(str(node.name or ""))
        return [
            Hit(
                "LS209",
                f"REINDEX {kind} {label} without CONCURRENTLY",
                {"table": label, "fixed": fixed},
                fixes.replace_statement(fixed, ctx.section),
            )
        ]
    if isinstance(node, ast.RefreshMatViewStmt) and not node.concurrent:
        view = relation_name(node.relation)
        if not ctx.busy(view):
            return []
        fixed = _fixed(node, "concurrent", True)
        label = quoted_relation(node.relation) or "<view>"
        return [
            Hit(
                "LS215",
                f"refreshes {label} without CONCURRENTLY",
                {"fixed": fixed},
                fixes.replace_statement(fixed, ctx.section),
            )
        ]
    if isinstance(node, (ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt, ast.InsertStmt)):
        return _check_dml(node, ctx)
    return []


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def record(node: ast.Node, ctx: Context, statement: str) -> None:
    """Remember what `node` changed, for the statements after it in the same section."""
    effect = lock_effect(node)
    ctx.created.update(effect.creates)
    for relation, mode in effect.locks:
        if mode.blocks_writes:
            ctx.locked.setdefault(relation, statement)
