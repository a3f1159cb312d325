"""The `lockstep` command line: ``lockstep COMMAND [options]``.

Each subcommand lives in its own module under `coordinator.cli.commands`; to add one, write the
module (see that package's docstring) and add it to `COMMANDS`. The order of `COMMANDS` is the
order in ``lockstep --help``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from types import ModuleType

from rich.markup import escape

from coordinator.cli.commands import (
    CommandError,
    apply,
    check_db,
    demo,
    diagram,
    lint,
    plan,
    status,
    stderr_console,
)

__all__ = ["COMMANDS", "build_parser", "main"]

#: Subcommand modules, each with ``register(subparsers) -> None``.
COMMANDS: list[ModuleType] = [
    demo,
    check_db,
    status,
    diagram,
    plan,
    lint,
    apply,
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lockstep",
        description=(
            "Zero-downtime PostgreSQL schema migrations: the database and the live fleet move "
            "in lockstep."
        ),
    )
    subparsers = parser.add_subparsers(
        title="commands", dest="command", metavar="COMMAND", required=True
    )
    for module in COMMANDS:
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI with `argv` (default: ``sys.argv[1:]``); return the process exit status.

    0 success, 1 a reported failure (``error: ...`` on stderr), 2 bad usage, 130 interrupted.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CommandError as exc:
        err = stderr_console()
        err.print(f"[bold red]error:[/] {escape(str(exc))}")
        if exc.details:
            for line in exc.details.splitlines():
                err.print(f"  {escape(line)}", style="dim")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        stderr_console().print("interrupted")
        return EXIT_INTERRUPTED
