"""`make bench-fleet` end to end on a small fleet, and its report/section helpers.

Timings are never asserted (a shared 2-core machine); the run (a coordinator here, agents in
worker processes, the raw baseline server in another) must finish, complete every migration,
lose no agent and report one row per fleet size.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from tests.bench import fleet


def _row(agents: int, acked_s: float) -> fleet.FleetRow:
    return fleet.FleetRow(
        agents=agents,
        connect_s=0.1,
        completed=1,
        attempted=1,
        migration_s=acked_s * 2,
        phase_s={"ANNOUNCE": acked_s / 2, "APPLY": acked_s / 2},
        acked_s=acked_s,
        cpu_s_per_migration=0.01,
    )


def test_small_fleet_runs_and_reports_a_row_per_size(
    dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status = fleet.main(
        ["--agents", "5,20", "--repeat", "2", "--idle", "0.2", "--no-write", "--dsn", dsn]
    )
    out = capsys.readouterr().out
    assert status == 0, out
    rows = re.findall(r"^\| (\d+) \| [\d.]+ \| (\d+)/(\d+) \|", out, re.MULTILINE)
    assert rows == [("5", "2", "2"), ("20", "2", "2")], out
    assert "100 agents" not in out
    assert "a direct send costs" in out, "the transport floor is reported"


def test_growth_compares_the_largest_size_with_the_middle_one() -> None:
    rows = [_row(10, 0.1), _row(100, 0.1), _row(1000, 3.0)]
    assert fleet.reference_row(rows).agents == 100
    assert fleet.growth(rows) == pytest.approx(3.0)
    assert fleet.reference_row(rows[:2]).agents == 10


def test_per_agent_figures() -> None:
    row = _row(100, 0.2)
    assert row.acks == 200
    assert row.acks_per_s == pytest.approx(1000)
    assert row.acked_ms_per_agent == pytest.approx(2.0)
    assert row.cpu_us_per_ack == pytest.approx(50)


def test_ratios_and_what_counts_as_ok() -> None:
    row = dataclasses.replace(_row(100, 0.2), raw_s=0.2, floor_s=0.005)
    assert row.ratio == pytest.approx(2.0)
    assert row.floor_ratio == pytest.approx(2.0)
    assert row.ok
    assert not dataclasses.replace(row, lost=1).ok, "a lost agent fails the run"
    assert not dataclasses.replace(row, completed=0).ok


def test_agents_are_split_evenly_over_the_workers() -> None:
    assert fleet._split(5, 2) == [3, 2]
    assert fleet._split(10_000, 2) == [5000, 5000]
    assert sum(fleet._split(7, 3)) == 7


def test_write_section_appends_once_then_replaces_and_keeps_other_markers(
    tmp_path: Path,
) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# B\n\n<!-- bench-traffic:begin -->\nT\n<!-- bench-traffic:end -->\n")
    fleet.write_section(doc, "first")
    fleet.write_section(doc, "second")
    text = doc.read_text()
    assert text.count(fleet.SECTION_TITLE) == 1
    assert "first" not in text and "second" in text
    assert "<!-- bench-traffic:begin -->\nT\n<!-- bench-traffic:end -->" in text
    assert text.index("bench-traffic:end") < text.index(fleet.BEGIN_MARK)


@pytest.mark.parametrize("bad", ["", "0,10", "ten"])
def test_bad_agent_counts_are_rejected(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        fleet.main(["--agents", bad, "--no-write"])
    assert exit_info.value.code == 2
    assert "agent counts" in capsys.readouterr().err


def test_the_command_line_in_the_doc_leaves_the_server_out() -> None:
    from tests.bench import scaffold

    line = scaffold.command("bench-fleet", ["--agents", "5", "--dsn", "postgresql://u:pw@h/db"])
    assert line == "make bench-fleet ARGS='--agents 5 --dsn …'"
    assert "pw" not in scaffold.command("bench-fleet", ["--dsn=postgresql://u:pw@h/db"])
