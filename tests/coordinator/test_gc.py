"""The collector settings a migration runs under (`coordinator.core.tuned_gc`) are undone.

While a migration runs, the heap is frozen and young collections are rarer (the collector was
the largest single cost at fleet scale); afterwards everything must be as before, or garbage
from before the migration could never be collected again.
"""

from __future__ import annotations

import gc

import pytest

from coordinator.core import ROUND_GC_THRESHOLD, tuned_gc


def test_tuned_gc_freezes_and_raises_the_threshold_then_undoes_both() -> None:
    before = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    with tuned_gc():
        assert gc.get_freeze_count() > 0, "the heap alive at the start is frozen"
        assert gc.get_threshold()[0] == max(before[0], ROUND_GC_THRESHOLD)
        assert gc.get_threshold()[1:] == before[1:]
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_tuned_gc_undoes_both_when_the_migration_raises() -> None:
    before = gc.get_threshold()
    with pytest.raises(RuntimeError), tuned_gc():
        raise RuntimeError("the run failed")
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
