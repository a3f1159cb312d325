"""statemachine.lease: the agent fences strictly before the coordinator counts it gone.

Plain calls with explicit clock values; no sleeping, no wall clock.
"""

from __future__ import annotations

import math

import pytest

from statemachine.lease import (
    DEFAULT_LEASE_SECONDS,
    SKEW_FACTOR,
    SKEW_MARGIN,
    AgentLease,
    LeaseTable,
    certainly_expired_after,
    check_lease_seconds,
    renew_interval,
)


def test_numbers() -> None:
    assert 15 <= DEFAULT_LEASE_SECONDS <= 45
    assert renew_interval(15.0) == 5.0
    assert certainly_expired_after(15.0) == pytest.approx(15 * SKEW_FACTOR + SKEW_MARGIN)
    # A dead agent holds a phase for less than the default 30 s ack timeout.
    assert certainly_expired_after(DEFAULT_LEASE_SECONDS) < 30.0


@pytest.mark.parametrize("bad", [0, -1, 0.1, math.inf, math.nan, "15", True])
def test_bad_lease_lengths_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="lease must be"):
        check_lease_seconds(bad)  # type: ignore[arg-type]


def test_agent_counts_from_the_hello_it_sent() -> None:
    lease = AgentLease()
    assert not lease.valid(0.0), "nothing granted yet"
    lease.welcomed(10.0, hello_sent_at=100.0)
    assert lease.valid(109.9)
    assert not lease.valid(110.0)


def test_a_coordinator_without_leases_grants_nothing() -> None:
    lease = AgentLease()
    lease.welcomed(0.0, hello_sent_at=100.0)
    assert lease.seconds == 0 and not lease.valid(100.0)


def test_renewal_counts_from_when_the_request_was_sent() -> None:
    lease = AgentLease()
    lease.welcomed(10.0, hello_sent_at=0.0)
    first = lease.request(3.0)
    second = lease.request(6.0)
    # The grant of the first request arrives late (at 8.0): it counts from 3.0, not 8.0.
    assert lease.granted(first, 10.0)
    assert lease.valid_until == 13.0
    assert lease.granted(second, 10.0)
    assert lease.valid_until == 16.0
    assert not lease.granted(first, 10.0), "answered already"
    assert not lease.granted(99, 10.0), "never asked"
    assert lease.valid_until == 16.0


def test_a_stale_grant_never_shortens_the_lease() -> None:
    lease = AgentLease()
    lease.welcomed(10.0, hello_sent_at=0.0)
    old = lease.request(1.0)
    new = lease.request(5.0)
    assert lease.granted(new, 10.0)
    assert not lease.granted(old, 10.0), "a grant of an older request is dropped"
    assert lease.valid_until == 15.0


def test_lapse_forgets_the_lease() -> None:
    lease = AgentLease()
    lease.welcomed(10.0, hello_sent_at=0.0)
    seq = lease.request(1.0)
    lease.lapse()
    assert not lease.valid(0.5)
    assert not lease.granted(seq, 10.0)


@pytest.mark.parametrize("lease_seconds", [0.5, 2.0, 15.0, 45.0])
@pytest.mark.parametrize("delay", [0.0, 0.3, 5.0])
def test_the_agent_fences_before_the_coordinator_counts_it_gone(
    lease_seconds: float, delay: float
) -> None:
    """The safety order: whatever the network delay, and with the agent's clock running up
    to 9 % slower than the coordinator's, the agent's lease ends (on the coordinator's time
    axis) before the coordinator's certain-expiry deadline."""
    sent = 1000.0
    granted = sent + delay  # the coordinator grants after the agent sent
    agent = AgentLease()
    agent.welcomed(lease_seconds, hello_sent_at=sent)
    table = LeaseTable(lease_seconds)
    deadline = table.grant("a", granted)
    agent_end_local = agent.valid_until - sent  # seconds of the agent's clock
    slow = 1.09  # the agent's clock runs slow: its seconds last longer in real time
    assert sent + agent_end_local * slow < deadline


def test_table_expires_in_deadline_order_and_renewals_postpone() -> None:
    table = LeaseTable(10.0)
    table.grant("a", 0.0)
    table.grant("b", 1.0)
    table.grant("a", 5.0)  # renewed: its old entry must not expire it
    expiry = certainly_expired_after(10.0)
    assert table.next_deadline() == pytest.approx(1.0 + expiry)
    assert table.pop_expired(0.0 + expiry) == []
    assert table.pop_expired(1.0 + expiry) == ["b"]
    assert table.holds("a", 1.0 + expiry)
    assert table.pop_expired(5.0 + expiry) == ["a"]
    assert table.next_deadline() is None
    assert len(table) == 0


def test_hold_keeps_unaccounted_agents_until_a_deadline() -> None:
    table = LeaseTable(10.0)
    table.grant("a", 0.0)
    table.hold_all(["a", "z"], 100.0)
    assert table.deadline("a") == 100.0 and table.deadline("z") == 100.0
    table.hold("a", 50.0)
    assert table.deadline("a") == 100.0, "a hold never shortens a lease"
    table.release("z")
    assert "z" not in table
    assert table.pop_expired(100.0) == ["a"]
    assert not table.holds("a", 0.0)
