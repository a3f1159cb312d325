"""Phase-aware lint: what would break old code or hold a long lock, and the safe recipe.

Why phase-aware: `sql` runs in EXECUTE while the old application code is still serving, so it
must be backward compatible (no drops, renames, type changes, new NOT NULLs). `contract_sql` runs
after every agent switched, so drops belong there. Every section still runs against a live
database, so statements that hold an ACCESS EXCLUSIVE lock for a table scan or rewrite are
warned about everywhere. A statement on a table created earlier in the same section is exempt:
nobody uses that table yet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from pglast import ast, enums

from statemachine.migration import Migration
from statemachine.sql._nodes import def_elem_true, dotted, object_words, relation_name
from statemachine.sql.rollback import try_derive_rollback
from statemachine.sql.rules import RULES, Section, Severity
from statemachine.sql.split import SqlSyntaxError, parse_statement, split_statements

_AT = enums.AlterTableType
_CT = enums.ConstrType
_OT = enums.ObjectType

#: Functions whose result changes per row: as a column default they force a table rewrite.
#: (now()/current_timestamp are STABLE: one value per statement, no rewrite.)
VOLATILE_FUNCTIONS = frozenset(
    {
        "random",
        "random_normal",
        "setseed",
        "clock_timestamp",
        "timeofday",
        "gen_random_uuid",
        "gen_random_bytes",
        "uuid_generate_v1",
        "uuid_generate_v1mc",
        "uuid_generate_v4",
        "uuidv4",
        "uuidv7",
        "nextval",
        "txid_current",
        "pg_current_xact_id",
    }
)
_SERIAL_TYPES = frozenset({"serial", "serial2", "serial4", "serial8", "smallserial", "bigserial"})
_DROP_RELATIONS = {
    _OT.OBJECT_TABLE,
    _OT.OBJECT_VIEW,
    _OT.OBJECT_MATVIEW,
    _OT.OBJECT_SEQUENCE,
    _OT.OBJECT_FOREIGN_TABLE,
}


@dataclasses.dataclass(frozen=True)
class Finding:
    """One problem in one statement, with the concrete safe way to do it.

    `index` is the statement's position in its section (a string holding several statements
    reports the same index for each); `line` is the line in the migration file when known.
    """

    rule: str
    severity: Severity
    section: Section
    statement: str
    index: int
    line: int | None
    message: str
    recipe: str

    def __str__(self) -> str:
        where = f"{self.section}[{self.index}]" + (f" line {self.line}" if self.line else "")
        return f"{where}: {self.severity} {self.rule} ({RULES[self.rule].name}): {self.message}"


@dataclasses.dataclass
class _Hit:
    rule: str
    message: str
    params: dict[str, str] = dataclasses.field(default_factory=dict)


class _Context:
    """What the checks need to know about the database: does this table exist and is it used?"""

    def __init__(self, section: Section, existing_tables: frozenset[str] | None) -> None:
        self.section = section
        self.existing = existing_tables
        self.existing_short = (
            None if existing_tables is None else {t.rsplit(".", 1)[-1] for t in existing_tables}
        )
        self.created: set[str] = set()

    def live(self, table: str | None) -> bool:
        """True if `table` exists and may be in use (unknown tables are assumed live)."""
        if table is None:
            return True
        if table in self.created:
            return False
        if self.existing is None or self.existing_short is None:
            return True
        return table in self.existing or table.rsplit(".", 1)[-1] in self.existing_short


def _short(table: str) -> str:
    return table.rsplit(".", 1)[-1]


def _walk(node: Any) -> Iterator[Any]:
    """Every node below `node` (pglast nodes and tuples of them)."""
    if isinstance(node, tuple):
        for item in node:
            yield from _walk(item)
    elif isinstance(node, ast.Node):
        yield node
        for attr in node:
            yield from _walk(getattr(node, attr))


def _volatile_call(expr: Any) -> str | None:
    for sub in _walk(expr):
        if isinstance(sub, ast.FuncCall) and sub.funcname:
            name = str(sub.funcname[-1].sval).lower()
            if name in VOLATILE_FUNCTIONS:
                return name
    return None


def _check_add_column(table: str, cmd: ast.AlterTableCmd) -> list[_Hit]:
    column = cmd.def_
    assert isinstance(column, ast.ColumnDef)
    name = str(column.colname)
    params = {"table": table, "column": name}
    constraints = [c for c in column.constraints or () if isinstance(c, ast.Constraint)]
    types = {c.contype for c in constraints}
    type_name = dotted(column.typeName.names if column.typeName else ()).rsplit(".", 1)[-1]
    serial = type_name.lower() in _SERIAL_TYPES
    default = next((c.raw_expr for c in constraints if c.contype is _CT.CONSTR_DEFAULT), None)
    has_value = (
        _CT.CONSTR_DEFAULT in types
        or _CT.CONSTR_IDENTITY in types
        or _CT.CONSTR_GENERATED in types
        or serial
    )
    not_null = bool(column.is_not_null) or bool(types & {_CT.CONSTR_NOTNULL, _CT.CONSTR_PRIMARY})
    hits: list[_Hit] = []
    if not_null and not has_value:
        hits.append(
            _Hit("LS106", f"column {name} is added NOT NULL without a DEFAULT to {table}", params)
        )
    volatile = _volatile_call(default) if default is not None else None
    rewrite = None
    if volatile:
        rewrite = f"its default calls the volatile function {volatile}()"
    elif serial:
        rewrite = f"it is {type_name} (a nextval() default per row)"
    elif _CT.CONSTR_IDENTITY in types:
        rewrite = "it is an identity column"
    elif _CT.CONSTR_GENERATED in types:
        rewrite = "it is a stored generated column"
    if rewrite:
        default_text = f"{volatile}()" if volatile else "<expression>"
        hits.append(
            _Hit(
                "LS204",
                f"adding column {name} rewrites {table}: {rewrite}",
                {**params, "default": default_text},
            )
        )
    for constraint in constraints:
        hits.extend(_check_constraint(table, constraint, inline_column=name))
    return hits


def _default_constraint_name(table: str, constraint: ast.Constraint, column: str | None) -> str:
    """The name PostgreSQL would generate, close enough for a recipe (``users_email_fkey``)."""
    suffix = (
        {
            _CT.CONSTR_FOREIGN: "fkey",
            _CT.CONSTR_PRIMARY: "pkey",
            _CT.CONSTR_UNIQUE: "key",
            _CT.CONSTR_EXCLUSION: "excl",
        }.get(constraint.contype, "check")
        if constraint.contype is not None
        else "check"
    )
    parts = [_short(table), column, suffix]
    return "_".join(p for p in parts if p)


def _check_constraint(
    table: str, constraint: ast.Constraint, *, inline_column: str | None = None
) -> list[_Hit]:
    cname = constraint.conname or _default_constraint_name(table, constraint, inline_column)
    params = {"table": table, "constraint": cname}
    kind = constraint.contype
    where = f"on column {inline_column} " if inline_column else ""
    if kind is _CT.CONSTR_FOREIGN and not constraint.skip_validation:
        return [_Hit("LS202", f"FOREIGN KEY {where}on {table} is validated at once", params)]
    if kind is _CT.CONSTR_CHECK and not constraint.skip_validation:
        return [_Hit("LS203", f"CHECK constraint {where}on {table} is validated at once", params)]
    if kind in (_CT.CONSTR_PRIMARY, _CT.CONSTR_UNIQUE, _CT.CONSTR_EXCLUSION) and not (
        constraint.indexname
    ):
        ctype = {
            _CT.CONSTR_PRIMARY: "PRIMARY KEY",
            _CT.CONSTR_UNIQUE: "UNIQUE",
            _CT.CONSTR_EXCLUSION: "EXCLUDE",
        }[kind]
        index = (
            f"{cname}_idx"
            if constraint.conname
            else f"{_short(table)}_{ctype.split()[0].lower()}_idx"
        )
        return [
            _Hit(
                "LS207",
                f"{ctype} constraint {where}on {table} builds its index while blocking writes",
                {**params, "ctype": ctype, "index": index},
            )
        ]
    return []


def _check_alter_table(node: ast.AlterTableStmt, ctx: _Context) -> list[_Hit]:
    table = relation_name(node.relation)
    if node.objtype is not _OT.OBJECT_TABLE or table is None or not ctx.live(table):
        return []
    hits: list[_Hit] = []
    for cmd in node.cmds or ():
        if not isinstance(cmd, ast.AlterTableCmd):
            continue
        column = str(cmd.name) if cmd.name else "<column>"
        params = {"table": table, "column": column}
        if cmd.subtype is _AT.AT_DropColumn:
            hits.append(_Hit("LS101", f"drops column {table}.{column} while old code runs", params))
        elif cmd.subtype is _AT.AT_AlterColumnType:
            rule = "LS105" if ctx.section == "sql" else "LS210"
            hits.append(_Hit(rule, f"changes the type of {table}.{column}", params))
        elif cmd.subtype is _AT.AT_SetNotNull:
            check = f"{_short(table)}_{column}_not_null"
            hits.append(
                _Hit("LS107", f"sets {table}.{column} NOT NULL", {**params, "check": check})
            )
        elif cmd.subtype is _AT.AT_AddColumn:
            hits.extend(_check_add_column(table, cmd))
        elif cmd.subtype is _AT.AT_AddConstraint and isinstance(cmd.def_, ast.Constraint):
            hits.extend(_check_constraint(table, cmd.def_))
    return hits


def _check_node(node: ast.Node, ctx: _Context) -> list[_Hit]:
    if isinstance(node, ast.AlterTableStmt):
        return _check_alter_table(node, ctx)
    if isinstance(node, ast.RenameStmt):
        table = relation_name(node.relation)
        if table is None or not ctx.live(table):
            return []
        if node.renameType is _OT.OBJECT_COLUMN:
            params = {"table": table, "column": str(node.subname), "new": str(node.newname)}
            return [_Hit("LS103", f"renames {table}.{node.subname} to {node.newname}", params)]
        if node.renameType in (_OT.OBJECT_TABLE, _OT.OBJECT_VIEW, _OT.OBJECT_MATVIEW):
            new = str(node.newname)
            schema = node.relation.schemaname if node.relation else None
            params = {
                "table": table,
                "new": new,
                "new_qualified": f"{schema}.{new}" if schema else new,
            }
            return [_Hit("LS104", f"renames {table} to {new}", params)]
        return []
    if isinstance(node, ast.DropStmt) and node.removeType in _DROP_RELATIONS:
        hits = []
        for obj in node.objects or ():
            name = dotted(obj) if isinstance(obj, tuple) else None
            if name and ctx.live(name):
                what = object_words(node.removeType)
                params = {"table": name, "object": what}
                hits.append(
                    _Hit("LS102", f"drops {what.lower()} {name} while old code runs", params)
                )
        return hits
    if isinstance(node, ast.TruncateStmt):
        names = [relation_name(rv) for rv in node.relations or ()]
        live = [n for n in names if n and ctx.live(n)]
        if live:
            return [_Hit("LS108", f"truncates {', '.join(live)}", {"table": live[0]})]
        return []
    if isinstance(node, ast.TransactionStmt):
        kind = node.kind.name.removeprefix("TRANS_STMT_") if node.kind is not None else "?"
        return [_Hit("LS109", f"{kind} inside a migration", {"kind": kind})]
    if isinstance(node, ast.IndexStmt):
        table = relation_name(node.relation)
        if node.concurrent or not ctx.live(table):
            return []
        index = node.idxname or f"{_short(table or 'table')}_idx"
        params = {"table": table or "<table>", "index": index}
        return [_Hit("LS201", f"builds index {index} on {table} without CONCURRENTLY", params)]
    if isinstance(node, ast.VacuumStmt) and node.is_vacuumcmd:
        if not def_elem_true(node.options, "full"):
            return []
        tables = [
            relation_name(r.relation) for r in node.rels or () if isinstance(r, ast.VacuumRelation)
        ]
        live = [t for t in tables if t and ctx.live(t)]
        if tables and not live:
            return []
        label = ", ".join(live) or "every table"
        return [_Hit("LS205", f"VACUUM FULL rewrites {label}", {"table": live[0] if live else ""})]
    if isinstance(node, ast.ClusterStmt):
        table = relation_name(node.relation)
        if table is not None and not ctx.live(table):
            return []
        return [_Hit("LS206", f"CLUSTER rewrites {table or 'every clustered table'}", {})]
    if isinstance(node, ast.LockStmt):
        names = [relation_name(rv) for rv in node.relations or ()]
        live = [n for n in names if n and ctx.live(n)]
        if not live:
            return []
        return [_Hit("LS208", f"explicitly locks {', '.join(live)}", {"table": live[0]})]
    if isinstance(node, ast.ReindexStmt) and not def_elem_true(node.params, "concurrently"):
        target = relation_name(node.relation) or node.name or ""
        kind = node.kind.name.removeprefix("REINDEX_OBJECT_") if node.kind is not None else ""
        if node.relation is not None and not ctx.live(target):
            return []
        return [
            _Hit(
                "LS209",
                f"REINDEX {kind} {target} without CONCURRENTLY",
                {"table": target, "what": kind},
            )
        ]
    return []


def _record_created(node: ast.Node, ctx: _Context) -> None:
    if isinstance(node, ast.CreateStmt):
        name = relation_name(node.relation)
    elif isinstance(node, ast.CreateTableAsStmt) and node.into is not None:
        name = relation_name(node.into.rel)
    else:
        return
    if name:
        ctx.created.add(name)


def _finding(hit: _Hit, section: Section, statement: str, index: int, line: int | None) -> Finding:
    rule = RULES[hit.rule]
    return Finding(
        rule=rule.id,
        severity=rule.severity,
        section=section,
        statement=statement,
        index=index,
        line=line,
        message=hit.message,
        recipe=rule.render_recipe(hit.params),
    )


def lint_statements(
    section: Section,
    statements: Sequence[str],
    *,
    existing_tables: frozenset[str] | None = None,
    lines: Sequence[int] | None = None,
) -> list[Finding]:
    """Lint one section. `lines[i]`, when given, is the file line where `statements[i]` starts."""
    ctx = _Context(section, existing_tables)
    findings: list[Finding] = []
    for index, text in enumerate(statements):
        base = lines[index] if lines is not None and index < len(lines) else None
        try:
            parts = split_statements(text)
        except SqlSyntaxError as exc:
            line = base + exc.line - 1 if base is not None else None
            where = "" if base is not None else f" (line {exc.line} of the statement)"
            findings.append(
                _finding(_Hit("LS000", exc.message + where), section, text, index, line)
            )
            continue
        for part in parts:
            node = parse_statement(part.text)
            line = base + part.line - 1 if base is not None else None
            for hit in _check_node(node, ctx):
                if section in RULES[hit.rule].sections:
                    findings.append(_finding(hit, section, part.text, index, line))
            _record_created(node, ctx)
    return findings


def _rollback_findings(migration: Migration, lines: Sequence[int] | None) -> list[Finding]:
    findings: list[Finding] = []
    for failure in try_derive_rollback(migration.sql).failures:
        if failure.syntax_error:
            continue  # already reported as LS000
        base = lines[failure.index] if lines is not None and failure.index < len(lines) else None
        line = base + failure.line - 1 if base is not None else None
        hit = _Hit("LS301", f"no rollback: {failure.reason}")
        findings.append(_finding(hit, "sql", failure.statement, failure.index, line))
    return findings


def lint_migration(
    migration: Migration,
    *,
    existing_tables: frozenset[str] | None = None,
    lines: Mapping[str, Sequence[int]] | None = None,
) -> list[Finding]:
    """Every finding for `migration`, section by section in statement order.

    `existing_tables` (``name`` or ``schema.name``) narrows the table-level rules to tables that
    exist; None assumes every table not created earlier in the same section exists.
    `lines` maps a section name to the file line of each of its statements (see
    `statemachine.sql.files.parse_migration_source`), so findings can name file lines.
    """
    lines = lines or {}
    findings: list[Finding] = []
    sections: tuple[tuple[Section, Sequence[str]], ...] = (
        ("sql", migration.sql),
        ("contract_sql", migration.contract_sql),
        ("rollback_sql", migration.rollback_sql or ()),
    )
    for section, statements in sections:
        findings.extend(
            lint_statements(
                section, statements, existing_tables=existing_tables, lines=lines.get(section)
            )
        )
    if migration.rollback_sql is None:
        findings.extend(_rollback_findings(migration, lines.get("sql")))
    return findings
