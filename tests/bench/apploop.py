"""One application instance's database traffic: a tight query loop in a worker thread.

The loop stands for the application code of one instance. On every iteration it picks its
query set from `agent.is_applied(migration)` (old queries before the switch, new ones after)
and runs one query on its own autocommit psycopg connection, recording latency and any error.

Why the hooks do more than flip a flag: the agent marks a migration applied only *after*
`on_apply` returns, and acks right after that. A query the thread picked from the old set just
before the flip could still reach the server after CONTRACT dropped the old column. So
`on_apply` switches the loop to the new set itself and returns only when no old-set query is
in flight; `on_rollback` does the reverse. That is the contract a real application's hooks
must honour too (see docs/recipes.md, "Switching safely").
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import random
import threading
import time
from collections.abc import Sequence
from typing import Any

import psycopg
import trio

from agent.client import Agent, MigrationInfo
from tests.bench.recipes import ROWS

#: How often a hook re-checks whether the other query set is still in flight.
_DRAIN_POLL = 0.001

#: `application_name` of the loops' sessions, so `pg_stat_activity` can tell them apart.
APP_NAME = "lockstep-bench-app"


@dataclasses.dataclass(frozen=True, slots=True)
class Sample:
    """One query: when it was sent (`time.monotonic()`), how long it took, which set, error,
    and which query of its set (`index`)."""

    at: float
    seconds: float
    new: bool
    error: str | None
    index: int = 0


class QueryLoop:
    """Runs `old_queries` or `new_queries` round-robin until stopped; see the module docstring.

    `agent` may be None (an instance without lockstep): the loop then stays on the old set.
    """

    def __init__(
        self,
        dsn: str,
        migration: str,
        old_queries: Sequence[str],
        new_queries: Sequence[str],
        *,
        pause: float = 0.002,
        rows: int = ROWS,
        seed: int | None = None,
    ) -> None:
        if not old_queries or not new_queries:
            raise ValueError("a query loop needs at least one old and one new query")
        if pause < 0:
            raise ValueError(f"pause must be >= 0, got {pause}")
        self.dsn = dsn
        self.migration = migration
        self.old_queries = tuple(old_queries)
        self.new_queries = tuple(new_queries)
        self.pause = pause
        self.rows = rows
        self.agent: Agent | None = None
        self.samples: list[Sample] = []
        # Send times per query set, in order (one thread appends): counts in O(log n), so
        # polling them does not steal the CPU from the loops being measured.
        self._sent: dict[bool, list[float]] = {False: [], True: []}
        self._failed: list[Sample] = []
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._override: bool | None = None  # set by the hooks while they switch
        self._in_flight: bool | None = None  # query set of the query running now
        self._stop = threading.Event()
        self._finished = threading.Event()
        self._conn: psycopg.Connection[Any] | None = None

    # ------------------------------------------------------------------ agent hooks
    async def on_apply(self, info: MigrationInfo) -> None:
        if info.name == self.migration:
            await self._switch(new=True)

    async def on_rollback(self, info: MigrationInfo) -> None:
        if info.name == self.migration:
            await self._switch(new=False)

    async def _switch(self, *, new: bool) -> None:
        with self._lock:
            self._override = new
        while True:
            with self._lock:
                if self._in_flight is not (not new):
                    return
            await trio.sleep(_DRAIN_POLL)

    # ------------------------------------------------------------------ counters
    @property
    def in_flight(self) -> bool | None:
        """The query set of the query running right now (True: new), None between queries."""
        with self._lock:
            return self._in_flight

    def count(self, *, new: bool | None = None, since: float = 0.0) -> int:
        """Queries sent at or after `since`, of one set (`new`) or both (None)."""
        total = 0
        for which in (False, True) if new is None else (new,):
            sent = self._sent[which]
            total += len(sent) - bisect.bisect_left(sent, since)
        return total

    def failures(self) -> list[Sample]:
        return list(self._failed)

    # ------------------------------------------------------------------ the loop
    def _uses_new(self) -> bool:
        if self._override is not None:
            return self._override
        return self.agent is not None and self.agent.is_applied(self.migration)

    def _params(self) -> dict[str, Any]:
        rng = self._rng
        return {
            "id": rng.randint(1, self.rows),
            "s": f"v{rng.getrandbits(48):x}",
            "n": rng.randint(0, 999),
        }

    def _main(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        turn = 0
        try:
            while not self._stop.is_set():
                if conn is None or conn.closed:
                    conn = self._conn = psycopg.connect(
                        self.dsn, autocommit=True, application_name=APP_NAME
                    )
                with self._lock:
                    new = self._uses_new()
                    self._in_flight = new
                queries = self.new_queries if new else self.old_queries
                index = turn % len(queries)
                query = queries[index]
                turn += 1
                error: str | None = None
                started = time.monotonic()
                try:
                    conn.execute(query.encode(), self._params())
                except psycopg.Error as exc:
                    error = f"{type(exc).__name__}: {str(exc).strip()}"
                    if conn.broken:
                        conn.close()
                finally:
                    seconds = time.monotonic() - started
                    with self._lock:
                        self._in_flight = None
                sample = Sample(started, seconds, new, error, index)
                self.samples.append(sample)
                self._sent[new].append(started)
                if error is not None:
                    self._failed.append(sample)
                if self.pause:
                    self._stop.wait(self.pause)
        finally:
            if conn is not None:
                conn.close()
            self._finished.set()

    def stop(self) -> None:
        """Ask the thread to finish after its current query."""
        self._stop.set()

    async def run(self) -> None:
        """Run the loop in a worker thread until `stop()` or cancellation.

        On cancellation (or an error) the running query is cancelled on the server and the
        thread awaited, so no query of this instance outlives the call, even one stuck behind a
        lock.
        """
        try:
            await trio.to_thread.run_sync(self._main, abandon_on_cancel=True)
        except BaseException:
            self._stop.set()
            conn = self._conn
            if conn is not None and not self._finished.is_set():
                with trio.CancelScope(shield=True), contextlib.suppress(psycopg.Error):
                    await trio.to_thread.run_sync(conn.cancel_safe)
            raise
        finally:
            self._stop.set()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._finished.wait)
