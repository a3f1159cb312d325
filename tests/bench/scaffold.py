"""What every `make bench-*` shares: the common options, the console, the header line and
where the markdown goes.

Kept in one place so the benchmarks cannot drift apart in how they are run and how their
sections of docs/benchmarks.md say what machine measured them.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psycopg
from rich.console import Console

from tests.bench.markdown import replace_section


def parser(prog: str, doc: str | None, default_out: Path, what: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark takes: --dsn, --out, --no-write."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0] if doc else None)
    add_output_options(p, default_out, what)
    return p


def add_output_options(p: argparse.ArgumentParser, default_out: Path, what: str) -> None:
    p.add_argument("--dsn", help="PostgreSQL server to use (default: $LOCKSTEP_DSN or embedded)")
    p.add_argument(
        "--out",
        type=Path,
        default=default_out,
        help=f"markdown file whose {what} section is rewritten (default docs/benchmarks.md)",
    )
    p.add_argument("--no-write", action="store_true", help="print the markdown, write nothing")


def console() -> Console:
    """Rich's console; piped into a CI log (no terminal width), wrapped at 200 columns, not
    rich's 80, so the wide tables stay readable."""
    return Console() if sys.stdout.isatty() else Console(width=200)


def server_version(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


def command(target: str, argv: Sequence[str] | None) -> str:
    """How this run is repeated: the make target with the arguments it was given (`argv` as
    `main` got it: None means the command line's)."""
    words = list(sys.argv[1:] if argv is None else argv)
    # A server's address is this machine's business (and may hold a password): not the doc's.
    for i, word in enumerate(words):
        if word.startswith("--dsn="):
            words[i] = "--dsn=…"
        elif word == "--dsn" and i + 1 < len(words):
            words[i + 1] = "…"
    extra = " ".join(words)
    return f"make {target} ARGS='{extra}'" if extra else f"make {target}"


def header(
    target: str, argv: Sequence[str] | None, server: str, seconds: float, detail: str
) -> list[str]:
    """The section's first line: the command, `detail`, the server and the machine."""
    return [
        f"Measured with `{command(target, argv)}` ({detail}, PostgreSQL"
        f" {server_version(server)}, {os.cpu_count()} CPUs, {platform.system()}"
        f" {platform.machine()}, {seconds:.0f} s in total)."
    ]


def write_section(path: Path, section: str, begin: str, end: str, title: str) -> None:
    """Replace the text between a benchmark's markers; append its section if there is none."""
    replace_section(path, section, begin=begin, end=end, title=title)


def publish(
    args: argparse.Namespace,
    out: Console,
    text: str,
    write: Callable[[Path, str], None],
    what: str,
) -> None:
    """Print the markdown (`--no-write`) or write it to its section of `--out`."""
    if args.no_write:
        out.print(text, markup=False, highlight=False, soft_wrap=True)
    else:
        write(args.out, text)
        out.print(f"wrote the {what} section of {args.out}")


class GcClock:
    """CPU seconds spent in the cyclic garbage collector while open (`gc.callbacks`).

    CPU time of the collecting thread (`time.thread_time`), not wall time: on a shared
    machine a collection's wall time also counts every moment the process was not running.
    """

    def __init__(self) -> None:
        self.total = 0.0
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.thread_time()
        else:
            self.total += time.thread_time() - self._started

    def __enter__(self) -> GcClock:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)
