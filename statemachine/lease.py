"""Lease arithmetic: how long an agent may vouch for its schema, and when it is certainly gone.

Pure: no I/O, every clock is passed in. The agent and the coordinator count the same lease from
two different instants, and the safety of CONTRACT rests on the order of those instants (see
docs/leases.md for the whole argument):

- the agent counts from the moment it *sent* the request that got granted (its hello, or a
  `Renew`), so its lease ends no later than `sent + seconds` on its own clock;
- the coordinator counts from the moment it *granted* it, which is after the agent sent it,
  and only declares the agent gone at `granted + seconds * SKEW_FACTOR + SKEW_MARGIN`.

So, as long as the two clocks' rates differ by less than 10 % over a lease (and the margin
covers a scheduling hiccup of the agent's fence check), the agent has fenced itself strictly
before the coordinator counts it gone. No wall clocks are compared across machines.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from typing import Final

#: Default lease length (seconds): long enough that a busy event loop or a GC pause never
#: fences a healthy agent (renewals go every 5 s), short enough that a dead agent holds a
#: migration for under 18 s, well inside the default 30 s ack timeout.
DEFAULT_LEASE_SECONDS: Final = 15.0
#: Shortest lease accepted: renewals every lease/3 must stay well above a round trip.
MIN_LEASE_SECONDS: Final = 0.3
#: The coordinator stretches the lease by this factor (clock-rate drift) ...
SKEW_FACTOR: Final = 1.1
#: ... and adds this margin (seconds) before it counts an agent certainly gone.
SKEW_MARGIN: Final = 1.0


def check_lease_seconds(seconds: float) -> float:
    """`seconds` as a lease length; `ValueError` with a plain reason otherwise."""
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        raise ValueError(f"lease must be a number of seconds, got {seconds!r}")
    if not math.isfinite(seconds) or seconds < MIN_LEASE_SECONDS:
        raise ValueError(f"lease must be at least {MIN_LEASE_SECONDS:g} s, got {seconds!r}")
    return float(seconds)


def renew_interval(seconds: float) -> float:
    """How often an agent renews: three chances per lease before it lapses."""
    return seconds / 3


def certainly_expired_after(seconds: float) -> float:
    """Seconds after a grant at which the coordinator counts the holder certainly gone."""
    return seconds * SKEW_FACTOR + SKEW_MARGIN


class AgentLease:
    """The agent's side: until when it may vouch for its schema, on its own clock.

    `seconds == 0` means the coordinator grants no leases (one that predates them): the
    lease is then "valid while connected", which the agent decides, not this class.
    """

    __slots__ = ("_pending", "_seq", "seconds", "valid_until")

    def __init__(self) -> None:
        self.seconds = 0.0
        self.valid_until = -math.inf
        self._seq = 0
        #: Renew requests in flight: sequence number -> when the agent sent it.
        self._pending: dict[int, float] = {}

    def welcomed(self, seconds: float, hello_sent_at: float) -> None:
        """A Welcome is the first grant: counted from when the hello was sent."""
        self.seconds = max(0.0, seconds)
        self._pending.clear()
        self.valid_until = hello_sent_at + self.seconds if self.seconds else -math.inf

    def request(self, now: float) -> int:
        """A renew request is about to be sent at `now`: its sequence number."""
        self._seq += 1
        self._pending[self._seq] = now
        return self._seq

    def granted(self, seq: int, seconds: float) -> bool:
        """The coordinator granted request `seq`; False for a grant nobody asked for."""
        sent_at = self._pending.get(seq)
        if sent_at is None:
            return False
        for old in [s for s in self._pending if s <= seq]:
            del self._pending[old]
        self.seconds = max(0.0, seconds)
        self.valid_until = max(self.valid_until, sent_at + self.seconds)
        return True

    def valid(self, now: float) -> bool:
        return now < self.valid_until

    def lapse(self) -> None:
        """Forget the lease (the link dropped and the agent gave up on it)."""
        self.valid_until = -math.inf
        self._pending.clear()


class LeaseTable:
    """The coordinator's side: when each agent's lease certainly expires, fleet-wide.

    One heap of deadlines (lazy deletion: a renewed agent's old entry is skipped when it
    surfaces), so a single sweeper task serves any number of agents: renewing is O(log n)
    and nothing wakes up per agent.
    """

    def __init__(self, seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        self.seconds = check_lease_seconds(seconds)
        self._deadline: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def __contains__(self, agent_id: object) -> bool:
        return agent_id in self._deadline

    def __len__(self) -> int:
        return len(self._deadline)

    @property
    def holders(self) -> frozenset[str]:
        return frozenset(self._deadline)

    def deadline(self, agent_id: str) -> float | None:
        return self._deadline.get(agent_id)

    def grant(self, agent_id: str, now: float) -> float:
        """A (re)grant at `now`; returns when the lease certainly expires."""
        return self.hold(agent_id, now + certainly_expired_after(self.seconds))

    def hold(self, agent_id: str, until: float) -> float:
        """Keep `agent_id` counted as possibly alive until at least `until` (a lease this
        coordinator cannot account for, such as one a previous leader granted)."""
        until = max(until, self._deadline.get(agent_id, -math.inf))
        self._deadline[agent_id] = until
        heapq.heappush(self._heap, (until, agent_id))
        return until

    def hold_all(self, agents: Iterable[str], until: float) -> None:
        for agent_id in agents:
            self.hold(agent_id, until)

    def holds(self, agent_id: str, now: float) -> bool:
        """The agent's lease has not certainly expired at `now`."""
        deadline = self._deadline.get(agent_id)
        return deadline is not None and now < deadline

    def release(self, agent_id: str) -> None:
        """Forget the agent (it is fenced for sure: it said so, or was declared gone)."""
        self._deadline.pop(agent_id, None)

    def next_deadline(self) -> float | None:
        """The earliest live deadline, or None when nobody holds a lease."""
        heap = self._heap
        while heap and self._deadline.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)  # superseded by a renewal, or released
        return heap[0][0] if heap else None

    def pop_expired(self, now: float) -> list[str]:
        """Agents whose lease certainly expired by `now`, removed from the table."""
        expired = []
        while (deadline := self.next_deadline()) is not None and deadline <= now:
            _, agent_id = heapq.heappop(self._heap)
            del self._deadline[agent_id]
            expired.append(agent_id)
        return expired


__all__ = [
    "DEFAULT_LEASE_SECONDS",
    "MIN_LEASE_SECONDS",
    "SKEW_FACTOR",
    "SKEW_MARGIN",
    "AgentLease",
    "LeaseTable",
    "certainly_expired_after",
    "check_lease_seconds",
    "renew_interval",
]
