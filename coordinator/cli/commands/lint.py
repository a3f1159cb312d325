"""`lockstep lint PATH...`: phase-aware lint of migration files, without a database.

Exit status 1 when any file has an error finding (the same errors that make `run_migration`
raise `MigrationRejected`), 0 otherwise: CI can run it on every pull request.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from coordinator.cli.commands import CommandError, stdout_console
from coordinator.cli.files import MigrationFile, MigrationLoadError, load_paths
from statemachine.sql import RULES, Finding, lint_migration

if TYPE_CHECKING:
    from coordinator.cli.commands import Subparsers

NAME = "lint"

_STYLE = {"error": "bold red", "warning": "yellow"}


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="lint migration files for changes that break old code or hold long locks",
        description=(
            "Check each migration file (or every .sql file of a directory) with lockstep's "
            "phase-aware rules: sql runs while old code is live, so it must not drop, rename or "
            "retype anything; every section is checked for statements that hold long locks. "
            "Each finding shows its rule, section, line, statement and the safe recipe. Exits 1 "
            "if any error was found, else 0. Needs no database."
        ),
    )
    parser.add_argument("paths", nargs="*", type=Path, metavar="PATH", help="file or directory")
    parser.add_argument("--rules", action="store_true", help="list every rule and exit")
    parser.set_defaults(func=run)


def print_findings(out: Console, path: Path, findings: Sequence[Finding]) -> None:
    """One block per finding: where, severity, rule, the statement, the problem, the fix."""
    for f in findings:
        line = f":{f.line}" if f.line else ""
        style = _STYLE[f.severity]
        out.print(
            f"{escape(str(path))}{line}: [{style}]{f.severity}[/] "
            f"[bold]{f.rule}[/] {RULES[f.rule].name} [dim]({f.section}[{f.index}])[/]"
        )
        out.print(f"  statement: {escape(' '.join(f.statement.split()))}", style="dim")
        out.print(f"  {escape(f.message)}")
        out.print(f"  [green]fix:[/] {escape(f.recipe)}")


def lint_file(file: MigrationFile) -> list[Finding]:
    """Lint with the file's line numbers, so findings point at the line to edit."""
    return lint_migration(file.migration, lines=file.source.lines)


def _print_rules(out: Console) -> int:
    table = Table("rule", "name", "severity", "sections", "summary")
    for rule in RULES.values():
        table.add_row(
            rule.id,
            rule.name,
            f"[{_STYLE[rule.severity]}]{rule.severity}[/]",
            ", ".join(rule.sections),
            escape(rule.summary),
        )
    out.print(table)
    return 0


def run(args: argparse.Namespace) -> int:
    out = stdout_console()
    if args.rules:
        return _print_rules(out)
    if not args.paths:
        raise CommandError("lint needs at least one migration file or directory")
    try:
        files = load_paths(args.paths)
    except MigrationLoadError as exc:
        raise CommandError(str(exc)) from exc
    errors = warnings = 0
    for file in files:
        findings = lint_file(file)
        print_findings(out, file.path, findings)
        errors += sum(1 for f in findings if f.severity == "error")
        warnings += sum(1 for f in findings if f.severity == "warning")
    verdict = "[bold red]FAIL[/]" if errors else "[green]OK[/]"
    out.print(f"{verdict}: {len(files)} migration(s), {errors} error(s), {warnings} warning(s)")
    return 1 if errors else 0
