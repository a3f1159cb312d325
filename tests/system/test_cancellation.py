"""A host cancelling `run_migration` mid-statement: the server stops the statement, agents are
told to roll back, the history says why, and the cancellation reaches the host as itself."""

from __future__ import annotations

import psycopg
import trio

from agent import open_agent
from coordinator import open_coordinator
from statemachine import Migration, Phase
from tests.support.flow import columns, history, make_users


def _sleeping_backends(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE query LIKE '%pg_sleep(60)%' AND pid <> pg_backend_pid()"
        ).fetchone()
    assert row is not None
    return int(row[0])


async def test_cancelling_a_running_statement_stops_it_and_rolls_back(dsn: str) -> None:
    make_users(dsn)
    migration = Migration(
        "slow_expand",
        ["ALTER TABLE users ADD COLUMN email TEXT", "SELECT pg_sleep(60)"],
        rollback_sql=["ALTER TABLE users DROP COLUMN email"],
    )
    reverted: list[str] = []

    async def on_rollback(info: object) -> None:
        reverted.append("rollback")

    async with (
        open_coordinator(dsn, ack_timeout=5) as coord,
        open_agent(coord.url, agent_id="app-1", on_rollback=on_rollback) as agent,
    ):
        await coord.wait_for_agents(1, timeout=5)
        with trio.move_on_after(30) as outer:
            async with trio.open_nursery() as nursery:

                async def cancel_once_sleeping() -> None:
                    while await trio.to_thread.run_sync(_sleeping_backends, dsn) == 0:
                        await trio.sleep(0.05)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(cancel_once_sleeping)
                await coord.run_migration(migration)
                raise AssertionError("run_migration returned although it was cancelled")
        assert not outer.cancelled_caught, "the cancelled run never came back"
        assert ("slow_expand", Phase.ROLLBACK) in agent.seen
        assert reverted == ["rollback"]
    assert await trio.to_thread.run_sync(_sleeping_backends, dsn) == 0
    assert "email" not in columns(dsn)
    [row] = history(dsn)
    assert row["status"] == "failed"
    assert "cancelled" in row["reason"]
