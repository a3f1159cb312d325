"""The admission gate: may a migration run, and what does its result carry from the plan?

Decided before ANNOUNCE, from the `statemachine.sql.Plan` that ``lockstep plan`` prints and
the executor runs. A plan with a section that does not parse is refused outright: the
executor runs exactly the planned groups, so there is nothing honest to run. Lint errors are
refused unless the caller forces them; warnings (and forced errors) travel with the result.
"""

from __future__ import annotations

from collections.abc import Sequence

from statemachine.exceptions import LockstepError
from statemachine.sql import Finding, Plan


class MigrationRejected(LockstepError):
    """Raised by `run_migration` (and `lockstep apply`) before ANNOUNCE when the migration's
    plan has an error: a lint error or SQL that does not parse. Nothing ran, nothing was
    recorded.

    `findings` holds every finding lint reported and `errors` the plan errors (for example a
    section that does not parse); a lint error can be overridden with
    ``run_migration(migration, force=True)`` once you know why the rule does not apply, a
    parse error cannot: the executor runs exactly the planned statement groups.
    """

    def __init__(
        self, migration: str, findings: Sequence[Finding], errors: Sequence[str] = ()
    ) -> None:
        self.migration = migration
        self.findings = tuple(findings)
        self.errors = tuple(errors)
        lint_errors = [f for f in self.findings if f.severity == "error"]
        lines = []
        if self.errors:
            lines.append(f"migration {migration!r} rejected: its SQL cannot be planned")
            lines += [f"  {error}" for error in self.errors]
        if lint_errors:
            lines.append(
                f"migration {migration!r} rejected by lint: {len(lint_errors)} error(s) "
                "(run_migration(..., force=True) runs it anyway)"
            )
            for finding in lint_errors:
                lines.append(f"  {finding}")
                lines.append(f"    statement: {' '.join(finding.statement.split())}")
                lines.append(f"    fix: {finding.recipe}")
        super().__init__("\n".join(lines))


def admit(plan: Plan, *, force: bool = False) -> list[str]:
    """Raise `MigrationRejected` unless `plan` may run; return the warnings for its result.

    With `force`, lint errors are returned as warnings too ("forced past ..."), so the result
    still says what was overridden. Parse errors cannot be forced.
    """
    errors = [
        f"{section.phase.name}: {section.error}"
        for section in (plan.execute, plan.contract, plan.rollback.phase)
        if section.error
    ]
    lint_errors = [f for f in plan.findings if f.severity == "error"]
    if errors or (lint_errors and not force):
        raise MigrationRejected(plan.migration, plan.findings, errors)
    warnings = []
    for finding in plan.findings:
        prefix = "lint (forced past error)" if finding.severity == "error" else "lint"
        warnings.append(f"{prefix}: {finding}")
    return warnings


def rollback_note(plan: Plan) -> str | None:
    """The result warning when ROLLBACK would have nothing to run (schema left expanded)."""
    if not plan.rollback.leaves_schema_expanded:
        return None
    return (
        "no rollback_sql was given and none could be derived, so the schema was left "
        "expanded: " + "; ".join(plan.rollback.reasons)
    )
