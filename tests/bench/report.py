"""Figures from the harness runs: latency percentiles, rows, a rich table and markdown.

Kept apart from the runs so the numbers can be checked without a database, and so the
terminal table and the markdown written to docs/benchmarks.md can never disagree.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

from rich.table import Table

from statemachine.phases import MigrationStatus
from tests.bench.apploop import Sample
from tests.bench.harness import DirectRun, LockstepRun, Traffic
from tests.bench.heldlock import HoldRun
from tests.bench.markdown import replace_section
from tests.bench.markdown import table as markdown_table

BEGIN_MARK = "<!-- bench-traffic:begin -->"
END_MARK = "<!-- bench-traffic:end -->"


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (`q` in 0..100) of `values`; NaN when there are none."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclasses.dataclass(frozen=True)
class Latency:
    """Latency of a set of queries, in milliseconds."""

    count: int
    p50: float
    p99: float
    max: float

    @classmethod
    def of(cls, samples: Sequence[Sample]) -> Latency:
        ms = [s.seconds * 1000 for s in samples]
        return cls(len(ms), percentile(ms, 50), percentile(ms, 99), max(ms, default=math.nan))

    def text(self) -> str:
        return f"{_ms(self.p50)} / {_ms(self.p99)} / {_ms(self.max)}"


def _ms(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


@dataclasses.dataclass(frozen=True)
class RecipeRow:
    key: str
    title: str
    status: str
    lock_retries: int
    seconds: float
    queries: int
    failed: int
    baseline: Latency
    during: Latency
    schema_ok: bool
    direct_queries: int | None
    direct_failed: int | None

    @property
    def ok(self) -> bool:
        return (
            self.failed == 0 and self.status == MigrationStatus.COMPLETED.value and self.schema_ok
        )


def recipe_row(run: LockstepRun, direct: DirectRun | None) -> RecipeRow:
    t = run.traffic
    return RecipeRow(
        key=run.recipe.key,
        title=run.recipe.title,
        status=run.result.status.value,
        lock_retries=run.result.lock_retries,
        seconds=t.ddl.seconds,
        queries=len(t.during(t.ddl)),
        failed=len(t.failures),
        baseline=Latency.of(t.during(t.baseline)),
        during=Latency.of(t.during(t.ddl)),
        schema_ok=not run.schema_problems,
        direct_queries=None if direct is None else len(_since_ddl(direct.traffic)),
        direct_failed=None if direct is None else len(direct.traffic.failures),
    )


def _since_ddl(traffic: Traffic) -> list[Sample]:
    return [s for s in traffic.samples if s.at >= traffic.ddl.start]


@dataclasses.dataclass(frozen=True)
class HoldRow:
    mode: str
    hold: float | None
    outcome: str
    lock_retries: int | None
    seconds: float
    queries: int
    failed: int
    longest_stall_ms: float
    stalled_on: str


def stalled_on(traffic: Traffic, sample: Sample | None) -> str:
    """The most frequent waits of the application's sessions while `sample` was running."""
    if sample is None:
        return "-"
    end = sample.at + sample.seconds
    counts = collections.Counter(
        w for ws in traffic.waits if sample.at <= ws.at <= end for w in ws.waits
    )
    if not counts:
        return "-"
    return ", ".join(f"{wait} ({n})" for wait, n in counts.most_common(2))


def hold_row(run: HoldRun, mode: str | None = None) -> HoldRow:
    t = run.traffic
    during = t.during(t.ddl)
    slowest = max(during, key=lambda s: s.seconds, default=None)
    if run.result is not None:
        outcome = run.result.status.value
        if run.result.reason:
            outcome += f": {run.result.reason}"
    else:
        outcome = "completed" if run.ddl_error is None else f"failed: {run.ddl_error}"
    return HoldRow(
        mode=mode or ("lockstep" if run.lockstep else "plain ALTER TABLE"),
        hold=run.hold,
        outcome=outcome,
        lock_retries=None if run.result is None else run.result.lock_retries,
        seconds=t.ddl.seconds,
        queries=len(during),
        failed=len(t.failures),
        longest_stall_ms=math.nan if slowest is None else slowest.seconds * 1000,
        stalled_on=stalled_on(t, slowest),
    )


# ---------------------------------------------------------------------- rendering
_RECIPE_HEADERS = (
    "recipe",
    "status",
    "lock retries",
    "migration s",
    "queries during",
    "failed queries",
    "baseline p50/p99/max ms",
    "during p50/p99/max ms",
    "schema ok",
    "without lockstep: failed of sent since the DDL began",
)
_HOLD_HEADERS = (
    "scenario",
    "lock held s",
    "outcome",
    "lock retries",
    "window s",
    "queries in window",
    "failed",
    "longest stall ms",
    "app sessions waited on (samples)",
)


def _recipe_cells(row: RecipeRow, *, short: bool = False) -> list[str]:
    direct = "-" if row.direct_failed is None else f"{row.direct_failed} of {row.direct_queries}"
    return [
        row.key if short else row.title,
        row.status,
        str(row.lock_retries),
        f"{row.seconds:.2f}",
        str(row.queries),
        str(row.failed),
        row.baseline.text(),
        row.during.text(),
        "yes" if row.schema_ok else "NO",
        direct,
    ]


def _hold_cells(row: HoldRow) -> list[str]:
    return [
        row.mode,
        "until the DDL ends" if row.hold is None else f"{row.hold:g}",
        row.outcome,
        "-" if row.lock_retries is None else str(row.lock_retries),
        f"{row.seconds:.2f}",
        str(row.queries),
        str(row.failed),
        _ms(row.longest_stall_ms),
        row.stalled_on,
    ]


def recipe_table(rows: Sequence[RecipeRow]) -> Table:
    table = Table(title="Recipes under live traffic")
    for header in _RECIPE_HEADERS:
        table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(*_recipe_cells(row, short=True), style=None if row.ok else "bold red")
    return table


def hold_table(rows: Sequence[HoldRow]) -> Table:
    table = Table(title="A long transaction holds a conflicting lock")
    for header in _HOLD_HEADERS:
        table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(*_hold_cells(row))
    return table


def markdown(
    recipes: Sequence[RecipeRow], holds: Sequence[HoldRow], *, header: Sequence[str]
) -> str:
    """The benchmark section for docs/benchmarks.md (without the markers)."""
    out = [*header, ""]
    if recipes:
        out += [*markdown_table(_RECIPE_HEADERS, [_recipe_cells(r) for r in recipes]), ""]
    if holds:
        out += [*markdown_table(_HOLD_HEADERS, [_hold_cells(r) for r in holds]), ""]
    return "\n".join(out)


def write_section(path: Path, section: str) -> None:
    """Replace the text between the benchmark markers in `path` (append them if missing)."""
    replace_section(path, section, begin=BEGIN_MARK, end=END_MARK)
