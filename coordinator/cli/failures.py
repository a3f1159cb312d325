"""The error every command raises for an expected failure (its own module, so the shared
option modules of `coordinator.cli` can raise it without importing the commands)."""

from __future__ import annotations

from statemachine.exceptions import LockstepError


class CommandError(LockstepError):
    """Raised by a command for an expected failure: shown as ``error: <message>`` (plus
    optional indented details), exit status 1, never a traceback."""

    def __init__(self, message: str, *, details: str | None = None) -> None:
        super().__init__(message)
        self.details = details
