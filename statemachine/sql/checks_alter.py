"""The ALTER TABLE checks: columns, constraints, type changes, NOT NULL, defaults, partitions.

Each returns the hits of one subcommand, with the recipe's parameters (names quoted as
PostgreSQL needs) and, where one exists, a complete safe migration (`statemachine.sql.fixes`).
"""

from __future__ import annotations

from pglast import ast, enums

from statemachine.sql import fixes
from statemachine.sql._nodes import dotted, quote, quoted_relation, relation_name, to_sql
from statemachine.sql.context import Context, Hit, column_type_text, ident, names, short
from statemachine.sql.types import no_rewrite_type_change
from statemachine.sql.volatility import volatile_call

_AT = enums.AlterTableType
_CT = enums.ConstrType
_OT = enums.ObjectType

_SERIAL_TYPES = frozenset({"serial", "serial2", "serial4", "serial8", "smallserial", "bigserial"})


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
    type_text = column_type_text(column)
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
            sequence = ident(short(table), name, "seq")
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
    return "_".join(p for p in (short(table), column, suffix) if p)


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
        columns = names(constraint.fk_attrs) or (quote(column) if column else "<column>")
        references = quoted_relation(constraint.pktable) or "<table>"
        if constraint.pk_attrs:
            references += f" ({names(constraint.pk_attrs)})"
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
        columns = names(constraint.keys) or (quote(column) if column else "<column>")
        index = ident(cname, "idx")
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
        "new": ident(column, "new"),
    }
    if ctx.section == "sql":
        example = fixes.change_type(qtable, qcolumn, params["new"], new_type, short(table))
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
            check = ident(short(table), column, "not_null")
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
