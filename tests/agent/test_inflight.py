"""`agent.using(name)`: the fleet's switch waits for work that chose the old query set."""

from __future__ import annotations

import psycopg
import pytest
import trio

from agent import open_agent
from agent.inflight import InFlight
from agent.threaded import ThreadedAgent
from coordinator import open_coordinator
from coordinator.events import Event, PhaseStarted
from statemachine import Migration, MigrationStatus, Phase
from tests.support.flow import make_users

RENAME = Migration(
    "drop_name",
    "ALTER TABLE users ADD COLUMN full_name TEXT",
    contract_sql="ALTER TABLE users DROP COLUMN name",
    rollback_sql="ALTER TABLE users DROP COLUMN full_name",
)


def _old_query(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute("SELECT id, name FROM users").fetchall()


async def test_apply_ack_waits_for_work_on_the_old_query_set(dsn: str) -> None:
    make_users(dsn)
    apply_started = trio.Event()
    outcome: list[str] = []

    def watch(event: Event) -> None:
        if isinstance(event, PhaseStarted) and event.phase is Phase.APPLY:
            apply_started.set()

    async with open_coordinator(dsn, ack_timeout=10) as coord:
        coord.subscribe(watch)
        async with open_agent(coord.url, agent_id="app-1") as agent, trio.open_nursery() as n:
            entered = trio.Event()

            async def request() -> None:
                with agent.using("drop_name") as new:
                    entered.set()
                    assert not new
                    # A slow request that chose the old query set before APPLY arrived.
                    await apply_started.wait()
                    await trio.sleep(0.5)
                    await trio.to_thread.run_sync(_old_query, dsn)
                    outcome.append("old query ok")

            n.start_soon(request)
            await entered.wait()
            result = await coord.run_migration(RENAME)
            assert result.status is MigrationStatus.COMPLETED, result.reason
            with agent.using("drop_name") as new:
                assert new
    assert outcome == ["old query ok"]


async def test_stuck_old_work_nacks_apply_after_the_ack_timeout(dsn: str) -> None:
    make_users(dsn)
    async with (
        open_coordinator(dsn, ack_timeout=1) as coord,
        open_agent(coord.url, agent_id="app-1") as agent,
    ):
        with agent.using("drop_name"):
            result = await coord.run_migration(RENAME)
    assert result.status is MigrationStatus.FAILED
    assert "app-1" in (result.reason or "")
    assert "drop_name" not in agent.applied


async def test_threaded_using_counts_work_from_other_threads(dsn: str) -> None:
    make_users(dsn)
    async with open_coordinator(dsn, ack_timeout=10) as coord:
        app = ThreadedAgent(coord.url, agent_id="django-1")
        await trio.to_thread.run_sync(app.start)
        try:
            lease = app.using("drop_name")
            assert await trio.to_thread.run_sync(lease.__enter__) is False
            async with trio.open_nursery() as nursery:
                results = []

                async def migrate() -> None:
                    results.append(await coord.run_migration(RENAME))

                nursery.start_soon(migrate)
                await trio.sleep(0.5)
                assert results == []  # APPLY is held by the old-version work
                await trio.to_thread.run_sync(_old_query, dsn)
                await trio.to_thread.run_sync(lease.__exit__, None, None, None)
            assert results[0].status is MigrationStatus.COMPLETED, results[0].reason
            assert app.is_applied("drop_name")
        finally:
            await trio.to_thread.run_sync(app.stop)


def test_a_closed_counter_refuses_new_work_and_reports_when_the_last_block_ends() -> None:
    """What a stopping agent relies on before it sends `Release`: after `close` no block can
    start (the refusal is raised under the lock that counts blocks in), and `when_idle` fires
    once the blocks already running have all ended, whatever their version."""
    flight = InFlight()
    woke: list[str] = []
    assert not flight.when_idle(lambda: woke.append("idle")), "nothing in flight: no wait"
    with flight.using("a", lambda name: False), flight.using("b", lambda name: True):
        assert flight.when_idle(lambda: woke.append("idle"))
        flight.close(lambda: RuntimeError("stopped"))
        with pytest.raises(RuntimeError, match="stopped"), flight.using("a", lambda n: True):
            pass
        assert woke == []
    assert woke == ["idle"]
    assert flight.count("a", False) == flight.count("b", True) == 0
