"""The coordinator's figures for Prometheus: read at scrape time, counted only where they pass.

What the coordinator already holds (the connected agents, the running migration's state, its
ledger and when it entered its phase, the leader epoch) is read when Prometheus scrapes, by a
custom collector: nothing is kept twice, so nothing can drift. Only what leaves no state behind
(answers, lock retries, backfilled rows, bad frames, finished migrations) is counted, from the
coordinator's events (`coordinator.events`). Migrations by status come from the history rows in
PostgreSQL (cached, `PostgresMigrationCounts`): that is the database's truth, the same on every
replica, whereas the `..._finished_total` counter says what this process saw since it started.

Each `CoordinatorMetrics` has its own `CollectorRegistry`, never prometheus_client's global one,
so two coordinators in one process (the tests) do not mix their figures. docs/operations.md
lists every metric with its type, labels and meaning.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

import psycopg
import trio
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from psycopg.conninfo import make_conninfo

from coordinator.backfill import BackfillProgress
from coordinator.events import AnswerReceived, BadFrame, Event, MigrationFinished, Subscriber
from coordinator.fleet import LeaseCounts
from coordinator.pg import thread as pgthread
from coordinator.pg.attempts import LockRetry
from statemachine.ledger import AckOutcome
from statemachine.migration import Migration
from statemachine.migration_fsm import MigrationMachine
from statemachine.phases import ACKED_PHASES, MigrationState, MigrationStatus, Phase

log = logging.getLogger("lockstep.coordinator")

#: Every metric name starts with this.
PREFIX = "lockstep"

#: Counts of `lockstep.migrations` rows by status ("completed", "failed", "running", ...).
MigrationCounts = Callable[[], Awaitable[Mapping[str, int]]]


class RunView(Protocol):
    """What the metrics read of the running migration (`coordinator.runner.MigrationRun`)."""

    @property
    def migration(self) -> Migration: ...

    @property
    def machine(self) -> MigrationMachine: ...


class FleetView(Protocol):
    """What the metrics read of the fleet's leases (`coordinator.fleet.Fleet`)."""

    @property
    def lease_seconds(self) -> float: ...

    @property
    def departing(self) -> frozenset[str]: ...

    @property
    def lease_counts(self) -> LeaseCounts: ...


class CoordinatorView(Protocol):
    """What the metrics read of a coordinator (`coordinator.core.Coordinator` is one).

    A protocol rather than the class, so the engine can mount the HTTP server without an
    import cycle.
    """

    @property
    def agents(self) -> frozenset[str]: ...

    @property
    def in_flight(self) -> RunView | None: ...

    @property
    def fleet(self) -> FleetView: ...

    def subscribe(self, subscriber: Subscriber) -> Any: ...


class LeaderView(Protocol):
    """The leadership side of `coordinator.http.Readiness`, all the metrics need of it."""

    def is_leader(self) -> bool: ...

    def epoch(self) -> int: ...


class EventCounts:
    """Counters of what passes through the coordinator's events and leaves no state behind.

    A subscriber must be quick and never raise (`coordinator.events`): each event is one
    dictionary increment.
    """

    def __init__(self) -> None:
        self.acks: Counter[Phase] = Counter()
        self.nacks: Counter[Phase] = Counter()
        self.ignored_answers: Counter[tuple[Phase, str]] = Counter()
        self.lock_retries: Counter[Phase] = Counter()
        self.backfill_rows: Counter[str] = Counter()
        self.bad_frames: Counter[str] = Counter()
        self.finished: Counter[MigrationStatus] = Counter()
        #: Rows of the backfill of (migration, table) counted so far: its events carry totals.
        self._backfilled: dict[tuple[str, str], int] = {}

    def __call__(self, event: Event) -> None:
        if isinstance(event, AnswerReceived):
            self._answer(event)
        elif isinstance(event, LockRetry):
            self.lock_retries[event.phase] += 1
        elif isinstance(event, BackfillProgress):
            self._backfill(event)
        elif isinstance(event, BadFrame):
            self.bad_frames[event.code] += 1
        elif isinstance(event, MigrationFinished):
            self.finished[event.status] += 1

    def _answer(self, event: AnswerReceived) -> None:
        if event.outcome is not AckOutcome.RECORDED:
            self.ignored_answers[event.phase, event.outcome.value] += 1
        elif event.ok:
            self.acks[event.phase] += 1
        else:
            self.nacks[event.phase] += 1

    def _backfill(self, event: BackfillProgress) -> None:
        key = (event.migration, event.table)
        # Batch 1 starts a backfill afresh (a resumed run backfills again from the start).
        before = 0 if event.batches <= 1 else self._backfilled.get(key, 0)
        self.backfill_rows[event.table] += max(0, event.rows - before)
        self._backfilled[key] = event.rows


class CoordinatorCollector:
    """The prometheus_client collector: reads the coordinator when Prometheus scrapes."""

    def __init__(
        self,
        coordinator: CoordinatorView,
        leadership: LeaderView,
        counts: EventCounts,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.coordinator = coordinator
        self.leadership = leadership
        self.counts = counts
        self.clock = clock
        #: Rows of lockstep.migrations by status, as last read (None: never read, or the
        #: last read failed; the family is then left out rather than reported stale).
        self.migrations_by_status: Mapping[str, int] | None = None
        #: The last database probe: 1 reachable, 0 not, None not probed.
        self.database_up: bool | None = None

    def collect(self) -> Iterable[Metric]:
        yield from self._fleet()
        yield from self._in_flight()
        yield from self._events()
        yield from self._leadership()
        yield from self._database()

    def _fleet(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            f"{PREFIX}_agents_connected",
            "Agents connected to this coordinator right now.",
            value=len(self.coordinator.agents),
        )
        fleet = self.coordinator.fleet
        yield GaugeMetricFamily(
            f"{PREFIX}_agents_departing",
            "Agents disconnected whose lease has not certainly expired yet (they may still "
            "serve on the schema they knew: phases wait for them).",
            value=len(fleet.departing),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_lease_seconds",
            "The lease this coordinator grants; agents renew every third of it.",
            value=fleet.lease_seconds,
        )
        counts = fleet.lease_counts
        yield CounterMetricFamily(
            f"{PREFIX}_lease_renewals",
            "Lease renewals granted since this process started (the idle load).",
            value=counts.renewed,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_lease_renewals_refused",
            "Renewals refused: the lease had certainly expired or was released.",
            value=counts.refused,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_leases_expired_while_connected",
            "Leases counted certainly expired while the agent looked connected (the link is "
            "then closed): a partition, or a coordinator too loaded to read renewals in time.",
            value=counts.expired_while_connected,
        )

    def _in_flight(self) -> Iterator[Metric]:
        run = self.coordinator.in_flight
        yield GaugeMetricFamily(
            f"{PREFIX}_migration_in_flight",
            "1 while a migration runs (or is being resumed) on this coordinator, else 0.",
            value=0 if run is None else 1,
        )
        phase = GaugeMetricFamily(
            f"{PREFIX}_migration_phase",
            "The running migration's FSM state: 1 for the current one, 0 for the others "
            "(only while a migration is in flight).",
            labels=["migration", "phase"],
        )
        age = GaugeMetricFamily(
            f"{PREFIX}_migration_phase_age_seconds",
            "Seconds since the running migration entered its current state.",
            labels=["migration", "phase"],
        )
        cohort = GaugeMetricFamily(
            f"{PREFIX}_phase_cohort_agents",
            "Agents that must answer the running migration's current phase.",
            labels=["migration", "phase"],
        )
        answered = GaugeMetricFamily(
            f"{PREFIX}_phase_acked_agents",
            "Agents of the current phase's cohort that acknowledged it so far.",
            labels=["migration", "phase"],
        )
        if run is not None:
            name, machine = run.migration.name, run.machine
            current = machine.state
            for state in MigrationState:
                phase.add_metric([name, state.value], 1 if state is current else 0)
            entered = machine.history[-1].entered_at if machine.history else self.clock()
            age.add_metric([name, current.value], max(0.0, self.clock() - entered))
            ledger = machine.ledger
            if ledger is not None and not ledger.closed:
                cohort.add_metric([name, ledger.phase.value], len(ledger.cohort))
                answered.add_metric([name, ledger.phase.value], len(ledger.acked))
        yield from (phase, age, cohort, answered)

    def _events(self) -> Iterator[Metric]:
        counts = self.counts
        acks = CounterMetricFamily(
            f"{PREFIX}_acks",
            "Acknowledgements that counted, by phase, since this process started.",
            labels=["phase"],
        )
        nacks = CounterMetricFamily(
            f"{PREFIX}_nacks",
            "Refusals (NACKs) that counted, by phase, since this process started.",
            labels=["phase"],
        )
        for phase in sorted(ACKED_PHASES, key=lambda p: p.value):
            acks.add_metric([phase.value], counts.acks[phase])
            nacks.add_metric([phase.value], counts.nacks[phase])
        ignored = CounterMetricFamily(
            f"{PREFIX}_answers_ignored",
            "Answers that changed nothing (duplicate, stale, stranger, closed), by phase.",
            labels=["phase", "outcome"],
        )
        for (phase, outcome), value in sorted(counts.ignored_answers.items(), key=str):
            ignored.add_metric([phase.value, outcome], value)
        retries = CounterMetricFamily(
            f"{PREFIX}_lock_retries",
            "SQL attempts that gave up waiting for a lock (lock_timeout) and were retried.",
            labels=["phase"],
        )
        for phase in (Phase.EXECUTE, Phase.CONTRACT, Phase.ROLLBACK):
            retries.add_metric([phase.value], counts.lock_retries[phase])
        rows = CounterMetricFamily(
            f"{PREFIX}_backfill_rows",
            "Rows updated by backfill batches that committed, by table.",
            labels=["table"],
        )
        for table, value in sorted(counts.backfill_rows.items()):
            rows.add_metric([table], value)
        bad = CounterMetricFamily(
            f"{PREFIX}_bad_frames",
            "Frames or handshakes from clients that were refused, by error code.",
            labels=["code"],
        )
        for code, value in sorted(counts.bad_frames.items()):
            bad.add_metric([code], value)
        finished = CounterMetricFamily(
            f"{PREFIX}_migrations_finished",
            "Migrations this process finished since it started, by final status.",
            labels=["status"],
        )
        for status in (MigrationStatus.COMPLETED, MigrationStatus.FAILED):
            finished.add_metric([status.value], counts.finished[status])
        yield from (acks, nacks, ignored, retries, rows, bad, finished)

    def _leadership(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            f"{PREFIX}_leader_epoch",
            "The leader epoch this replica knows (it grows at every takeover).",
            value=self.leadership.epoch(),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_is_leader",
            "1 when this replica is the leader (it runs migrations), 0 on a standby.",
            value=1 if self.leadership.is_leader() else 0,
        )

    def _database(self) -> Iterator[Metric]:
        if self.database_up is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_database_up",
                "1 when the last probe of the database (SELECT 1) succeeded, else 0.",
                value=1 if self.database_up else 0,
            )
        if self.migrations_by_status is not None:
            family = GaugeMetricFamily(
                f"{PREFIX}_migrations",
                "Rows of lockstep.migrations by status (the database's history, cached).",
                labels=["status"],
            )
            for status, value in sorted(self.migrations_by_status.items()):
                family.add_metric([status], value)
            yield family


class CoordinatorMetrics:
    """One coordinator's registry: subscribe to its events, `await refresh()`, `render()`.

    `migration_counts` reads the history's rows by status (`PostgresMigrationCounts`);
    `database_probe` says whether the database answers (`coordinator.http.PostgresProbe`).
    Both are awaited by `refresh`, which the HTTP server calls before each render, because a
    prometheus_client collector cannot await. Call `close` (or use `with`) to unsubscribe.
    """

    def __init__(
        self,
        coordinator: CoordinatorView,
        leadership: LeaderView,
        *,
        migration_counts: MigrationCounts | None = None,
        database_probe: Callable[[], Awaitable[tuple[bool, str]]] | None = None,
        process_metrics: bool = True,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.counts = EventCounts()
        self.collector = CoordinatorCollector(coordinator, leadership, self.counts)
        self.registry.register(self.collector)
        if process_metrics:
            ProcessCollector(registry=self.registry)
        self._migration_counts = migration_counts
        self._database_probe = database_probe
        self._unsubscribe: Callable[[], None] | None = coordinator.subscribe(self.counts)

    async def refresh(self) -> None:
        """Read what needs I/O (the database probe, the history counts); never raises."""
        if self._database_probe is not None:
            up, _ = await self._database_probe()
            self.collector.database_up = up
        if self._migration_counts is not None:
            try:
                self.collector.migrations_by_status = dict(await self._migration_counts())
            except (psycopg.Error, OSError) as exc:
                log.warning("metrics: cannot read the migration history: %s", exc)
                self.collector.migrations_by_status = None

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric, as of now."""
        return generate_latest(self.registry)

    def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def __enter__(self) -> CoordinatorMetrics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PostgresMigrationCounts:
    """`MigrationCounts` from `lockstep.migrations`, read at most once per `max_age` seconds.

    Scrapes come every few seconds from every Prometheus replica; the history changes once per
    migration, so a cached count spares the database a connection per scrape. Concurrent
    callers share one read. An absent schema (lockstep never ran there) counts nothing.
    """

    def __init__(self, dsn: str, *, max_age: float = 10.0, timeout: float = 2.0) -> None:
        self.dsn = make_conninfo(dsn, connect_timeout=max(1, round(timeout)))
        self.max_age = max_age
        self.timeout = timeout
        #: Reads actually made (the cache's effect, for tests).
        self.reads = 0
        self._lock = trio.Lock()
        self._read_at: float | None = None
        self._cached: dict[str, int] = {}
        #: Why the last read failed: repeated until `max_age` passed, so a database that is
        #: down is not asked again by every scrape.
        self._error: str | None = None

    async def __call__(self) -> Mapping[str, int]:
        async with self._lock:
            if self._read_at is None or trio.current_time() - self._read_at >= self.max_age:
                try:
                    self._cached, self._error = await self._read(), None
                except (psycopg.Error, OSError) as exc:
                    self._error = str(exc).strip() or type(exc).__name__
                self._read_at = trio.current_time()
            if self._error is not None:
                raise OSError(self._error)
            return dict(self._cached)

    async def _read(self) -> dict[str, int]:
        self.reads += 1
        conn = await pgthread.connect(self.dsn, autocommit=True)
        try:

            def work() -> dict[str, int]:
                conn.execute(
                    "SELECT set_config('statement_timeout', %s, false)",
                    (f"{int(self.timeout * 1000)}ms",),
                )
                try:
                    rows = conn.execute(
                        "SELECT status, count(*) FROM lockstep.migrations GROUP BY status"
                    ).fetchall()
                except psycopg.errors.UndefinedTable:
                    return {}
                return {str(status): int(count) for status, count in rows}

            with trio.fail_after(self.timeout * 2):
                return await pgthread.run_in_thread(conn, work)
        except trio.TooSlowError as exc:
            raise OSError(f"no answer within {self.timeout * 2:.1f} s") from exc
        finally:
            await pgthread.close(conn)


__all__ = [
    "PREFIX",
    "CoordinatorCollector",
    "CoordinatorMetrics",
    "CoordinatorView",
    "EventCounts",
    "LeaderView",
    "MigrationCounts",
    "PostgresMigrationCounts",
    "RunView",
]
