"""`lockstep lint PATH...`: phase-aware lint of migration files, with or without a database.

Exit status: 0 when no file has an error finding (warnings are fine), 1 when one has (the same
errors that make `run_migration` raise `MigrationRejected`), 3 when a file, directory or the
``--dsn`` database could not be read: every file is still reported. 2 is a usage error. CI can
run it on every pull request and tell "the SQL is unsafe" from "lint could not look".
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from coordinator.cli.commands import CommandError, stderr_console, stdout_console
from coordinator.cli.files import MigrationFile, MigrationLoadError, load_file, migration_paths
from statemachine.sql import RULES, Finding, lint_migration
from statemachine.sql.catalog import Catalog
from statemachine.sql.report import FileResult, to_json, to_sarif
from statemachine.sql.rules import PROFILES, Profile

if TYPE_CHECKING:
    from coordinator.cli.commands import Subparsers

NAME = "lint"

EXIT_FINDINGS = 1
EXIT_NOT_LOADED = 3

_STYLE = {"error": "bold red", "warning": "yellow"}


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="lint migration files for changes that break old code or hold long locks",
        description=(
            "Check each migration file (or every .sql file of a directory) with lockstep's "
            "phase-aware rules: sql runs while old code is live, so it must not drop, rename or "
            "retype anything; every section is checked for statements that hold long locks. "
            "Each finding shows its rule, section, line, statement and the safe recipe. Exits 0 "
            "when no error was found, 1 when one was, 3 when a file or the database could not be "
            "read (every other file is still reported). Needs no database; with --dsn it reads "
            "the catalog (table sizes, column types, function volatility) and stays quiet about "
            "what cannot hurt there. Silence one finding with a line "
            "'-- lockstep:allow LS105 <reason>' before the statement."
        ),
    )
    parser.add_argument("paths", nargs="*", type=Path, metavar="PATH", help="file or directory")
    parser.add_argument("--rules", action="store_true", help="list every rule and exit")
    add_lint_options(parser)
    parser.add_argument(
        "--format",
        choices=("text", "json", "sarif"),
        default="text",
        help="text for people, json for scripts, sarif for GitHub code scanning",
    )
    parser.add_argument(
        "--json",
        dest="format",
        action="store_const",
        const="json",
        help="the same as --format json (every command that reports takes --json)",
    )
    parser.set_defaults(func=run)


def add_lint_options(parser: argparse.ArgumentParser) -> None:
    """--dsn and --profile, shared with `lockstep plan`."""
    parser.add_argument(
        "--dsn", help="read the live catalog of this database (read only) for sharper findings"
    )
    parser.add_argument(
        "--profile",
        choices=PROFILES,
        default="default",
        help="strict adds style rules (json, varchar(n), timestamp, serial, char, int keys)",
    )


def catalog_from(dsn: str | None) -> Catalog | None:
    """The catalog of `dsn`, or None without one; a connection problem is a CommandError."""
    if not dsn:
        return None
    import psycopg

    from coordinator.pg.catalog import load_catalog

    try:
        return load_catalog(dsn)
    except psycopg.Error as exc:
        raise CommandError(f"cannot read the catalog of --dsn: {exc}".strip()) from exc


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
        if f.example:
            out.print("  [green]safe migration:[/]")
            for line in f.example.rstrip().splitlines():
                out.print(f"    {escape(line)}", style="green")


def lint_file(
    file: MigrationFile, *, catalog: Catalog | None = None, profile: Profile = "default"
) -> list[Finding]:
    """Lint with the file's line numbers (findings point at the line to edit) and allows."""
    return lint_migration(
        file.migration,
        lines=file.source.lines,
        catalog=catalog,
        profile=profile,
        allow=file.source.allow,
    )


def load_each(paths: Sequence[Path]) -> list[MigrationFile | MigrationLoadError]:
    """Every file of every path, in order; a file that does not load is kept as its error,
    so one broken file never hides the findings of the others."""
    out: list[MigrationFile | MigrationLoadError] = []
    for path in paths:
        if path.is_dir():
            try:
                files = migration_paths(path)
            except MigrationLoadError as exc:
                out.append(exc)
                continue
            if not files:
                out.append(MigrationLoadError(path, "no .sql migration files in this directory"))
        elif path.exists():
            files = [path]
        else:
            out.append(MigrationLoadError(path, "no such file or directory"))
            continue
        for file in files:
            try:
                out.append(load_file(file))
            except MigrationLoadError as exc:
                out.append(exc)
    return out


def _print_rules(out: Console) -> int:
    table = Table("rule", "name", "severity", "sections", "profile", "summary")
    for rule in RULES.values():
        table.add_row(
            rule.id,
            rule.name,
            f"[{_STYLE[rule.severity]}]{rule.severity}[/]",
            ", ".join(rule.sections),
            rule.profile,
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
        catalog = catalog_from(args.dsn)
    except CommandError as exc:
        stderr_console().print(f"error: {escape(str(exc))}")
        return EXIT_NOT_LOADED
    results: list[FileResult] = []
    for item in load_each(args.paths):
        if isinstance(item, MigrationLoadError):
            results.append(FileResult(str(item.path), error=item.message, line=item.line))
            continue
        findings = lint_file(item, catalog=catalog, profile=args.profile)
        results.append(FileResult(str(item.path), item.migration.name, tuple(findings)))
    if args.format == "json":
        print(json.dumps(to_json(results), indent=2))
    elif args.format == "sarif":
        print(json.dumps(to_sarif(results), indent=2))
    else:
        _print_text(out, results)
    if any(r.error for r in results):
        return EXIT_NOT_LOADED
    errors = any(f.severity == "error" for r in results for f in r.findings)
    return EXIT_FINDINGS if errors else 0


def _print_text(out: Console, results: Sequence[FileResult]) -> None:
    errors = warnings = 0
    for r in results:
        if r.error is not None:
            where = f"{r.path}:{r.line}" if r.line else r.path
            out.print(f"{escape(where)}: [bold red]cannot load[/]: {escape(r.error)}")
            continue
        print_findings(out, Path(r.path), r.findings)
        errors += sum(1 for f in r.findings if f.severity == "error")
        warnings += sum(1 for f in r.findings if f.severity == "warning")
    broken = sum(1 for r in results if r.error is not None)
    verdict = "[bold red]FAIL[/]" if errors or broken else "[green]OK[/]"
    loaded = len(results) - broken
    tail = f", {broken} could not be loaded" if broken else ""
    out.print(f"{verdict}: {loaded} migration(s), {errors} error(s), {warnings} warning(s){tail}")
