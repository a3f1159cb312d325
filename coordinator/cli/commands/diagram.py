"""`lockstep diagram`: write (or check) the state-machine diagrams generated from the code.

The diagrams themselves come from `statemachine.diagrams`, which only returns text and bytes;
this command is the I/O around it, shared by `docs/gen_diagrams.py` and the freshness test.
Besides the files in ``--out`` it refreshes the generated blocks (diagrams, guard table) of the
Markdown page next to them, `state-machine.md`, so the page can never show a stale diagram.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from coordinator.cli.commands import CommandError, stderr_console, stdout_console
from statemachine.diagrams import (
    MACHINES,
    REFRESH_COMMAND,
    DiagramError,
    embed,
    markdown_sections,
    render,
    stale,
)

if TYPE_CHECKING:
    from coordinator.cli.commands import Subparsers

NAME = "diagram"
DEFAULT_OUT = Path("docs/diagrams")
MARKDOWN_NAME = "state-machine.md"


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="render the migration and agent state machines (mermaid + SVG)",
        description=(
            "Render the coordinator's migration FSM and the agent FSM from the transition tables "
            "the runtime uses, guards on the edges: <name>.mmd (mermaid) and <name>.svg "
            "(Graphviz, needs pygraphviz), and refresh the generated blocks of the Markdown "
            f"page ({MARKDOWN_NAME} next to --out, if there is one). With --check, write "
            "nothing and exit 1 if anything differs from what the code generates."
        ),
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"directory of the diagram files (default: {DEFAULT_OUT})",
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help=f"page with generated blocks to refresh (default: {MARKDOWN_NAME} next to --out)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="compare instead of writing; exit 1 naming every stale or missing file",
    )
    parser.add_argument(
        "--no-svg",
        dest="svg",
        action="store_false",
        help="only the mermaid files (no pygraphviz needed)",
    )
    parser.set_defaults(func=run)


def markdown_page(out: Path, markdown: Path | None) -> Path | None:
    """The page to refresh: the one given, else `state-machine.md` beside `out` if present."""
    if markdown is not None:
        if not markdown.is_file():
            raise CommandError(f"--markdown {markdown} is not a file")
        return markdown
    default = out.resolve().parent / MARKDOWN_NAME
    return default if default.is_file() else None


def read_committed(out: Path, names: list[str]) -> dict[str, bytes | None]:
    """The current bytes of each diagram file in `out` (None for a missing file)."""
    return {name: (out / name).read_bytes() if (out / name).is_file() else None for name in names}


def check(out: Path, *, with_svg: bool = True, markdown: Path | None = None) -> list[str]:
    """Problems with the diagrams in `out` (and the page `markdown`); empty when up to date."""
    exts = ("mmd", "svg") if with_svg else ("mmd",)
    names = [f"{m.name}.{ext}" for m in MACHINES for ext in exts]
    try:
        problems = stale(MACHINES, read_committed(out, names), with_svg=with_svg)
        if markdown is not None:
            text = markdown.read_text()
            if embed(text, markdown_sections()) != text:
                problems.append(f"{markdown.name}: its generated blocks differ from the code")
    except DiagramError as exc:
        raise CommandError(str(exc)) from None
    return problems


def write(out: Path, *, with_svg: bool = True, markdown: Path | None = None) -> list[Path]:
    """(Re)write every diagram in `out` and the page's generated blocks; returns the paths."""
    try:
        files = render(MACHINES, with_svg=with_svg)
        page = embed(markdown.read_text(), markdown_sections()) if markdown else None
    except DiagramError as exc:
        raise CommandError(
            str(exc), details="pass --no-svg to write only the mermaid files"
        ) from None
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} exists and is not a directory")
    written = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            path = out / name
            path.write_bytes(content)
            written.append(path)
        if markdown is not None and page is not None:
            markdown.write_text(page)
            written.append(markdown)
    except OSError as exc:
        raise CommandError(f"cannot write the diagrams: {exc}") from None
    return written


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    markdown = markdown_page(out, args.markdown)
    if args.check:
        problems = check(out, with_svg=args.svg, markdown=markdown)
        if problems:
            raise CommandError(
                f"diagrams in {out} are out of date; run `{REFRESH_COMMAND}` to refresh them",
                details="\n".join(problems),
            )
        stdout_console().print(f"diagrams in {out} match the code")
        return 0
    for path in write(out, with_svg=args.svg, markdown=markdown):
        stdout_console().print(f"wrote {path}")
    if not args.svg:
        stderr_console().print("SVG skipped (--no-svg)")
    return 0
