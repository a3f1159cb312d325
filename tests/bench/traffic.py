"""`make bench-traffic`: every recipe under live traffic, with and without lockstep.

    python -m tests.bench.traffic [--agents 8] [--hold 10] [--dsn URI] [--out FILE]
    python -m tests.bench.traffic --rows 1000000   (the large-table scenario only)

For each recipe, in a fresh database: N application instances (each an agent plus a query loop
on its own connection) query the database while the coordinator runs the recipe's migration;
then the same SQL is applied directly while N old-code loops run. A second scenario holds a
conflicting lock for --hold seconds and measures the application's longest stall with lockstep
and with a plain ALTER TABLE. The exit status is 1 if lockstep let any application query fail,
left a migration unfinished or the schema wrong; latency is reported, never asserted.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import trio
from rich.console import Console
from rich.logging import RichHandler

from coordinator.cli import options
from coordinator.cli.embedded import resolve_dsn
from coordinator.pg.attempts import RetryPolicy
from tests.bench import harness, heldlock, recipes, scaffold
from tests.bench.report import (
    HoldRow,
    RecipeRow,
    hold_row,
    hold_table,
    markdown,
    recipe_row,
    recipe_table,
    write_section,
)

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"
HOLD_RECIPE = "add_column"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench.traffic",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    scaffold.add_output_options(p, DEFAULT_OUT, "traffic")
    p.add_argument("--agents", type=options.at_least_one, default=8, help="instances (default 8)")
    p.add_argument(
        "--hold", type=options.positive, default=10.0, help="seconds the lock is held (10)"
    )
    p.add_argument(
        "--budget",
        type=options.positive,
        default=3.0,
        help="retry budget of the extra held-lock run that gives up (3 s; none if >= --hold)",
    )
    p.add_argument(
        "--lock-timeout", type=options.positive, default=0.5, help="lockstep's lock_timeout (0.5)"
    )
    p.add_argument(
        "--baseline",
        type=options.non_negative,
        default=2.0,
        help="seconds of no-migration traffic measured before each migration (2)",
    )
    p.add_argument(
        "--min-queries",
        type=options.at_least_one,
        default=20,
        help="queries each instance serves before and after each migration (20)",
    )
    p.add_argument(
        "--pause",
        type=options.non_negative,
        default=0.002,
        help="sleep between an instance's queries (0.002 s)",
    )
    p.add_argument(
        "--recipes",
        default=",".join(r.key for r in recipes.RECIPES),
        help="comma-separated recipe keys (default: all)",
    )
    p.add_argument("--skip-direct", action="store_true", help="do not run without lockstep")
    p.add_argument("--skip-hold", action="store_true", help="skip the held-lock scenario")
    p.add_argument(
        "--rows",
        type=options.at_least_one,
        help="run only the large-table scenario (FK + NOT NULL via CHECK) on this many rows;"
        " prints its figures and writes nothing",
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="show lockstep's log (lock retries...)"
    )
    return p


def _selected(text: str) -> list[recipes.Recipe]:
    try:
        return [recipes.get(key.strip()) for key in text.split(",") if key.strip()]
    except KeyError as exc:
        raise SystemExit(f"error: {exc.args[0]}") from None


async def _bench(
    server: str, args: argparse.Namespace, selected: list[recipes.Recipe], console: Console
) -> tuple[list[RecipeRow], list[HoldRow]]:
    rows: list[RecipeRow] = []
    for recipe in selected:
        console.print(f"[bold]{recipe.title}[/] ({recipe.file})")
        with harness.fresh_database(server) as dsn:
            run = await harness.run_with_lockstep(
                dsn,
                recipe,
                agents=args.agents,
                baseline_seconds=args.baseline,
                min_queries=args.min_queries,
                pause=args.pause,
                lock_timeout=args.lock_timeout,
            )
        for problem in run.schema_problems:
            console.print(f"  [red]schema: {problem}[/]")
        if run.result.reason:
            console.print(f"  [red]migration: {run.result.reason}[/]")
        for failure in run.traffic.failures[:3]:
            console.print(f"  [red]query failed: {failure.error}[/]")
        direct = None
        if not args.skip_direct:
            with harness.fresh_database(server) as dsn:
                direct = await harness.run_direct(
                    dsn,
                    recipe,
                    instances=args.agents,
                    min_queries=args.min_queries,
                    pause=args.pause,
                )
        row = recipe_row(run, direct)
        console.print(
            f"  lockstep: {row.status}, {row.queries} queries during, {row.failed} failed;"
            f" without: {'-' if direct is None else row.direct_failed} failed"
        )
        rows.append(row)

    holds: list[HoldRow] = []
    if not args.skip_hold:
        recipe = recipes.get(HOLD_RECIPE)
        scenarios: list[tuple[str, bool, RetryPolicy | None]] = [
            ("lockstep", True, None),
            ("plain ALTER TABLE", False, None),
        ]
        if args.budget < args.hold:
            budget = RetryPolicy(max_seconds=args.budget)
            scenarios.insert(1, (f"lockstep, retry budget {args.budget:g} s", True, budget))
        for label, lockstep, policy in scenarios:
            console.print(f"[bold]Lock held for {args.hold:g}s[/], {label}")
            with harness.fresh_database(server) as dsn:
                hold = await heldlock.run_hold(
                    dsn,
                    recipe,
                    lockstep=lockstep,
                    hold=args.hold,
                    agents=args.agents,
                    min_queries=args.min_queries,
                    pause=args.pause,
                    lock_timeout=args.lock_timeout,
                    lock_retry=policy,
                )
            holds.append(hold_row(hold, label))
    return rows, holds


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = scaffold.console()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.ERROR,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )
    if args.rows:
        return _big_table(args, console)
    selected = _selected(args.recipes)
    started = time.monotonic()
    with resolve_dsn(args.dsn) as server:
        rows, holds = trio.run(_bench, server, args, selected, console)
        header = scaffold.header(
            "bench-traffic",
            argv,
            server,
            time.monotonic() - started,
            f"{args.agents} agents, lock_timeout {args.lock_timeout:g} s,"
            f" lock held {args.hold:g} s",
        )
    if rows:
        console.print(recipe_table(rows))
    if holds:
        console.print(hold_table(holds))
        target = args.lock_timeout * 1000 + 100
        for row in holds:
            if row.mode.startswith("lockstep"):
                verdict = "within" if row.longest_stall_ms < target else "ABOVE"
                console.print(
                    f"lockstep's longest stall {row.longest_stall_ms:.0f} ms is {verdict} the"
                    f" target lock_timeout + 100 ms = {target:.0f} ms"
                )
    text = markdown(rows, holds, header=header)
    scaffold.publish(args, console, text, write_section, "traffic")
    bad = [r.title for r in rows if not r.ok] + [
        h.mode for h in holds if h.mode.startswith("lockstep") and h.failed
    ]
    if bad:
        console.print(f"[bold red]lockstep failed application queries or migrations:[/] {bad}")
        return 1
    return 0


def _big_table(args: argparse.Namespace, console: Console) -> int:
    from tests.bench import bigtable

    with resolve_dsn(args.dsn) as server:
        results = trio.run(
            functools.partial(
                bigtable.run_big_table,
                server,
                args.rows,
                agents=args.agents,
                min_queries=args.min_queries,
                pause=args.pause,
                lock_timeout=args.lock_timeout,
            )
        )
    console.print(bigtable.markdown(args.rows, results), markup=False, highlight=False)
    for row in results:
        if row.error:
            console.print(f"{row.mode}: {row.error}", markup=False)
    return 1 if results[0].failed or results[0].error else 0


if __name__ == "__main__":
    sys.exit(main())
