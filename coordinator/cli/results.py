"""How the commands that run migrations narrate them: one line per event, and the results.

Shared by ``lockstep apply`` (which runs them) and ``lockstep serve`` / ``submit --wait``
(which report what a leader ran), so an operator reads the same words everywhere.
"""

from __future__ import annotations

from typing import Any

from coordinator.cli.output import Output, safe
from coordinator.events import (
    AgentJoined,
    AgentLeft,
    AnswerReceived,
    Event,
    PhaseStarted,
    SqlProgress,
)
from coordinator.pg.attempts import LockRetry
from statemachine.phases import MigrationStatus
from statemachine.result import MigrationResult


class EventPrinter:
    """Prints the coordinator's events as they happen, one line each (timestamped when piped).

    Every value an agent or the database supplied goes through `safe`: NACK text with
    ``ESC[2J`` or ``[/]`` is shown as data.
    """

    def __init__(self, out: Output) -> None:
        self.out = out

    def __call__(self, event: Event) -> None:
        out = self.out
        if isinstance(event, AgentJoined):
            out.detail(f"[dim]agent {safe(event.agent_id)} joined from {safe(event.remote)}[/]")
        elif isinstance(event, AgentLeft):
            out.event(f"[dim]agent {safe(event.agent_id)} left: {safe(event.reason)}[/]")
        elif isinstance(event, PhaseStarted):
            cohort = ", ".join(event.cohort) or "no agents"
            out.event(
                f"[bold]{event.phase.name}[/] {safe(event.migration)} [dim]({safe(cohort)})[/]"
            )
        elif isinstance(event, AnswerReceived):
            if event.ok:
                out.detail(f"  {safe(event.agent_id)}: ack")
            else:
                out.event(f"  {safe(event.agent_id)}: [red]nack[/]: {safe(event.error or '')}")
        elif isinstance(event, LockRetry):
            out.event(f"  [yellow]{safe(event.message)}[/]")
        elif isinstance(event, SqlProgress):
            out.detail(f"  [dim]{safe(event.message)}[/]")


def print_result(out: Output, result: MigrationResult) -> None:
    seconds = sum(p.duration for p in result.phases)
    path = " -> ".join(result.phase_names)
    if result.status is MigrationStatus.COMPLETED:
        out.event(f"[bold green]completed[/] {safe(result.name)} in {seconds:.1f} s ({path})")
    else:
        restored = {True: "restored", False: "LEFT EXPANDED", None: "untouched"}
        out.event(f"[bold red]failed[/] {safe(result.name)} ({path}): {safe(result.reason or '')}")
        out.event(f"  schema: {restored[result.schema_restored]}")
    if result.lock_retries:
        out.event(f"  lock retries: {result.lock_retries}")
    if result.departed:
        names = ", ".join(safe(a) for a in result.departed)
        out.event(f"  departed (lease expired, fenced): {names}")
    for b in result.backfills:
        state = "" if b.complete else " [red](stopped)[/]"
        out.event(
            f"  backfill {safe(b.table)}: {b.rows} rows in {b.batches} batches "
            f"({b.seconds:.1f} s){state}"
        )
    for warning in result.warnings:
        out.event(f"  [yellow]warning:[/] {safe(warning)}")


def result_json(result: MigrationResult) -> dict[str, Any]:
    return {
        "name": result.name,
        "status": result.status.value,
        "reason": result.reason,
        "schema_restored": result.schema_restored,
        "phases": [
            {"phase": p.phase.name.lower(), "duration": round(p.duration, 6)} for p in result.phases
        ],
        "lock_retries": result.lock_retries,
        "departed": list(result.departed),
        "warnings": list(result.warnings),
    }
