"""Text that came from outside (agents, the database, files) made safe to print or log.

A NACK message, an agent's id, a PostgreSQL error or a migration's SQL may hold terminal
escape sequences (``ESC[2J`` clears the operator's screen; a carriage return overwrites a line
with a fake "completed"). `printable` turns every control character into a visible escape, so
such text is shown as data and can never act on the terminal or forge a log line. Escaping for
rich markup is the command line's job (`coordinator.cli.output`); this module is pure so the
coordinator's logs and the CLI use the same rule.
"""

from __future__ import annotations

import re
from typing import Final

#: C0 controls, DEL, C1 controls, and the Unicode format characters that reorder or hide text
#: (bidi overrides and isolates, zero-width joiners): what could make shown text lie.
_UNSAFE: Final = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    if char == "\n":
        return "\\n"
    if char == "\t":
        return "\\t"
    if char == "\r":
        return "\\r"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, *, keep_newlines: bool = False, limit: int | None = None) -> str:
    """`text` with every control or invisible formatting character escaped (``\\x1b``).

    `keep_newlines` keeps ``\\n`` as a line break (multi-line SQL, an error's details);
    `limit` cuts the result to that many characters, marking the cut with an ellipsis.
    """
    if keep_newlines:
        result = "\n".join(_UNSAFE.sub(_escape, line) for line in text.split("\n"))
    else:
        result = _UNSAFE.sub(_escape, text)
    if limit is not None and len(result) > limit:
        result = result[: max(limit - 1, 0)] + "\u2026"
    return result


def is_printable(text: str) -> bool:
    """Whether `printable` would leave `text` unchanged (no control or format characters)."""
    return _UNSAFE.search(text) is None


__all__ = ["is_printable", "printable"]
