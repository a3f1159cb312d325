"""The runner wakes for what it acts on, not once per ack (a task switch per agent per phase).

While a phase collects answers, the first recorded ack since the last checkpoint of the acks
wakes the runner (it schedules that checkpoint), and so does the ack that settles the phase;
the acks between do not. A NACK, which rolls the migration back, always wakes it. Between
wake-ups the runner sleeps: it does not spin through its loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio
import trio.testing

from coordinator.events import EventBus
from coordinator.fleet import Fleet
from coordinator.runner import ACK_CHECKPOINT_INTERVAL, MigrationRun
from statemachine import Migration, MigrationMachine, MigrationState, Phase
from statemachine.result import SqlAttempt
from statemachine.sql import ExecutionGroup, build_plan

AGENTS = [f"a{i}" for i in range(20)]


class _NoSql:
    async def run_phase(self, phase: Phase, groups: Sequence[ExecutionGroup]) -> list[SqlAttempt]:
        raise AssertionError("no SQL runs while answers are collected")


def _run() -> tuple[MigrationRun, list[str], list[None]]:
    """A run in ANNOUNCE for `AGENTS`; its wake-ups (by state) and its loop's rounds."""
    migration = Migration("add_c", ["ALTER TABLE t ADD COLUMN c int"])
    machine = MigrationMachine(migration.id, has_contract=False, connected=AGENTS)
    machine.start()
    run = MigrationRun(
        migration,
        build_plan(migration),
        fleet=Fleet(),
        executor=_NoSql(),
        events=EventBus(),
        ack_timeout=30,
        machine=machine,
    )
    wakes: list[str] = []
    rounds: list[None] = []
    wake, abort_now = run._wake, run._abort_now

    def counted_wake() -> None:
        wakes.append(run.machine.state.name)
        wake()

    def counted_round() -> bool:  # asked once per round of the collecting loop
        rounds.append(None)
        return abort_now()

    run._wake = counted_wake  # type: ignore[method-assign]
    run._abort_now = counted_round  # type: ignore[method-assign]
    return run, wakes, rounds


async def _answer(run: MigrationRun, agents: Sequence[str], nack: str | None = None) -> None:
    for agent in agents:
        await trio.sleep(0.001)  # the runner gets to run between two answers
        if agent == nack:
            run.on_nack(agent, run.migration.id, Phase.ANNOUNCE, "refused")
        else:
            run.on_ack(agent, run.migration.id, Phase.ANNOUNCE)


async def test_only_the_first_and_the_settling_ack_wake_the_runner() -> None:
    run, wakes, rounds = _run()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_answer, run, AGENTS)
            await run._collect_answers()
    assert run.machine.state is MigrationState.EXECUTE
    assert len(wakes) == 2, wakes
    # Waiting for the next checkpoint of the acks is a sleep, not a loop round per tick.
    assert len(rounds) <= 4, len(rounds)


async def test_a_nack_wakes_the_runner_at_once(autojump_clock: trio.testing.MockClock) -> None:
    run, wakes, _ = _run()
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_answer, run, AGENTS[:5], AGENTS[4])
        await run._collect_answers()
    assert run.machine.state is MigrationState.ROLLBACK
    # Virtual time: not woken, the runner would only notice at the acks' next checkpoint.
    assert trio.current_time() - started < ACK_CHECKPOINT_INTERVAL
    assert len(wakes) == 2, wakes
