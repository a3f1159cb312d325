"""`Fleet`'s lease bookkeeping at the edges a sweeper tick leaves open."""

from __future__ import annotations

import trio
import trio.testing

from coordinator.fleet import AgentLink, Fleet, LeaseCounts
from statemachine.lease import certainly_expired_after

LEASE = 1.0


def _link(fleet: Fleet, agent_id: str) -> AgentLink:
    send, _ = trio.open_memory_channel[str](4)
    link = AgentLink(agent_id, "127.0.0.1:1", 0.0, send)
    fleet.add(link)
    return link


async def test_a_reconnect_after_an_unswept_expiry_gets_a_counted_lease(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The previous connection's lease certainly expired, and the sweeper has not popped it
    yet, when the agent connects again: its Welcome must be a lease the coordinator counts
    (else it is declared gone while it serves on what the Welcome said), and a renewal of
    it is granted."""
    fleet = Fleet(LEASE)
    first = _link(fleet, "a")
    assert fleet.grant("a")
    fleet.remove(first)  # the connection closed: departing
    await trio.sleep(certainly_expired_after(LEASE) + 0.1)  # no sweeper runs here
    assert not fleet.grant("a"), "a renewal after the certain expiry is refused"
    _link(fleet, "a")
    assert fleet.grant("a")
    now = trio.current_time()
    assert fleet.leases.holds("a", now)
    assert fleet.leases.pop_expired(now) == []
    assert fleet.grant("a")


async def test_a_renewal_read_after_the_sweep_is_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The sweeper declared the agent gone and asked its link to close, and a renewal
    already read from that link arrives before the close took effect: granting it would
    make the agent's lease valid again after the coordinator counted it out."""
    fleet = Fleet(LEASE)
    _link(fleet, "a")
    assert fleet.grant("a")
    gone: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fleet.sweep_leases, gone.append)
        await trio.sleep(certainly_expired_after(LEASE) + 0.1)
        nursery.cancel_scope.cancel()
    assert gone == ["a"]
    assert "a" in fleet, "the link is still registered: its close is under way"
    assert not fleet.grant("a")
    assert "a" not in fleet.leases
    assert fleet.lease_counts == LeaseCounts(renewed=0, refused=1, expired_while_connected=1)


async def test_a_renewal_after_a_release_is_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fleet = Fleet(LEASE)
    _link(fleet, "a")
    assert fleet.grant("a")
    fleet.release("a")
    assert not fleet.grant("a"), "the agent said it stopped serving: nothing to renew"


async def test_a_link_never_leased_is_leased_by_its_first_renewal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A relay's agent is welcomed before the relay may grant (its Welcome comes from the
    leader): its first renewal is its first grant. Once leased and released, never again."""
    fleet = Fleet(LEASE)
    _link(fleet, "a")
    assert fleet.grant("a")
    assert fleet.leases.holds("a", trio.current_time())
    fleet.release("a")
    assert not fleet.grant("a")
