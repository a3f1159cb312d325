"""Derive the statements that undo an expand script, when that can be done without guessing.

Why: a migration that fails after EXECUTE committed must leave the database as it found it, so
the coordinator needs `rollback_sql`. Writing it by hand is error-prone; for purely additive
statements the inverse is mechanical (``ADD COLUMN c`` -> ``DROP COLUMN IF EXISTS c``). Anything
where the inverse could destroy something that existed before the migration (``IF NOT EXISTS``,
``OR REPLACE``, data changes, ``ALTER TYPE ... ADD VALUE``) is refused with a reason instead:
a wrong rollback is worse than none. Inverses use ``IF EXISTS`` so they also undo a partial run,
and are printed from an AST so identifiers keep their schema and quoting.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from pglast import ast, enums

from statemachine.exceptions import LockstepError
from statemachine.sql._nodes import to_sql
from statemachine.sql.classify import classify_node
from statemachine.sql.split import SqlSyntaxError, parse_statement, split_statements

_AT = enums.AlterTableType
_OT = enums.ObjectType
_RESTRICT = enums.DropBehavior.DROP_RESTRICT


class CannotDeriveRollback(LockstepError, ValueError):
    """Raised by `derive_rollback` when a statement has no safe automatic inverse; `statement`
    and `reason` say which and why."""

    def __init__(self, statement: str, reason: str) -> None:
        super().__init__(f"cannot derive a rollback for {statement!r}: {reason}")
        self.statement = statement
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class RollbackFailure:
    """Why one statement has no inverse: `index` of its string, `line` within that string."""

    index: int
    line: int
    statement: str
    reason: str
    syntax_error: bool = False

    def __str__(self) -> str:
        return f"{self.statement!r}: {self.reason}"


@dataclasses.dataclass(frozen=True)
class RollbackDerivation:
    """The derived rollback (`statements`), or None and a failure per underivable statement."""

    statements: tuple[str, ...] | None
    failures: tuple[RollbackFailure, ...] = ()

    @property
    def ok(self) -> bool:
        return self.statements is not None

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(str(f) for f in self.failures)


def _drop(objects: tuple[Any, ...], remove_type: enums.ObjectType, concurrent: bool = False) -> str:
    return to_sql(
        ast.DropStmt(
            objects=objects,
            removeType=remove_type,
            behavior=_RESTRICT,
            missing_ok=True,
            concurrent=concurrent,
        )
    )


def _names(rv: ast.RangeVar) -> tuple[ast.String, ...]:
    parts = [rv.catalogname, rv.schemaname, rv.relname]
    return tuple(ast.String(sval=p) for p in parts if p)


def _alter_drop(rv: ast.RangeVar, subtype: enums.AlterTableType, name: str) -> str:
    cmd = ast.AlterTableCmd(subtype=subtype, name=name, behavior=_RESTRICT, missing_ok=True)
    return to_sql(ast.AlterTableStmt(relation=rv, cmds=(cmd,), objtype=_OT.OBJECT_TABLE))


class _Deriver:
    """Walks the statements in order, remembering indexes created earlier in the same script."""

    def __init__(self) -> None:
        self.created_indexes: set[str] = set()
        self.added_columns: set[tuple[str | None, str | None, str]] = set()
        self.created_sequences: set[tuple[str | None, str | None]] = set()

    def inverse(self, sql: str) -> list[str]:
        node = parse_statement(sql)
        method = getattr(self, f"_{type(node).__name__}", None)
        if method is None:
            raise CannotDeriveRollback(sql, _refusal(node))
        result: list[str] = method(sql, node)
        return result

    # -- one method per supported node class ------------------------------------------------

    def _AlterTableStmt(self, sql: str, node: ast.AlterTableStmt) -> list[str]:
        rv = node.relation
        if node.objtype is not _OT.OBJECT_TABLE or rv is None:
            raise CannotDeriveRollback(sql, "only ALTER TABLE can be derived")
        inverses: list[str] = []
        for cmd in node.cmds or ():
            assert isinstance(cmd, ast.AlterTableCmd)
            if cmd.subtype is _AT.AT_AddColumn:
                column = cmd.def_
                assert isinstance(column, ast.ColumnDef)
                if cmd.missing_ok:
                    raise CannotDeriveRollback(
                        sql,
                        f"ADD COLUMN IF NOT EXISTS {column.colname}: the column may have existed "
                        "before, and dropping it would destroy its data",
                    )
                inverses.append(_alter_drop(rv, _AT.AT_DropColumn, str(column.colname)))
                self.added_columns.add((rv.schemaname, rv.relname, str(column.colname)))
            elif (
                cmd.subtype is _AT.AT_ColumnDefault
                and (rv.schemaname, rv.relname, str(cmd.name)) in self.added_columns
            ):
                continue  # the default of a column this script added goes with the column
            elif cmd.subtype is _AT.AT_AddConstraint:
                constraint = cmd.def_
                assert isinstance(constraint, ast.Constraint)
                if not constraint.conname:
                    raise CannotDeriveRollback(
                        sql,
                        "the constraint has no name, so its generated name is unknown: "
                        "name it (ADD CONSTRAINT name ...)",
                    )
                if constraint.indexname and constraint.indexname not in self.created_indexes:
                    raise CannotDeriveRollback(
                        sql,
                        f"dropping the constraint would also drop index {constraint.indexname}, "
                        "which this migration did not create",
                    )
                inverses.append(_alter_drop(rv, _AT.AT_DropConstraint, str(constraint.conname)))
            elif cmd.subtype is _AT.AT_ValidateConstraint:
                continue  # validating changes no schema; the constraint's own inverse drops it
            else:
                action = cmd.subtype.name.removeprefix("AT_") if cmd.subtype else "?"
                raise CannotDeriveRollback(
                    sql,
                    f"ALTER TABLE subcommand {action} is not purely additive "
                    "(only ADD COLUMN, named ADD CONSTRAINT and VALIDATE CONSTRAINT are derived)",
                )
        return list(reversed(inverses))

    def _CreateStmt(self, sql: str, node: ast.CreateStmt) -> list[str]:
        _refuse_if(sql, bool(node.if_not_exists), "CREATE TABLE IF NOT EXISTS")
        assert node.relation is not None
        return [_drop((_names(node.relation),), _OT.OBJECT_TABLE)]

    def _CreateTableAsStmt(self, sql: str, node: ast.CreateTableAsStmt) -> list[str]:
        _refuse_if(sql, bool(node.if_not_exists), "CREATE ... IF NOT EXISTS")
        assert node.into is not None and node.into.rel is not None
        kind = _OT.OBJECT_MATVIEW if node.objtype is _OT.OBJECT_MATVIEW else _OT.OBJECT_TABLE
        return [_drop((_names(node.into.rel),), kind)]

    def _IndexStmt(self, sql: str, node: ast.IndexStmt) -> list[str]:
        if not node.idxname:
            raise CannotDeriveRollback(
                sql, "the index has no name, so its generated name is unknown: name it"
            )
        _refuse_if(sql, bool(node.if_not_exists), "CREATE INDEX IF NOT EXISTS")
        assert node.relation is not None
        self.created_indexes.add(node.idxname)
        # An index lives in its table's schema, so qualify it the same way.
        parts = [node.relation.schemaname, node.idxname]
        names = tuple(ast.String(sval=p) for p in parts if p)
        return [_drop((names,), _OT.OBJECT_INDEX, concurrent=bool(node.concurrent))]

    def _CreateTrigStmt(self, sql: str, node: ast.CreateTrigStmt) -> list[str]:
        _refuse_if_replace(sql, bool(node.replace), "trigger")
        assert node.relation is not None and node.trigname
        names = (*_names(node.relation), ast.String(sval=node.trigname))
        return [_drop((names,), _OT.OBJECT_TRIGGER)]

    def _CreateFunctionStmt(self, sql: str, node: ast.CreateFunctionStmt) -> list[str]:
        what = "procedure" if node.is_procedure else "function"
        _refuse_if_replace(sql, bool(node.replace), what)
        modes = enums.FunctionParameterMode
        args = []
        for param in node.parameters or ():
            assert isinstance(param, ast.FunctionParameter)
            if param.mode in (modes.FUNC_PARAM_OUT, modes.FUNC_PARAM_TABLE):
                if node.is_procedure and param.mode is modes.FUNC_PARAM_OUT:
                    raise CannotDeriveRollback(
                        sql, "procedures with OUT parameters are not derived"
                    )
                continue  # OUT and TABLE parameters are not part of a function's identity
            args.append(param.argType)
        target = ast.ObjectWithArgs(objname=node.funcname, objargs=tuple(args))
        kind = _OT.OBJECT_PROCEDURE if node.is_procedure else _OT.OBJECT_FUNCTION
        return [_drop((target,), kind)]

    def _CreateSeqStmt(self, sql: str, node: ast.CreateSeqStmt) -> list[str]:
        _refuse_if(sql, bool(node.if_not_exists), "CREATE SEQUENCE IF NOT EXISTS")
        assert node.sequence is not None
        self.created_sequences.add((node.sequence.schemaname, node.sequence.relname))
        return [_drop((_names(node.sequence),), _OT.OBJECT_SEQUENCE)]

    def _ViewStmt(self, sql: str, node: ast.ViewStmt) -> list[str]:
        _refuse_if_replace(sql, bool(node.replace), "view")
        assert node.view is not None
        return [_drop((_names(node.view),), _OT.OBJECT_VIEW)]

    def _CreateEnumStmt(self, sql: str, node: ast.CreateEnumStmt) -> list[str]:
        return [_drop((ast.TypeName(names=node.typeName),), _OT.OBJECT_TYPE)]

    def _CreateSchemaStmt(self, sql: str, node: ast.CreateSchemaStmt) -> list[str]:
        _refuse_if(sql, bool(node.if_not_exists), "CREATE SCHEMA IF NOT EXISTS")
        if node.schemaElts or not node.schemaname:
            raise CannotDeriveRollback(sql, "CREATE SCHEMA with elements or AUTHORIZATION only")
        return [_drop((ast.String(sval=node.schemaname),), _OT.OBJECT_SCHEMA)]

    def _AlterSeqStmt(self, sql: str, node: ast.AlterSeqStmt) -> list[str]:
        seq = node.sequence
        created = seq is not None and (seq.schemaname, seq.relname) in self.created_sequences
        if created:
            return []  # dropping the sequence this script created undoes it
        raise CannotDeriveRollback(sql, "ALTER SEQUENCE of an existing sequence is not derived")

    def _CommentStmt(self, sql: str, node: ast.CommentStmt) -> list[str]:
        return []  # a comment changes nothing any code reads; the old text is not known

    def _VariableSetStmt(self, sql: str, node: ast.VariableSetStmt) -> list[str]:
        return []  # session settings change no schema

    def _VacuumStmt(self, sql: str, node: ast.VacuumStmt) -> list[str]:
        return []  # VACUUM/ANALYZE change no schema

    def _ReindexStmt(self, sql: str, node: ast.ReindexStmt) -> list[str]:
        return []  # rebuilding an index changes no schema

    def _ClusterStmt(self, sql: str, node: ast.ClusterStmt) -> list[str]:
        return []  # reordering rows changes no schema

    def _LockStmt(self, sql: str, node: ast.LockStmt) -> list[str]:
        return []  # a lock ends with its transaction


def _refuse_if(sql: str, condition: bool, what: str) -> None:
    if condition:
        raise CannotDeriveRollback(
            sql,
            f"{what}: the object may have existed before this migration, and dropping it "
            "would destroy what was there",
        )


def _refuse_if_replace(sql: str, replace: bool, what: str) -> None:
    if replace:
        raise CannotDeriveRollback(
            sql,
            f"CREATE OR REPLACE {what}: the previous definition is lost, so it cannot be restored; "
            "write rollback_sql that recreates it",
        )


def _refusal(node: ast.Node) -> str:
    if isinstance(node, ast.AlterEnumStmt):
        return "PostgreSQL cannot remove a value from an enum type"
    if isinstance(node, ast.InsertStmt | ast.UpdateStmt | ast.DeleteStmt | ast.TruncateStmt):
        return "data changes cannot be undone automatically"
    if isinstance(node, ast.DropStmt):
        return "a dropped object cannot be recreated automatically"
    info = classify_node(node)
    where = f" on {info.target}" if info.target else ""
    return f"{info.kind}{where} is not a known additive statement"


def derive_rollback(statements: Sequence[str]) -> list[str]:
    """Inverse statements, in reverse order, undoing `statements`.

    Each string may hold several statements. Raises `CannotDeriveRollback` for the first
    statement without a safe inverse, `SqlSyntaxError` for invalid SQL.
    """
    deriver = _Deriver()
    inverses: list[list[str]] = []
    for text in statements:
        for stmt in split_statements(text):
            inverses.append(deriver.inverse(stmt.text))
    return [inv for group in reversed(inverses) for inv in group]


def try_derive_rollback(statements: Sequence[str]) -> RollbackDerivation:
    """Like `derive_rollback`, but collects every failure instead of stopping at the first."""
    deriver = _Deriver()
    inverses: list[list[str]] = []
    failures: list[RollbackFailure] = []
    for index, text in enumerate(statements):
        try:
            stmts = split_statements(text)
        except SqlSyntaxError as exc:
            failures.append(RollbackFailure(index, exc.line, text, f"syntax error: {exc}", True))
            continue
        for stmt in stmts:
            try:
                inverses.append(deriver.inverse(stmt.text))
            except CannotDeriveRollback as exc:
                failures.append(RollbackFailure(index, stmt.line, stmt.text, exc.reason))
    if failures:
        return RollbackDerivation(None, tuple(failures))
    return RollbackDerivation(tuple(inv for group in reversed(inverses) for inv in group))
