"""How big the next backfill batch is: a pure rule over the last batch and what it saw.

Why adapt at all: a fixed batch size is right for one table on one server at one load only.
Small batches pay a round trip and a commit (a WAL flush) per few milliseconds of work, so a
backfill of a big table crawls; one huge UPDATE is fast but holds its row locks for seconds,
and every application write to those rows waits that long. What the application feels is how
long a batch holds its locks, so the rule sizes batches by **time**, like Spirit's chunker:

1. Aim every batch at `target` seconds (default 50 ms). The size that would have taken
   exactly that long is ``size * target / elapsed``.
2. A slow batch (``elapsed > target``) shrinks to that size **at once**: the next batch must
   not repeat the stall.
3. A fast batch grows towards it by at most ``MAX_GROWTH`` (2x) per batch: one lucky batch
   (cached pages, a `where` that matched few rows) must not make the next one enormous.
4. The batch blocked application sessions (they waited on its row locks when it was about
   to commit): aim at half the target and never grow. Those waits are the application's
   latency, and they last as long as the batch.
5. Replication lags more than `max_lag` seconds: halve the size and sleep for the excess
   (at most ``MAX_LAG_SLEEP``), so standbys catch up before more WAL is written.
6. Always between `min_batch` and `max_batch` rows.

``pacing="fixed"`` turns all of it off: every batch has `batch_size` rows (the signals are
still read and reported). The clock and the signals are measured by `coordinator.backfill`;
this module only decides, so it is tested without a database.
"""

from __future__ import annotations

import dataclasses

from statemachine.migration import Backfill

#: Largest factor a batch grows by after a fast one.
MAX_GROWTH = 2.0
#: Longest sleep for replication lag before the next batch (the lag is read again after it).
MAX_LAG_SLEEP = 5.0
#: A batch faster than this is measured as this fast (no division by zero, no absurd jumps).
_SHORTEST = 0.0005


@dataclasses.dataclass(frozen=True)
class PacingPolicy:
    """The knobs of the rule (module docstring), from a `Backfill`'s options."""

    start: int
    target: float = 0.05
    min_batch: int = 100
    max_batch: int = 50_000
    max_lag: float = 1.0
    adaptive: bool = True

    @classmethod
    def of(cls, backfill: Backfill) -> PacingPolicy:
        return cls(
            start=backfill.batch_size,
            target=backfill.target_seconds,
            min_batch=backfill.smallest_batch,
            max_batch=backfill.largest_batch,
            max_lag=backfill.max_lag,
            adaptive=backfill.pacing == "adaptive",
        )


@dataclasses.dataclass(frozen=True)
class BatchSignals:
    """What the application felt from the last batch, read just before it committed.

    `blocked_sessions`: sessions waiting for a lock the batch's transaction held.
    `replication_lag`: the largest replay lag of a standby in seconds (None: no standby).
    """

    blocked_sessions: int = 0
    replication_lag: float | None = None


@dataclasses.dataclass(frozen=True)
class Pace:
    """The next batch's size, the sleep before it, and why (for progress messages)."""

    size: int
    sleep: float
    why: str


def next_pace(policy: PacingPolicy, size: int, elapsed: float, signals: BatchSignals) -> Pace:
    """Size the next batch after one of `size` rows took `elapsed` seconds (module docstring)."""
    if not policy.adaptive:
        return Pace(policy.start, 0.0, "fixed")
    elapsed = max(elapsed, _SHORTEST)
    target = policy.target
    blocking = signals.blocked_sessions > 0
    if blocking:
        target /= 2
    fitting = size * target / elapsed
    if elapsed > target:
        why = "blocking the application" if blocking else "slow"
        wanted = fitting
    elif blocking:
        why, wanted = "blocking the application", min(fitting, size)
    else:
        why, wanted = "fast", min(fitting, size * MAX_GROWTH)
    sleep = 0.0
    lag = signals.replication_lag
    if lag is not None and lag > policy.max_lag:
        why = f"replication lag {lag:.1f} s"
        wanted = min(wanted, size / 2)
        sleep = min(lag - policy.max_lag, MAX_LAG_SLEEP)
    bounded = max(policy.min_batch, min(policy.max_batch, int(wanted)))
    return Pace(bounded, sleep, why)


__all__ = ["MAX_GROWTH", "MAX_LAG_SLEEP", "BatchSignals", "Pace", "PacingPolicy", "next_pace"]
