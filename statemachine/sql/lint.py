"""Phase-aware lint: what would break old code or hold a long lock, and the safe recipe.

Why phase-aware: `sql` runs in EXECUTE while the old application code is still serving, so it
must be backward compatible (no drops, renames, type changes, new NOT NULLs). `contract_sql` runs
after every agent switched, so drops belong there. Every section still runs against a live
database, so statements that hold an ACCESS EXCLUSIVE lock for a table scan or rewrite are
warned about everywhere. A statement on a table created earlier in the same section is exempt:
nobody uses that table yet, and with a `Catalog` neither is a table that does not exist or has no
rows. Renames break whichever code is live, so they are errors in `contract_sql` too.

Allowing a finding: a comment ``-- lockstep:allow LS105 <reason>`` inside or right before a
statement (a migration file keeps it with the statement) silences that rule for it; ``allow``
does the same for a whole migration (``-- lockstep:allow-file`` in a file). The reason is
mandatory: an allow without one is itself an error (LS001).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

from pglast import ast

from statemachine.migration import Migration
from statemachine.sql._nodes import relation_name
from statemachine.sql.catalog import Catalog
from statemachine.sql.checks import check_node, record
from statemachine.sql.context import Context, Hit
from statemachine.sql.rollback import try_derive_rollback
from statemachine.sql.rules import RULES, Profile, Section, Severity
from statemachine.sql.split import SqlSyntaxError, parse_statement, split_statements
from statemachine.sql.style import style_hits
from statemachine.sql.volatility import VOLATILE_FUNCTIONS

__all__ = ["ALLOW_COMMENT", "VOLATILE_FUNCTIONS", "Finding", "lint_migration", "lint_statements"]

#: ``-- lockstep:allow LS105 the table is empty`` (the reason is everything after the id).
ALLOW_COMMENT = re.compile(
    r"--\s*lockstep:allow(?P<file>-file)?[ \t]+(?P<rule>\S+)(?:[ \t]+(?P<reason>[^\n]*?))?[ \t]*$",
    re.MULTILINE,
)


@dataclasses.dataclass(frozen=True)
class Finding:
    """One problem in one statement, with the concrete safe way to do it.

    `index` is the statement's position in its section (a string holding several statements
    reports the same index for each); `line` is the line in the migration file when known.
    `example`, when there is one, is a complete migration file doing it safely. `allowed` is
    the reason of the allow marker that silenced it (only with ``include_allowed=True``).
    """

    rule: str
    severity: Severity
    section: Section
    statement: str
    index: int
    line: int | None
    message: str
    recipe: str
    example: str | None = None
    allowed: str | None = None

    def __str__(self) -> str:
        where = f"{self.section}[{self.index}]" + (f" line {self.line}" if self.line else "")
        return f"{where}: {self.severity} {self.rule} ({RULES[self.rule].name}): {self.message}"


def _finding(hit: Hit, section: Section, statement: str, index: int, line: int | None) -> Finding:
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
        example=hit.example,
    )


def statement_allows(text: str) -> tuple[dict[str, str], list[str]]:
    """The rules an allow comment in `text` silences (rule -> reason), and what is wrong with
    the malformed ones."""
    allows: dict[str, str] = {}
    problems: list[str] = []
    for match in ALLOW_COMMENT.finditer(text):
        rule, reason = match["rule"], (match["reason"] or "").strip()
        if rule not in RULES:
            problems.append(f"'lockstep:allow {rule}': no such rule (see 'lockstep lint --rules')")
        elif not reason:
            problems.append(f"'lockstep:allow {rule}' needs a reason after the rule id")
        else:
            allows[rule] = reason
    return allows, problems


def _views_created(statements: Sequence[str]) -> set[str]:
    views: set[str] = set()
    for text in statements:
        try:
            parts = split_statements(text)
        except SqlSyntaxError:
            continue
        for part in parts:
            node = parse_statement(part.text)
            if isinstance(node, ast.ViewStmt) and node.view is not None:
                name = relation_name(node.view)
                if name:
                    views.add(name)
    return views


@dataclasses.dataclass
class _Shared:
    """What one section teaches the next (a CHECK IS NOT NULL in sql proves it in contract)."""

    not_null_checks: set[tuple[str, str]] = dataclasses.field(default_factory=set)
    added: set[tuple[str, str]] = dataclasses.field(default_factory=set)


def lint_statements(
    section: Section,
    statements: Sequence[str],
    *,
    existing_tables: frozenset[str] | None = None,
    lines: Sequence[int] | None = None,
    catalog: Catalog | None = None,
    profile: Profile = "default",
    allow: Mapping[str, str] | None = None,
    include_allowed: bool = False,
    _shared: _Shared | None = None,
) -> list[Finding]:
    """Lint one section. `lines[i]`, when given, is the file line where `statements[i]` starts."""
    shared = _shared or _Shared()
    ctx = Context(
        section,
        catalog,
        existing_tables,
        views=_views_created(statements),
        not_null_checks=shared.not_null_checks,
        added=shared.added,
    )
    findings: list[Finding] = []
    for index, text in enumerate(statements):
        base = lines[index] if lines is not None and index < len(lines) else None
        allows, problems = statement_allows(text)
        allows = {**(allow or {}), **allows}
        for problem in problems:
            findings.append(_finding(Hit("LS001", problem), section, text, index, base))
        try:
            parts = split_statements(text)
        except SqlSyntaxError as exc:
            line = base + exc.line - 1 if base is not None else None
            where = "" if base is not None else f" (line {exc.line} of the statement)"
            hit = Hit("LS000", exc.message + where)
            findings.append(_finding(hit, section, text, index, line))
            continue
        for part in parts:
            node = parse_statement(part.text)
            line = base + part.line - 1 if base is not None else None
            hits = check_node(node, ctx, part.text)
            if profile == "strict":
                hits += [Hit(r, m, p) for r, m, p in style_hits(parse_statement(part.text))]
            for hit in hits:
                rule = RULES[hit.rule]
                if section not in rule.sections or (
                    rule.profile == "strict" and profile != "strict"
                ):
                    continue
                finding = _finding(hit, section, part.text, index, line)
                if hit.rule in allows:
                    if not include_allowed:
                        continue
                    finding = dataclasses.replace(finding, allowed=allows[hit.rule])
                findings.append(finding)
            record(node, ctx, part.text)
    return findings


def _rollback_findings(
    migration: Migration, lines: Sequence[int] | None, allow: Mapping[str, str]
) -> list[Finding]:
    findings: list[Finding] = []
    for failure in try_derive_rollback(migration.sql).failures:
        if failure.syntax_error:
            continue  # already reported as LS000
        source = migration.sql[failure.index] if failure.index < len(migration.sql) else ""
        if "LS301" in allow or "LS301" in statement_allows(source)[0]:
            continue
        base = lines[failure.index] if lines is not None and failure.index < len(lines) else None
        line = base + failure.line - 1 if base is not None else None
        hit = Hit("LS301", f"no rollback: {failure.reason}")
        findings.append(_finding(hit, "sql", failure.statement, failure.index, line))
    return findings


def lint_migration(
    migration: Migration,
    *,
    existing_tables: frozenset[str] | None = None,
    lines: Mapping[str, Sequence[int]] | None = None,
    catalog: Catalog | None = None,
    profile: Profile = "default",
    allow: Mapping[str, str] | None = None,
    include_allowed: bool = False,
) -> list[Finding]:
    """Every finding for `migration`, section by section in statement order.

    `existing_tables` (``name`` or ``schema.name``) narrows the table-level rules to tables that
    exist; None assumes every table not created earlier in the same section exists. A
    `catalog` (see `statemachine.sql.catalog`) supersedes it and adds what the live database
    knows. `lines` maps a section name to the file line of each of its statements (see
    `statemachine.sql.files.parse_migration_source`), so findings can name file lines.
    `allow` maps rule ids to the reason they are allowed for the whole migration;
    `profile="strict"` adds the style rules.
    """
    lines = lines or {}
    allow = allow or {}
    shared = _Shared()
    findings: list[Finding] = []
    sections: tuple[tuple[Section, Sequence[str]], ...] = (
        ("sql", migration.sql),
        ("contract_sql", migration.contract_sql),
        ("rollback_sql", migration.rollback_sql or ()),
    )
    for section, statements in sections:
        findings.extend(
            lint_statements(
                section,
                statements,
                existing_tables=existing_tables,
                lines=lines.get(section),
                catalog=catalog,
                profile=profile,
                allow=allow,
                include_allowed=include_allowed,
                _shared=shared,
            )
        )
    if migration.rollback_sql is None:
        findings.extend(_rollback_findings(migration, lines.get("sql"), allow))
    return findings
