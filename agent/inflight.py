"""Which schema version the app's in-flight work uses, so a switch waits for old work to end.

`agent.is_applied(name)` alone leaves a gap: a request reads False, is descheduled, the fleet
acks APPLY, CONTRACT drops the old column, and the request then sends its old query. Wrapping
each unit of work in `agent.using(name)` closes it: the agent acks APPLY only once no work that
chose the old query set is still running, and acks ROLLBACK only once no work on the new set is
(F1's schema leases, per request). The counts are guarded by a thread lock because threaded
apps enter `using` from their own threads.

The trio and the asyncio agents share this counter: `when_drained` takes a thread-safe
wake-up callback, and each event loop supplies its own (`drained` is the trio one).
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Callable, Iterator

import trio

Version = tuple[str, bool]  # (migration name, applied?)


class InFlight:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: collections.Counter[Version] = collections.Counter()
        self._waiters: dict[Version, list[Callable[[], None]]] = {}
        #: Set by `close`: what `using` raises from then on (the agent is stopping).
        self._refusal: Callable[[], BaseException] | None = None
        self._idle_waiters: list[Callable[[], None]] = []

    def close(self, refusal: Callable[[], BaseException]) -> None:
        """Refuse new work from now on: `using` raises ``refusal()``. Checked under the same
        lock that counts work in, so after this returns no new block can start unseen."""
        with self._lock:
            self._refusal = refusal

    def when_idle(self, wake: Callable[[], None]) -> bool:
        """Call `wake` (from any thread) once nothing at all is in flight.

        Returns False, without registering `wake`, when nothing is in flight now.
        """
        with self._lock:
            if not self._counts:
                return False
            self._idle_waiters.append(wake)
            return True

    def count(self, name: str, applied: bool) -> int:
        with self._lock:
            return self._counts[(name, applied)]

    @contextlib.contextmanager
    def using(self, name: str, is_applied: Callable[[str], bool]) -> Iterator[bool]:
        """Count the caller as in flight on the version it sees; yields whether it is new."""
        with self._lock:
            if self._refusal is not None:
                raise self._refusal()
            # Read and count atomically: a switch cannot slip between the two.
            version = (name, is_applied(name))
            self._counts[version] += 1
        try:
            yield version[1]
        finally:
            with self._lock:
                self._counts[version] -= 1
                waiters = []
                if self._counts[version] <= 0:
                    del self._counts[version]
                    waiters = self._waiters.pop(version, [])
                    if not self._counts:
                        waiters += self._idle_waiters
                        self._idle_waiters = []
            for wake in waiters:
                wake()  # each is a thread-safe wake-up of its agent's event loop

    def when_drained(self, name: str, applied: bool, wake: Callable[[], None]) -> bool:
        """Call `wake` (from any thread) once no work on (`name`, `applied`) is in flight.

        Returns False, without registering `wake`, when nothing is in flight now.
        """
        version = (name, applied)
        with self._lock:
            if not self._counts[version]:
                return False
            self._waiters.setdefault(version, []).append(wake)
            return True

    async def drained(self, name: str, applied: bool) -> None:
        """Return once no work on (`name`, `applied`) is in flight. Call after the switch."""
        event = trio.Event()
        token = trio.lowlevel.current_trio_token()
        if self.when_drained(name, applied, lambda: token.run_sync_soon(event.set)):
            await event.wait()
