"""The collector hold a migration runs under (`coordinator.core.CollectorHold`).

While a migration (and its CONFIRM answers) runs, the heap is frozen and automatic collection
is off: the collector was the largest single cost at fleet scale. Afterwards collection must
be back on, the heap unfrozen once an agent left (its connection's cyclic garbage could never
be collected otherwise) but kept frozen while the fleet is unchanged, and a stale release
(a timer from an earlier migration) must not end a newer hold.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from agent import open_agent
from coordinator import open_coordinator
from coordinator.core import CollectorHold, Coordinator
from coordinator.executor import PostgresExecutor
from statemachine import Migration, MigrationStatus
from tests.support.flow import make_users, until


@pytest.fixture(autouse=True)
def collector() -> Iterator[None]:
    """A migration run by an earlier test may have left the heap frozen (on purpose)."""
    gc.unfreeze()
    gc.enable()
    yield
    gc.unfreeze()
    gc.enable()


def test_a_hold_freezes_and_disables_then_the_release_enables_again() -> None:
    hold = CollectorHold()
    token = hold.hold()
    assert gc.get_freeze_count() > 0, "the heap alive at the start is frozen"
    assert not gc.isenabled()
    hold.release(unfreeze=False, token=token)
    assert gc.isenabled()
    assert gc.get_freeze_count() > 0, "kept frozen: no full traversal after"
    hold.hold()
    hold.release(unfreeze=True)
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_a_stale_release_does_not_end_a_newer_hold() -> None:
    hold = CollectorHold()
    first = hold.hold()
    hold.hold()  # the next migration began before the first one's timer fired
    hold.release(unfreeze=False, token=first)
    assert not gc.isenabled(), "the newer hold is still on"
    hold.release(unfreeze=False)
    assert gc.isenabled()


def test_a_hold_keeps_a_collector_the_host_disabled_disabled() -> None:
    gc.disable()
    hold = CollectorHold()
    hold.release(unfreeze=False, token=hold.hold())
    assert not gc.isenabled()


def test_the_heap_is_released_after_an_agent_left() -> None:
    coord = Coordinator(executor=PostgresExecutor("postgresql://unused"))
    assert coord._release_heap() is False
    coord.agent_left("a1")
    assert coord._release_heap() is True
    assert coord._release_heap() is False, "counted since the last freeze only"


async def test_collection_resumes_once_every_agent_confirmed(dsn: str) -> None:
    make_users(dsn)
    async with (
        open_coordinator(dsn, ack_timeout=60) as coord,
        open_agent(coord.url, agent_id="a1"),
        open_agent(coord.url, agent_id="a2"),
    ):
        await coord.wait_for_agents(2, timeout=10)
        result = await coord.run_migration(
            Migration("add_email", ["ALTER TABLE users ADD COLUMN email text"])
        )
        assert result.status is MigrationStatus.COMPLETED, result.reason
        # Far sooner than ack_timeout: the last CONFIRM ack ends the hold.
        await until(gc.isenabled, timeout=10)
        assert not coord.collector.held
    assert gc.isenabled()
