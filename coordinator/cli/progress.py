"""Live progress for `lockstep apply`: acks and backfills as bars on a terminal, sparse lines
when piped.

Why: a backfill of 300,000 rows in batches of 1,000 is 300 events, and an acked phase on a
big fleet is one event per agent; a line each buries what matters. On a terminal each gets
one bar that updates in place (transient: gone once the phase or backfill ends, so the
scrollback keeps only the one-line outcomes). Piped into a log, a backfill prints one
timestamped line at most every `PIPED_INTERVAL` seconds; acks print as they always did.
"""

from __future__ import annotations

import math
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

from coordinator.backfill import BackfillProgress
from coordinator.cli.output import Output, safe
from coordinator.events import AnswerReceived, Event, MigrationFinished, PhaseStarted

#: Seconds between two backfill lines when the output is not a terminal.
PIPED_INTERVAL = 5.0


class LiveProgress:
    """Feed it every coordinator event; it shows bars only where bars make sense."""

    def __init__(self, out: Output) -> None:
        self.out = out
        self.live = out.console.is_terminal and not out.json_mode and out.verbosity >= 0
        self.bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=out.console,
            transient=True,
        )
        self._acks: TaskID | None = None
        self._backfills: dict[str, TaskID] = {}
        self._last_line = -math.inf  # the first batch is always shown

    def __enter__(self) -> LiveProgress:
        if self.live:
            self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.bars.stop()

    @property
    def shows_acks(self) -> bool:
        """True when ack answers go to a bar instead of lines."""
        return self.live

    def __call__(self, event: Event) -> None:
        if isinstance(event, PhaseStarted):
            self._end_acks()
            if self.live and event.ack_required and event.cohort:
                self._acks = self.bars.add_task(f"{event.phase.name} acks", total=len(event.cohort))
        elif isinstance(event, AnswerReceived) and self._acks is not None:
            self.bars.advance(self._acks)
        elif isinstance(event, BackfillProgress):
            self._backfill(event)
        elif isinstance(event, MigrationFinished):
            self._end_acks()
            for task in self._backfills.values():
                self.bars.remove_task(task)
            self._backfills.clear()

    def _end_acks(self) -> None:
        if self._acks is not None:
            self.bars.remove_task(self._acks)
            self._acks = None

    def _backfill(self, event: BackfillProgress) -> None:
        text = f"backfill {safe(event.table)}: {event.rows} rows in {event.batches} batches"
        if self.live:
            task = self._backfills.get(event.table)
            if task is None:
                task = self._backfills[event.table] = self.bars.add_task(text, total=None)
            self.bars.update(task, description=text, completed=event.rows)
            return
        now = time.monotonic()
        if now - self._last_line >= PIPED_INTERVAL:
            self._last_line = now
            self.out.event(f"  {text}")
