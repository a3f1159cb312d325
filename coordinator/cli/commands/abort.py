"""`lockstep abort NAME`: ask the leader to roll back a queued or running migration.

A queued migration is cancelled at once. A running one is rolled back by the leader at its
next safe point (at once while acks are collected, right after EXECUTE commits if its SQL is
running). Refused once CONTRACT committed: from then on the migration only goes forward.
With no leader alive the request is kept, and the next leader to start rolls it back.
``--wait`` waits for the outcome. ``--json`` prints ``{"ok", "name", "outcome", "status",
"reason"}``.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import psycopg
import trio

from coordinator.cli import options
from coordinator.cli.commands import CommandError
from coordinator.cli.embedded import configured_dsn
from coordinator.cli.output import Output, safe
from coordinator.queue import AbortRefused, RunState, request_abort, watch
from coordinator.snapshot import read_snapshot

if TYPE_CHECKING:
    from coordinator.cli.commands import Subparsers

NAME = "abort"


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="roll back the queued or running migration NAME (refused once CONTRACT committed)",
        description=(
            "Ask the leader to roll back the migration NAME: a queued one is cancelled, a "
            "running one is rolled back at its next safe point. Refused once its CONTRACT "
            "committed (it only goes forward then)."
        ),
    )
    parser.add_argument("name", metavar="NAME", help="the migration's name")
    options.add_database(parser)
    options.add_output(parser)
    parser.add_argument(
        "--reason", default="requested with lockstep abort", help="recorded as the reason"
    )
    parser.add_argument("--wait", action="store_true", help="wait until it rolled back")
    parser.add_argument(
        "--wait-timeout", type=options.positive, default=None, help="give up waiting after this"
    )
    parser.set_defaults(func=run)


async def _abort(dsn: str, args: argparse.Namespace, out: Output) -> tuple[str, RunState | None]:
    request = await request_abort(dsn, args.name, args.reason)
    if request.outcome == "cancelled":
        out.event(f"cancelled {safe(args.name)}: it had not started")
        return request.outcome, None
    snap = await read_snapshot(dsn, limit=1)
    if snap.leader is None or not snap.leader.alive:
        out.event(
            f"abort of {safe(args.name)} recorded; [yellow]no coordinator leads now[/]: the "
            "next one to start rolls it back"
        )
    else:
        out.event(f"abort of {safe(args.name)} requested: the leader rolls it back")
    if not args.wait:
        return request.outcome, None
    with trio.move_on_after(args.wait_timeout or float("inf")):
        [final] = await watch(dsn, [request.id])
        out.event(f"{safe(final.name)}: {safe(final.status)}: {safe(final.reason or '')}")
        return request.outcome, final
    raise CommandError(f"{args.name} still running after {args.wait_timeout:g} s")


def run(args: argparse.Namespace) -> int:
    dsn = configured_dsn(args.dsn)
    if dsn is None:
        raise CommandError("abort needs a database: pass --dsn or set LOCKSTEP_DSN")
    dsn = options.with_connect_timeout(dsn, args.connect_timeout)
    out = Output(json_mode=args.json, verbosity=options.verbosity(args))
    try:
        outcome, final = trio.run(_abort, dsn, args, out)
    except AbortRefused as exc:
        raise CommandError(str(exc)) from exc
    except psycopg.errors.UndefinedTable as exc:
        raise CommandError(f"no migration named {args.name!r} is queued or running") from exc
    except psycopg.Error as exc:
        raise CommandError(f"cannot reach lockstep's state: {str(exc).strip()}") from exc
    # The migration went forward despite the request (CONTRACT committed meanwhile).
    ok = final is None or final.status != "completed"
    out.emit_json(
        {
            "ok": ok,
            "name": args.name,
            "outcome": outcome,
            "status": None if final is None else final.status,
            "reason": None if final is None else final.reason,
        }
    )
    return 0 if ok else 1
