"""The hazard checks: one function per kind of statement, each returning the rules it breaks.

Phase awareness lives in the rule registry (`Rule.sections`) and in three questions the
`Context` answers per table: does old or new code see it (`visible`: it exists and was not
created earlier in this section), does anyone wait for its locks (`busy`: visible and, when the
catalog says so, not empty), and what does the catalog know about it. Each hit carries the
parameters of its recipe (names quoted as PostgreSQL needs) and, where one exists, a complete
safe migration file (`statemachine.sql.fixes`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

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
from statemachine.sql.catalog import Catalog, TableInfo
from statemachine.sql.locks import lock_effect
from statemachine.sql.rules import Section
from statemachine.sql.types import no_rewrite_type_change
from statemachine.sql.volatility import volatile_call

_AT = enums.AlterTableType
_CT = enums.ConstrType
_OT = enums.ObjectType

_SERIAL_TYPES = frozenset({"serial", "serial2", "serial4", "serial8", "smallserial", "bigserial"})
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


@dataclasses.dataclass
class Hit:
    rule: str
    message: str
    params: dict[str, str] = dataclasses.field(default_factory=dict)
    example: str | None = None


@dataclasses.dataclass
class Context:
    """What the checks know while walking one section in order."""

    section: Section
    catalog: Catalog | None = None
    existing: frozenset[str] | None = None
    #: Tables created earlier in this section: nobody else sees them before commit.
    created: set[str] = dataclasses.field(default_factory=set)
    #: Tables an earlier statement of this section locked against writes (DDL), and by which.
    locked: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Views this section creates anywhere (a rename may leave one with the old name).
    views: set[str] = dataclasses.field(default_factory=set)
    #: (table, column) pairs with a CHECK (column IS NOT NULL) added by this migration.
    not_null_checks: set[tuple[str, str]] = dataclasses.field(default_factory=set)
    #: (table, column) pairs added by this migration.
    added: set[tuple[str, str]] = dataclasses.field(default_factory=set)

    def info(self, table: str) -> TableInfo | None:
        return self.catalog.table(table) if self.catalog is not None else None

    def visible(self, table: str | None) -> bool:
        """True if running code may use `table` (unknown tables are assumed to be used)."""
        if table is None:
            return True
        if table in self.created:
            return False
        if self.catalog is not None:
            return self.info(table) is not None
        if self.existing is not None:
            short = {t.rsplit(".", 1)[-1] for t in self.existing}
            return table in self.existing or table.rsplit(".", 1)[-1] in short
        return True

    def busy(self, table: str | None) -> bool:
        """True if a lock or scan on `table` can make anyone wait: visible and not empty."""
        if not self.visible(table):
            return False
        info = self.info(table) if table else None
        return not (info is not None and info.empty)


def _short(table: str) -> str:
    return table.rsplit(".", 1)[-1]


def _ident(*parts: str) -> str:
    """A new identifier built from names (``users_email_fkey``), quoted if needed."""
    return quote("_".join(p for p in parts if p)[:63])


def _names(items: tuple[Any, ...] | None) -> str:
    return ", ".join(quote(str(n.sval)) for n in items or () if isinstance(n, ast.String))


def _type_text(column: ast.ColumnDef) -> str:
    return to_sql(column.typeName) if column.typeName is not None else "<type>"


# -- ALTER TABLE ----------------------------------------------------------------------------


def _check_add_column(
    ctx: Context, table: str, qtable: str, cmd: ast.AlterTableCmd, statement: str
) -> list[Hit]:
    column = cmd.def_
    assert isinstance(column, ast.ColumnDef)
    name = str(column.colname)
    qname = quote(name)
    ctx.added.add((table, name))
    constraints = [c for c in column.constraints or () if isinstance(c, ast.Constraint)]
    types = {c.contype for c in constraints}
    type_name = dotted(column.typeName.names if column.typeName else ()).rsplit(".", 1)[-1]
    type_text = _type_text(column)
    params = {"table": qtable, "column": qname, "type": type_text}
    serial = type_name.lower() in _SERIAL_TYPES
    default = next((c.raw_expr for c in constraints if c.contype is _CT.CONSTR_DEFAULT), None)
    has_value = bool(types & {_CT.CONSTR_DEFAULT, _CT.CONSTR_IDENTITY, _CT.CONSTR_GENERATED})
    not_null = bool(column.is_not_null) or bool(types & {_CT.CONSTR_NOTNULL, _CT.CONSTR_PRIMARY})
    hits: list[Hit] = []
    info = ctx.info(table)
    empty = info is not None and info.empty
    if not_null and not (has_value or serial) and not (ctx.section != "sql" and empty):
        why = "it fails on any row" if ctx.section != "sql" else "old code's INSERTs fail"
        hits.append(
            Hit(
                "LS106",
                f"column {qname} is added NOT NULL without a DEFAULT to {qtable}: {why}",
                params,
                fixes.add_column_with_default(qtable, qname, type_text),
            )
        )
    if not ctx.busy(table):
        return hits
    volatile = volatile_call(default, ctx.catalog) if default is not None else None
    rewrite = None
    if volatile:
        rewrite = f"its default calls {volatile}(), which may be VOLATILE"
    elif serial:
        rewrite = f"it is {type_name} (a nextval() default per row)"
    elif _CT.CONSTR_IDENTITY in types:
        rewrite = "it is an identity column (a nextval() per row)"
    elif any(c.contype is _CT.CONSTR_GENERATED and c.generated_kind == "s" for c in constraints):
        rewrite = "it is a stored generated column"
    if rewrite:
        default_text = to_sql(default) if volatile and default is not None else "<expression>"
        example = None
        if volatile and default is not None and not not_null:
            example = fixes.add_column_then_default(qtable, qname, type_text, default_text)
        elif serial or _CT.CONSTR_IDENTITY in types:
            sequence = _ident(_short(table), name, "seq")
            default_text = f"nextval('{sequence}')"
            bigint = "bigint" if type_name.lower() in ("bigserial", "serial8") else "integer"
            example = fixes.add_column_with_sequence(qtable, qname, bigint, sequence)
        hits.append(
            Hit(
                "LS204",
                f"adding column {qname} rewrites {qtable}: {rewrite}",
                {**params, "default": default_text},
                example,
            )
        )
    for constraint in constraints:
        hits.extend(
            _check_constraint(ctx, table, qtable, constraint, column=name, column_type=type_text)
        )
    return hits


def _default_constraint_name(table: str, constraint: ast.Constraint, column: str | None) -> str:
    """The name PostgreSQL would generate, close enough for a recipe (``users_email_fkey``)."""
    suffix = {
        _CT.CONSTR_FOREIGN: "fkey",
        _CT.CONSTR_PRIMARY: "pkey",
        _CT.CONSTR_UNIQUE: "key",
        _CT.CONSTR_EXCLUSION: "excl",
    }.get(constraint.contype or _CT.CONSTR_CHECK, "check")
    return "_".join(p for p in (_short(table), column, suffix) if p)


def _check_constraint(
    ctx: Context,
    table: str,
    qtable: str,
    constraint: ast.Constraint,
    *,
    column: str | None = None,
    column_type: str = "<type>",
) -> list[Hit]:
    kind = constraint.contype
    if (
        kind is _CT.CONSTR_CHECK
        and isinstance(constraint.raw_expr, ast.NullTest)
        and constraint.raw_expr.nulltesttype is enums.NullTestType.IS_NOT_NULL
        and isinstance(constraint.raw_expr.arg, ast.ColumnRef)
    ):
        fields = constraint.raw_expr.arg.fields or ()
        if fields and isinstance(fields[-1], ast.String):
            ctx.not_null_checks.add((table, str(fields[-1].sval)))
    if not ctx.busy(table):
        return []
    cname = constraint.conname or _default_constraint_name(table, constraint, column)
    qcname = quote(cname)
    params = {"table": qtable, "constraint": qcname}
    where = f"on column {quote(column)} " if column else ""
    example: str | None
    if kind is _CT.CONSTR_FOREIGN and not constraint.skip_validation:
        columns = _names(constraint.fk_attrs) or (quote(column) if column else "<column>")
        references = quoted_relation(constraint.pktable) or "<table>"
        if constraint.pk_attrs:
            references += f" ({_names(constraint.pk_attrs)})"
        params |= {"columns": columns, "references": references}
        example = fixes.validate_later(
            qtable,
            qcname,
            f"FOREIGN KEY ({columns}) REFERENCES {references}",
            add_column=f"ALTER TABLE {qtable} ADD COLUMN {quote(column)} {column_type}"
            if column
            else None,
        )
        return [
            Hit("LS202", f"FOREIGN KEY {where}on {qtable} is validated at once", params, example)
        ]
    if kind is _CT.CONSTR_CHECK and not constraint.skip_validation:
        expression = to_sql(constraint.raw_expr) if constraint.raw_expr is not None else "..."
        params["expression"] = expression
        example = None if column else fixes.validate_later(qtable, qcname, f"CHECK ({expression})")
        return [
            Hit(
                "LS203",
                f"CHECK constraint {where}on {qtable} is validated at once",
                params,
                example,
            )
        ]
    if kind is _CT.CONSTR_EXCLUSION:
        return [
            Hit("LS216", f"EXCLUDE constraint on {qtable} is built under ACCESS EXCLUSIVE", params)
        ]
    if kind in (_CT.CONSTR_PRIMARY, _CT.CONSTR_UNIQUE) and not constraint.indexname:
        ctype = "PRIMARY KEY" if kind is _CT.CONSTR_PRIMARY else "UNIQUE"
        columns = _names(constraint.keys) or (quote(column) if column else "<column>")
        index = _ident(cname, "idx")
        params |= {"ctype": ctype, "index": index, "columns": columns}
        example = (
            None if column else fixes.unique_using_index(qtable, qcname, ctype, index, columns)
        )
        return [
            Hit(
                "LS207",
                f"{ctype} constraint {where}on {qtable} builds its index while blocking writes",
                params,
                example,
            )
        ]
    return []


def _check_alter_type(
    ctx: Context, table: str, qtable: str, cmd: ast.AlterTableCmd, column: str
) -> list[Hit]:
    new_type = "<new type>"
    if isinstance(cmd.def_, ast.ColumnDef) and cmd.def_.typeName is not None:
        new_type = to_sql(cmd.def_.typeName)
    info = ctx.info(table)
    current = info.columns.get(column) if info is not None else None
    if current is not None and no_rewrite_type_change(current.type, new_type):
        return []
    qcolumn = quote(column)
    params = {
        "table": qtable,
        "column": qcolumn,
        "new_type": new_type,
        "new": _ident(column, "new"),
    }
    if ctx.section == "sql":
        example = fixes.change_type(qtable, qcolumn, params["new"], new_type, _short(table))
        return [
            Hit("LS105", f"changes the type of {qtable}.{qcolumn} to {new_type}", params, example)
        ]
    if not ctx.busy(table):
        return []
    return [Hit("LS210", f"changes the type of {qtable}.{qcolumn} to {new_type}", params)]


def check_alter_table(node: ast.AlterTableStmt, ctx: Context, statement: str) -> list[Hit]:
    table = relation_name(node.relation)
    qtable = quoted_relation(node.relation)
    if node.objtype is not _OT.OBJECT_TABLE or table is None or qtable is None:
        return []
    if not ctx.visible(table):
        # Still remember NOT NULL checks and added columns for later statements.
        for cmd in node.cmds or ():
            if isinstance(cmd, ast.AlterTableCmd) and isinstance(cmd.def_, ast.Constraint):
                _check_constraint(ctx, table, qtable, cmd.def_)
        return []
    hits: list[Hit] = []
    for cmd in node.cmds or ():
        if not isinstance(cmd, ast.AlterTableCmd):
            continue
        column = str(cmd.name) if cmd.name else "<column>"
        qcolumn = quote(column)
        params = {"table": qtable, "column": qcolumn}
        if cmd.subtype is _AT.AT_DropColumn:
            hits.append(
                Hit(
                    "LS101",
                    f"drops column {qtable}.{qcolumn} while old code runs",
                    params,
                    fixes.move_to_contract(statement),
                )
            )
        elif cmd.subtype is _AT.AT_AlterColumnType:
            hits.extend(_check_alter_type(ctx, table, qtable, cmd, column))
        elif cmd.subtype is _AT.AT_SetNotNull:
            check = _ident(_short(table), column, "not_null")
            params["check"] = check
            example = fixes.not_null_via_check(qtable, qcolumn, check)
            if ctx.section == "sql":
                hits.append(Hit("LS107", f"sets {qtable}.{qcolumn} NOT NULL", params, example))
            elif ctx.busy(table) and (table, column) not in ctx.not_null_checks:
                hits.append(
                    Hit(
                        "LS217",
                        f"sets {qtable}.{qcolumn} NOT NULL with a full scan under ACCESS "
                        "EXCLUSIVE (no CHECK IS NOT NULL in this migration proves it)",
                        params,
                        example,
                    )
                )
        elif cmd.subtype is _AT.AT_AddColumn:
            hits.extend(_check_add_column(ctx, table, qtable, cmd, statement))
        elif cmd.subtype is _AT.AT_AddConstraint and isinstance(cmd.def_, ast.Constraint):
            hits.extend(_check_constraint(ctx, table, qtable, cmd.def_))
        elif cmd.subtype is _AT.AT_ColumnDefault and cmd.def_ is None:
            info = ctx.info(table)
            current = info.columns.get(column) if info is not None else None
            nullable = current is not None and not current.not_null
            if not nullable and (table, column) not in ctx.added:
                unsure = "" if current is not None else " (if it is NOT NULL)"
                hits.append(
                    Hit(
                        "LS116",
                        f"drops the default of {qtable}.{qcolumn}{unsure}: old code's INSERTs "
                        "that omit it fail",
                        params,
                        fixes.move_to_contract(statement),
                    )
                )
        elif (
            cmd.subtype is _AT.AT_DetachPartition
            and isinstance(cmd.def_, ast.PartitionCmd)
            and not cmd.def_.concurrent
            and ctx.busy(table)
        ):
            fixed = statement.rstrip().rstrip(";") + " CONCURRENTLY"
            hits.append(
                Hit(
                    "LS212",
                    f"detaches {quoted_relation(cmd.def_.name)} from {qtable} under ACCESS "
                    "EXCLUSIVE",
                    {**params, "fixed": fixed},
                    fixes.replace_statement(fixed, ctx.section),
                )
            )
    return hits


# -- everything else ------------------------------------------------------------------------


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
        example = fixes.rename_column(qtable, _short(table), column, new, params["type"])
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
        old_short = quote(_short(table))
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
        index = quote(node.idxname) if node.idxname else f"{_short(table or 'table')}_idx"
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
