"""`lockstep plan PATH...`: what `apply` would do, phase by phase, without a database.

Shows for each migration the statements of every phase and how they run (which share one
transaction, which run alone in autocommit), the backfills, the rollback that would run on
failure (given, derived, or none and why), and the lint verdict with every finding. It never
connects to anything unless given ``--dsn`` (then lint reads the live catalog), so it works
in CI and on a laptop with no DSN at all. ``--json`` prints the same plan as one object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.tree import Tree

from coordinator.cli.commands import CommandError, stdout_console
from coordinator.cli.commands.lint import add_lint_options, catalog_from, lint_file, print_findings
from coordinator.cli.files import MigrationFile, MigrationLoadError, load_paths
from statemachine.sql import PhasePlan, Plan, build_plan
from statemachine.sql.catalog import Catalog
from statemachine.sql.report import plan_dict
from statemachine.sql.rules import Profile

if TYPE_CHECKING:
    from coordinator.cli.commands import Subparsers

NAME = "plan"


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="show the phases, statements, transactions, rollback and lint of migration files",
        description=(
            "Print what applying each migration file (or every .sql file of a directory, in "
            "order) would do: EXECUTE's statements grouped into transactions and autocommit "
            "statements, backfills, APPLY, CONTRACT, the rollback that would run on failure "
            "(given, derived from sql, or none), and the lint verdict. Touches no database. "
            "Exits 0 when every file parses (lint errors are shown, not fatal: use "
            "'lockstep lint' as a gate)."
        ),
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="file or directory")
    parser.add_argument(
        "--json",
        action="store_true",
        help='print {"migrations": [plan, ...]}: the groups, rollback and findings of each',
    )
    add_lint_options(parser)
    parser.set_defaults(func=run)


def file_plan(
    file: MigrationFile, *, catalog: Catalog | None = None, profile: Profile = "default"
) -> Plan:
    """The plan, with lint findings that carry the file's line numbers."""
    findings = lint_file(file, catalog=catalog, profile=profile)
    return dataclasses.replace(build_plan(file.migration), findings=tuple(findings))


def _add_phase(tree: Tree, title: str, phase: PhasePlan) -> None:
    branch = tree.add(f"[bold]{title}[/]: {phase.statement_count} statement(s)")
    if phase.error:
        branch.add(f"[bold red]cannot plan:[/] {escape(phase.error)}")
    for number, group in enumerate(phase.groups, start=1):
        if group.transactional:
            how = "[cyan]in one transaction[/] (all or nothing)"
        else:
            how = "[magenta]autocommit[/] (alone, outside any transaction)"
        node = branch.add(f"group {number}: {how}")
        if group.reason:
            node.add(f"[dim]{escape(group.reason)}[/]")
        for statement in group.statements:
            node.add(escape(" ".join(statement.split()) + ";"))


def render_plan(out: Console, file: MigrationFile, plan: Plan) -> None:
    tree = Tree(f"[bold]migration {escape(plan.migration)}[/] [dim]({escape(str(file.path))})[/]")
    _add_phase(tree, "EXECUTE (old code still live)", plan.execute)
    if plan.backfills:
        branch = tree.add(
            f"[bold]BACKFILL[/] after EXECUTE commits, before APPLY ({len(plan.backfills)})"
        )
        for b in plan.backfills:
            where = f" WHERE {b.where}" if b.where else ""
            delay = f", {b.delay:g} s between batches" if b.delay else ""
            branch.add(
                escape(f"UPDATE {b.table} SET {b.set}{where}")
                + f" [dim](batches of {b.batch_size} ordered by {escape(b.key)}{delay})[/]"
            )
    tree.add("[bold]APPLY[/]: every agent switches to the new code and acks")
    if plan.contract.groups or plan.contract.error:
        _add_phase(tree, "CONTRACT (after every agent switched)", plan.contract)
    else:
        tree.add("[bold]CONTRACT[/]: nothing to contract")
    rollback = plan.rollback
    if rollback.leaves_schema_expanded:
        branch = tree.add(
            "[bold]ROLLBACK on failure[/]: [yellow]none - the schema would be left expanded[/]"
        )
        for reason in rollback.reasons:
            branch.add(escape(reason))
    else:
        _add_phase(tree, f"ROLLBACK on failure ({rollback.source})", rollback.phase)
    errors = sum(1 for f in plan.findings if f.severity == "error")
    warnings = len(plan.findings) - errors
    if errors:
        counts = f"{errors} error(s), {warnings} warning(s)"
        verdict = f"[bold red]REJECTED[/]: {counts} (--force overrides)"
    elif warnings:
        verdict = f"[yellow]OK with {warnings} warning(s)[/]"
    else:
        verdict = "[green]OK[/]: no findings"
    tree.add(f"[bold]LINT[/]: {verdict}")
    out.print(tree, soft_wrap=False)  # wrap long statements instead of cropping them
    print_findings(out, file.path, plan.findings)


def run(args: argparse.Namespace) -> int:
    try:
        files = load_paths(args.paths)
    except MigrationLoadError as exc:
        raise CommandError(str(exc)) from exc
    out = stdout_console()
    catalog = catalog_from(args.dsn)
    if args.json:
        plans = [file_plan(f, catalog=catalog, profile=args.profile) for f in files]
        sys.stdout.write(json.dumps({"migrations": [plan_dict(p) for p in plans]}) + "\n")
        return 0
    for index, file in enumerate(files):
        if index:
            out.print()
        render_plan(out, file, file_plan(file, catalog=catalog, profile=args.profile))
    return 0
