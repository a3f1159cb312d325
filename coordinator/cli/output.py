"""How commands print: untrusted text as data, --json, -v/-q, timestamps when piped.

Everything a command prints that came from outside (an agent's NACK message or id, a
PostgreSQL error, a migration's name or SQL, a path the user typed) goes through `safe`:
control characters are escaped (`statemachine.text.printable`) so it cannot clear the screen
or forge a line, and rich markup is escaped so ``[/]`` is shown instead of crashing rich.
Consoles are built with ``emoji=False`` so ``:-1:`` in a value stays text.

`Output` is what a command prints through: `event` lines (prefixed with a UTC timestamp when
stdout is not a terminal, so piped logs can be correlated), `detail` lines shown only with
``-v``, and nothing but errors with ``-q``. With ``--json`` a command prints one JSON object
at the end (`emit_json`) and nothing else on stdout.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.markup import escape

from statemachine.text import printable


def safe(text: object, *, keep_newlines: bool = False) -> str:
    """`text` ready to embed in rich markup: control characters and markup escaped."""
    return escape(printable(str(text), keep_newlines=keep_newlines))


def console(file: Any = None) -> Console:
    """A plain console: no emoji codes, no highlighting, no hard wrapping."""
    return Console(
        file=file if file is not None else sys.stdout,
        highlight=False,
        soft_wrap=True,
        emoji=False,
    )


class Output:
    """A command's stdout, honouring ``--json``, ``-v`` and ``-q``."""

    def __init__(self, *, json_mode: bool = False, verbosity: int = 0, out: Console | None = None):
        self.console = out if out is not None else console()
        self.json_mode = json_mode
        self.verbosity = verbosity
        self.timestamps = not self.console.is_terminal

    def _stamp(self) -> str:
        if not self.timestamps:
            return ""
        now = datetime.datetime.now(datetime.UTC)
        return f"{now:%Y-%m-%dT%H:%M:%S.%f}"[:-3] + "Z "

    def event(self, markup: str) -> None:
        """One line per event (markup; interpolate outside text through `safe`)."""
        if self.json_mode or self.verbosity < 0:
            return
        self.console.print(escape(self._stamp()) + markup)

    def detail(self, markup: str) -> None:
        """Like `event`, shown only with ``-v``."""
        if self.verbosity > 0:
            self.event(markup)

    def print(self, renderable: Any) -> None:
        """A table or block, unless --json or -q."""
        if not self.json_mode and self.verbosity >= 0:
            self.console.print(renderable)

    def emit_json(self, document: dict[str, Any]) -> None:
        """The one JSON object of a ``--json`` run."""
        if self.json_mode:
            sys.stdout.write(json.dumps(document, default=str, sort_keys=True) + "\n")
            sys.stdout.flush()


__all__ = ["Output", "console", "logging_to_stderr", "safe"]


class _UtcFormatter(logging.Formatter):
    """``2026-12-03T13:35:26.182Z WARNING lockstep.coordinator: ...``: the stamp of `Output`."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"


@contextlib.contextmanager
def logging_to_stderr(verbosity: int) -> Iterator[None]:
    """While a long-running command runs, send lockstep's log records to stderr, stamped like
    events: warnings and errors, and with ``-v`` the INFO lines too (leadership, reconnects).
    Without it Python's last-resort handler prints bare messages: no time, level or source.
    The logger is put back as it was afterwards (the CLI also runs inside other programs)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_UtcFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("lockstep")
    level = logger.level
    logger.addHandler(handler)
    if verbosity > 0 and logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
