"""The coordinator: fleet registry, WebSocket server and the one-at-a-time migration queue.

`open_coordinator` is the embedding API (an async context manager); `serve_coordinator` is the
same thing as a `nursery.start`-able task for host programs that prefer that shape.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import psycopg
import trio
from trio_websocket import WebSocketConnection, WebSocketRequest

from coordinator.admission import ConnectionLimits, Ticket
from coordinator.connection import serve_connection, welcome_frame
from coordinator.events import EventBus, MigrationFinished, Subscriber
from coordinator.executor import Executor, PostgresExecutor
from coordinator.fleet import Fleet
from coordinator.history import (
    History,
    InMemoryHistory,
    PostgresHistory,
    UnfinishedRun,
    checksum,
)
from coordinator.pg.attempts import DEFAULT_STATEMENT_TIMEOUT, RetryPolicy
from coordinator.pg.catalog import CatalogReader
from coordinator.pg.errors import DatabaseFailed, pg_message
from coordinator.runner import MigrationRun
from coordinator.server import serve_bounded
from statemachine.checkpoint import Checkpoint, restore
from statemachine.exceptions import AlreadyApplied, unwrap_single_group
from statemachine.gate import admit
from statemachine.lease import DEFAULT_LEASE_SECONDS, check_lease_seconds
from statemachine.ledger import AckOutcome
from statemachine.migration import Migration
from statemachine.migration_fsm import AGENT_LOSS_POLICIES
from statemachine.phases import MigrationStatus, Phase
from statemachine.protocol import CLOSE_NOT_LEADER, Ack, Nack, unknown_path_message
from statemachine.relay import RELAY_PATH
from statemachine.result import MigrationResult
from statemachine.sql import build_plan
from statemachine.sql.catalog import Catalog
from statemachine.text import printable

log = logging.getLogger("lockstep.coordinator")


class CollectorHold:
    """The cyclic garbage collector, held off while a migration and its CONFIRM answers run.

    Why: at fleet scale the collector was the largest single cost of a migration (about half
    of it at 10,000 agents): collections kept traversing the fleet (connections, tasks,
    buffers), which a migration does not change, and the objects every round keeps alive for
    a moment. `hold` freezes the heap alive when the migration starts (`gc.freeze`: later
    collections never look at it again) and disables automatic collection; `release`
    enables it again. The coordinator holds from the start of a migration until the last
    CONFIRM answer came in (at most `ack_timeout` after the finish): CONFIRM is not waited
    for, so its frames and acks run after the result, and would otherwise pay the
    collector's full price. What a migration leaves as cyclic garbage is small (its state
    machine: a few hundred objects) and is collected once the hold ends.

    The heap stays frozen after a release unless `unfreeze` is asked for: unfrozen, the
    whole fleet would be back in the old generation with CPython's count of long-lived
    objects still the small one of the frozen heap, and the next collections would traverse
    it all (hundreds of ms at 1,000 agents). Frozen objects are still freed when their last
    reference goes; only garbage with reference cycles cannot be collected while frozen, and
    the fleet makes such garbage only when an agent's connection ends, so the coordinator
    unfreezes after a migration during or before which an agent left. Every call is O(1).
    """

    def __init__(self) -> None:
        self.held = False
        self._enabled = True
        #: Which hold a later `release` belongs to (a stale timer must not end a newer one).
        self.token = 0

    def hold(self) -> int:
        gc.freeze()
        if not self.held:
            self._enabled = gc.isenabled()
            gc.disable()
            self.held = True
        self.token += 1
        return self.token

    def release(self, *, unfreeze: bool, token: int | None = None) -> None:
        if not self.held or (token is not None and token != self.token):
            return
        self.held = False
        if self._enabled:
            gc.enable()
        if unfreeze:
            gc.unfreeze()


@dataclasses.dataclass
class _Resumption:
    run: MigrationRun
    committed: set[tuple[Phase, int]]
    done: trio.Event = dataclasses.field(default_factory=trio.Event)
    result: MigrationResult | None = None


class Coordinator:
    """Holds the fleet and runs migrations one at a time (invariant 5 in docs/design.md).

    Build it with `open_coordinator`; construct it directly only to drive it over your own
    transport (the property tests hand it in-memory WebSocket connections).
    """

    def __init__(
        self,
        *,
        executor: Executor,
        history: History | None = None,
        ack_timeout: float = 30.0,
        heartbeat_interval: float = 0.0,
        handshake_timeout: float = 5.0,
        token: str | None = None,
        shared_token: bool = False,
        limits: ConnectionLimits | None = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        on_agent_loss: str = "wait",
        durable_readers: bool = False,
    ) -> None:
        if not ack_timeout > 0:
            raise ValueError(f"ack_timeout must be > 0, got {ack_timeout}")
        check_lease_seconds(lease_seconds)
        if on_agent_loss not in AGENT_LOSS_POLICIES:
            raise ValueError(
                f"on_agent_loss must be one of {', '.join(AGENT_LOSS_POLICIES)}, "
                f"got {on_agent_loss!r}"
            )
        #: What a cohort agent's disconnect means: "wait" for it to come back or for its
        #: lease to expire, or "rollback" at once (the behaviour before leases).
        self.on_agent_loss = on_agent_loss
        #: Agents may vouch from the durable state (dsn=/connect=): destructive SQL then
        #: waits one lease after the state change they must read (docs/leases.md).
        self.durable_readers = durable_readers
        self.executor = executor
        self.history: History = history if history is not None else InMemoryHistory()
        self.ack_timeout = ack_timeout
        self.heartbeat_interval = heartbeat_interval
        self.handshake_timeout = handshake_timeout
        #: The fleet secret: agents authenticate with `agent_credential(token, agent_id)`, or
        #: with the secret itself only when `shared_token` (see statemachine.credentials).
        self.token = token
        self.shared_token = shared_token
        self.limits = limits if limits is not None else ConnectionLimits()
        self.fleet = Fleet(lease_seconds)
        self.events = EventBus()
        self.url = ""
        self._applied: list[str] = []
        self._queue = trio.Lock()
        self._active: MigrationRun | None = None
        #: The last run that finished: CONFIRM completes without waiting for acks
        #: (`MigrationMachine.acks_awaited`), so its answers still arrive for a while and
        #: must reach its events quietly, not be refused as answers to nobody.
        self._finished: MigrationRun | None = None
        #: Runs a coordinator that stopped left unfinished, by name, until this one finished
        #: them (`adopt`, `resume_unfinished`).
        self._resuming: dict[str, _Resumption] = {}
        #: Resumed runs that finished, by name, until reported once (`_wait_for_resumption`).
        self._resumed: dict[str, _Resumption] = {}
        #: None while this coordinator serves agents; otherwise why it refuses them (a
        #: standby of ``lockstep serve``: agents go to the leader, close code 4011).
        self.standby_reason: str | None = None
        #: Agents that left since the heap was last frozen (`CollectorHold`).
        self._left_since_freeze = 0
        self.collector = CollectorHold()
        #: Where `serve` runs its tasks (the collector's release timer), once it runs.
        self._nursery: trio.Nursery | None = None
        #: Serves a replica's relay link (path `RELAY_PATH`) while this coordinator leads;
        #: None: relay links are refused like any unknown path (`lockstep serve` sets it).
        self.relay_handler: Callable[[WebSocketConnection], Awaitable[None]] | None = None
        #: The lint gate's catalog, read on one held connection (closed by `aclose`).
        self._catalog_reader: CatalogReader | None = None

    async def aclose(self) -> None:
        """Close the connections this coordinator holds for reuse (the catalog's, the
        executor's and the history's); `open_coordinator` calls it on the way out."""
        self.collector.release(unfreeze=True)
        with trio.CancelScope(shield=True):
            if self._catalog_reader is not None:
                await self._catalog_reader.aclose()
            for holder in (self.executor, self.history):
                close = getattr(holder, "aclose", None)
                if close is not None:
                    await close()

    # ------------------------------------------------------------- public API
    @property
    def agents(self) -> frozenset[str]:
        """Ids of the agents connected right now."""
        return self.fleet.agent_ids

    @property
    def epoch(self) -> int:
        """The leader epoch this coordinator acts under now (0: it holds no lead)."""
        return self.history.epoch

    @property
    def in_flight(self) -> MigrationRun | None:
        """The migration running (or being resumed) right now, or None: for status pages and
        metrics, which read its `machine` (state, ledger) and never drive it."""
        return self._active

    def subscribe(self, subscriber: Subscriber) -> Any:
        """Receive every `coordinator.events` event; returns an unsubscribe function."""
        return self.events.subscribe(subscriber)

    async def wait_for_agents(self, count: int, timeout: float | None = None) -> None:
        """Wait until `count` agents are connected; `trio.TooSlowError` after `timeout`."""
        with trio.fail_after(math.inf if timeout is None else timeout):
            await self.fleet.wait_for(count)

    async def load_history(self) -> None:
        self._applied = [a.name for a in await self.history.applied()]

    async def run_migration(
        self, migration: Migration, *, force: bool = False, rollback_on_cancel: bool = True
    ) -> MigrationResult:
        """Run `migration` through every phase; waits its turn if another one is running.

        The migration is planned first (`statemachine.sql.build_plan`, what ``lockstep plan``
        prints): the executor runs exactly the plan's groups. SQL that does not parse, or a
        lint error unless `force`, raises `MigrationRejected` (nothing runs, nothing is
        recorded); warnings go to the result's warnings. Without `rollback_sql`, one is
        derived when every statement has a safe inverse; otherwise a failure after EXECUTE
        leaves the schema expanded and the result's warnings say why.

        Cancelled, it rolls back first unless `rollback_on_cancel` is False (``lockstep
        serve`` stopping): then the run stays durable where it was, for the next leader.

        Returns the result whether it completed or rolled back; raises only for misuse
        (`MigrationRejected`, `AlreadyApplied` when the name already completed here) and
        `Deposed` when another coordinator took over mid-run (it finishes the migration).
        """
        try:
            return await self._run_migration(migration, force, rollback_on_cancel)
        except psycopg.Error as exc:
            raise DatabaseFailed(
                f"migration {migration.name!r}: lockstep's state in the database could not be "
                f"read or written: {pg_message(exc)}"
            ) from exc

    async def _run_migration(
        self, migration: Migration, force: bool, rollback_on_cancel: bool
    ) -> MigrationResult:
        resumed = await self._wait_for_resumption(migration)
        if resumed is not None:
            return resumed
        plan = build_plan(migration, catalog=await self._catalog())
        lint_warnings = admit(plan, force=force)
        for warning in lint_warnings:
            log.warning("%s: %s", migration.name, warning)
        if plan.rollback.source == "derived":
            derived = [s for g in plan.rollback.phase.groups for s in g.statements]
            log.info("%s: derived rollback_sql: %s", migration.name, "; ".join(derived))
        async with self._queue, self.history.migration_lock():
            completed = await self.history.applied()
            self._applied = [a.name for a in completed]
            applied = {a.name: a.checksum for a in completed}
            if migration.name in applied:
                same = applied[migration.name] == checksum(migration)
                raise AlreadyApplied(
                    f"migration {migration.name!r} already completed on this database"
                    + ("" if same else " (with different SQL: its checksum changed)")
                )
            run = MigrationRun(
                migration,
                plan,
                fleet=self.fleet,
                executor=self.executor,
                events=self.events,
                ack_timeout=self.ack_timeout,
                history=self.history,
                warnings=lint_warnings,
                on_agent_loss=self.on_agent_loss,
                durable_readers=self.durable_readers,
            )
            # Started before the start is recorded, so the first checkpoint written is
            # ANNOUNCE's (one write less; nothing was sent yet either way).
            run.machine.start()
            started = Checkpoint.of(run.machine)
            await self.history.record_start(migration, started)
            run.mark_durable(started)
            return await self._drive_run(run, rollback_on_cancel=rollback_on_cancel, catch_up=True)

    async def _drive_run(
        self, run: MigrationRun, *, rollback_on_cancel: bool = True, catch_up: bool = False
    ) -> MigrationResult:
        """Run `run` to its end as the active migration; the caller holds the locks.

        Cancelled with `rollback_on_cancel` (a host cancelling its `run_migration`), the run
        rolls back first; without it (the coordinator closing while it resumes a run in the
        background) the run stops where it is and its durable state is left for the next
        coordinator, which resumes it.
        """
        migration = run.migration
        self._active = run
        if catch_up:
            # A new run's machine copied the fleet before its start was recorded; a resumed
            # one was rebuilt from a checkpoint whose absent agents must stay in its cohort.
            run.catch_up_with_fleet()
        try:
            token = self.collector.hold()
            with unwrap_single_group():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write_progress, run)
                    result = await run.run(rollback_on_cancel=rollback_on_cancel)
                    nursery.cancel_scope.cancel()
        finally:
            self._active = None
            self._finished = run
            final = run.result()
            if final.status is not MigrationStatus.RUNNING:
                with trio.CancelScope(shield=True):
                    await run.record_finish(final, patience=run.ack_timeout)
                run.send_confirm()
            self._release_collector_after(run, token)
        if result.status is MigrationStatus.COMPLETED:
            self._applied.append(migration.name)
        self.events.emit(MigrationFinished(migration.name, result.status, result.reason))
        return result

    def _release_heap(self) -> bool:
        """Unfreeze after this migration? Only if an agent left (see `CollectorHold`)."""
        left, self._left_since_freeze = self._left_since_freeze, 0
        return left > 0

    def _release_collector_after(self, run: MigrationRun, token: int) -> None:
        """End the collector hold of `run` now, or once its CONFIRM answers are in (at the
        latest `ack_timeout` later; without a nursery to wait in, now)."""
        ledger = run.machine.ledger
        waiting = (
            run.machine.status is MigrationStatus.COMPLETED
            and ledger is not None
            and not ledger.settled
        )
        if waiting and self._nursery is not None:
            self._nursery.start_soon(self._release_collector_at, token, run.ack_timeout)
        else:
            self.collector.release(unfreeze=self._release_heap(), token=token)

    async def _release_collector_at(self, token: int, delay: float) -> None:
        await trio.sleep(delay)
        self.collector.release(unfreeze=self._release_heap(), token=token)

    def _confirm_answered(self, run: MigrationRun) -> None:
        """The finished run's CONFIRM answers are all in: the collector may run again."""
        ledger = run.machine.ledger
        if self.collector.held and ledger is not None and ledger.settled:
            self.collector.release(unfreeze=self._release_heap())

    async def _write_progress(self, run: MigrationRun) -> None:
        """Keep the run's live progress in the database, at most once a second (for
        ``lockstep status`` on any machine). Best effort: a failed write is retried later."""
        written = -1
        while True:
            await trio.sleep(1.0)
            if run.progress_version == written:
                continue
            version = run.progress_version
            try:
                await self.history.save_progress(run.migration, run.progress())
            except Exception as exc:  # progress is informational: never a reason to stop
                log.debug("%s: progress not written: %s", run.migration.name, exc)
                continue
            written = version

    @property
    def lease_seconds(self) -> float:
        return self.fleet.lease_seconds

    def take_over(self, margin: float = 0.0) -> None:
        """A previous coordinator may have granted leases this one cannot account for: no
        destructive SQL until they all certainly expired (`Fleet.hold_unaccounted`)."""
        until = self.fleet.hold_unaccounted((), margin=margin)
        log.info(
            "leases granted by a previous coordinator may be valid for %.1f s more: "
            "CONTRACT and rollback SQL wait for them",
            until - trio.current_time(),
        )

    # -------------------------------------------------------------- resuming
    def adopt(self, runs: Sequence[UnfinishedRun], *, margin: float = 0.0) -> None:
        """Take over runs a stopped coordinator left, before any agent is served.

        The oldest becomes the active migration at once, so the Welcome every reconnecting
        agent gets already tells the truth (applied once EXECUTE committed, and forward-only
        once CONTRACT committed); `resume_unfinished` then drives them.
        """
        for unfinished in runs:
            migration, checkpoint = unfinished.migration, unfinished.checkpoint
            machine = restore(
                checkpoint,
                has_contract=bool(migration.contract_sql),
                connected=self.fleet.agent_ids,
                on_agent_loss=self.on_agent_loss,
                lease_seconds=self.lease_seconds,
            )
            # The predecessor's agents that are not back: their leases are unaccounted for.
            self.fleet.hold_unaccounted(machine.departing, margin=margin)
            run = MigrationRun(
                migration,
                build_plan(migration),
                fleet=self.fleet,
                executor=self.executor,
                events=self.events,
                ack_timeout=self.ack_timeout,
                history=self.history,
                machine=machine,
                on_agent_loss=self.on_agent_loss,
                durable_readers=self.durable_readers,
                warnings=[
                    f"resumed by a new coordinator: the previous one stopped in "
                    f"{checkpoint.state.name}"
                    + (" (EXECUTE committed)" if checkpoint.executed else "")
                    + (" (CONTRACT committed)" if checkpoint.contracted else "")
                ],
            )
            self._resuming[migration.name] = _Resumption(run, set(unfinished.journal))
            if self._active is None:
                self._active = run

    async def resume_unfinished(self) -> None:
        """Finish the adopted runs, oldest first, each under the migration lock."""
        for name, resumption in list(self._resuming.items()):
            run = resumption.run
            log.warning(
                "resuming migration %r, left unfinished by a coordinator that stopped (%s)",
                name,
                run.machine.state.name,
            )
            async with self._queue, self.history.migration_lock():
                run.journal = self.history.journal(run.migration)
                if run.journal is not None:
                    run.journal.committed.update(resumption.committed)
                resumption.result = await self._drive_run(run, rollback_on_cancel=False)
            resumption.done.set()
            # Kept until a `run_migration` of that name asks for it: a resumed run can
            # finish before the host gets to ask (CONFIRM waits for nobody).
            self._resumed[name] = self._resuming.pop(name)

    async def _wait_for_resumption(self, migration: Migration) -> MigrationResult | None:
        """A migration being resumed under that name is the one to report: wait for it."""
        resumption = self._resuming.get(migration.name) or self._resumed.pop(migration.name, None)
        if resumption is None:
            return None
        if resumption.run.migration.to_json() | {"id": None} != migration.to_json() | {"id": None}:
            log.warning(
                "%s: the file differs from the migration being resumed; reporting the "
                "resumed one (its SQL is what ran)",
                migration.name,
            )
        await resumption.done.wait()
        assert resumption.result is not None
        return resumption.result

    async def run_migrations(
        self, migrations: Sequence[Migration], *, force: bool = False
    ) -> list[MigrationResult]:
        """Run migrations in order, skipping names already completed, stopping at a failure.

        Each one passes the lint gate when its turn comes (`MigrationRejected` stops the run).
        """
        results = []
        for migration in migrations:
            resumed = await self._wait_for_resumption(migration)
            if resumed is not None:
                results.append(resumed)
                if resumed.status is not MigrationStatus.COMPLETED:
                    break
                continue
            await self.load_history()
            if migration.name in self._applied:
                continue
            result = await self.run_migration(migration, force=force)
            results.append(result)
            if result.status is not MigrationStatus.COMPLETED:
                break
        return results

    async def _catalog(self) -> Catalog | None:
        """The live catalog for the lint gate (volatility, table sizes, column types), or
        None, and lint stays conservative, when the executor has no database or it cannot
        be read."""
        dsn = getattr(self.executor, "dsn", None)
        if not isinstance(dsn, str):
            return None
        if self._catalog_reader is None or self._catalog_reader.held.dsn != dsn:
            self._catalog_reader = CatalogReader(dsn)
        try:
            return await self._catalog_reader.read()
        except Exception as exc:  # a catalog is an optimisation: never a reason to fail
            log.warning("lint gate without the catalog (%s): it stays conservative", exc)
            return None

    def request_abort(self, name: str, reason: str) -> bool:
        """Roll back the in-flight migration `name` at its next safe point
        (`MigrationRun.abort`); False if it is not the one in flight here."""
        run = self._active
        if run is None or run.migration.name != name:
            return False
        run.abort(reason)
        return True

    def begin_term(self) -> None:
        """Forget what an earlier leadership term knew (``lockstep serve`` regained the lead
        after losing it): the durable state is read afresh by `load_history` and `adopt`."""
        self._applied = []
        self._active = None
        self._finished = None
        self._resuming = {}
        self._resumed = {}

    def drop_agents(self, code: int, reason: str) -> None:
        """Close every agent connection with `code` (a deposed leader sends them on)."""
        for link in self.fleet:
            link.close(reason, code=code)

    def completed_names(self) -> list[str]:
        """Migrations completed on this database (a resumed one only once it finished)."""
        return list(self._applied)

    # ------------------------------------------------- used by the connections
    def applied_names(self) -> list[str]:
        names = list(self._applied)
        run = self._active
        if run is not None and run.machine.applied and run.migration.name not in names:
            names.append(run.migration.name)
        return names

    def welcome(self, agent_id: str) -> str | None:
        return welcome_frame(self)

    def agent_joined(self, agent_id: str) -> None:
        if self._active is not None:
            self._active.on_join(agent_id)

    def agent_left(self, agent_id: str) -> None:
        self._left_since_freeze += 1
        released = agent_id in self.fleet.released
        self.fleet.released.discard(agent_id)
        if self._active is None:
            return
        if released:
            self._active.on_lease_expired(agent_id, released=True)  # it stopped serving
        elif agent_id in self.fleet.leases:
            self._active.on_leave(agent_id)  # departing: its lease may still be valid
        else:
            self._active.on_lease_expired(agent_id)  # closed because its lease expired

    def lease_expired(self, agent_id: str) -> None:
        """The fleet's sweeper found `agent_id`'s lease certainly expired."""
        if self._active is not None:
            self._active.on_lease_expired(agent_id)

    def is_active_migration(self, migration_id: str) -> bool:
        """The migration in flight, or the one that just finished (its late answers)."""
        return self._run_for(migration_id) is not None

    def _run_for(self, migration_id: str) -> MigrationRun | None:
        for run in (self._active, self._finished):
            if run is not None and run.migration.id == migration_id:
                return run
        return None

    def route_ack(self, agent_id: str, ack: Ack) -> AckOutcome:
        run = self._run_for(ack.migration_id) or self._active
        if run is None:
            return AckOutcome.STALE
        outcome = run.on_ack(agent_id, ack.migration_id, ack.phase)
        if run is self._finished and self._active is None:
            self._confirm_answered(run)
        return outcome

    def route_nack(self, agent_id: str, nack: Nack) -> AckOutcome:
        run = self._run_for(nack.migration_id) or self._active
        if run is None:
            return AckOutcome.STALE
        outcome = run.on_nack(agent_id, nack.migration_id, nack.phase, nack.error)
        if run is self._finished and nack.phase is Phase.CONFIRM:
            log.warning(
                "%s: agent %s refused CONFIRM after the migration completed: %s",
                run.migration.name,
                agent_id,
                printable(nack.error, limit=300),
            )
        return outcome

    async def handle_connection(self, ws: WebSocketConnection) -> None:
        """Serve one already-accepted WebSocket (any transport); never raises."""
        await serve_connection(self, ws)

    async def handle_request(self, request: WebSocketRequest, ticket: Ticket | None = None) -> None:
        """Accept the upgrade and serve the agent; `ticket` is released once it said hello.

        Agents connect to the root path; any other path is refused with HTTP 404 and a body
        that says so, because a wrong URL (``/ws``, a proxy's prefix) accepted silently hides
        a configuration mistake that the agent's log should name."""
        path = request.path.split("?", 1)[0]
        if path == RELAY_PATH and self.relay_handler is not None:
            if ticket is not None:
                ticket.release()
            await self._serve_relay(request, self.relay_handler)
            return
        if path not in ("", "/"):
            log.info("refused a WebSocket upgrade for the unknown path %r", path[:100])
            with contextlib.suppress(Exception):
                await request.reject(404, body=unknown_path_message(path).encode())
            return
        try:
            ws = await request.accept()
        except Exception:
            log.info("a client went away during the WebSocket upgrade")
            return
        if self.standby_reason is not None:
            with trio.move_on_after(2):
                await ws.aclose(CLOSE_NOT_LEADER, self.standby_reason[:120])
            return
        await serve_connection(self, ws, None if ticket is None else ticket.release)

    async def _serve_relay(
        self, request: WebSocketRequest, handler: Callable[[WebSocketConnection], Awaitable[None]]
    ) -> None:
        """A replica's relay link (`coordinator.relay`): served only while this one leads."""
        try:
            ws = await request.accept()
        except Exception:
            return
        if self.standby_reason is not None:
            with trio.move_on_after(2):
                await ws.aclose(CLOSE_NOT_LEADER, self.standby_reason[:120])
            return
        await handler(ws)

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept agents on `host:port` until cancelled; `nursery.start` returns the URL.

        With `ssl_context` (a server context holding the certificate) agents connect over TLS
        and the URL is ``wss://``.
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            server = await nursery.start(
                serve_bounded, self.handle_request, host, port, ssl_context, self.limits
            )
            nursery.start_soon(self.fleet.sweep_leases, self.lease_expired)
            scheme = "ws" if ssl_context is None else "wss"
            self.url = f"{scheme}://{host}:{server.port}"
            task_status.started(self.url)


@contextlib.asynccontextmanager
async def open_coordinator(
    dsn: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    ack_timeout: float = 30.0,
    lock_timeout: float = 0.5,
    statement_timeout: float | None = DEFAULT_STATEMENT_TIMEOUT,
    lock_retry: RetryPolicy | None = None,
    heartbeat_interval: float = 0.0,
    token: str | None = None,
    shared_token: bool = False,
    limits: ConnectionLimits | None = None,
    executor: Executor | None = None,
    ssl_context: ssl.SSLContext | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    on_agent_loss: str = "wait",
    durable_readers: bool = False,
) -> AsyncIterator[Coordinator]:
    """Start a coordinator for the database at `dsn`, serving agents on `host:port`.

    Port 0 picks a free port; the URL agents connect to is `coordinator.url`.
    `lock_timeout` (seconds) bounds each wait for a lock, `statement_timeout` each statement in
    a phase transaction, and `lock_retry` how long lock timeouts are retried (see
    `coordinator.executor`); they configure the default `PostgresExecutor` and are ignored when
    you pass your own `executor`. `ssl_context` (a server context with the certificate) serves
    agents over TLS (``wss://``); pair it with `token` so only your fleet can join.
    `token` is the fleet secret: each agent presents `statemachine.agent_credential(token,
    agent_id)`; the secret itself is accepted as well only with `shared_token=True`.
    `limits` bounds connections still in their handshake (`ConnectionLimits`).
    `heartbeat_interval` (seconds; 0, the default: none) adds a WebSocket ping per connection;
    liveness is the agents' leases, checked by one sweeper for the whole fleet.
    `lease_seconds` is each agent's lease (docs/leases.md); `on_agent_loss` what a cohort
    agent's disconnect means ("wait" for its lease, or "rollback" at once);
    `durable_readers=True` when agents may vouch from the durable state (`dsn=`/`connect=`):
    destructive SQL then waits one lease after the state change they must read.
    """
    history = PostgresHistory(dsn, hold_connections=True)
    try:
        await history.ensure_schema()
        # Runs a stopped coordinator left are resumed, unless a live one still holds the
        # lock (then they are its own, in progress).
        led_before = await history.current_epoch() > 0
        unfinished = await history.unfinished() if await history.lock_is_free() else []
        for name in await history.mark_unresumable():
            log.warning(
                "migration %r was left running with no checkpoint: marked interrupted", name
            )
        coordinator = Coordinator(
            executor=executor
            or PostgresExecutor(
                dsn,
                lock_timeout=lock_timeout,
                statement_timeout=statement_timeout,
                retry=lock_retry,
                reuse_connections=True,
            ),
            history=history,
            ack_timeout=ack_timeout,
            heartbeat_interval=heartbeat_interval,
            token=token,
            shared_token=shared_token,
            limits=limits,
            lease_seconds=lease_seconds,
            on_agent_loss=on_agent_loss,
            durable_readers=durable_readers,
        )
        try:
            await coordinator.load_history()
            if led_before:  # a coordinator ran on this database before: its leases may be live
                coordinator.take_over()
            coordinator.adopt(unfinished)
            with unwrap_single_group():
                async with trio.open_nursery() as nursery:
                    await nursery.start(coordinator.serve, host, port, ssl_context)
                    if unfinished:
                        nursery.start_soon(coordinator.resume_unfinished)
                    try:
                        yield coordinator
                    finally:
                        nursery.cancel_scope.cancel()
        finally:
            await coordinator.aclose()
    finally:
        with trio.CancelScope(shield=True):
            await history.aclose()


async def serve_coordinator(
    dsn: str,
    *,
    task_status: trio.TaskStatus[Coordinator] = trio.TASK_STATUS_IGNORED,
    **options: Any,
) -> None:
    """`open_coordinator` as a task: `coord = await nursery.start(serve_coordinator, dsn)`.

    Keyword options are those of `open_coordinator` (pass them with `functools.partial`).
    """
    async with open_coordinator(dsn, **options) as coordinator:
        task_status.started(coordinator)
        await trio.sleep_forever()
