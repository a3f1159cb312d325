"""The `lockstep` command line: ``lockstep COMMAND [options]``.

Each subcommand lives in its own module under `coordinator.cli.commands`; to add one, write the
module (see that package's docstring) and add it to `COMMANDS`. The order of `COMMANDS` is the
order in ``lockstep --help``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from importlib import metadata
from types import FrameType, ModuleType

from coordinator.cli import config
from coordinator.cli.commands import (
    CommandError,
    abort,
    agent_token,
    apply,
    check_db,
    demo,
    diagram,
    lint,
    plan,
    serve,
    status,
    stderr_console,
    submit,
    validate,
)
from coordinator.cli.output import safe

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
    serve,
    submit,
    abort,
    validate,
    agent_token,
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a closed pipe
EXIT_TERMINATED = 143  # 128 + SIGTERM


def _version() -> str:
    try:
        return metadata.version("lockstep")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lockstep",
        description=(
            "Zero-downtime PostgreSQL schema migrations: the database and the live fleet move "
            "in lockstep."
        ),
    )
    parser.add_argument("--version", action="version", version=f"lockstep {_version()}")
    subparsers = parser.add_subparsers(
        title="commands", dest="command", metavar="COMMAND", required=True
    )
    for module in COMMANDS:
        module.register(subparsers)
    for name, subparser in subparsers.choices.items():
        config.install(subparser, name)  # LOCKSTEP_* and lockstep.toml for every option
    return parser


class _Terminated:
    """SIGTERM handler: re-raised as SIGINT so trio (or Python) stops the command cleanly
    with KeyboardInterrupt, then reported as "terminated" with exit status 143."""

    def __init__(self) -> None:
        self.received = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.received = True
        signal.raise_signal(signal.SIGINT)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI with `argv` (default: ``sys.argv[1:]``); return the process exit status.

    0 success, 1 a reported failure (``error: ...`` on stderr), 2 bad usage (also a bad
    ``LOCKSTEP_*`` value or lockstep.toml), 130 interrupted (Ctrl-C), 141 the output pipe
    closed (``| head``), 143 terminated (SIGTERM).
    """
    try:
        parser = build_parser()
    except config.ConfigError as exc:
        stderr_console().print(f"lockstep: error: {safe(exc)}")
        return EXIT_USAGE
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    func: Callable[[argparse.Namespace], int] = args.func
    terminated = _Terminated()
    previous = signal.signal(signal.SIGTERM, terminated)
    # A process started in the background by a non-interactive shell (`cmd &`, some init
    # scripts and supervisors) inherits SIGINT *ignored*; SIGTERM, re-raised as SIGINT, would
    # then do nothing and `lockstep serve` could not be stopped. Both signals stop lockstep.
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return func(args)
    except CommandError as exc:
        err = stderr_console()
        err.print(f"[bold red]error:[/] {safe(exc)}")
        if exc.details:
            for line in exc.details.splitlines():
                err.print(f"  {safe(line)}", style="dim")
        return EXIT_FAILURE
    except config.ConfigError as exc:
        stderr_console().print(f"lockstep {args.command}: error: {safe(exc)}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        if terminated.received:
            stderr_console().print("terminated (SIGTERM)")
            return EXIT_TERMINATED
        stderr_console().print("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`lockstep lint --json | head`): not an error of ours, and
        # nothing more can be written. Point stdout at /dev/null so the final flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    finally:
        signal.signal(signal.SIGTERM, previous)
        if previous_int is signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
