"""Markdown output shared by the benchmarks: tables, and a marked section of a doc to rewrite.

Each benchmark owns a block of docs/benchmarks.md between its own HTML-comment markers, so a
rerun replaces its figures and nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a markdown table; `|` and newlines in cells cannot break it."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return [line(headers), line(["---"] * len(headers)), *(line(r) for r in rows)]


def replace_section(
    path: Path, section: str, *, begin: str, end: str, title: str | None = None
) -> None:
    """Replace the text between `begin` and `end` in `path`; if the markers are missing, append
    them (under a `title` heading, if given)."""
    block = f"{begin}\n{section.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        appended = block if title is None else f"{title}\n\n{block}"
        text = (text.rstrip() + "\n\n" if text.strip() else "") + appended + "\n"
    path.write_text(text)
