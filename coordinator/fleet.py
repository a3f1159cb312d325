"""The registry of connected agents and the one place frames are fanned out to them.

Each connection gets a bounded outbox drained by its own sender task, so a broadcast is a loop of
non-blocking puts of one already-encoded frame: O(fleet) with no awaits, and one slow or stuck
agent can never delay the others. An agent whose outbox overflows is disconnected (it would miss
phase notices otherwise) and, if it owed an ack, that counts as a disconnect.

The fleet also holds every agent's lease (`statemachine.lease.LeaseTable`): an agent that
disconnected stays *departing* until its lease certainly expired, because until then it may
still serve on the schema it knew. One sweeper task (`sweep_leases`) declares expiries for the
whole fleet, whatever its size; nothing runs per connection.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

import trio

from statemachine.exceptions import LockstepError
from statemachine.lease import DEFAULT_LEASE_SECONDS, LeaseTable, certainly_expired_after

log = logging.getLogger("lockstep.coordinator")

OUTBOX_SIZE = 64


class Outbox(Protocol):
    """Where an agent's frames are queued: its connection's bounded channel, or, for an
    agent of a relaying replica, that relay's link (`coordinator.relay`). `send_nowait`
    raises `trio.WouldBlock` when full, `trio.BrokenResourceError` when gone."""

    def send_nowait(self, value: str) -> None: ...


@dataclasses.dataclass(eq=False)
class AgentLink:
    """One connected agent as the fleet sees it."""

    agent_id: str
    remote: str
    connected_at: float
    outbox: Outbox
    #: Set when the coordinator wants this connection closed (slow consumer, shutdown).
    kick: trio.Event = dataclasses.field(default_factory=trio.Event)
    kick_reason: str = ""
    #: The WebSocket close code the kick ends with (1008: policy violation, a slow reader).
    kick_code: int = 1008
    #: Bad frames received in a row (reset by an answer that counted); see connection.py.
    bad_frames: int = 0
    #: Whether this connection was granted a lease yet (`Fleet.grant`).
    leased: bool = False

    def close(self, reason: str, *, code: int = 1008) -> None:
        if not self.kick.is_set():
            self.kick_reason = reason
            self.kick_code = code
            self.kick.set()


@dataclasses.dataclass
class LeaseCounts:
    """Running totals of the fleet's lease traffic, for `/metrics`.

    Why: at fleet scale the renewals are the coordinator's whole idle cost, and leases that
    expire while their agents look connected are how an overloaded coordinator (or a
    partition) shows before agents are lost; an operator needs both as rates.
    """

    #: Renewals granted (not counting the Welcome's first grant).
    renewed: int = 0
    #: Renewals refused: the lease had certainly expired or was released.
    refused: int = 0
    #: Leases the sweeper counted certainly expired while the agent looked connected (it
    #: then closed the link): a partition, or renewals the coordinator read too late.
    expired_while_connected: int = 0


class DuplicateAgent(LockstepError):
    """Raised by `Fleet.add` when an agent with that id is already connected (the newcomer is
    refused with close code 4009; the connected one keeps its place)."""


class Fleet:
    def __init__(self, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        self._links: dict[str, AgentLink] = {}
        #: Agents whose connection ends after a `Release` (taken by `Coordinator.agent_left`).
        self.released: set[str] = set()
        self._changed = trio.Event()
        self.leases = LeaseTable(lease_seconds)
        self._lease_added = trio.Event()
        #: Until when (trio clock) leases this coordinator cannot account for may be valid:
        #: a previous leader's agents that have not come back. Destructive SQL waits for it.
        self.unaccounted_until = -math.inf
        self.lease_counts = LeaseCounts()

    @property
    def lease_seconds(self) -> float:
        return self.leases.seconds

    @property
    def departing(self) -> frozenset[str]:
        """Agents not connected whose lease has not certainly expired yet."""
        return self.leases.holders - self._links.keys()

    def grant(self, agent_id: str) -> bool:
        """Grant (or renew) `agent_id`'s lease now; False if it certainly expired already
        or was released (it was declared gone: its connection is being closed, it must
        reconnect).

        A connection's first grant (its Welcome's, or, for a relay's agent welcomed before
        the relay may grant, its first renewal's) is always a fresh lease. Otherwise a
        reconnect landing after the previous connection's lease certainly expired, but
        before the sweeper popped it, would get a Welcome the coordinator does not count,
        then be declared gone while the agent serves."""
        now = trio.current_time()
        link = self._links.get(agent_id)
        if link is not None and not link.leased:
            link.leased = True
            self.leases.grant(agent_id, now)
            self._lease_added.set()
            return True
        if not self.leases.holds(agent_id, now):
            # Leased before and not in the table now: released, or declared gone by the
            # sweeper, whose close of the link may not have taken effect yet. A grant now
            # would revive, on the agent, a lease the coordinator already counted out (it
            # may be running CONTRACT): the agent waits out its late-grant window and
            # reconnects instead.
            self.lease_counts.refused += 1
            return False
        self.leases.grant(agent_id, now)
        self.lease_counts.renewed += 1
        return True

    def release(self, agent_id: str) -> None:
        """`agent_id` said it stopped serving (`Release`): its lease is over now."""
        self.leases.release(agent_id)
        self.released.add(agent_id)

    def hold_unaccounted(self, agents: Iterable[str], *, margin: float = 0.0) -> float:
        """A new leader took over: leases granted by its predecessor (to `agents` and to
        anyone else) may be valid for one more whole lease. Returns the trio time until
        which destructive SQL must wait."""
        until = trio.current_time() + certainly_expired_after(self.lease_seconds) + margin
        self.unaccounted_until = max(self.unaccounted_until, until)
        self.leases.hold_all(agents, until)
        self._lease_added.set()
        return self.unaccounted_until

    async def wait_unaccounted(self) -> None:
        """Return once no lease this coordinator cannot account for may still be valid."""
        await trio.sleep_until(self.unaccounted_until)

    async def sweep_leases(self, expired: Callable[[str], None]) -> None:
        """Forever: declare each lease that certainly expired (`expired(agent_id)`), and
        close the connection of an agent that stopped renewing while it looked connected
        (a partition). One task for the whole fleet: it sleeps until the earliest deadline."""
        while True:
            self._lease_added = trio.Event()
            deadline = self.leases.next_deadline()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await self._lease_added.wait()
            for agent_id in self.leases.pop_expired(trio.current_time()):
                link = self._links.get(agent_id)
                if link is not None:
                    self.lease_counts.expired_while_connected += 1
                    log.warning("agent %s: lease expired while connected; closing", agent_id)
                    link.close("lease expired: no renewal", code=1001)
                expired(agent_id)

    def __len__(self) -> int:
        return len(self._links)

    def __contains__(self, agent_id: object) -> bool:
        return agent_id in self._links

    def __iter__(self) -> Iterator[AgentLink]:
        return iter(list(self._links.values()))

    @property
    def agent_ids(self) -> frozenset[str]:
        return frozenset(self._links)

    def link(self, agent_id: str) -> AgentLink | None:
        return self._links.get(agent_id)

    def add(self, link: AgentLink) -> None:
        if link.agent_id in self._links:
            raise DuplicateAgent(f"agent id {link.agent_id!r} is already connected")
        self._links[link.agent_id] = link
        self._notify()

    def remove(self, link: AgentLink) -> bool:
        """Forget `link` if it is still the registered one; returns whether it was."""
        if self._links.get(link.agent_id) is link:
            del self._links[link.agent_id]
            self._notify()
            return True
        return False

    def send(self, agent_id: str, frame: str) -> bool:
        link = self._links.get(agent_id)
        return link is not None and self._put(link, frame)

    def broadcast(self, frame: str, only: Iterable[str] | None = None) -> int:
        """Queue `frame` for every agent (or those in `only`); returns how many got it."""
        links: Iterable[AgentLink]
        if only is None:
            links = list(self._links.values())
        else:
            links = [link for a in only if (link := self._links.get(a)) is not None]
        return sum(1 for link in links if self._put(link, frame))

    def _put(self, link: AgentLink, frame: str) -> bool:
        try:
            link.outbox.send_nowait(frame)
        except trio.WouldBlock:
            log.warning("agent %s is not reading its frames; disconnecting it", link.agent_id)
            link.close("outbox overflow: the agent stopped reading")
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def wait_for(self, count: int) -> None:
        """Return once at least `count` agents are connected."""
        while len(self._links) < count:
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
