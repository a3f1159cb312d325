"""The collector settings a migration runs under (`coordinator.core.tuned_gc`) are undone.

While a migration runs, the heap is frozen and young collections are rarer (the collector was
the largest single cost at fleet scale); afterwards the thresholds must be as before, and the
heap unfrozen once an agent left (its connection's cyclic garbage could never be collected
otherwise), but kept frozen while the fleet is unchanged.
"""

from __future__ import annotations

import gc

import pytest

from coordinator.core import ROUND_GC_THRESHOLD, Coordinator, tuned_gc
from coordinator.executor import PostgresExecutor


@pytest.fixture(autouse=True)
def unfrozen() -> None:
    """A migration run by an earlier test may have left the heap frozen (on purpose)."""
    gc.unfreeze()


def test_tuned_gc_freezes_and_raises_the_threshold_then_undoes_both() -> None:
    before = gc.get_threshold()
    with tuned_gc():
        assert gc.get_freeze_count() > 0, "the heap alive at the start is frozen"
        assert gc.get_threshold()[0] == max(before[0], ROUND_GC_THRESHOLD)
        assert gc.get_threshold()[1:] == before[1:]
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_the_heap_stays_frozen_unless_released() -> None:
    before = gc.get_threshold()
    try:
        with tuned_gc(release=lambda: False):
            pass
        assert gc.get_freeze_count() > 0, "kept frozen: no full traversal after"
        assert gc.get_threshold() == before
    finally:
        gc.unfreeze()


def test_the_heap_is_released_after_an_agent_left() -> None:
    coord = Coordinator(executor=PostgresExecutor("postgresql://unused"))
    assert coord._release_heap() is False
    coord.agent_left("a1")
    assert coord._release_heap() is True
    assert coord._release_heap() is False, "counted since the last freeze only"


def test_tuned_gc_undoes_both_when_the_migration_raises() -> None:
    before = gc.get_threshold()
    with pytest.raises(RuntimeError), tuned_gc():
        raise RuntimeError("the run failed")
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
