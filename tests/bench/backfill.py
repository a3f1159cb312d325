"""`make bench-backfill`: backfill throughput against what the application feels meanwhile.

    python -m tests.bench.backfill [--rows 1000000] [--instances 4] [--dsn URI] [--out FILE]

A backfill is a trade: bigger batches finish sooner and hold their row locks longer. Each mode
runs in a fresh database holding `--rows` rows (``items(id, name, copy)``) while `--instances`
application loops (point reads, updates of random rows, inserts; each on its own connection)
run, and copies ``name`` into ``copy`` for every row:

- **baseline**: no backfill, the loops alone for `--baseline-seconds`;
- **fixed 1,000 before**: lockstep's backfill loop as it was before adaptive pacing, replayed
  here (`legacy_fixed`): a new connection per 1,000-row batch and ``key IN (SELECT ...)``;
- **fixed 1,000**: lockstep's backfill with ``pacing="fixed", batch_size=1000``;
- **adaptive**: lockstep's backfill with its defaults (`statemachine.backfill_pacing`);
- **single UPDATE**: ``UPDATE items SET copy = name``, as a plain migration tool would.

Both lockstep modes run through a real coordinator (`run_migration`, durable positions
included). The report gives rows/s and the application's p50/p99/max latency during the
backfill, and the ratios that matter: adaptive rows/s over the fixed batches before this change
(target: at least 3x) and over today's fixed batches, and adaptive p99 over the baseline's p99
(target: at most 2x). Ratios come from one run on one machine, so
a loaded machine moves both sides; the exit status is 1 only if a mode failed (a migration
that did not complete, or an application query that failed), never on a ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psycopg
import trio
from rich.console import Console
from rich.table import Table

from coordinator import open_coordinator
from coordinator.backfill import BackfillProgress
from coordinator.cli import options
from coordinator.cli.embedded import resolve_dsn
from coordinator.events import Event
from statemachine import Backfill, Migration, MigrationStatus
from tests.bench import scaffold
from tests.bench.apploop import QueryLoop
from tests.bench.markdown import table as markdown_table
from tests.bench.report import Latency
from tests.support.scratchdb import fresh_database

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"
BEGIN_MARK = "<!-- bench-backfill:begin -->"
END_MARK = "<!-- bench-backfill:end -->"
SECTION_TITLE = "## Backfill pacing"
MODES = ("baseline", "before", "fixed", "adaptive", "single")
TITLES = {
    "baseline": "baseline (no backfill)",
    "before": "fixed 1,000-row batches, before this change",
    "fixed": "fixed 1,000-row batches",
    "adaptive": "adaptive",
    "single": "single UPDATE",
}
#: The targets the report checks (printed, not enforced).
MIN_SPEEDUP = 3.0
MAX_P99_RATIO = 2.0
STUCK_AFTER = 600.0

_QUERIES = (
    "SELECT id, name, copy FROM items WHERE id = %(id)s",
    "UPDATE items SET name = %(s)s WHERE id = %(id)s",
    "SELECT id, name, copy FROM items WHERE id = %(id)s",
    "INSERT INTO items (name) VALUES (%(s)s)",
)


@dataclasses.dataclass(frozen=True)
class ModeRow:
    """One mode's figures: `seconds` is the measured window (the latency's), `work_seconds` the
    backfill's own time (for lockstep, without starting the coordinator), `rows` what it did."""

    mode: str
    rows: int
    seconds: float
    work_seconds: float
    latency: Latency
    failed: int
    batches: int = 0
    median_batch: int = 0
    largest_batch: int = 0
    blocked_batches: int = 0
    wal_batches: int = 0
    rests: int = 0
    rest_seconds: float = 0.0
    error: str | None = None

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.work_seconds if self.rows and self.work_seconds > 0 else math.nan

    @property
    def ok(self) -> bool:
        return self.error is None and self.failed == 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench.backfill",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument(
        "--rows", type=options.at_least_one, default=1_000_000, help="rows to backfill (1000000)"
    )
    p.add_argument(
        "--instances", type=options.at_least_one, default=4, help="application loops (4)"
    )
    p.add_argument(
        "--pause",
        type=options.non_negative,
        default=0.002,
        help="seconds each loop sleeps between queries (0.002)",
    )
    p.add_argument(
        "--baseline-seconds",
        type=options.positive,
        default=5.0,
        help="how long the baseline mode measures (5)",
    )
    p.add_argument(
        "--modes",
        type=_modes,
        default=MODES,
        help=f"modes to run, comma-separated (default {','.join(MODES)})",
    )
    p.add_argument(
        "--target-seconds",
        type=options.positive,
        default=Backfill("t", "x").target_seconds,
        help="the adaptive mode's target time per batch (the default of Backfill)",
    )
    scaffold.add_output_options(p, DEFAULT_OUT, "backfill")
    return p


def _modes(text: str) -> tuple[str, ...]:
    chosen = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in chosen if m not in MODES]
    if not chosen or unknown:
        raise argparse.ArgumentTypeError(f"modes must be some of {','.join(MODES)}, got {text!r}")
    return chosen


# ---------------------------------------------------------------------------- one mode
def _setup(dsn: str, rows: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id bigserial PRIMARY KEY, name text NOT NULL, copy text)")
        conn.execute(
            "INSERT INTO items (name) SELECT 'name ' || g FROM generate_series(1, %s) g", (rows,)
        )
        conn.execute("VACUUM (ANALYZE) items")
        # No checkpoint of the load inside the measured window (a role that may not: go on).
        with contextlib.suppress(psycopg.Error):
            conn.execute("CHECKPOINT")


def _single_update(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("UPDATE items SET copy = name").rowcount


#: The batch statement before adaptive pacing (``key IN (SELECT ...)``), for `legacy_fixed`.
_LEGACY_BATCH = (
    "WITH lockstep_batch AS (SELECT id AS k FROM items {after}ORDER BY id LIMIT 1000), "
    "lockstep_updated AS (UPDATE items SET copy = name "
    "WHERE id IN (SELECT k FROM lockstep_batch) RETURNING 1) "
    "SELECT (SELECT k FROM lockstep_batch ORDER BY k DESC LIMIT 1), "
    "(SELECT count(*) FROM lockstep_batch), (SELECT count(*) FROM lockstep_updated)"
)


def legacy_fixed(dsn: str) -> int:
    """The backfill loop as lockstep ran it before adaptive pacing: per 1,000-row batch a new
    connection, the timeouts set locally, the batch, a commit. Returns the rows updated."""
    last: int | None = None
    rows = 0
    while True:
        with psycopg.connect(dsn) as conn:
            conn.execute("SELECT set_config('lock_timeout', '500ms', true)")
            conn.execute("SELECT set_config('statement_timeout', '300000ms', true)")
            if last is None:
                row = conn.execute(_LEGACY_BATCH.format(after="").encode()).fetchone()
            else:
                sql_text = _LEGACY_BATCH.format(after="WHERE id > %(last)s ")
                row = conn.execute(sql_text.encode(), {"last": last}).fetchone()
            conn.commit()
        assert row is not None
        if row[1] == 0:
            return rows
        last, rows = row[0], rows + int(row[2])
        if row[1] < 1000:
            return rows


def _backfill(mode: str, target_seconds: float) -> Backfill:
    if mode == "fixed":
        return Backfill("items", "copy = name", batch_size=1000, pacing="fixed")
    return Backfill("items", "copy = name", target_seconds=target_seconds)


async def _run_mode(dsn: str, mode: str, args: argparse.Namespace) -> ModeRow:
    await trio.to_thread.run_sync(_setup, dsn, args.rows)
    loops = [
        QueryLoop(dsn, "backfill", _QUERIES, _QUERIES, pause=args.pause, rows=args.rows, seed=i)
        for i in range(args.instances)
    ]
    progress: list[BackfillProgress] = []

    def note(event: Event) -> None:
        if isinstance(event, BackfillProgress):
            progress.append(event)

    rows, error, work = 0, None, math.nan
    async with trio.open_nursery() as nursery:
        for loop in loops:
            nursery.start_soon(loop.run)
        try:
            with trio.fail_after(STUCK_AFTER):
                while not all(loop.count() >= 20 for loop in loops):
                    await trio.sleep(0.01)
            started = time.monotonic()
            if mode == "baseline":
                await trio.sleep(args.baseline_seconds)
            elif mode == "single":
                rows = await trio.to_thread.run_sync(_single_update, dsn)
            elif mode == "before":
                rows = await trio.to_thread.run_sync(legacy_fixed, dsn)
            else:
                migration = Migration(
                    f"bench_{mode}",
                    ["COMMENT ON TABLE items IS 'backfill benchmark'"],
                    rollback_sql=[],
                    backfills=[_backfill(mode, args.target_seconds)],
                )
                async with open_coordinator(dsn) as coordinator:
                    coordinator.subscribe(note)
                    result = await coordinator.run_migration(migration)
                if result.status is not MigrationStatus.COMPLETED:
                    error = result.reason or result.status.value
                if result.backfills:
                    rows, work = result.backfills[0].rows, result.backfills[0].seconds
            ended = time.monotonic()
            if mode in ("single", "before"):
                work = ended - started
        finally:
            for loop in loops:
                loop.stop()
    samples = [s for loop in loops for s in loop.samples if started <= s.at < ended]
    failed = sum(1 for s in samples if s.error is not None)
    sizes = [p.size for p in progress]
    return ModeRow(
        mode=mode,
        rows=0 if mode == "baseline" else rows,
        seconds=ended - started,
        work_seconds=work,
        latency=Latency.of(samples),
        failed=failed,
        batches=len(progress),
        median_batch=int(statistics.median(sizes)) if sizes else 0,
        largest_batch=max(sizes, default=0),
        blocked_batches=sum(1 for p in progress if p.signals.blocked_sessions),
        wal_batches=sum(1 for p in progress if p.signals.wal_waits),
        rests=sum(1 for p in progress if p.rest),
        rest_seconds=sum(p.rest for p in progress),
        error=error,
    )


async def _bench(server: str, args: argparse.Namespace, console: Console) -> list[ModeRow]:
    out = []
    for mode in args.modes:
        console.print(f"[bold]{TITLES[mode]}[/] ({args.rows:,} rows)...")
        with fresh_database(server, "lockstep_bench_backfill") as dsn:
            out.append(await _run_mode(dsn, mode, args))
    return out


# ---------------------------------------------------------------------------- the report
_HEADERS = [
    "mode",
    "rows",
    "seconds",
    "rows/s",
    "batches",
    "median / largest batch",
    "batches that saw app lock / WAL waits",
    "rests (s)",
    "app queries",
    "failed",
    "app p50 / p99 / max ms",
]


def _cells(row: ModeRow) -> list[str]:
    backfill = row.mode in ("fixed", "adaptive")
    batches = f"{row.rows // 1000 + 1:,}" if row.mode == "before" else "-"
    return [
        TITLES[row.mode] + ("" if row.error is None else f" (failed: {row.error})"),
        f"{row.rows:,}" if row.rows else "-",
        f"{row.seconds:.1f}",
        "-" if math.isnan(row.rows_per_s) else f"{row.rows_per_s:,.0f}",
        f"{row.batches:,}" if backfill else batches,
        f"{row.median_batch:,} / {row.largest_batch:,}"
        if backfill
        else ("1,000 / 1,000" if row.mode == "before" else "-"),
        f"{row.blocked_batches:,} / {row.wal_batches:,}" if backfill else "-",
        f"{row.rests:,} ({row.rest_seconds:.1f})" if backfill else "-",
        f"{row.latency.count:,}",
        str(row.failed),
        row.latency.text(),
    ]


def ratios(rows: Sequence[ModeRow]) -> list[str]:
    """The comparisons of the report, as sentences (only those the modes run allow)."""
    by_mode = {r.mode: r for r in rows}
    lines = []
    adaptive, fixed, base = by_mode.get("adaptive"), by_mode.get("fixed"), by_mode.get("baseline")
    before = by_mode.get("before")
    if adaptive and before:
        speedup = adaptive.rows_per_s / before.rows_per_s
        verdict = "met" if speedup >= MIN_SPEEDUP else "NOT met"
        lines.append(
            f"Adaptive rows/s vs fixed 1,000-row batches before this change: {speedup:.1f}x "
            f"(target >= {MIN_SPEEDUP:g}x: {verdict})."
        )
    if adaptive and fixed:
        lines.append(
            f"Adaptive rows/s vs today's fixed 1,000-row batches (same statement, one "
            f"connection): {adaptive.rows_per_s / fixed.rows_per_s:.1f}x."
        )
    if adaptive and base:
        p99 = adaptive.latency.p99 / base.latency.p99
        verdict = "met" if p99 <= MAX_P99_RATIO else "NOT met"
        lines.append(
            f"Application p99 during the adaptive backfill vs baseline: {p99:.2f}x "
            f"(target <= {MAX_P99_RATIO:g}x: {verdict})."
        )
    single = by_mode.get("single")
    if adaptive and single:
        lines.append(
            f"Single UPDATE: {single.rows_per_s / adaptive.rows_per_s:.1f}x the adaptive "
            f"rows/s, application max {single.latency.max:.0f} ms "
            f"(adaptive: {adaptive.latency.max:.0f} ms)."
        )
    return lines


def table(rows: Sequence[ModeRow]) -> Table:
    out = Table(title="Backfill under application traffic")
    for header in _HEADERS:
        out.add_column(header, justify="right")
    for row in rows:
        out.add_row(*_cells(row))
    return out


def markdown(rows: Sequence[ModeRow], header: Sequence[str]) -> str:
    lines = markdown_table(_HEADERS, [_cells(r) for r in rows])
    return "\n".join([*header, "", *lines, "", *ratios(rows), ""])


def write_section(path: Path, section: str) -> None:
    """Replace the text between the backfill markers; append the section if there is none."""
    scaffold.write_section(path, section, BEGIN_MARK, END_MARK, SECTION_TITLE)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = scaffold.console()
    started = time.monotonic()
    with resolve_dsn(args.dsn) as server:
        rows = trio.run(_bench, server, args, console)
        header = scaffold.header(
            "bench-backfill",
            argv,
            server,
            time.monotonic() - started,
            f"{args.rows:,} rows, {args.instances} application loops with a"
            f" {args.pause * 1000:g} ms pause",
        )
    console.print(table(rows))
    for line in ratios(rows):
        console.print(line)
    text = markdown(rows, header)
    scaffold.publish(args, console, text, write_section, "backfill")
    failed = [r for r in rows if not r.ok]
    for row in failed:
        why = row.error or f"{row.failed} application queries failed"
        console.print(f"[bold red]{TITLES[row.mode]}: {why}[/]")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
