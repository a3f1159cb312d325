"""`lockstep status`: the leader, the queue, the migration in flight, and the history.

Everything comes from the database alone (`coordinator.snapshot`), so it works from any
machine that reaches it, with or without a coordinator running, and it never writes. Every
cell holding text from the database or an agent goes through `safe`: ``[/]`` or ``ESC[2J``
in a reason is shown as text. ``--watch`` redraws every ``--interval`` seconds until Ctrl-C.

``--json`` prints one object: ``{"waiting_for_a_coordinator": bool, "leader": {"holder",
"epoch", "since", "alive"} | null, "queue": [name], "in_flight": [{"name", "state", "since",
"executed", "contracted", "cohort", "acked", "pending", "departing", "departed",
"lock_retries", "backfills", "message", "abort_requested"}], "migrations": [{"name",
"status", "started_at", "finished_at", "schema_restored", "reason"}]}`` (times in ISO 8601).
"""

from __future__ import annotations

import argparse
import datetime
from typing import TYPE_CHECKING, Any

import psycopg
import trio
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from coordinator.cli import options
from coordinator.cli.commands import CommandError
from coordinator.cli.embedded import configured_dsn
from coordinator.cli.output import Output, safe
from coordinator.snapshot import Snapshot, read_snapshot

if TYPE_CHECKING:
    from coordinator.cli.commands import Subparsers

NAME = "status"


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="show the leader, the queue, the migration in flight and the history",
        description=(
            "Read lockstep's durable state in the database: the leader and its epoch, the "
            "queued migrations, the one in flight (phase and for how long, who acked and who "
            "is pending, lock retries, backfill progress) and the history, newest first. "
            "Read-only. A run shown 'running' while no coordinator leads is resumed by the "
            "next coordinator that starts on the database."
        ),
    )
    options.add_database(parser)
    options.add_output(parser)
    parser.add_argument(
        "--limit", type=options.at_least_one, default=50, help="how many history rows (50)"
    )
    parser.add_argument("--watch", action="store_true", help="redraw until interrupted")
    parser.add_argument(
        "--interval", type=options.positive, default=2.0, help="seconds between redraws (2)"
    )
    parser.set_defaults(func=run)


def _iso(when: datetime.datetime | None) -> str | None:
    return None if when is None else when.isoformat()


def snapshot_json(snap: Snapshot) -> dict[str, Any]:
    leader = snap.leader
    return {
        "waiting_for_a_coordinator": snap.waiting_for_a_coordinator,
        "leader": None
        if leader is None
        else {
            "holder": leader.holder,
            "epoch": leader.epoch,
            "since": _iso(leader.since),
            "alive": leader.alive,
        },
        "queue": list(snap.queue),
        "in_flight": [
            {
                "name": f.name,
                "state": f.state,
                "since": _iso(f.since),
                "executed": f.executed,
                "contracted": f.contracted,
                "cohort": list(f.cohort),
                "acked": list(f.acked),
                "pending": list(f.pending),
                "departing": list(f.departing),
                "departed": list(f.departed),
                "lock_retries": f.lock_retries,
                "backfills": f.backfills,
                "message": f.message,
                "abort_requested": f.abort_requested,
            }
            for f in snap.in_flight
        ],
        "migrations": [
            {
                "name": row.name,
                "status": row.status,
                "started_at": row.started_at.isoformat(),
                "finished_at": _iso(row.finished_at),
                "schema_restored": row.schema_restored,
                "reason": row.reason,
            }
            for row in snap.history
        ],
    }


def _age(since: datetime.datetime | None) -> str:
    if since is None:
        return ""
    seconds = (datetime.datetime.now(datetime.UTC) - since).total_seconds()
    return f"{max(seconds, 0):.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _names(names: tuple[str, ...], limit: int = 12) -> str:
    shown = ", ".join(safe(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def render(snap: Snapshot) -> Group:
    """The human view of a snapshot (also what --watch redraws)."""
    parts: list[Any] = []
    leader = snap.leader
    if leader is None:
        parts.append(Text("leader: none has run on this database yet"))
    elif leader.alive:
        parts.append(
            Text.from_markup(
                f"leader: [bold]{safe(leader.holder or 'a coordinator')}[/], epoch "
                f"{leader.epoch}, leading for {_age(leader.since)}"
            )
        )
    else:
        parts.append(
            Text.from_markup(
                f"leader: [yellow]none alive[/] (last: {safe(leader.holder or '?')}, epoch "
                f"{leader.epoch})"
            )
        )
    if snap.waiting_for_a_coordinator:
        parts.append(
            Text.from_markup(
                "[yellow]no coordinator is running a migration now:[/] the next coordinator "
                "that starts on this database resumes the runs shown as running"
            )
        )
    if snap.queue:
        parts.append(Text.from_markup(f"queue: {_names(snap.queue)}"))
    for f in snap.in_flight:
        flags = [
            w
            for w, on in (("EXECUTE committed", f.executed), ("CONTRACT committed", f.contracted))
            if on
        ]
        line = f"in flight: [bold]{safe(f.name)}[/] in {f.state.upper()} for {_age(f.since)}" + (
            f" ({', '.join(flags)})" if flags else ""
        )
        parts.append(Text.from_markup(line))
        if f.cohort:
            parts.append(
                Text.from_markup(
                    f"  acked {len(f.acked)} of {len(f.cohort)}"
                    + (f"; pending: {_names(f.pending)}" if f.pending else "")
                )
            )
        if f.departing:
            parts.append(Text(f"  departing (lease not expired yet): {_names(f.departing)}"))
        if f.departed:
            parts.append(Text(f"  departed (lease expired, fenced): {_names(f.departed)}"))
        if f.lock_retries:
            parts.append(Text(f"  lock retries: {f.lock_retries}"))
        for backfilled, done in f.backfills.items():
            parts.append(
                Text(
                    f"  backfill {backfilled}: {done.get('rows', 0)} rows, "
                    f"{done.get('batches', 0)} batches"
                )
            )
        if f.message:
            parts.append(Text(f"  last: {f.message}"))
        if f.abort_requested:
            parts.append(Text(f"  abort requested: {f.abort_requested}"))
    if not snap.history:
        parts.append(Text("no migrations recorded yet"))
    else:
        table = Table("name", "status", "started", "finished", "schema restored", "reason")
        for row in snap.history:
            table.add_row(
                safe(row.name),
                safe(row.status),
                f"{row.started_at:%Y-%m-%d %H:%M:%S}",
                "" if row.finished_at is None else f"{row.finished_at:%Y-%m-%d %H:%M:%S}",
                "" if row.schema_restored is None else str(row.schema_restored).lower(),
                safe(row.reason or ""),
            )
        parts.append(table)
    return Group(*parts)


async def _watch(dsn: str, args: argparse.Namespace, out: Output) -> None:
    with Live(render(await read_snapshot(dsn, args.limit)), console=out.console) as live:
        while True:
            await trio.sleep(args.interval)
            live.update(render(await read_snapshot(dsn, args.limit)))


def run(args: argparse.Namespace) -> int:
    dsn = configured_dsn(args.dsn)
    if not dsn:
        raise CommandError("status needs a database: pass --dsn or set LOCKSTEP_DSN")
    dsn = options.with_connect_timeout(dsn, args.connect_timeout)
    out = Output(json_mode=args.json, verbosity=options.verbosity(args))
    try:
        if args.watch and not args.json:
            trio.run(_watch, dsn, args, out)
            return 0
        snap = trio.run(read_snapshot, dsn, args.limit)
    except psycopg.Error as exc:
        raise CommandError(f"cannot read lockstep's state: {str(exc).strip()}") from exc
    out.emit_json(snapshot_json(snap))
    out.print(render(snap))
    return 0
