"""What a statement is and whether it may run inside a transaction.

Why it matters: EXECUTE and CONTRACT run their statements in one transaction so they are atomic,
but some statements refuse to run in a transaction block (``CREATE INDEX CONCURRENTLY``) or are
only useful outside one (``ALTER TYPE ... ADD VALUE``: the new value cannot be used until the
adding transaction commits). The executor therefore needs the script cut into ordered groups:
runs of transactional statements, each in one transaction, and single autocommit statements.

A third reason to cut: a statement that reads a whole table under a lock that lets writes go on
(``VALIDATE CONSTRAINT``, an ``UPDATE`` backfill) must not share a transaction with an earlier
statement that took a lock blocking writes (``ADD CONSTRAINT ... NOT VALID`` takes ACCESS
EXCLUSIVE or SHARE ROW EXCLUSIVE), or that lock is held for the whole scan. Such a statement runs
alone, after the locking group committed (`statemachine.sql.locks` has the lock levels).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from pglast import ast, enums

from statemachine.sql._nodes import (
    camel_words,
    def_elem_true,
    dotted,
    object_words,
    relation_name,
)
from statemachine.sql.locks import LockEffect, LockMode, lock_effect, scans_under_weak_lock
from statemachine.sql.split import parse_statement, split_statements


@dataclasses.dataclass(frozen=True)
class StatementInfo:
    """A statement's kind (e.g. ``"ALTER TABLE ADD COLUMN"``), transactionality and target.

    `target` is the relation or object acted on, ``schema.name`` as written without quotes
    (None when there is none); `actions` lists the subcommands of an ``ALTER TABLE``.
    """

    kind: str
    transactional: bool
    target: str | None = None
    actions: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ExecutionGroup:
    """Statements the executor runs together: one transaction, or one autocommit statement.

    `sources[i]` is the index, in the input sequence, of the string `statements[i]` came from
    (a string holding several statements is split, so one source may appear several times).
    """

    transactional: bool
    statements: tuple[str, ...]
    sources: tuple[int, ...]
    #: Why the group was cut off from the statements before it, when not for autocommit.
    reason: str | None = None

    @property
    def autocommit(self) -> bool:
        return not self.transactional


_AT = enums.AlterTableType
_AT_WORDS: dict[enums.AlterTableType, str] = {
    _AT.AT_AddColumn: "ADD COLUMN",
    _AT.AT_DropColumn: "DROP COLUMN",
    _AT.AT_AlterColumnType: "ALTER COLUMN TYPE",
    _AT.AT_SetNotNull: "ALTER COLUMN SET NOT NULL",
    _AT.AT_DropNotNull: "ALTER COLUMN DROP NOT NULL",
    _AT.AT_AddConstraint: "ADD CONSTRAINT",
    _AT.AT_DropConstraint: "DROP CONSTRAINT",
    _AT.AT_ValidateConstraint: "VALIDATE CONSTRAINT",
    _AT.AT_AttachPartition: "ATTACH PARTITION",
    _AT.AT_DetachPartition: "DETACH PARTITION",
    _AT.AT_AddIndex: "ADD INDEX",
}

_SIMPLE_KINDS: dict[str, str] = {
    "CreateStmt": "CREATE TABLE",
    "CreateSeqStmt": "CREATE SEQUENCE",
    "CreateTrigStmt": "CREATE TRIGGER",
    "CreateEnumStmt": "CREATE TYPE AS ENUM",
    "CompositeTypeStmt": "CREATE TYPE",
    "CreateSchemaStmt": "CREATE SCHEMA",
    "CreateExtensionStmt": "CREATE EXTENSION",
    "CreatedbStmt": "CREATE DATABASE",
    "DropdbStmt": "DROP DATABASE",
    "CreateTableSpaceStmt": "CREATE TABLESPACE",
    "DropTableSpaceStmt": "DROP TABLESPACE",
    "AlterSystemStmt": "ALTER SYSTEM",
    "ClusterStmt": "CLUSTER",
    "LockStmt": "LOCK TABLE",
    "TruncateStmt": "TRUNCATE",
    "InsertStmt": "INSERT",
    "UpdateStmt": "UPDATE",
    "DeleteStmt": "DELETE",
    "SelectStmt": "SELECT",
    "CommentStmt": "COMMENT",
    "DoStmt": "DO",
    "VariableSetStmt": "SET",
}

#: Statements PostgreSQL refuses inside a transaction block, whatever their options.
_ALWAYS_AUTOCOMMIT = frozenset(
    {"CreatedbStmt", "DropdbStmt", "CreateTableSpaceStmt", "DropTableSpaceStmt", "AlterSystemStmt"}
)


def _alter_action(cmd: ast.AlterTableCmd) -> str:
    subtype = cmd.subtype
    if subtype is None:
        return "UNKNOWN"
    if subtype is _AT.AT_ColumnDefault:
        return "ALTER COLUMN SET DEFAULT" if cmd.def_ is not None else "ALTER COLUMN DROP DEFAULT"
    if subtype in _AT_WORDS:
        return _AT_WORDS[subtype]
    return camel_words(subtype.name.removeprefix("AT_"))


def classify_node(node: ast.Node) -> StatementInfo:
    """Classify an already parsed statement (the node inside pglast's `RawStmt`)."""
    name = type(node).__name__
    if isinstance(node, ast.AlterTableStmt):
        actions = tuple(
            _alter_action(c) for c in node.cmds or () if isinstance(c, ast.AlterTableCmd)
        )
        detach_concurrently = any(
            isinstance(c, ast.AlterTableCmd)
            and c.subtype is _AT.AT_DetachPartition
            and isinstance(c.def_, ast.PartitionCmd)
            and bool(c.def_.concurrent)
            for c in node.cmds or ()
        )
        kind = f"ALTER {object_words(node.objtype)} {', '.join(actions)}".strip()
        return StatementInfo(kind, not detach_concurrently, relation_name(node.relation), actions)
    if isinstance(node, ast.IndexStmt):
        kind = "CREATE UNIQUE INDEX" if node.unique else "CREATE INDEX"
        if node.concurrent:
            kind += " CONCURRENTLY"
        return StatementInfo(kind, not node.concurrent, relation_name(node.relation))
    if isinstance(node, ast.DropStmt):
        kind = f"DROP {object_words(node.removeType)}"
        if node.concurrent:
            kind += " CONCURRENTLY"
        target: str | None = None
        objects = node.objects or ()
        if len(objects) == 1 and isinstance(objects[0], tuple):
            target = dotted(objects[0])
        return StatementInfo(kind, not node.concurrent, target)
    if isinstance(node, ast.RenameStmt):
        if node.renameType is enums.ObjectType.OBJECT_COLUMN:
            kind = f"ALTER {object_words(node.relationType)} RENAME COLUMN"
        else:
            kind = f"ALTER {object_words(node.renameType)} RENAME"
        return StatementInfo(kind, True, relation_name(node.relation))
    if isinstance(node, ast.ReindexStmt):
        concurrently = def_elem_true(node.params, "concurrently")
        kind = "REINDEX CONCURRENTLY" if concurrently else "REINDEX"
        return StatementInfo(kind, not concurrently, relation_name(node.relation) or node.name)
    if isinstance(node, ast.VacuumStmt):
        if not node.is_vacuumcmd:
            return StatementInfo("ANALYZE", True)
        kind = "VACUUM FULL" if def_elem_true(node.options, "full") else "VACUUM"
        return StatementInfo(kind, False)
    if isinstance(node, ast.AlterEnumStmt):
        target = dotted(node.typeName)
        if node.oldVal is None:
            return StatementInfo("ALTER TYPE ADD VALUE", False, target)
        return StatementInfo("ALTER TYPE RENAME VALUE", True, target)
    if isinstance(node, ast.CreateFunctionStmt):
        what = "PROCEDURE" if node.is_procedure else "FUNCTION"
        kind = f"CREATE OR REPLACE {what}" if node.replace else f"CREATE {what}"
        return StatementInfo(kind, True, dotted(node.funcname))
    if isinstance(node, ast.ViewStmt):
        kind = "CREATE OR REPLACE VIEW" if node.replace else "CREATE VIEW"
        return StatementInfo(kind, True, relation_name(node.view))
    if isinstance(node, ast.CreateTableAsStmt):
        matview = node.objtype is enums.ObjectType.OBJECT_MATVIEW
        kind = "CREATE MATERIALIZED VIEW" if matview else "CREATE TABLE AS"
        rel = node.into.rel if node.into is not None else None
        return StatementInfo(kind, True, relation_name(rel))
    if isinstance(node, ast.TransactionStmt):
        kind_enum = node.kind
        words = (
            kind_enum.name.removeprefix("TRANS_STMT_").replace("_", " ")
            if kind_enum is not None
            else "?"
        )
        return StatementInfo(words, True)
    if isinstance(node, ast.GrantStmt):
        return StatementInfo("GRANT" if node.is_grant else "REVOKE", True)
    kind = _SIMPLE_KINDS.get(name, camel_words(name))
    target = None
    rel = getattr(node, "relation", None) or getattr(node, "sequence", None)
    if isinstance(rel, ast.RangeVar):
        target = relation_name(rel)
    elif isinstance(node, ast.CreateSchemaStmt):
        target = node.schemaname
    elif isinstance(node, ast.CreateEnumStmt):
        target = dotted(node.typeName)
    return StatementInfo(kind, name not in _ALWAYS_AUTOCOMMIT, target)


def classify(sql: str) -> StatementInfo:
    """Classify one statement. Raises `SqlSyntaxError`, or `ValueError` for several statements."""
    return classify_node(parse_statement(sql))


def needs_autocommit(sql: str) -> bool:
    """True when `sql` must run outside a transaction block (see module docstring)."""
    return not classify(sql).transactional


def group_for_execution(statements: Sequence[str]) -> list[ExecutionGroup]:
    """Cut `statements` into ordered execution groups.

    Each string may hold several statements; they are split first so that a non-transactional
    statement never hides inside a string that would otherwise run in a transaction.
    Consecutive transactional statements share one group; each autocommit statement gets its
    own, and so does a long scan under a weak lock that follows a write-blocking lock (see the
    module docstring): it runs in autocommit, so no lock of ours is held while it reads.
    Raises `SqlSyntaxError` for invalid SQL.
    """
    groups: list[ExecutionGroup] = []
    pending: list[tuple[int, str]] = []
    held: dict[str, tuple[LockMode, str]] = {}  # relation -> (mode, statement) in `pending`
    created: set[str] = set()

    def flush() -> None:
        if pending:
            groups.append(
                ExecutionGroup(True, tuple(s for _, s in pending), tuple(i for i, _ in pending))
            )
            pending.clear()
            held.clear()
            created.clear()

    for index, text in enumerate(statements):
        for stmt in split_statements(text):
            node = parse_statement(stmt.text)
            if not classify_node(node).transactional:
                flush()
                groups.append(ExecutionGroup(False, (stmt.text,), (index,)))
                continue
            effect = lock_effect(node)
            if held and scans_under_weak_lock(effect):
                reason = _scan_reason(effect, held)
                flush()
                groups.append(ExecutionGroup(False, (stmt.text,), (index,), reason))
                continue
            pending.append((index, stmt.text))
            created.update(effect.creates)
            for relation, mode in effect.locks:
                stronger = relation not in held or held[relation][0] < mode
                if mode.blocks_writes and relation not in created and stronger:
                    held[relation] = (mode, stmt.text)
    flush()
    return groups


def _scan_reason(effect: LockEffect, held: dict[str, tuple[LockMode, str]]) -> str:
    """``"it scans orders; in one transaction the ACCESS EXCLUSIVE lock on orders ..."``."""
    scans = ", ".join(effect.scans)
    relation, (mode, statement) = max(
        held.items(), key=lambda item: (item[0] in effect.scans, item[1][0])
    )
    short = " ".join(statement.split())
    if len(short) > 60:
        short = short[:57] + "..."
    return (
        f"runs alone after the previous group committed: it reads all of {scans}, and in one "
        f"transaction the {mode.label} lock on {relation} taken by '{short}' would be held "
        "for the whole scan"
    )
