"""Why a migration rolled back, as data the result, the logs and the tests can all read."""

from __future__ import annotations

import dataclasses
import enum

from statemachine.phases import Phase


class FailureKind(enum.Enum):
    TIMEOUT = "timeout"  # cohort agents did not ack before the deadline
    NACK = "nack"  # an agent's hook raised
    DISCONNECT = "disconnect"  # a cohort agent went away before acking
    SQL_ERROR = "sql_error"  # a statement failed (PostgreSQL's message included)
    REFUSED = "refused"  # lint errors or a precondition stopped it before ANNOUNCE
    CANCELLED = "cancelled"  # the host program cancelled the migration


@dataclasses.dataclass(frozen=True)
class Failure:
    """The first cause of a rollback; later problems go to the result's warnings."""

    kind: FailureKind
    phase: Phase | None
    message: str
    agents: tuple[str, ...] = ()
    statement: str | None = None

    def describe(self) -> str:
        where = f" in {self.phase.name}" if self.phase else ""
        if self.kind is FailureKind.TIMEOUT:
            who = ", ".join(self.agents)
            return f"timeout{where}: agent(s) {who} did not ack ({self.message})"
        if self.kind is FailureKind.NACK:
            return f"nack{where} from agent {self.agents[0]}: {self.message}"
        if self.kind is FailureKind.DISCONNECT:
            return f"agent {self.agents[0]} disconnected{where} before acking"
        if self.kind is FailureKind.SQL_ERROR:
            return f"statement failed{where}: {self.statement!r}: {self.message}"
        return f"{self.kind.value}{where}: {self.message}"

    def __str__(self) -> str:
        return self.describe()
