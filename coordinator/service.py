"""`lockstep serve`: a long-running coordinator that leads, or stands by, and survives its death.

One `Service` per process. It listens for agents from the start, but serves them only while
it is the leader (`coordinator.leader`): a standby closes agent connections with code 4011
(`CLOSE_NOT_LEADER`) so agents given several URLs move on to the leader. Each time it
becomes the leader (a *term*) it takes a new epoch and, in this order:

1. reads the durable state: the completed migrations and any run a previous leader left
   unfinished, which it adopts *before* serving an agent, so every Welcome tells the truth
   (`Coordinator.adopt`, docs/durability.md);
2. serves agents and resumes the adopted runs;
3. takes submitted migrations from the durable queue (`coordinator.queue`) oldest first, woken
   by ``NOTIFY lockstep`` and polling every `poll_interval` s in case a notification was lost;
4. applies abort requests (``lockstep abort``) to the run in flight.

With ``relay=True`` (``lockstep serve --relay``) a standby does not send agents away: it
*relays* for the leader (`coordinator.relay`, docs/replicas.md). It serves them as the leader
would, over one link to the leader whose URL each leader writes into ``lockstep.leader``, so
a fleet spread over R replicas costs each about 1/R. A relay stops relaying while it leads.

A term ends when the leadership is lost (a failed probe: the leader stops acting within a few
seconds and drops its agents, which reconnect to the new leader) or when the service stops.
Stopping (SIGTERM, SIGINT, a cancelled scope) never rolls back: the run in flight stays
durable where it was, and the next leader (a standby, or this service restarted) resumes it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import ssl
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import trio
from trio_websocket import WebSocketRequest

from coordinator.admission import Ticket
from coordinator.core import Coordinator
from coordinator.events import Subscriber
from coordinator.executor import PostgresExecutor
from coordinator.fleet import Fleet
from coordinator.history import PostgresHistory
from coordinator.http import PostgresProbe, serve_http
from coordinator.leader import Deposed, Leadership, default_holder, open_leadership
from coordinator.pg.attempts import DEFAULT_STATEMENT_TIMEOUT, RetryPolicy
from coordinator.pg.errors import pg_message
from coordinator.pg.notify import listen
from coordinator.pg.thread import query
from coordinator.queue import CHANNEL, abort_requested, mark_not_run, next_queued
from coordinator.relay import Relay, RelayHub
from coordinator.runner import MigrationRun
from coordinator.server import serve_bounded
from statemachine.exceptions import AlreadyApplied, unwrap_single_group
from statemachine.gate import MigrationRejected
from statemachine.protocol import CLOSE_NOT_LEADER
from statemachine.relay import RELAY_PATH

log = logging.getLogger("lockstep.coordinator")

STANDBY = "standby: another coordinator leads this database"


class Service:
    """A coordinator process that takes the lead when it can (module docstring).

    Build it with `open_service`. `coordinator` is the same object for the whole process
    (its events and metrics carry across terms); `leadership` is the current term's, or None
    while standing by.
    """

    def __init__(
        self,
        dsn: str,
        coordinator: Coordinator,
        history: PostgresHistory,
        *,
        holder: str,
        poll_interval: float,
        leader_poll_interval: float,
        probe_interval: float,
        probe_timeout: float,
        relay: Relay | None = None,
    ) -> None:
        #: The relay links this replica serves while it leads: every leader accepts them
        #: (authenticated with the fleet secret).
        self.hub = RelayHub(coordinator)
        coordinator.relay_handler = self.hub.serve
        self.dsn = dsn
        #: Relays for the leader while this replica stands by (None: sends agents away).
        self.relay = relay
        self.coordinator = coordinator
        self.history = history
        self.holder = holder
        self.poll_interval = poll_interval
        self.leader_poll_interval = leader_poll_interval
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.leadership: Leadership | None = None
        self.terms = 0
        #: Where /healthz, /readyz and /metrics are served (None: not served).
        self.http_port: int | None = None
        self._probe = PostgresProbe(dsn)
        self._queue_changed = trio.Event()
        self._abort_changed = trio.Event()
        self._leading = trio.Event()

    # ------------------------------------------------------- for readiness
    def is_leader(self) -> bool:
        return self.leadership is not None and self.leadership.is_leader()

    def epoch(self) -> int:
        return self.leadership.epoch if self.leadership is not None else 0

    def leader_description(self) -> str:
        return self.holder if self.is_leader() else STANDBY

    async def database_reachable(self) -> tuple[bool, str]:
        return await self._probe.database_reachable()

    async def wait_until_leader(self) -> None:
        await self._leading.wait()

    async def handle_request(self, request: WebSocketRequest, ticket: Ticket | None = None) -> None:
        """An agent's upgrade: served by the leader's coordinator, or by this standby's relay
        while it is linked to the leader; otherwise refused (4011) by the coordinator."""
        relay = self.relay
        if (
            relay is not None
            and relay.linked
            and not self.is_leader()
            and request.path.split("?", 1)[0] in ("", "/")
        ):
            await relay.handle_request(request, ticket)
        else:
            await self.coordinator.handle_request(request, ticket)

    # ----------------------------------------------------------- the loop
    async def run(self) -> None:
        """Stand by, lead, and stand by again after a lost term, until cancelled."""
        delay = 1.0
        while True:
            try:
                async with open_leadership(
                    self.dsn,
                    holder=self.holder,
                    poll_interval=self.leader_poll_interval,
                    probe_interval=self.probe_interval,
                    probe_timeout=self.probe_timeout,
                    takes_queue=True,
                ) as leadership:
                    await self._term(leadership)
            except Deposed as exc:
                # LeadershipLost (the probe saw the lock go), or a fenced write of the run's
                # state that saw a successor's epoch first: either way another leads now.
                log.error("%s; standing by", exc)
            except psycopg.OperationalError as exc:
                log.error("the database failed during the term (%s); standing by", pg_message(exc))
                await trio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _term(self, leadership: Leadership) -> None:
        coordinator = self.coordinator
        if self.relay is not None:
            self.relay.pause("this replica leads now")
        self.history.lead_with(leadership)
        coordinator.begin_term()
        try:
            await self._advertise(leadership)
            for name in await self.history.mark_unresumable(when_free=False):
                log.warning("migration %r was left running with no checkpoint: interrupted", name)
            await coordinator.load_history()
            # A predecessor (epoch below ours) may have granted leases this term cannot
            # account for, until it stopped acting: at most probe_interval + probe_timeout
            # after it lost the lock. Destructive SQL waits them out (docs/leases.md).
            margin = self.probe_interval + self.probe_timeout
            if leadership.epoch > 1:
                coordinator.take_over(margin=margin)
            coordinator.adopt(await self.history.unfinished(), margin=margin)
            self.leadership = leadership
            self.terms += 1
            coordinator.standby_reason = None  # agents are served from here on
            self._leading.set()
            log.info("leading with epoch %d: serving agents on %s", leadership.epoch, self.url)
            async with trio.open_nursery() as nursery:
                await nursery.start(listen, self.dsn, CHANNEL, self._notified)
                nursery.start_soon(self._watch_aborts)
                await coordinator.resume_unfinished()
                await self._take_queue(leadership)
        finally:
            coordinator.standby_reason = STANDBY
            self.leadership = None
            self._leading = trio.Event()
            self.history.lead_with(None)
            coordinator.drop_agents(CLOSE_NOT_LEADER, "this coordinator stopped leading")
            self.hub.close_all()
            if self.relay is not None:
                self.relay.resume()

    async def _advertise(self, leadership: Leadership) -> None:
        """Write where this leader serves, for relaying replicas (fenced by the epoch)."""
        await query(
            self.dsn,
            "UPDATE lockstep.leader SET url = %s WHERE id = 1 AND epoch = %s",
            (self.coordinator.url, leadership.epoch),
        )

    @property
    def url(self) -> str:
        return self.coordinator.url

    def _notified(self, payload: str) -> None:
        if payload == "abort":
            self._abort_changed.set()
        else:
            self._queue_changed.set()

    async def _take_queue(self, leadership: Leadership) -> None:
        while True:
            item = await next_queued(self.dsn)
            if item is None:
                with trio.move_on_after(self.poll_interval):
                    await self._queue_changed.wait()
                self._queue_changed = trio.Event()
                continue
            migration = item.migration
            try:
                await self.coordinator.run_migration(
                    migration, force=item.force, rollback_on_cancel=False
                )
            except (MigrationRejected, AlreadyApplied) as exc:
                log.error("%s: not run: %s", migration.name, exc)
                await mark_not_run(self.dsn, migration.id, "rejected", str(exc), leadership.epoch)

    async def _watch_aborts(self) -> None:
        while True:
            run = self.coordinator.in_flight
            if run is not None and run.abort_reason is None:
                try:
                    reason = await abort_requested(self.dsn, run.migration.id)
                except psycopg.OperationalError as exc:
                    log.warning("cannot read abort requests (%s)", pg_message(exc))
                    reason = None
                if reason is not None and run is self.coordinator.in_flight:
                    log.warning("%s: abort requested: %s", run.migration.name, reason)
                    run.abort(reason)
            with trio.move_on_after(1.0):
                await self._abort_changed.wait()
            self._abort_changed = trio.Event()


@contextlib.asynccontextmanager
async def open_service(
    dsn: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    ssl_context: ssl.SSLContext | None = None,
    ack_timeout: float = 30.0,
    lock_timeout: float = 0.5,
    statement_timeout: float | None = DEFAULT_STATEMENT_TIMEOUT,
    lock_retry: RetryPolicy | None = None,
    holder: str | None = None,
    poll_interval: float = 2.0,
    leader_poll_interval: float = 0.5,
    probe_interval: float = 1.0,
    probe_timeout: float = 3.0,
    http_host: str = "127.0.0.1",
    http_port: int | None = None,
    relay: bool = False,
    **coordinator_options: Any,
) -> AsyncIterator[Service]:
    """Run a `Service` on `dsn`, listening for agents on `host:port`, until the body ends.

    Leaving the body (or cancelling it) stops the service without rolling anything back
    (module docstring). With `http_port` (0: any free port) it also serves ``/healthz``,
    ``/readyz`` (200 only while leading with the database reachable) and ``/metrics``
    (`coordinator.http`) on `http_host`. With `relay`, it relays for the leader while it
    stands by (module docstring). `coordinator_options` go to `Coordinator` (token,
    shared_token, heartbeat_interval, handshake_timeout, limits).
    """
    history = PostgresHistory(dsn)
    await history.ensure_schema()
    coordinator = Coordinator(
        executor=PostgresExecutor(
            dsn, lock_timeout=lock_timeout, statement_timeout=statement_timeout, retry=lock_retry
        ),
        history=history,
        ack_timeout=ack_timeout,
        **coordinator_options,
    )
    coordinator.standby_reason = STANDBY
    with unwrap_single_group():
        async with trio.open_nursery() as nursery:
            handler = _Dispatch()
            server = await nursery.start(
                serve_bounded,
                handler,
                host,
                port,
                ssl_context,
                coordinator.limits,
            )
            nursery.start_soon(coordinator.fleet.sweep_leases, coordinator.lease_expired)
            scheme = "ws" if ssl_context is None else "wss"
            coordinator.url = f"{scheme}://{host}:{server.port}"
            service = Service(
                dsn,
                coordinator,
                history,
                holder=holder or default_holder(f"agents on {coordinator.url}"),
                poll_interval=poll_interval,
                leader_poll_interval=leader_poll_interval,
                probe_interval=probe_interval,
                probe_timeout=probe_timeout,
                relay=None
                if not relay
                else Relay(
                    dsn,
                    url=coordinator.url,
                    token=coordinator.token,
                    shared_token=coordinator.shared_token,
                    handshake_timeout=coordinator.handshake_timeout,
                    heartbeat_interval=coordinator.heartbeat_interval,
                    lease_seconds=coordinator.lease_seconds,
                    poll_interval=leader_poll_interval,
                ),
            )
            handler.service = service
            if service.relay is not None:
                await nursery.start(service.relay.run)
                nursery.start_soon(service.relay.fleet.sweep_leases, _ignore)
            if http_port is not None:
                service.http_port = await nursery.start(
                    functools.partial(
                        serve_http, _ServedView(service), http_host, http_port, readiness=service
                    )
                )
            nursery.start_soon(service.run)
            try:
                yield service
            finally:
                nursery.cancel_scope.cancel()
                await coordinator.aclose()  # the lint catalog's held connection


class _ServedView:
    """What this replica's ``/metrics`` reads: its coordinator's fleet while it leads (or
    has no relay), its relay's fleet while it stands by and relays.

    Why: a relaying standby's agents are connected to its relay, not to its coordinator
    (which serves nobody while it stands by), so reading the coordinator alone showed a
    relay with thousands of agents as serving none. Migration figures still come from the
    coordinator: only a leader runs migrations, and it counts relayed agents too (so sum
    `lockstep_agents_connected` over the leader or over the relays, not over both).
    """

    def __init__(self, service: Service) -> None:
        self._service = service

    def _fleet(self) -> Fleet:
        service = self._service
        if service.relay is None or service.is_leader():
            return service.coordinator.fleet
        return service.relay.fleet

    @property
    def agents(self) -> frozenset[str]:
        return self._fleet().agent_ids

    @property
    def fleet(self) -> Fleet:
        return self._fleet()

    @property
    def in_flight(self) -> MigrationRun | None:
        return self._service.coordinator.in_flight

    @property
    def history(self) -> object:
        """The coordinator's history: /metrics reads migrations by status from it."""
        return self._service.coordinator.history

    def subscribe(self, subscriber: Subscriber) -> Any:
        return self._service.coordinator.subscribe(subscriber)


class _Dispatch:
    """The listening socket's handler: the service's, once it exists (the socket is bound
    first, because the service needs its URL)."""

    service: Service | None = None

    async def __call__(self, request: WebSocketRequest, ticket: Ticket | None = None) -> None:
        if self.service is not None:
            await self.service.handle_request(request, ticket)
        else:
            with contextlib.suppress(Exception):
                await request.reject(503)


def _ignore(agent_id: str) -> None:
    """A relay's agent whose lease expired: its link is closed; the leader decides."""


__all__ = ["RELAY_PATH", "STANDBY", "Service", "open_service"]
