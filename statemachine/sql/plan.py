"""What running a migration would do, phase by phase, as pure data.

Why: before touching a production database an operator wants to see the exact statements per
phase, which of them run in a transaction and which in autocommit, what the linter thinks, and
what would happen on failure (the rollback that would run, or "the schema would be left
expanded"). `build_plan` computes that without a database; `lockstep plan` renders it, and
`Plan.to_text` gives a plain rendering for logs and tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Literal

from statemachine.migration import Backfill, Migration
from statemachine.phases import Phase
from statemachine.sql.catalog import Catalog
from statemachine.sql.classify import ExecutionGroup, group_for_execution
from statemachine.sql.lint import Finding, lint_migration
from statemachine.sql.rollback import try_derive_rollback
from statemachine.sql.split import SqlSyntaxError

RollbackSource = Literal["given", "derived", "none"]


@dataclasses.dataclass(frozen=True)
class PhasePlan:
    """The execution groups of one phase, or the syntax error that prevents grouping."""

    phase: Phase
    groups: tuple[ExecutionGroup, ...]
    error: str | None = None

    @property
    def statement_count(self) -> int:
        return sum(len(g.statements) for g in self.groups)


@dataclasses.dataclass(frozen=True)
class RollbackPlan:
    """What ROLLBACK would run: `source` says whether it was given, derived or is missing."""

    source: RollbackSource
    phase: PhasePlan
    reasons: tuple[str, ...] = ()

    @property
    def leaves_schema_expanded(self) -> bool:
        return self.source == "none"


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything `run_migration` would do for one migration, in order."""

    migration: str
    execute: PhasePlan
    backfills: tuple[Backfill, ...]
    contract: PhasePlan
    rollback: RollbackPlan
    findings: tuple[Finding, ...]

    @property
    def has_errors(self) -> bool:
        """True if lint found an error or a section could not be parsed."""
        return any(f.severity == "error" for f in self.findings) or any(
            p.error for p in (self.execute, self.contract, self.rollback.phase)
        )

    def to_text(self) -> str:
        """A plain-text rendering: phases, groups, backfills, rollback and findings."""
        out = [f"migration {self.migration}"]
        out += _phase_text("EXECUTE (old code live)", self.execute)
        out.append(f"BACKFILL ({len(self.backfills)})")
        for b in self.backfills:
            where = f" WHERE {b.where}" if b.where else ""
            out.append(
                f"  UPDATE {b.table} SET {b.set}{where}"
                f" -- batches of {b.batch_size} by {b.key}, delay {b.delay}s"
            )
        out.append("APPLY: agents switch to the new code")
        out += _phase_text("CONTRACT (after every agent switched)", self.contract)
        if self.rollback.source == "none":
            out.append("ROLLBACK: none - the schema would be left expanded:")
            out += [f"  - {reason}" for reason in self.rollback.reasons]
        else:
            out += _phase_text(f"ROLLBACK ({self.rollback.source})", self.rollback.phase)
        out.append(f"FINDINGS ({len(self.findings)})")
        for f in self.findings:
            out.append(f"  {f}")
            out.append(f"    fix: {f.recipe}")
        return "\n".join(out) + "\n"


def _phase_text(title: str, phase: PhasePlan) -> list[str]:
    out = [f"{title}: {phase.statement_count} statement(s)"]
    if phase.error:
        out.append(f"  cannot plan: {phase.error}")
    for number, group in enumerate(phase.groups, start=1):
        how = "transaction" if group.transactional else "autocommit"
        out.append(f"  group {number} [{how}]")
        if group.reason:
            out.append(f"    -- {group.reason}")
        out += [f"    {_indented(s)};" for s in group.statements]
    return out


def _indented(sql: str) -> str:
    """Keep a statement's own lines: joining them would let a `--` comment inside a function
    body swallow the rest of the body in the printed plan."""
    return "\n    ".join(line.rstrip() for line in sql.strip().splitlines())


def _phase(phase: Phase, statements: Sequence[str]) -> PhasePlan:
    try:
        return PhasePlan(phase, tuple(group_for_execution(statements)))
    except SqlSyntaxError as exc:
        return PhasePlan(phase, (), f"syntax error: {exc}")


def build_plan(
    migration: Migration,
    *,
    existing_tables: frozenset[str] | None = None,
    lines: Mapping[str, Sequence[int]] | None = None,
    catalog: Catalog | None = None,
    allow: Mapping[str, str] | None = None,
) -> Plan:
    """The plan for `migration`. Never raises for bad SQL: it shows up as an error instead.

    `catalog` (the live database's, when there is one) makes lint precise; without it lint
    stays conservative. `allow` carries a file's ``lockstep:allow-file`` markers.
    """
    if migration.rollback_sql is not None:
        rollback = RollbackPlan("given", _phase(Phase.ROLLBACK, migration.rollback_sql))
    else:
        derivation = try_derive_rollback(migration.sql)
        if derivation.statements is not None:
            rollback = RollbackPlan("derived", _phase(Phase.ROLLBACK, derivation.statements))
        else:
            rollback = RollbackPlan("none", PhasePlan(Phase.ROLLBACK, ()), derivation.reasons)
    return Plan(
        migration=migration.name,
        execute=_phase(Phase.EXECUTE, migration.sql),
        backfills=migration.backfills,
        contract=_phase(Phase.CONTRACT, migration.contract_sql),
        rollback=rollback,
        findings=tuple(
            lint_migration(
                migration,
                existing_tables=existing_tables,
                lines=lines,
                catalog=catalog,
                allow=allow,
            )
        ),
    )
