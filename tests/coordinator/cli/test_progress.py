"""apply's live progress: one bar per acked phase and per backfill on a terminal, sparse lines
in a log, instead of a line per batch."""

from __future__ import annotations

import io

from rich.console import Console

from coordinator.backfill import BackfillProgress
from coordinator.cli import progress as progress_module
from coordinator.cli.output import Output
from coordinator.cli.progress import LiveProgress
from coordinator.events import AnswerReceived, MigrationFinished, PhaseStarted
from statemachine import AckOutcome, MigrationStatus, Phase


def _batch(rows: int) -> BackfillProgress:
    return BackfillProgress(
        "m", Phase.EXECUTE, "batch", table="users", batches=rows // 10, rows=rows
    )


def _output(terminal: bool) -> tuple[Output, io.StringIO]:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=terminal, width=100)
    return Output(out=console), buffer


def test_piped_backfill_prints_one_line_per_interval_not_per_batch(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    clock = iter([0.0, 1.0, 2.0, 6.0, 7.0])
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    out, buffer = _output(terminal=False)
    with LiveProgress(out) as live:
        assert not live.shows_acks
        for rows in (10, 20, 30, 40, 50):
            live(_batch(rows))
    lines = buffer.getvalue().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == [
        "  backfill users: 10 rows in 1 batches",
        "  backfill users: 40 rows in 4 batches",
    ]


def test_terminal_shows_bars_that_follow_acks_and_rows() -> None:
    out, _ = _output(terminal=True)
    with LiveProgress(out) as live:
        live(PhaseStarted("m", Phase.APPLY, ("a1", "a2"), True))
        live(AnswerReceived("m", "a1", Phase.APPLY, True, AckOutcome.RECORDED))
        [acks] = live.bars.tasks
        assert (acks.description, acks.completed, acks.total) == ("APPLY acks", 1, 2)
        live(_batch(300))
        backfill = live.bars.tasks[-1]
        assert backfill.completed == 300 and "300 rows" in backfill.description
        live(MigrationFinished("m", MigrationStatus.COMPLETED, None))
        assert live.bars.tasks == []
