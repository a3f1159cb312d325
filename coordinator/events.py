"""What the coordinator reports while it works, for terminal UIs, logs and tests.

Subscribers are plain synchronous callables: they run inline, so they must be quick and must
not raise (a raising subscriber is logged and ignored, never allowed to break a migration).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from statemachine.ledger import AckOutcome
from statemachine.phases import MigrationStatus, Phase

log = logging.getLogger("lockstep.coordinator")


@dataclasses.dataclass(frozen=True)
class AgentJoined:
    agent_id: str
    remote: str


@dataclasses.dataclass(frozen=True)
class AgentLeft:
    agent_id: str
    reason: str


@dataclasses.dataclass(frozen=True)
class PhaseStarted:
    migration: str
    phase: Phase
    cohort: tuple[str, ...]
    ack_required: bool


@dataclasses.dataclass(frozen=True)
class AnswerReceived:
    migration: str
    agent_id: str
    phase: Phase
    ok: bool
    outcome: AckOutcome
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class SqlProgress:
    migration: str
    phase: Phase
    message: str


@dataclasses.dataclass(frozen=True)
class MigrationFinished:
    migration: str
    status: MigrationStatus
    reason: str | None


@dataclasses.dataclass(frozen=True)
class BadFrame:
    agent_id: str | None
    remote: str
    code: str
    message: str


Event = (
    AgentJoined
    | AgentLeft
    | PhaseStarted
    | AnswerReceived
    | SqlProgress
    | MigrationFinished
    | BadFrame
)
Subscriber = Callable[[Event], None]


class EventBus:
    """Fan-out of events to subscribers; cheap when nobody listens."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Add a subscriber; returns a function that removes it."""
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber)

    def emit(self, event: Event) -> None:
        log.debug("%s", event)
        for subscriber in list(self._subscribers):
            try:
                subscriber(event)
            except Exception:
                log.exception("event subscriber %r failed on %r", subscriber, event)


@dataclasses.dataclass(frozen=True)
class Reporter:
    """Where SQL work reports progress: the migration's name and the coordinator's events.

    Each report is logged as well as emitted, so a coordinator without subscribers still
    leaves a trail of what its SQL did.
    """

    migration: str
    emit: Callable[[Event], None] | None = None

    def event(self, event: SqlProgress, level: int = logging.INFO) -> None:
        log.log(level, "%s %s: %s", event.migration or "-", event.phase.name, event.message)
        if self.emit is not None:
            self.emit(event)

    def say(self, phase: Phase, message: str) -> None:
        self.event(SqlProgress(self.migration, phase, message))
