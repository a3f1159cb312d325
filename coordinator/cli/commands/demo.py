"""`lockstep demo`: run `add_user_email` on a live demo fleet (see `coordinator.cli.demo`)."""

from __future__ import annotations

import argparse
import functools
from typing import TYPE_CHECKING

import trio

from coordinator.cli import options
from coordinator.cli.commands import CommandError, stdout_console
from coordinator.cli.demo import (
    DEFAULT_ACK_TIMEOUT,
    MAX_AGENTS,
    MISSING_TABLE,
    SCENARIOS,
    TIMEOUT_SCENARIO_ACK_TIMEOUT,
    DemoSetupError,
    run_demo,
)
from coordinator.cli.embedded import EmbeddedPostgresError, configured_dsn, resolve_dsn

if TYPE_CHECKING:
    from coordinator.cli.commands import Subparsers

NAME = "demo"

EPILOG = f"""\
scenarios:
  success    every agent acks; the columns are added while the apps keep querying users,
             each app switches to the new queries at APPLY and no query fails
  timeout    the last agent's on_announce hook hangs, so it never acks ANNOUNCE: after the ack
             timeout ({TIMEOUT_SCENARIO_ACK_TIMEOUT:g} s unless --ack-timeout is given) the
             migration rolls back, naming that agent, and users is unchanged
  sql-error  EXECUTE's second statement names a missing table ({MISSING_TABLE}): the
             transaction rolls back, the first column is not left behind, and the reason
             shows PostgreSQL's message

Exit status: 0 when the scenario showed what it promises (also for timeout and sql-error, which
are expected to roll back), 1 when it did not or the database could not be used, 130 on Ctrl-C.

WARNING: with --dsn or LOCKSTEP_DSN the demo DROPS table users and schema lockstep (lockstep's
migration history) in that database before it starts, so that it can be run again. Point it at
a scratch database.
"""


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="watch a live fleet go through a migration with zero failed queries",
        description=(
            "Create table users with rows, start a coordinator and N agents whose apps keep "
            "reading and writing users, run the migration add_user_email (ADD COLUMN email, "
            "email_verified) while they do, and show every phase and ack. Ends with the users "
            "columns and each agent's query counts. Uses a temporary embedded PostgreSQL "
            "unless --dsn or LOCKSTEP_DSN names a server."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dsn",
        default=None,
        help=(
            "libpq connection string or URI of a scratch database (default: $LOCKSTEP_DSN, "
            "else a temporary embedded PostgreSQL server removed on exit). Its table users "
            "and schema lockstep are dropped first."
        ),
    )
    parser.add_argument(
        "--agents",
        type=options.integer_between(1, MAX_AGENTS),
        default=3,
        metavar="N",
        help=f"number of agents, each with its own app loop (1-{MAX_AGENTS}, default 3)",
    )
    parser.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default="success",
        help="what to demonstrate (default: success; see below)",
    )
    parser.add_argument(
        "--ack-timeout",
        type=options.positive,
        default=None,
        metavar="SECONDS",
        help=(
            f"how long the coordinator waits for acks (default {DEFAULT_ACK_TIMEOUT:g}; "
            f"{TIMEOUT_SCENARIO_ACK_TIMEOUT:g} in the timeout scenario)"
        ),
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = stdout_console()
    if configured_dsn(args.dsn) is None:
        out.print("Starting a temporary embedded PostgreSQL server...")
    demo = functools.partial(
        run_demo,
        agents=args.agents,
        scenario=args.scenario,
        ack_timeout=args.ack_timeout,
        console=out,
    )
    try:
        with resolve_dsn(args.dsn) as dsn:
            return trio.run(demo, dsn)
    except EmbeddedPostgresError as exc:
        raise CommandError(str(exc), details=exc.details) from exc
    except DemoSetupError as exc:
        raise CommandError(str(exc)) from exc
    except BaseExceptionGroup as group:
        # trio wraps a Ctrl-C that lands inside a nursery; the CLI turns a bare one into 130.
        if group.subgroup(KeyboardInterrupt) is not None:
            raise KeyboardInterrupt from group
        raise
