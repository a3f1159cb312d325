"""The `lockstep` subcommands, one module each.

A command module exposes ``register(subparsers) -> None``, which adds its parser and sets
``func=`` (``func(args) -> int``, the exit code) as the parser default; then it is listed in
``coordinator.cli.COMMANDS``. Commands report expected failures by raising `CommandError`, which
the CLI prints as one ``error: ...`` line on stderr and turns into exit status 1; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, TypeAlias

from rich.console import Console

from coordinator.cli.failures import CommandError

if TYPE_CHECKING:
    # Generic only in typeshed: subscripting it at run time raises TypeError.
    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = ["CommandError", "Subparsers", "stderr_console", "stdout_console"]


def stdout_console() -> Console:
    """A console for a command's normal output.

    Colour only on a terminal (rich decides, honouring NO_COLOR/FORCE_COLOR); no automatic
    highlighting or hard wrapping, so piped output stays plain text one can grep.
    """
    return Console(file=sys.stdout, highlight=False, soft_wrap=True, emoji=False)


def stderr_console() -> Console:
    """Like `stdout_console`, for errors and diagnostics."""
    return Console(file=sys.stderr, highlight=False, soft_wrap=True, emoji=False)
