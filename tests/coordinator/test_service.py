"""`lockstep serve` in-process: leading and standing by, the durable queue, abort, handover.

Real PostgreSQL, real loopback WebSockets, two services on one database where it matters.
The SIGKILL versions with real processes are in tests/system/test_serve_faults.py.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import psycopg
import pytest
import trio
from trio_websocket import ConnectionClosed

from agent import MigrationInfo, open_agent
from coordinator.events import Event, PhaseStarted
from coordinator.queue import AbortRefused, SubmitRefused, request_abort, submit
from coordinator.service import Service, open_service
from statemachine import Migration, Phase
from statemachine.lease import certainly_expired_after
from statemachine.protocol import CLOSE_NOT_LEADER
from tests.support.flow import columns, hang, make_users, raw_client, say_hello

ADD_EMAIL = "ALTER TABLE users ADD COLUMN email text"
#: Short leases too: a new leader waits out its predecessor's leases before CONTRACT
#: (1.1 x lease + 1 s + probe_interval + probe_timeout: 6.4 s here).
LEASE = 2.0
FAST = {
    "leader_poll_interval": 0.05,
    "probe_interval": 0.2,
    "poll_interval": 0.5,
    "lease_seconds": LEASE,
}


def _migration(name: str = "add_email", *, contract: bool = False) -> Migration:
    return Migration(
        name,
        [ADD_EMAIL],
        rollback_sql=["ALTER TABLE users DROP COLUMN IF EXISTS email"],
        contract_sql=["ALTER TABLE users DROP COLUMN name"] if contract else [],
        ack_timeout=10,
    )


def _rows(dsn: str) -> dict[str, tuple[str, str | None]]:
    with psycopg.connect(dsn) as conn:
        found = conn.execute("SELECT name, status, reason FROM lockstep.migrations").fetchall()
    return {name: (status, reason) for name, status, reason in found}


async def _until(predicate: object, timeout: float = 15) -> None:
    assert callable(predicate)
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)


def _first_leader(
    dsn: str, firsts: list[Service], leading: trio.Event, stop: trio.Event, stopped: trio.Event
) -> Callable[[], Awaitable[None]]:
    """A service that leads (`leading`, appended to `firsts`) until `stop`, then stops
    without rolling anything back: its run stays durable for the next leader (`stopped`)."""

    async def first_leader() -> None:
        async with open_service(dsn, **FAST) as first:
            await first.wait_until_leader()
            firsts.append(first)
            leading.set()
            await stop.wait()
        stopped.set()

    return first_leader


async def test_a_submitted_migration_is_run_by_the_leader_with_its_fleet(dsn: str) -> None:
    make_users(dsn)
    async with open_service(dsn, **FAST) as service:
        with trio.fail_after(10):
            await service.wait_until_leader()
        async with open_agent(service.url, agent_id="a1") as agent:
            [queued] = await submit(dsn, [_migration()])
            assert queued.outcome == "queued"
            await _until(lambda: _rows(dsn).get("add_email", ("",))[0] == "completed")
            assert agent.is_applied("add_email")
    assert "email" in columns(dsn)


async def test_submitting_is_idempotent_and_refuses_changed_sql(dsn: str) -> None:
    make_users(dsn)
    async with open_service(dsn, **FAST) as service:
        await service.wait_until_leader()
        first = await submit(dsn, [_migration()])
        again = await submit(dsn, [_migration()])
        assert again[0].id == first[0].id and again[0].outcome.startswith("already")
        changed = Migration("add_email", ["ALTER TABLE users ADD COLUMN email varchar(10)"])
        with pytest.raises(SubmitRefused, match="different SQL"):
            await submit(dsn, [changed])


async def test_the_leader_says_its_epoch_and_a_standby_refuses_agents(dsn: str) -> None:
    async with open_service(dsn, **FAST) as leader:
        await leader.wait_until_leader()
        async with raw_client(leader.url) as ws:
            welcome = await say_hello(ws, "a0")
        assert welcome.epoch == leader.epoch() > 0, "agents could not tell a deposed leader"
        async with open_service(dsn, **FAST) as standby:
            await trio.sleep(0.3)
            assert not standby.is_leader()
            async with raw_client(standby.url) as ws:
                with pytest.raises(ConnectionClosed) as closed:
                    await say_hello(ws, "a1")
            assert closed.value.reason.code == CLOSE_NOT_LEADER


async def test_abort_rolls_back_the_running_migration_and_cancels_a_queued_one(dsn: str) -> None:
    make_users(dsn)
    async with open_service(dsn, **FAST) as service:
        await service.wait_until_leader()
        async with open_agent(service.url, agent_id="a1", on_apply=hang):
            await submit(dsn, [_migration(), _migration("second")])
            await _until(lambda: _rows(dsn)["add_email"][0] == "running")
            await _until(lambda: service.coordinator.in_flight is not None)
            run = service.coordinator.in_flight
            assert run is not None
            await _until(lambda: run.machine.state.name == "APPLY")
            queued = await request_abort(dsn, "second", "not today")
            assert queued.outcome == "cancelled"
            running = await request_abort(dsn, "add_email", "wrong column name")
            assert running.outcome == "requested"
            await _until(lambda: _rows(dsn)["add_email"][0] == "failed")
    rows = _rows(dsn)
    assert "aborted by an operator: wrong column name" in (rows["add_email"][1] or "")
    assert rows["second"][0] == "cancelled"
    assert "email" not in columns(dsn)  # rolled back: rollback_sql ran


async def test_abort_is_refused_once_contract_committed(dsn: str) -> None:
    make_users(dsn)
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS lockstep")
    async with open_service(dsn, **FAST) as service:
        await service.wait_until_leader()
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO lockstep.migrations (id, name, checksum, status, checkpoint) "
            "VALUES ('x', 'dropped_name', '', 'running', %s)",
            (json.dumps({"contracted": True}),),
        )
    with pytest.raises(AbortRefused, match="only goes forward"):
        await request_abort(dsn, "dropped_name", "too late")
    with pytest.raises(AbortRefused, match="no migration named"):
        await request_abort(dsn, "nothing", "typo")


async def test_a_stopped_leader_leaves_its_run_to_the_standby_which_finishes_it(
    dsn: str,
) -> None:
    make_users(dsn)
    applied = trio.Event()

    async def noted(info: MigrationInfo) -> None:
        applied.set()
        await trio.sleep_forever()  # never acks APPLY on the first leader

    leading, stop, stopped = trio.Event(), trio.Event(), trio.Event()
    firsts: list[Service] = []
    first_leader = _first_leader(dsn, firsts, leading, stop, stopped)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first_leader)
            await leading.wait()
            async with open_service(dsn, **FAST) as standby:
                async with open_agent(firsts[0].url, agent_id="a1", on_apply=noted):
                    await submit(dsn, [_migration(contract=True)])
                    await applied.wait()
                stop.set()
                await stopped.wait()
                assert _rows(dsn)["add_email"][0] == "running"
                await standby.wait_until_leader()
                assert standby.epoch() > 0
                async with open_agent(standby.url, agent_id="a1") as agent:
                    await _until(lambda: _rows(dsn)["add_email"][0] == "completed")
                    assert agent.is_applied("add_email")
    assert "email" in columns(dsn) and "name" not in columns(dsn)  # CONTRACT ran once


async def test_a_leader_whose_write_is_fenced_stands_by_and_the_run_still_completes(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A successor's epoch seen by a fenced write (not by the lock probe, made slow here) is
    news the service lives through: it stands by, leads again and finishes the run once."""
    make_users(dsn)
    migration = Migration(
        "drop_name",
        [ADD_EMAIL],
        contract_sql=["SELECT pg_sleep(1)", "ALTER TABLE users DROP COLUMN name"],
        rollback_sql=["ALTER TABLE users DROP COLUMN IF EXISTS email"],
        ack_timeout=10,
    )

    def sleeping() -> bool:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state = 'active' AND query LIKE 'SELECT pg_sleep(1)%'"
            ).fetchone()
        return bool(row and row[0])

    with trio.fail_after(60):
        # The probe is slow so that the fenced write is what notices the successor (the
        # write comes about 1 s after the bump, while CONTRACT's pg_sleep runs). Every term
        # after the first waits out its predecessor's leases plus a probe bound before
        # CONTRACT, so the probe is only as slow as needed: 10 s, not more.
        async with open_service(dsn, **{**FAST, "probe_interval": 10.0}) as service:
            await service.wait_until_leader()
            async with open_agent(service.url, agent_id="a1") as agent:
                await submit(dsn, [migration])
                while not await trio.to_thread.run_sync(sleeping):
                    await trio.sleep(0.02)
                with psycopg.connect(dsn, autocommit=True) as conn:  # a successor's takeover
                    conn.execute("UPDATE lockstep.leader SET epoch = epoch + 1 WHERE id = 1")
                await _until(lambda: _rows(dsn)["drop_name"][0] == "completed", timeout=40)
                assert service.terms >= 2
                await _until(lambda: agent.is_applied("drop_name"))
    assert "email" in columns(dsn) and "name" not in columns(dsn)
    # The fenced write noticed the successor, not the lock probe.
    assert "(epoch 1 is no longer the leader's); standing by" in caplog.text
    assert "lost the leadership" not in caplog.text


async def test_a_new_leader_waits_out_leases_it_cannot_account_for(dsn: str) -> None:
    """The first leader stops mid-APPLY while agent a1, which only knows the first leader's
    URL, still owes its APPLY ack on the old query set. The new leader cannot know a1's lease:
    it keeps a1 in the cohort and runs CONTRACT only once a lease granted just before the
    takeover certainly expired; a1 has fenced itself by then and is reported departed."""
    make_users(dsn)
    applied = trio.Event()

    async def noted(info: MigrationInfo) -> None:
        applied.set()
        await trio.sleep_forever()  # never acks APPLY

    leading, stop, stopped = trio.Event(), trio.Event(), trio.Event()
    firsts: list[Service] = []
    first_leader = _first_leader(dsn, firsts, leading, stop, stopped)
    marks: dict[str, float] = {}

    def on_event(event: Event) -> None:
        if isinstance(event, PhaseStarted) and event.phase is Phase.CONTRACT:
            marks.setdefault("contract", trio.current_time())

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first_leader)
            await leading.wait()
            async with open_service(dsn, **FAST) as standby:
                standby.coordinator.subscribe(on_event)
                async with open_agent(
                    firsts[0].url, agent_id="a1", on_apply=noted, lease_seconds=LEASE
                ) as a1:

                    async def watch_fence() -> None:
                        while not a1.fenced:
                            await trio.sleep(0.01)
                        marks["fenced"] = trio.current_time()

                    nursery.start_soon(watch_fence)
                    await submit(dsn, [_migration(contract=True)])
                    await applied.wait()
                    stop.set()
                    await stopped.wait()
                    await standby.wait_until_leader()
                    marks["takeover"] = trio.current_time()
                    await _until(lambda: _rows(dsn)["add_email"][0] == "completed", timeout=60)
                    assert not a1.is_applied("add_email"), "a1 never heard of APPLY"
    waited = marks["contract"] - marks["takeover"]
    print(f"\nfailover: CONTRACT {waited:.2f} s after the takeover")
    assert waited >= certainly_expired_after(LEASE), "CONTRACT ran inside an unaccounted lease"
    assert marks["fenced"] < marks["contract"], "a1 was still unfenced when CONTRACT ran"
    with psycopg.connect(dsn) as conn:
        (checkpoint,) = conn.execute(
            "SELECT checkpoint FROM lockstep.migrations WHERE name = 'add_email'"
        ).fetchone()
    assert checkpoint["departed"] == ["a1"]
    assert "email" in columns(dsn) and "name" not in columns(dsn)
