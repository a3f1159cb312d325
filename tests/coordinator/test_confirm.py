"""CONFIRM is sent and not waited for: a migration completes without a round of acks.

A missing, late or refused CONFIRM ack could only ever be a warning, so waiting for them held
the next migration a full round for nothing. The agents still run `on_confirm` and answer;
those answers arrive after the result and must be taken quietly (no error frame back to an
agent for answering the migration that just finished).
"""

from __future__ import annotations

import trio

from agent import MigrationInfo, open_agent
from coordinator import open_coordinator
from coordinator.events import AnswerReceived, BadFrame
from statemachine import AckOutcome, Migration, MigrationStatus, Phase
from tests.support.flow import EventLog, make_users


async def test_a_migration_completes_while_on_confirm_still_runs(dsn: str) -> None:
    make_users(dsn)
    release = trio.Event()
    confirmed = trio.Event()

    async def on_confirm(info: MigrationInfo) -> None:
        await release.wait()
        confirmed.set()

    events = EventLog()
    async with (
        open_coordinator(dsn, ack_timeout=60) as coord,
        open_agent(coord.url, agent_id="slow", on_confirm=on_confirm),
        open_agent(coord.url, agent_id="quick"),
    ):
        coord.subscribe(events)
        await coord.wait_for_agents(2, timeout=10)
        with trio.fail_after(20):  # far below ack_timeout: nobody waited for "slow"
            result = await coord.run_migration(
                Migration("add_email", ["ALTER TABLE users ADD COLUMN email text"])
            )
        assert result.status is MigrationStatus.COMPLETED, result.reason
        assert result.warnings == ()
        assert not confirmed.is_set(), "the result came before the slow agent confirmed"
        release.set()
        with trio.fail_after(10):
            await confirmed.wait()
            while not [
                e
                for e in events.events
                if isinstance(e, AnswerReceived)
                and e.agent_id == "slow"
                and e.phase is Phase.CONFIRM
            ]:
                await trio.sleep(0.01)
        # Another migration runs at once, and the late answer was not refused as a stranger's.
        second = await coord.run_migration(
            Migration("add_phone", ["ALTER TABLE users ADD COLUMN phone text"])
        )
        assert second.status is MigrationStatus.COMPLETED, second.reason
    late = [e for e in events.events if isinstance(e, AnswerReceived) and e.agent_id == "slow"]
    assert [(e.phase, e.outcome) for e in late if e.migration == "add_email"][-1:] == [
        (Phase.CONFIRM, AckOutcome.RECORDED)
    ], "a late CONFIRM ack is still counted"
    assert not [e for e in events.events if isinstance(e, BadFrame)], "no error frame sent"
