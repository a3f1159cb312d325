"""Leader election on a real PostgreSQL: one leader at a time, and a lost session is noticed.

The cases of the issue this answers: terminating the leader's lock session (an operator's
`pg_terminate_backend`, or `idle_session_timeout`) let a second coordinator act while the
first still thought it led. Now the first notices within its probe bound and stops, and its
writes are fenced by the epoch the second took.
"""

from __future__ import annotations

import time

import psycopg
import pytest
import trio

from coordinator.history import Deposed, PostgresHistory
from coordinator.leader import LeadershipLost, open_leadership
from statemachine import Migration, MigrationMachine
from statemachine.checkpoint import Checkpoint


async def _schema(dsn: str) -> PostgresHistory:
    history = PostgresHistory(dsn)
    await history.ensure_schema()
    return history


def _lock_sessions(dsn: str) -> list[int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT backend_pid FROM lockstep.leader WHERE id = 1 AND backend_pid IS NOT NULL"
        ).fetchall()
    return [int(r[0]) for r in rows]


async def test_a_standby_waits_while_the_lock_is_held_then_leads_with_a_new_epoch(
    dsn: str,
) -> None:
    await _schema(dsn)
    epochs: list[int] = []
    first_may_leave = trio.Event()

    async def candidate(delay: float) -> None:
        await trio.sleep(delay)
        async with open_leadership(dsn, poll_interval=0.05) as lead:
            epochs.append(lead.epoch)
            if len(epochs) == 1:
                await first_may_leave.wait()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(candidate, 0)
            nursery.start_soon(candidate, 0.2)
            await trio.sleep(0.8)
            assert len(epochs) == 1, "the standby led while the leader held the lock"
            first_may_leave.set()
    assert len(epochs) == 2 and epochs[1] == epochs[0] + 1


async def test_a_terminated_lock_session_ends_the_leadership_within_the_probe_bound(
    dsn: str,
) -> None:
    history = await _schema(dsn)
    migration = Migration("m", ["SELECT 1"])
    machine = MigrationMachine(migration.id, has_contract=False, connected=[])
    await history.record_start(migration, Checkpoint.of(machine))
    stopped_after: list[float] = []
    with pytest.raises(LeadershipLost, match="lock session failed"):
        with trio.fail_after(20):
            async with open_leadership(dsn, probe_interval=0.2, probe_timeout=1.0) as lead:
                history.lead_with(lead)
                await history.save(migration, Checkpoint.of(machine))  # allowed: we lead
                (pid,) = _lock_sessions(dsn)
                with psycopg.connect(dsn, autocommit=True) as admin:
                    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                killed = time.monotonic()
                try:
                    await trio.sleep_forever()
                finally:
                    stopped_after.append(time.monotonic() - killed)
    print(f"leadership lost {stopped_after[0]:.2f} s after its session was terminated")
    assert stopped_after[0] < 0.2 + 1.0 + 2.0  # probe interval + timeout, with slack
    assert history.deposed
    # A successor takes the lock and a new epoch: the old epoch's writes are refused.
    async with open_leadership(dsn, poll_interval=0.05) as successor:
        assert successor.epoch > lead.epoch
        with pytest.raises(Deposed):
            await history.save(migration, Checkpoint.of(machine))


async def test_idle_session_timeout_does_not_end_the_leadership(dsn: str) -> None:
    await _schema(dsn)
    with psycopg.connect(dsn, autocommit=True) as admin:
        database = admin.execute("SELECT current_database()").fetchone()
        assert database is not None
        admin.execute(f'ALTER DATABASE "{database[0]}" SET idle_session_timeout = 300')
    async with open_leadership(dsn, probe_interval=0.5, probe_timeout=1.0) as lead:
        # Probes keep the session busy anyway; the setting is overridden for the lock
        # session, which a probe-free interval of over 0.3 s would otherwise end.
        await trio.sleep(1.5)
        assert lead.is_leader()


async def test_an_unreachable_database_is_waited_for_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with trio.move_on_after(1.5) as scope:
        async with open_leadership(
            "postgresql://lockstep@127.0.0.1:1/none?connect_timeout=1", poll_interval=0.1
        ):
            pytest.fail("led a database that cannot be reached")
    assert scope.cancelled_caught
    assert "cannot reach the database to take the leader lock" in caplog.text


async def test_a_leader_too_busy_to_look_at_its_probe_keeps_the_leadership(dsn: str) -> None:
    """A busy event loop is not a lost session: the leader must not depose itself (and
    drop its fleet) because it read the probe's answer late. The loop is blocked in
    stretches longer than the probe timeout, as the batches of a leader accepting 10,000
    agents were; the database answers each probe at once."""
    await _schema(dsn)
    async with open_leadership(dsn, probe_interval=0.05, probe_timeout=0.3) as lead:
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            await trio.sleep(0)  # one batch: a due probe starts its thread ...
            time.sleep(0.6)  # ... which answers now, but the loop looks only after 0.6 s
        await trio.sleep(0.5)  # the last probe is read and judged
        assert lead.is_leader(), lead.lost_reason
