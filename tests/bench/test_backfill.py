"""`make bench-backfill` end to end on a small table, and its report helpers.

Timings are never asserted (a shared 2-core machine): the run must finish, backfill every row
in every mode, let no application query fail, and print one row per mode with the ratios.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import psycopg
import pytest

from tests.bench import backfill
from tests.bench.report import Latency


def test_small_table_runs_every_mode_and_reports_them(
    dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    small = ["--rows", "10000", "--instances", "2", "--baseline-seconds", "0.5"]
    status = backfill.main([*small, "--no-write", "--dsn", dsn])
    out = capsys.readouterr().out
    assert status == 0, out
    rows = re.findall(r"^\| ([a-zA-Z][^|]*?) \| ([\d,-]+) \|", out, re.MULTILINE)
    assert [mode for mode, _ in rows] == [backfill.TITLES[m] for m in backfill.MODES], out
    for mode, count in rows[1:]:
        assert int(count.replace(",", "")) >= 10_000, (mode, out)
    assert "Adaptive rows/s vs fixed 1,000-row batches before this change" in out
    assert "Application p99 during the adaptive backfill vs baseline" in out


def test_the_legacy_loop_visits_every_row_once(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id bigserial PRIMARY KEY, name text, copy text)")
        conn.execute("INSERT INTO items (name) SELECT 'n' || g FROM generate_series(1, 2500) g")
    assert backfill.legacy_fixed(dsn) == 2500
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM items WHERE copy = name").fetchone()
    assert row == (2500,)


def _row(mode: str, rows: int, seconds: float, p99: float) -> backfill.ModeRow:
    return backfill.ModeRow(mode, rows, seconds, seconds, Latency(100, 1.0, p99, p99 * 2), 0)


def test_ratios_compare_adaptive_with_the_old_fixed_batches_and_the_baseline() -> None:
    rows = [
        _row("baseline", 0, 5.0, 2.0),
        _row("before", 1000, 10.0, 3.0),
        _row("fixed", 1000, 5.0, 3.0),
        _row("adaptive", 1000, 2.0, 3.0),
        _row("single", 1000, 0.5, 900.0),
    ]
    text = "\n".join(backfill.ratios(rows))
    assert "before this change: 5.0x (target >= 3x: met)" in text
    assert "same statement, one connection): 2.5x" in text
    assert "vs baseline: 1.50x (target <= 2x: met)" in text
    assert "Single UPDATE: 4.0x the adaptive rows/s, application max 1800 ms" in text
    assert math.isnan(rows[0].rows_per_s)


def test_write_section_appends_once_then_replaces(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# B\n")
    backfill.write_section(doc, "first")
    backfill.write_section(doc, "second")
    text = doc.read_text()
    assert text.count(backfill.SECTION_TITLE) == 1
    assert "first" not in text and "second" in text


@pytest.mark.parametrize("bad", ["", "fast", "fixed,slow"])
def test_bad_modes_are_rejected(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        backfill.main(["--modes", bad, "--no-write"])
    assert exit_info.value.code == 2
    assert "modes must be some of" in capsys.readouterr().err
