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
5. Application commits got slow: a probe commit (a transaction that writes nothing but its
   commit record, so it takes what any application commit takes: a WAL flush) timed during
   the batch took more than ``COMMIT_SLOWDOWN`` times its time before the backfill started
   (and at least ``COMMIT_MARGIN`` more). A backfill writes WAL as fast as the server lets
   it, and every application commit must flush the WAL written before it, so on a disk that
   cannot keep up the application's writes stall behind the backfill. Never grow, and rest
   before the next batch for as long as the batch took times how far over the limit the
   probe was (at most ``MAX_REST`` times): while nothing is written the disk catches up.
6. Replication lags more than `max_lag` seconds: halve the size and sleep for the excess
   (at most ``MAX_LAG_SLEEP``), so standbys catch up before more WAL is written.
7. Always between `min_batch` and `max_batch` rows.

``pacing="fixed"`` turns all of it off: every batch has `batch_size` rows (the signals are
still read and reported). The clock and the signals are measured by `coordinator.backfill`;
this module only decides, so it is tested without a database.
"""

from __future__ import annotations

import dataclasses

from statemachine.migration import Backfill

#: Largest factor a batch grows by after a fast one.
MAX_GROWTH = 2.0
#: Application commits may take this many times their time before the backfill...
COMMIT_SLOWDOWN = 2.0
#: ... and at least this many seconds more, before the backfill rests.
COMMIT_MARGIN = 0.001
#: Longest rest after a batch that slowed commits, as a multiple of the batch's time.
MAX_REST = 4.0
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
    #: A probe commit's time before the backfill started (None: commits are not watched).
    commit_baseline: float | None = None

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
    `commit_seconds`: the median time of the probe commits made during the batch (None: the
    batch was too short for one, or commits are not watched).
    `wal_waits`: other client sessions waiting to write or flush WAL (or on a synchronous
    standby). Reported only: under write traffic application sessions wait on each other's
    WAL flushes all the time (group commit), so the count alone does not say whether the
    backfill made it worse; the probe commit's time does.
    """

    blocked_sessions: int = 0
    replication_lag: float | None = None
    commit_seconds: float | None = None
    wal_waits: int = 0


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
    over = commit_slowdown(policy, signals)
    if over > 1:
        why = f"commits {over:.1f}x over their limit"
        wanted = min(wanted, size)
        sleep = elapsed * min(over, MAX_REST)
    lag = signals.replication_lag
    if lag is not None and lag > policy.max_lag:
        why = f"replication lag {lag:.1f} s"
        wanted = min(wanted, size / 2)
        sleep = max(sleep, min(lag - policy.max_lag, MAX_LAG_SLEEP))
    bounded = max(policy.min_batch, min(policy.max_batch, int(wanted)))
    return Pace(bounded, sleep, why)


def commit_slowdown(policy: PacingPolicy, signals: BatchSignals) -> float:
    """How far the batch's probe commits were over their limit (above 1: too slow; 0: not
    watched). The limit is ``max(COMMIT_SLOWDOWN * baseline, baseline + COMMIT_MARGIN)``."""
    baseline, seen = policy.commit_baseline, signals.commit_seconds
    if baseline is None or seen is None:
        return 0.0
    return seen / max(COMMIT_SLOWDOWN * baseline, baseline + COMMIT_MARGIN)


__all__ = [
    "COMMIT_MARGIN",
    "COMMIT_SLOWDOWN",
    "MAX_GROWTH",
    "MAX_LAG_SLEEP",
    "MAX_REST",
    "BatchSignals",
    "Pace",
    "PacingPolicy",
    "commit_slowdown",
    "next_pace",
]
