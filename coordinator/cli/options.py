"""Options several commands share, and the validating `type=` functions behind them.

Every numeric option is validated by argparse (``--port 99999`` is a usage error, exit 2,
not a silent random port), and through `coordinator.cli.config` the same check applies to
``LOCKSTEP_*`` and lockstep.toml values.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
from collections.abc import Callable
from pathlib import Path

from psycopg.conninfo import make_conninfo

from coordinator.cli import config

DEFAULT_CONNECT_TIMEOUT = 10.0


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def integer_between(low: int, high: int | None = None) -> Callable[[str], int]:
    """A `type=` for whole numbers from `low` to `high` (no upper bound when None)."""

    def parse(text: str) -> int:
        value = _integer(text)
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    return parse


def positive(text: str) -> float:
    """A finite number > 0 (seconds, mostly)."""
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative(text: str) -> float:
    """A finite number >= 0."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


#: A count that may be zero (``--wait-agents 0``), and one that may not.
count = integer_between(0)
at_least_one = integer_between(1)


def port(text: str) -> int:
    value = _integer(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0-65535 (0 picks a free port), got {text}")
    return value


def add_database(parser: argparse.ArgumentParser) -> None:
    """``--dsn`` and ``--connect-timeout``."""
    parser.add_argument(
        "--dsn", default=None, help="libpq connection string or URI (default: $LOCKSTEP_DSN)"
    )
    parser.add_argument(
        "--connect-timeout",
        type=positive,
        default=DEFAULT_CONNECT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up connecting to the database after this long ({DEFAULT_CONNECT_TIMEOUT:g})",
    )


def add_output(parser: argparse.ArgumentParser) -> None:
    """``--json``, ``-v`` and ``-q`` (see `coordinator.cli.output.Output`)."""
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object (documented in the README)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print more detail")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only errors")


def verbosity(args: argparse.Namespace) -> int:
    return -1 if args.quiet else (1 if args.verbose else 0)


def with_connect_timeout(dsn: str, seconds: float) -> str:
    """`dsn` with libpq's ``connect_timeout`` (whole seconds, at least 1) unless it has one."""
    if "connect_timeout" in dsn:
        return dsn
    return make_conninfo(dsn, connect_timeout=str(max(1, math.ceil(seconds))))


def add_token(parser: argparse.ArgumentParser) -> None:
    """``--token`` (visible in ps: prefer $LOCKSTEP_TOKEN) and ``--token-file``."""
    parser.add_argument(
        "--token",
        default=None,
        help="the fleet secret (prefer $LOCKSTEP_TOKEN or --token-file: ps shows arguments)",
    )
    parser.add_argument(
        "--token-file", type=Path, default=None, metavar="FILE", help="read the fleet secret here"
    )


def token(args: argparse.Namespace) -> str | None:
    """The fleet secret from --token-file, --token or $LOCKSTEP_TOKEN (via config)."""
    if args.token_file is not None:
        return config.read_secret(args.token_file)
    value: str | None = args.token
    return value or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


__all__ = [
    "add_database",
    "add_output",
    "add_token",
    "at_least_one",
    "count",
    "is_loopback",
    "non_negative",
    "port",
    "positive",
    "token",
    "verbosity",
    "with_connect_timeout",
]
