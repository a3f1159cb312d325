"""How many connections may be in their handshake at once, globally and per source address.

A connection is *pending* from the moment it is accepted until its `hello` is accepted (or it
closes). Pending connections are the only ones an outsider can open without a credential, so
they are what a flood fills: `Admission` caps them (`ConnectionLimits`) and the excess is
refused at once, before a byte is read, so an attacker can never make the coordinator hold
more than `max_pending` descriptors on its behalf. Joined agents are not counted: the fleet's
size is the operator's business.
"""

from __future__ import annotations

import dataclasses
from collections import Counter


@dataclasses.dataclass(frozen=True)
class ConnectionLimits:
    """The per-client bounds of the coordinator's server (stated in docs/protocol.md).

    `upgrade_timeout` bounds the TCP and TLS setup plus the WebSocket upgrade (trio-websocket
    would wait 60 s); the `hello` then has the coordinator's `handshake_timeout`.
    `max_message_bytes` is trio-websocket's frame limit (close 1009 above it); frames between
    `MAX_FRAME_BYTES` and it get a precise `frame_too_large` error instead.
    """

    max_pending: int = 256
    max_pending_per_address: int = 32
    upgrade_timeout: float = 5.0
    max_message_bytes: int = 128 * 1024

    def __post_init__(self) -> None:
        if self.max_pending < 1 or self.max_pending_per_address < 1:
            raise ValueError("connection limits must be >= 1")
        if not self.upgrade_timeout > 0:
            raise ValueError(f"upgrade_timeout must be > 0, got {self.upgrade_timeout}")


class Ticket:
    """One admitted pending connection; `release` (idempotent) frees its place."""

    def __init__(self, admission: Admission, address: str) -> None:
        self._admission = admission
        self.address = address
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._admission._release(self.address)


class Admission:
    """Counts pending connections; `admit` returns a `Ticket`, or None when over a limit."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self._by_address: Counter[str] = Counter()
        self.pending = 0
        #: Connections refused because a limit was reached, since the server started.
        self.refused = 0

    def admit(self, address: str) -> Ticket | None:
        if (
            self.pending >= self.limits.max_pending
            or self._by_address[address] >= self.limits.max_pending_per_address
        ):
            self.refused += 1
            return None
        self.pending += 1
        self._by_address[address] += 1
        return Ticket(self, address)

    def _release(self, address: str) -> None:
        self.pending -= 1
        self._by_address[address] -= 1
        if self._by_address[address] <= 0:
            del self._by_address[address]


__all__ = ["Admission", "ConnectionLimits", "Ticket"]
