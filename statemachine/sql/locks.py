"""Which table locks a statement takes and which tables it reads in full, from the AST alone.

Why a table of lock levels: the executor must never hold a lock that blocks the application
while a statement scans a big table, and lint must say which lock a hazard holds. Both follow
from PostgreSQL's lock levels (the "Table-level Lock Modes" table of its documentation, and
``AlterTableGetLockLevel`` for ``ALTER TABLE``), so they are written down once, here, and a test
on a real server compares every entry with ``pg_locks`` while the statement is held open.

Unknown statements that name a relation are assumed to take ACCESS EXCLUSIVE on it: wrong in
the safe direction (the executor splits more eagerly, never less).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence

from pglast import ast, enums

from statemachine.sql._nodes import def_elem_true, dotted, relation_name


class LockMode(enum.IntEnum):
    """PostgreSQL's table lock modes, weakest first; the value orders them by strength."""

    ACCESS_SHARE = 1
    ROW_SHARE = 2
    ROW_EXCLUSIVE = 3
    SHARE_UPDATE_EXCLUSIVE = 4
    SHARE = 5
    SHARE_ROW_EXCLUSIVE = 6
    EXCLUSIVE = 7
    ACCESS_EXCLUSIVE = 8

    @property
    def label(self) -> str:
        """``"ACCESS EXCLUSIVE"``: how PostgreSQL's documentation names the mode."""
        return self.name.replace("_", " ")

    @property
    def pg_name(self) -> str:
        """``"AccessExclusiveLock"``: how ``pg_locks.mode`` names it."""
        return "".join(w.capitalize() for w in self.name.split("_")) + "Lock"

    @property
    def blocks_writes(self) -> bool:
        """True when INSERT/UPDATE/DELETE (ROW EXCLUSIVE) must wait for it: SHARE and above."""
        return self >= LockMode.SHARE

    @property
    def blocks_reads(self) -> bool:
        """True when plain SELECT (ACCESS SHARE) must wait for it: only ACCESS EXCLUSIVE."""
        return self is LockMode.ACCESS_EXCLUSIVE


_L = LockMode
_AT = enums.AlterTableType
_CT = enums.ConstrType

#: ALTER TABLE subcommands weaker than ACCESS EXCLUSIVE (PostgreSQL's AlterTableGetLockLevel);
#: every other subcommand takes ACCESS EXCLUSIVE.
_ALTER_LOCKS: dict[enums.AlterTableType, LockMode] = {
    _AT.AT_ValidateConstraint: _L.SHARE_UPDATE_EXCLUSIVE,
    _AT.AT_SetStatistics: _L.SHARE_UPDATE_EXCLUSIVE,
    _AT.AT_ClusterOn: _L.SHARE_UPDATE_EXCLUSIVE,
    _AT.AT_DropCluster: _L.SHARE_UPDATE_EXCLUSIVE,
    _AT.AT_SetOptions: _L.SHARE_UPDATE_EXCLUSIVE,
    _AT.AT_ResetOptions: _L.SHARE_UPDATE_EXCLUSIVE,
    _AT.AT_SetRelOptions: _L.SHARE_UPDATE_EXCLUSIVE,
    _AT.AT_ResetRelOptions: _L.SHARE_UPDATE_EXCLUSIVE,
    _AT.AT_AttachPartition: _L.SHARE_UPDATE_EXCLUSIVE,  # the partition: ACCESS EXCLUSIVE
    _AT.AT_EnableTrig: _L.SHARE_ROW_EXCLUSIVE,
    _AT.AT_EnableAlwaysTrig: _L.SHARE_ROW_EXCLUSIVE,
    _AT.AT_EnableReplicaTrig: _L.SHARE_ROW_EXCLUSIVE,
    _AT.AT_EnableTrigAll: _L.SHARE_ROW_EXCLUSIVE,
    _AT.AT_EnableTrigUser: _L.SHARE_ROW_EXCLUSIVE,
    _AT.AT_DisableTrig: _L.SHARE_ROW_EXCLUSIVE,
    _AT.AT_DisableTrigAll: _L.SHARE_ROW_EXCLUSIVE,
    _AT.AT_DisableTrigUser: _L.SHARE_ROW_EXCLUSIVE,
}


_OT = enums.ObjectType
_RELATION_KINDS = frozenset(
    {
        _OT.OBJECT_TABLE,
        _OT.OBJECT_VIEW,
        _OT.OBJECT_MATVIEW,
        _OT.OBJECT_INDEX,
        _OT.OBJECT_SEQUENCE,
        _OT.OBJECT_FOREIGN_TABLE,
    }
)


@dataclasses.dataclass(frozen=True)
class LockEffect:
    """What one statement does to tables: the locks it holds until commit and what it scans.

    `locks` maps each relation (``schema.name`` as written) to the strongest mode taken on it;
    `scans` are the relations it reads in full (time grows with the table) while holding them;
    `creates` are relations it creates (invisible to others until commit, so locking them
    blocks nobody).
    """

    locks: tuple[tuple[str, LockMode], ...] = ()
    scans: tuple[str, ...] = ()
    creates: tuple[str, ...] = ()

    @property
    def strongest(self) -> LockMode | None:
        return max((mode for _, mode in self.locks), default=None)

    def mode_on(self, relation: str) -> LockMode | None:
        return max((mode for rel, mode in self.locks if rel == relation), default=None)


def _merge(pairs: Sequence[tuple[str | None, LockMode]]) -> tuple[tuple[str, LockMode], ...]:
    best: dict[str, LockMode] = {}
    for rel, mode in pairs:
        if rel is not None:
            best[rel] = max(mode, best.get(rel, mode))
    return tuple(best.items())


def _fk_target(constraint: object) -> str | None:
    if isinstance(constraint, ast.Constraint) and constraint.contype is _CT.CONSTR_FOREIGN:
        return relation_name(constraint.pktable)
    return None


def _alter_table(node: ast.AlterTableStmt) -> LockEffect:
    table = relation_name(node.relation)
    pairs: list[tuple[str | None, LockMode]] = []
    scans: list[str] = []
    for cmd in node.cmds or ():
        if not isinstance(cmd, ast.AlterTableCmd) or cmd.subtype is None:
            continue
        mode = _ALTER_LOCKS.get(cmd.subtype, _L.ACCESS_EXCLUSIVE)
        constraint = cmd.def_ if isinstance(cmd.def_, ast.Constraint) else None
        if cmd.subtype is _AT.AT_AddConstraint and _fk_target(constraint):
            mode = _L.SHARE_ROW_EXCLUSIVE  # on both tables
            pairs.append((_fk_target(constraint), _L.SHARE_ROW_EXCLUSIVE))
        if cmd.subtype is _AT.AT_AddColumn and isinstance(cmd.def_, ast.ColumnDef):
            for c in cmd.def_.constraints or ():
                if _fk_target(c):
                    pairs.append((_fk_target(c), _L.SHARE_ROW_EXCLUSIVE))
        if cmd.subtype is _AT.AT_AttachPartition and isinstance(cmd.def_, ast.PartitionCmd):
            partition = relation_name(cmd.def_.name)
            pairs.append((partition, _L.ACCESS_EXCLUSIVE))
            if partition:
                scans.append(partition)
        if cmd.subtype is _AT.AT_DetachPartition and isinstance(cmd.def_, ast.PartitionCmd):
            concurrent = bool(cmd.def_.concurrent)
            mode = _L.SHARE_UPDATE_EXCLUSIVE if concurrent else _L.ACCESS_EXCLUSIVE
            pairs.append((relation_name(cmd.def_.name), _L.ACCESS_EXCLUSIVE))
        if cmd.subtype is _AT.AT_ValidateConstraint and table:
            scans.append(table)
        if cmd.subtype is _AT.AT_SetNotNull and table:
            scans.append(table)
        pairs.append((table, mode))
    return LockEffect(_merge(pairs), tuple(scans))


def _dml_target(node: ast.Node) -> str | None:
    return relation_name(getattr(node, "relation", None))


def lock_effect(node: ast.Node) -> LockEffect:
    """The table locks `node` takes (see the module docstring for the conservative default)."""
    if isinstance(node, ast.AlterTableStmt):
        if node.objtype is enums.ObjectType.OBJECT_INDEX:
            return LockEffect(_merge([(relation_name(node.relation), _L.ACCESS_EXCLUSIVE)]))
        return _alter_table(node)
    if isinstance(node, ast.IndexStmt):
        table = relation_name(node.relation)
        mode = _L.SHARE_UPDATE_EXCLUSIVE if node.concurrent else _L.SHARE
        return LockEffect(_merge([(table, mode)]), (table,) if table else ())
    if isinstance(node, (ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)):
        table = _dml_target(node)
        return LockEffect(_merge([(table, _L.ROW_EXCLUSIVE)]), (table,) if table else ())
    if isinstance(node, ast.InsertStmt):
        table = _dml_target(node)
        read = lock_effect(node.selectStmt) if node.selectStmt is not None else LockEffect()
        return LockEffect(_merge([*read.locks, (table, _L.ROW_EXCLUSIVE)]), read.scans)
    if isinstance(node, ast.SelectStmt):
        tables = [relation_name(rv) for rv in node.fromClause or () if isinstance(rv, ast.RangeVar)]
        names = tuple(t for t in tables if t)
        return LockEffect(_merge([(t, _L.ACCESS_SHARE) for t in names]), names)
    if isinstance(node, ast.CreateStmt):
        table = relation_name(node.relation)
        pairs: list[tuple[str | None, LockMode]] = [(table, _L.ACCESS_EXCLUSIVE)]
        for elt in node.tableElts or ():
            pairs += [(_fk_target(c), _L.SHARE_ROW_EXCLUSIVE) for c in _constraints(elt)]
        return LockEffect(_merge(pairs), creates=(table,) if table else ())
    if isinstance(node, ast.CreateTableAsStmt):
        rel = relation_name(node.into.rel) if node.into is not None else None
        return LockEffect(_merge([(rel, _L.ACCESS_EXCLUSIVE)]), creates=(rel,) if rel else ())
    if isinstance(node, ast.VacuumStmt):
        tables = [
            relation_name(r.relation) for r in node.rels or () if isinstance(r, ast.VacuumRelation)
        ]
        full = node.is_vacuumcmd and def_elem_true(node.options, "full")
        mode = _L.ACCESS_EXCLUSIVE if full else _L.SHARE_UPDATE_EXCLUSIVE
        names = tuple(t for t in tables if t)
        return LockEffect(_merge([(t, mode) for t in names]), names)
    if isinstance(node, ast.RefreshMatViewStmt):
        mode = _L.EXCLUSIVE if node.concurrent else _L.ACCESS_EXCLUSIVE
        return LockEffect(_merge([(relation_name(node.relation), mode)]))
    if isinstance(node, ast.LockStmt):
        mode = _L(int(node.mode)) if node.mode else _L.ACCESS_EXCLUSIVE
        return LockEffect(_merge([(relation_name(rv), mode) for rv in node.relations or ()]))
    if isinstance(node, ast.CreateTrigStmt):
        return LockEffect(_merge([(relation_name(node.relation), _L.SHARE_ROW_EXCLUSIVE)]))
    if isinstance(node, ast.CommentStmt):
        return LockEffect(_merge([(_commented_relation(node), _L.SHARE_UPDATE_EXCLUSIVE)]))
    if isinstance(node, ast.ViewStmt):
        view = relation_name(node.view)
        return LockEffect(
            _merge([(view, _L.ACCESS_EXCLUSIVE)]),
            creates=() if node.replace or not view else (view,),
        )
    if isinstance(node, ast.DropStmt):
        if node.removeType not in _RELATION_KINDS:
            return LockEffect()
        dropped = [dotted(o) for o in node.objects or () if isinstance(o, tuple)]
        # DROP INDEX also locks the index's table (not named in the statement) the same way.
        mode = _L.SHARE_UPDATE_EXCLUSIVE if node.concurrent else _L.ACCESS_EXCLUSIVE
        return LockEffect(_merge([(n, mode) for n in dropped]))
    if isinstance(node, ast.TruncateStmt):
        rels = node.relations or ()
        return LockEffect(_merge([(relation_name(rv), _L.ACCESS_EXCLUSIVE) for rv in rels]))
    if isinstance(node, ast.ClusterStmt):
        table = relation_name(node.relation)
        return LockEffect(_merge([(table, _L.ACCESS_EXCLUSIVE)]), (table,) if table else ())
    if isinstance(node, ast.ReindexStmt):
        table = relation_name(node.relation)
        mode = _L.SHARE_UPDATE_EXCLUSIVE if def_elem_true(node.params, "concurrently") else _L.SHARE
        if node.kind is enums.ReindexObjectType.REINDEX_OBJECT_INDEX and mode is _L.SHARE:
            mode = _L.ACCESS_EXCLUSIVE  # on the index; its table gets SHARE
        return LockEffect(_merge([(table, mode)]), (table,) if table else ())
    if isinstance(node, ast.RenameStmt):
        mode = (
            _L.SHARE_UPDATE_EXCLUSIVE
            if node.renameType is enums.ObjectType.OBJECT_INDEX
            else _L.ACCESS_EXCLUSIVE
        )
        return LockEffect(_merge([(relation_name(node.relation), mode)]))
    rel = getattr(node, "relation", None)
    if isinstance(rel, ast.RangeVar):
        return LockEffect(_merge([(relation_name(rel), _L.ACCESS_EXCLUSIVE)]))
    return LockEffect()


def _commented_relation(node: ast.CommentStmt) -> str | None:
    """The table of ``COMMENT ON TABLE t`` / ``COMMENT ON COLUMN t.c``; None for other objects."""
    parts = tuple(str(p.sval) for p in node.object or () if isinstance(p, ast.String))
    if node.objtype is enums.ObjectType.OBJECT_TABLE and parts:
        return ".".join(parts)
    if node.objtype is enums.ObjectType.OBJECT_COLUMN and len(parts) > 1:
        return ".".join(parts[:-1])
    return None


def _constraints(elt: object) -> tuple[object, ...]:
    if isinstance(elt, ast.ColumnDef):
        return tuple(elt.constraints or ())
    if isinstance(elt, ast.Constraint):
        return (elt,)
    return ()


def scans_under_weak_lock(effect: LockEffect) -> bool:
    """True for a long read (time grows with the table) that itself lets writes go on.

    Such a statement (``VALIDATE CONSTRAINT``, a DML backfill, ``ANALYZE``) is harmless alone,
    and an outage when a lock taken earlier in the same transaction is still held during it.
    """
    strongest = effect.strongest
    return bool(effect.scans) and (strongest is None or not strongest.blocks_writes)
