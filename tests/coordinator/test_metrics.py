"""The coordinator's Prometheus metrics, scraped over HTTP while real migrations run.

A real coordinator on the test database, real agents over WebSockets, and ``/metrics`` parsed
with prometheus_client's parser: the figures must follow the fleet and the migration (agents
connected, the current phase and its cohort, acks by phase, backfilled rows, lock retries,
finished migrations and the history's rows by status). The event counters are also checked
one event at a time, with the events the engine emits.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

import psycopg
import trio
from psycopg.conninfo import make_conninfo

from agent import MigrationInfo, open_agent
from coordinator import Coordinator, open_coordinator
from coordinator.backfill import BackfillProgress
from coordinator.events import AnswerReceived, BadFrame, Event, MigrationFinished
from coordinator.executor import PostgresExecutor
from coordinator.http import HttpEndpoint, PostgresProbe, StaticLeadership, open_http
from coordinator.metrics import CoordinatorMetrics, EventCounts, PostgresMigrationCounts
from coordinator.pg.attempts import LockRetry, RetryPolicy
from statemachine import Backfill, Migration, MigrationStatus, Phase
from statemachine.ledger import AckOutcome
from tests.support.flow import HookLog, agents, failing, make_users, raw_client, say_hello
from tests.support.http_client import Samples, get, scrape, value

HANG_GUARD = 30.0


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until `check()` holds (the engine's state, not a clock, is what we wait for)."""
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.01)


async def scrape_until(
    http: HttpEndpoint, check: Callable[[Samples], bool], timeout: float = 10.0
) -> Samples:
    with trio.fail_after(timeout):
        while True:
            samples = await scrape(http.port)
            if check(samples):
                return samples
            await trio.sleep(0.02)


# ------------------------------------------------------- while migrations run
async def test_metrics_follow_a_migration_from_start_to_end(dsn: str) -> None:
    make_users(dsn)
    gate = trio.Event()

    async def wait_for_gate(info: MigrationInfo) -> None:
        await gate.wait()

    migration = Migration(
        "add_full_name",
        ["ALTER TABLE users ADD COLUMN full_name text"],
        rollback_sql=["ALTER TABLE users DROP COLUMN full_name"],
        backfills=[Backfill("users", "full_name = name", batch_size=1)],
    )
    log = HookLog()
    async with (
        open_coordinator(dsn) as coord,
        open_http(
            coord,
            readiness=StaticLeadership(PostgresProbe(dsn)),
            migration_counts=PostgresMigrationCounts(dsn, max_age=0.0),
        ) as http,
        agents(coord.url, ["a1", "a2"], log, {"a1": {"on_apply": wait_for_gate}}),
    ):
        await coord.wait_for_agents(2, timeout=5)
        before = await scrape(http.port)
        assert value(before, "lockstep_agents_connected") == 2
        assert value(before, "lockstep_migration_in_flight") == 0
        assert value(before, "lockstep_acks_total", phase="announce") == 0
        assert value(before, "lockstep_migrations", status="completed") is None  # no rows
        assert value(before, "lockstep_database_up") == 1
        assert value(before, "lockstep_is_leader") == 1

        result: list[MigrationStatus] = []

        async def run() -> None:
            result.append((await coord.run_migration(migration)).status)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            # A failed assertion must not leave a1 holding APPLY until the ack timeout.
            nursery.start_soon(release_at_exit, gate)
            # a1 holds APPLY open: the scrape sees the phase, its cohort and who acked.
            during = await scrape_until(
                http,
                lambda s: value(s, "lockstep_phase_acked_agents", **labels("apply")) == 1,
            )
            assert value(during, "lockstep_migration_in_flight") == 1
            assert value(during, "lockstep_migration_phase", **labels("apply")) == 1
            assert value(during, "lockstep_migration_phase", **labels("announce")) == 0
            age = value(during, "lockstep_migration_phase_age_seconds", **labels("apply"))
            assert age is not None and age >= 0
            assert value(during, "lockstep_phase_cohort_agents", **labels("apply")) == 2
            assert value(during, "lockstep_acks_total", phase="announce") == 2
            assert value(during, "lockstep_backfill_rows_total", table="users") == 2
            assert value(during, "lockstep_migrations", status="running") == 1
            gate.set()
            await until(lambda: bool(result))
            nursery.cancel_scope.cancel()
        assert result == [MigrationStatus.COMPLETED]

        # CONFIRM is not waited for: its acks are counted as they come, after the result.
        after = await scrape_until(
            http, lambda s: value(s, "lockstep_acks_total", phase="confirm") == 2
        )
    assert value(after, "lockstep_migration_in_flight") == 0
    assert value(after, "lockstep_migration_phase", **labels("apply")) is None
    for phase in ("announce", "apply", "confirm"):
        assert value(after, "lockstep_acks_total", phase=phase) == 2, phase
    assert value(after, "lockstep_acks_total", phase="rollback") == 0
    assert value(after, "lockstep_nacks_total", phase="apply") == 0
    assert value(after, "lockstep_migrations_finished_total", status="completed") == 1
    assert value(after, "lockstep_migrations", status="completed") == 1
    assert value(after, "lockstep_backfill_rows_total", table="users") == 2


async def release_at_exit(gate: trio.Event) -> None:
    try:
        await trio.sleep_forever()
    finally:
        gate.set()


def labels(phase: str) -> dict[str, str]:
    return {"migration": "add_full_name", "phase": phase}


async def test_a_nack_is_counted_and_the_failure_recorded(dsn: str) -> None:
    migration = Migration("refused", ["CREATE TABLE refused (id int)"])
    async with (
        open_coordinator(dsn) as coord,
        open_http(coord, migration_counts=PostgresMigrationCounts(dsn, max_age=0.0)) as http,
        agents(coord.url, ["a1"], HookLog(), {"a1": {"on_announce": failing("not today")}}),
    ):
        await coord.wait_for_agents(1, timeout=5)
        with trio.fail_after(HANG_GUARD):
            result = await coord.run_migration(migration)
        assert result.status is MigrationStatus.FAILED
        samples = await scrape(http.port)
    assert value(samples, "lockstep_nacks_total", phase="announce") == 1
    assert value(samples, "lockstep_acks_total", phase="rollback") == 1
    assert value(samples, "lockstep_migrations_finished_total", status="failed") == 1
    assert value(samples, "lockstep_migrations", status="failed") == 1


async def test_agents_connected_follows_joins_and_leaves(dsn: str) -> None:
    async with open_coordinator(dsn) as coord, open_http(coord) as http:
        # Without a readiness object: the only coordinator, its history's database probed.
        assert (await get(http.port, "/readyz")).text == "ready: leader, epoch 0\n"
        assert value(await scrape(http.port), "lockstep_agents_connected") == 0
        async with open_agent(coord.url, agent_id="solo"):
            await coord.wait_for_agents(1, timeout=5)
            assert value(await scrape(http.port), "lockstep_agents_connected") == 1
        await scrape_until(http, lambda s: value(s, "lockstep_agents_connected") == 0)


async def test_lease_traffic_is_counted(dsn: str) -> None:
    """Renewals (the idle load), leases that expire under a live-looking link (the sign of
    a partition or an overloaded coordinator) and agents departing are all visible."""
    lease = 0.6
    async with open_coordinator(dsn, lease_seconds=lease) as coord, open_http(coord) as http:
        assert value(await scrape(http.port), "lockstep_lease_seconds") == lease
        async with open_agent(coord.url, agent_id="renewer"):
            await scrape_until(http, lambda s: value(s, "lockstep_lease_renewals_total") >= 2)
        async with raw_client(coord.url) as ws:
            await say_hello(ws, "silent")  # connected, and never renews
            await scrape_until(
                http, lambda s: value(s, "lockstep_leases_expired_while_connected_total") == 1
            )
        async with raw_client(coord.url) as ws:
            await say_hello(ws, "vanished")  # gone without a Release: departing
        await scrape_until(http, lambda s: value(s, "lockstep_agents_departing") == 1)
        await scrape_until(http, lambda s: value(s, "lockstep_agents_departing") == 0)
        samples = await scrape(http.port)
        assert value(samples, "lockstep_leases_expired_while_connected_total") == 1
        assert value(samples, "lockstep_lease_renewals_refused_total") == 0


async def test_bad_frames_are_counted_by_code(dsn: str) -> None:
    async with (
        open_coordinator(dsn) as coord,
        open_http(coord) as http,
        raw_client(coord.url) as ws,
    ):
        await say_hello(ws, "rogue")
        await ws.send_message("this is not json")
        await ws.send_message("{also not json")
        await scrape_until(
            http, lambda s: value(s, "lockstep_bad_frames_total", code="malformed_frame") == 2
        )


async def test_lock_retries_are_counted(dsn: str) -> None:
    make_users(dsn)
    holder = psycopg.connect(dsn)
    holder.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
    released = threading.Event()

    def release() -> None:
        if not released.is_set():
            released.set()
            holder.rollback()

    def on_event(event: Event) -> None:
        if isinstance(event, LockRetry):
            release()

    fast = RetryPolicy(max_attempts=50, max_seconds=20, base_delay=0.01, max_delay=0.05)
    try:
        async with (
            open_coordinator(dsn, lock_timeout=0.1, lock_retry=fast) as coord,
            open_http(coord) as http,
        ):
            coord.subscribe(on_event)
            with trio.fail_after(HANG_GUARD):
                result = await coord.run_migration(
                    Migration("add_email", ["ALTER TABLE users ADD COLUMN email text"])
                )
            assert result.status is MigrationStatus.COMPLETED, result.reason
            samples = await scrape(http.port)
    finally:
        release()
        holder.close()
    assert result.lock_retries >= 1
    assert value(samples, "lockstep_lock_retries_total", phase="execute") == result.lock_retries


# --------------------------------------------------------------- leadership
class Standby:
    def is_leader(self) -> bool:
        return False

    def epoch(self) -> int:
        return 7

    def leader_description(self) -> str:
        return "another replica"

    async def database_reachable(self) -> tuple[bool, str]:
        return False, "connection refused"


def bare_coordinator() -> Coordinator:
    return Coordinator(executor=PostgresExecutor("dbname=unused"))


async def test_leadership_and_the_database_probe_are_reported() -> None:
    async with open_http(bare_coordinator(), readiness=Standby()) as http:
        samples = await scrape(http.port)
    assert value(samples, "lockstep_is_leader") == 0
    assert value(samples, "lockstep_leader_epoch") == 7
    assert value(samples, "lockstep_database_up") == 0


async def test_an_unreadable_history_leaves_the_family_out() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    closed = make_conninfo(host="127.0.0.1", port=port, dbname="x", user="x")
    counts = PostgresMigrationCounts(closed, max_age=60.0)
    async with open_http(bare_coordinator(), migration_counts=counts) as http:
        first = await scrape(http.port)
        await scrape(http.port)
    assert not any(name == "lockstep_migrations" for name, _ in first)
    assert value(first, "lockstep_agents_connected") == 0  # the rest is still there
    assert counts.reads == 1  # a failed read is cached too: a dead database is not hammered


async def test_history_counts_are_cached(dsn: str) -> None:
    async with open_coordinator(dsn):
        pass  # creates the lockstep schema
    counts = PostgresMigrationCounts(dsn, max_age=60.0)
    for _ in range(5):
        assert await counts() == {}
    assert counts.reads == 1


def test_each_coordinator_has_its_own_registry() -> None:
    """Two in one process: no 'duplicated timeseries' error, and no shared figures."""
    first, second = bare_coordinator(), bare_coordinator()
    leader = StaticLeadership()
    with CoordinatorMetrics(first, leader) as one, CoordinatorMetrics(second, leader) as two:
        first.events.emit(MigrationFinished("m", MigrationStatus.COMPLETED, None))
        assert b'lockstep_migrations_finished_total{status="completed"} 1.0' in one.render()
        assert b'lockstep_migrations_finished_total{status="completed"} 0.0' in two.render()


def test_closing_unsubscribes() -> None:
    coord = bare_coordinator()
    metrics = CoordinatorMetrics(coord, StaticLeadership())
    metrics.close()
    coord.events.emit(MigrationFinished("m", MigrationStatus.COMPLETED, None))
    assert metrics.counts.finished[MigrationStatus.COMPLETED] == 0


# ------------------------------------------------------------ event counters
def answer(phase: Phase, ok: bool, outcome: AckOutcome = AckOutcome.RECORDED) -> AnswerReceived:
    return AnswerReceived("m", "a1", phase, ok, outcome, None if ok else "no")


def progress(table: str, batches: int, rows: int, migration: str = "m") -> BackfillProgress:
    return BackfillProgress(
        migration, Phase.EXECUTE, "batch", table=table, batches=batches, rows=rows
    )


def test_answers_are_counted_by_phase_and_outcome() -> None:
    counts = EventCounts()
    for event in (
        answer(Phase.ANNOUNCE, True),
        answer(Phase.ANNOUNCE, True),
        answer(Phase.APPLY, False),
        answer(Phase.APPLY, True, AckOutcome.DUPLICATE),
        answer(Phase.APPLY, False, AckOutcome.STALE),
    ):
        counts(event)
    assert counts.acks == {Phase.ANNOUNCE: 2}
    assert counts.nacks == {Phase.APPLY: 1}
    assert counts.ignored_answers == {(Phase.APPLY, "duplicate"): 1, (Phase.APPLY, "stale"): 1}


def test_backfill_rows_are_counted_from_running_totals() -> None:
    counts = EventCounts()
    for event in (
        progress("users", 1, 10),
        progress("users", 2, 20),
        progress("users", 3, 25),
        progress("orders", 1, 4),
        progress("users", 1, 5),  # a resumed run backfills afresh: its totals restart
        progress("users", 2, 9),
    ):
        counts(event)
    assert counts.backfill_rows == {"users": 34, "orders": 4}


def test_lock_retries_bad_frames_and_finishes_are_counted() -> None:
    counts = EventCounts()
    retry = LockRetry("m", Phase.CONTRACT, "retry", group=0, attempt=1, delay=0.1, blockers=())
    counts(retry)
    counts(retry)
    counts(BadFrame("a1", "127.0.0.1", "malformed_frame", "bad"))
    counts(MigrationFinished("m", MigrationStatus.FAILED, "refused"))
    assert counts.lock_retries == {Phase.CONTRACT: 2}
    assert counts.bad_frames == {"malformed_frame": 1}
    assert counts.finished == {MigrationStatus.FAILED: 1}
