"""Agents outlive coordinator restarts: they reconnect and resync what is applied."""

from __future__ import annotations

import trio

from agent import MigrationInfo, open_agent
from coordinator import Coordinator, open_coordinator, serve_coordinator
from statemachine import AgentMachine, Migration, MigrationStatus, Phase
from tests.support.flow import make_users


async def _until(predicate: object, timeout: float = 15) -> None:
    assert callable(predicate)
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


class Background:
    """A coordinator in its own task, so it can stop and restart under a live agent."""

    def __init__(self, nursery: trio.Nursery, dsn: str) -> None:
        self.nursery = nursery
        self.dsn = dsn
        self.scope = trio.CancelScope()
        self.stopped = trio.Event()

    async def start(self, port: int = 0) -> Coordinator:
        async def run(task_status: trio.TaskStatus[Coordinator]) -> None:
            with self.scope:
                await serve_coordinator(self.dsn, port=port, task_status=task_status)
            self.stopped.set()

        coordinator: Coordinator = await self.nursery.start(run)
        return coordinator

    async def stop(self) -> None:
        self.scope.cancel()
        await self.stopped.wait()


def _port(coordinator: Coordinator) -> int:
    return int(coordinator.url.rsplit(":", 1)[1])


async def test_agent_reconnects_and_adopts_a_migration_completed_while_away(dsn: str) -> None:
    make_users(dsn)
    calls: list[MigrationInfo] = []

    async def on_apply(info: MigrationInfo) -> None:
        calls.append(info)

    async with trio.open_nursery() as nursery:
        first = Background(nursery, dsn)
        coordinator = await first.start()
        port = _port(coordinator)
        async with open_agent(coordinator.url, agent_id="app-1", on_apply=on_apply) as agent:
            await first.stop()
            # The coordinator is gone; the agent keeps retrying in the background.
            await _until(lambda: not agent.connected)
            async with open_coordinator(dsn) as elsewhere:  # another port: the agent is not there
                result = await elsewhere.run_migration(
                    Migration("add_email", "ALTER TABLE users ADD COLUMN email TEXT")
                )
                assert result.status is MigrationStatus.COMPLETED
            assert not agent.is_applied("add_email")
            again = await Background(nursery, dsn).start(port)
            await _until(lambda: agent.sessions == 2)
            assert again.agents == {"app-1"}
            assert agent.is_applied("add_email")
            assert [(c.name, c.resynced) for c in calls] == [("add_email", True)]
            # And it is a full member of the fleet again.
            result = await again.run_migration(
                Migration("add_phone", "ALTER TABLE users ADD COLUMN phone TEXT")
            )
            assert result.status is MigrationStatus.COMPLETED
            assert agent.is_applied("add_phone")
        nursery.cancel_scope.cancel()


async def test_without_reconnect_the_agent_stays_disconnected(dsn: str) -> None:
    async with trio.open_nursery() as nursery:
        first = Background(nursery, dsn)
        coordinator = await first.start()
        port = _port(coordinator)
        async with open_agent(coordinator.url, agent_id="app-1", reconnect=False) as agent:
            await first.stop()
            await _until(lambda: not agent.connected)
            again = await Background(nursery, dsn).start(port)
            await trio.sleep(1.0)
            assert again.agents == frozenset()
            assert agent.sessions == 1
        nursery.cancel_scope.cancel()


def test_resync_reports_what_to_switch_and_what_to_revert() -> None:
    machine = AgentMachine(applied=["a", "b"])
    machine.on_notice("m-id", "c", Phase.APPLY, True)
    added, removed = machine.resync(["a", "d"])
    assert (added, removed) == ({"d"}, {"b"})
    assert machine.applied == {"a", "d"}
    assert machine.migration_id is None and machine.state.name == "IDLE"
