"""Lint results as JSON and as SARIF 2.1.0 (what GitHub code scanning reads), for CI.

Pure data in, plain dicts out: the CLI only serialises them. A file that could not be loaded is
reported next to the findings of the others (JSON ``errors``; SARIF tool execution
notifications), never instead of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from statemachine.sql.lint import Finding
from statemachine.sql.plan import PhasePlan, Plan
from statemachine.sql.rules import RULES

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"


@dataclasses.dataclass(frozen=True)
class FileResult:
    """One linted file (`findings`), or one that could not be loaded (`error`, `line`)."""

    path: str
    migration: str | None = None
    findings: tuple[Finding, ...] = ()
    error: str | None = None
    line: int | None = None


def finding_dict(f: Finding) -> dict[str, Any]:
    """One finding as the JSON reports (lint, plan) print it."""
    return {
        "rule": f.rule,
        "name": RULES[f.rule].name,
        "severity": f.severity,
        "section": f.section,
        "index": f.index,
        "line": f.line,
        "statement": f.statement,
        "message": f.message,
        "recipe": f.recipe,
        "example": f.example,
        "allowed": f.allowed,
    }


def plan_dict(plan: Plan) -> dict[str, Any]:
    """A plan as ``lockstep plan --json`` prints it: the groups the executor will run."""

    def phase(section: PhasePlan) -> dict[str, Any]:
        return {
            "error": section.error,
            "groups": [
                {
                    "transactional": group.transactional,
                    "statements": list(group.statements),
                    "reason": group.reason,
                }
                for group in section.groups
            ],
        }

    return {
        "migration": plan.migration,
        "execute": phase(plan.execute),
        "backfills": [dataclasses.asdict(b) for b in plan.backfills],
        "contract": phase(plan.contract),
        "rollback": {
            "source": plan.rollback.source,
            "reasons": list(plan.rollback.reasons),
            **phase(plan.rollback.phase),
        },
        "findings": [finding_dict(f) for f in plan.findings],
        "has_errors": plan.has_errors,
    }


def to_json(results: Sequence[FileResult]) -> dict[str, Any]:
    findings = [f for r in results for f in r.findings if f.allowed is None]
    return {
        "version": 1,
        "files": [
            {
                "path": r.path,
                "migration": r.migration,
                "findings": [finding_dict(f) for f in r.findings],
            }
            for r in results
            if r.error is None
        ],
        "errors": [
            {"path": r.path, "line": r.line, "message": r.error}
            for r in results
            if r.error is not None
        ],
        "summary": {
            "files": len(results),
            "errors": sum(f.severity == "error" for f in findings),
            "warnings": sum(f.severity == "warning" for f in findings),
            "not_loaded": sum(r.error is not None for r in results),
        },
    }


def _region(line: int | None) -> dict[str, Any]:
    return {"region": {"startLine": line}} if line else {}


def to_sarif(results: Sequence[FileResult], *, version: str = "") -> dict[str, Any]:
    rules = [
        {
            "id": rule.id,
            "name": rule.name,
            "shortDescription": {"text": rule.summary},
            "help": {"text": rule.render_recipe()},
            "defaultConfiguration": {"level": rule.severity},
            "properties": {"sections": list(rule.sections), "profile": rule.profile},
        }
        for rule in RULES.values()
    ]
    index = {rule.id: i for i, rule in enumerate(RULES.values())}
    sarif_results = []
    for r in results:
        for f in r.findings:
            result: dict[str, Any] = {
                "ruleId": f.rule,
                "ruleIndex": index[f.rule],
                "level": f.severity,
                "message": {"text": f"{f.message}. Fix: {f.recipe}"},
                "locations": [
                    {
                        "physicalLocation": {
                            "artifactLocation": {"uri": r.path},
                            **_region(f.line),
                        }
                    }
                ],
            }
            if f.allowed is not None:
                result["suppressions"] = [{"kind": "inSource", "justification": f.allowed}]
            sarif_results.append(result)
    notifications = [
        {
            "level": "error",
            "message": {"text": r.error},
            "locations": [
                {"physicalLocation": {"artifactLocation": {"uri": r.path}, **_region(r.line)}}
            ],
        }
        for r in results
        if r.error is not None
    ]
    driver: dict[str, Any] = {"name": "lockstep", "rules": rules}
    if version:
        driver["version"] = version
    return {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {"driver": driver},
                "invocations": [
                    {
                        "executionSuccessful": not notifications,
                        "toolExecutionNotifications": notifications,
                    }
                ],
                "results": sarif_results,
            }
        ],
    }
