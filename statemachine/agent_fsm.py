"""The agent-side state machine: which schema the app may use, decided without I/O.

The agent driver (`agent/client.py`) hands every phase notice to `AgentMachine.on_notice`,
runs the hook it names, and reports the hook's outcome back. The machine keeps the set of
applied migrations, which is what `agent.is_applied(name)` answers from:

    IDLE --announced--> READY --saw_execute--> EXECUTING --switched--> SWITCHED
    SWITCHED --saw_contract--> CONTRACTING --confirmed--> IDLE   (migration stays applied)
    any --reverted--> IDLE                                      (migration no longer applied)

An agent that connects mid-migration never saw ANNOUNCE, so EXECUTE and APPLY are also accepted
from IDLE: it is still in the APPLY cohort and must switch before CONTRACT may run.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable, Iterable
from typing import Any

from transitions import EventData, Machine

from statemachine.phases import Phase


def quiet_transitions_logging() -> None:
    """Keep the `transitions` library's loggers at WARNING unless the app chose a level.

    It logs every state change at INFO; an app whose root logger is at INFO would get a few
    lines per phase per agent, in every worker. A level the app set on ``transitions`` (or
    on one of its child loggers, which takes precedence) is left alone.
    """
    logger = logging.getLogger("transitions")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)


quiet_transitions_logging()


class AgentState(enum.Enum):
    IDLE = "idle"
    READY = "ready"  # acked ANNOUNCE, still on the old queries
    EXECUTING = "executing"  # the coordinator is running the expand SQL
    SWITCHED = "switched"  # on the new queries (acked APPLY)
    CONTRACTING = "contracting"  # the coordinator is running the contract SQL


A = AgentState

AGENT_TRANSITIONS: list[dict[str, Any]] = [
    {"trigger": "announced", "source": [A.IDLE, A.READY], "dest": A.READY},
    {"trigger": "saw_execute", "source": [A.IDLE, A.READY], "dest": A.EXECUTING},
    {
        "trigger": "switched",
        "source": [A.IDLE, A.READY, A.EXECUTING],
        "dest": A.SWITCHED,
        "after": "_mark_applied",
    },
    {"trigger": "saw_contract", "source": A.SWITCHED, "dest": A.CONTRACTING},
    {"trigger": "confirmed", "source": [A.IDLE, A.SWITCHED, A.CONTRACTING], "dest": A.IDLE},
    {"trigger": "reverted", "source": list(AgentState), "dest": A.IDLE, "after": "_unmark_applied"},
]


class Hook(enum.Enum):
    """Which application hook a notice asks the driver to run."""

    ON_ANNOUNCE = "on_announce"
    ON_APPLY = "on_apply"
    ON_CONFIRM = "on_confirm"
    ON_ROLLBACK = "on_rollback"


_HOOK_FOR_PHASE = {
    Phase.ANNOUNCE: Hook.ON_ANNOUNCE,
    Phase.APPLY: Hook.ON_APPLY,
    Phase.CONFIRM: Hook.ON_CONFIRM,
    Phase.ROLLBACK: Hook.ON_ROLLBACK,
}
_TRIGGER_AFTER_HOOK = {
    Phase.ANNOUNCE: "announced",
    Phase.APPLY: "switched",
    Phase.CONFIRM: "confirmed",
    Phase.ROLLBACK: "reverted",
}
_TRIGGER_ON_NOTICE = {Phase.EXECUTE: "saw_execute", Phase.CONTRACT: "saw_contract"}


@dataclasses.dataclass(frozen=True)
class Step:
    """What the driver must do for one notice: run `hook` (if any), then ack or nack."""

    hook: Hook | None
    ack: bool
    problem: str | None = None  # set when the notice does not fit the agent's state


class AgentMachine:
    """Current migration, phase and applied set of one agent."""

    state: AgentState
    announced: Callable[..., bool]
    saw_execute: Callable[..., bool]
    switched: Callable[..., bool]
    saw_contract: Callable[..., bool]
    confirmed: Callable[..., bool]
    reverted: Callable[..., bool]

    def __init__(self, applied: Iterable[str] = ()) -> None:
        self.applied: set[str] = set(applied)
        self.migration_id: str | None = None
        self.migration_name: str | None = None
        self.phase: Phase | None = None
        self.seen: list[tuple[str, Phase]] = []  # (migration name, phase) in arrival order
        self.machine = Machine(
            model=self,
            states=list(AgentState),
            initial=A.IDLE,
            transitions=AGENT_TRANSITIONS,
            auto_transitions=False,
            send_event=True,
        )

    def _mark_applied(self, event: EventData) -> None:
        if self.migration_name is not None:
            self.applied.add(self.migration_name)

    def _unmark_applied(self, event: EventData) -> None:
        if self.migration_name is not None:
            self.applied.discard(self.migration_name)

    def is_applied(self, name: str) -> bool:
        return name in self.applied

    def on_notice(self, migration_id: str, name: str, phase: Phase, ack_required: bool) -> Step:
        """Record a phase notice and say which hook to run; never raises for odd input."""
        if self.migration_id != migration_id:
            if self.state is not A.IDLE and phase is not Phase.ROLLBACK:
                # The coordinator moved on (we missed a CONFIRM/ROLLBACK): it is the
                # authority, so follow it and say so rather than wedge.
                problem = (
                    f"notice for {name!r} while {self.migration_name!r} was in "
                    f"{self.state.name}; following the coordinator"
                )
                self.machine.set_state(A.IDLE)
            else:
                problem = None
            self.migration_id, self.migration_name = migration_id, name
        else:
            problem = None
        self.phase = phase
        self.seen.append((name, phase))
        trigger = _TRIGGER_ON_NOTICE.get(phase)
        if trigger is not None:
            self._try(trigger)
            return Step(hook=None, ack=ack_required, problem=problem)
        return Step(hook=_HOOK_FOR_PHASE[phase], ack=ack_required, problem=problem)

    def resync(self, applied: Iterable[str]) -> tuple[set[str], set[str]]:
        """Adopt the coordinator's applied list after a reconnect.

        While we were away the coordinator may have completed a migration (we must switch) or
        rolled one back because we vanished mid-phase (we must revert). Any in-flight migration
        is forgotten: if it is still running we are not in its cohort until its next phase.
        Returns (newly applied, no longer applied).
        """
        wanted = set(applied)
        added, removed = wanted - self.applied, self.applied - wanted
        self.applied = wanted
        self.migration_id = self.migration_name = None
        self.phase = None
        self.machine.set_state(A.IDLE)
        return added, removed

    def hook_failed(self, phase: Phase) -> None:
        """The hook raised (the driver NACKs). Only ROLLBACK still changes the state: the
        coordinator puts the schema back whatever the app managed, so the new queries must
        stop now; staying "applied" would send them against a schema that no longer has them.
        """
        if phase is Phase.ROLLBACK:
            self.hook_succeeded(phase)

    def hook_succeeded(self, phase: Phase) -> None:
        trigger = _TRIGGER_AFTER_HOOK.get(phase)
        if trigger is not None:
            self._try(trigger)
        if phase in (Phase.CONFIRM, Phase.ROLLBACK):
            self.migration_id = self.migration_name = None
            self.phase = None

    def _try(self, trigger: str) -> bool:
        """Fire `trigger` if the current state allows it; unexpected orders are tolerated."""
        if trigger in self.machine.get_triggers(self.state):
            return bool(getattr(self, trigger)())
        return False


__all__ = [
    "AGENT_TRANSITIONS",
    "AgentMachine",
    "AgentState",
    "Hook",
    "Step",
    "quiet_transitions_logging",
]
