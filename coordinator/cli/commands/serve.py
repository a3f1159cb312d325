"""`lockstep serve`: the long-running coordinator your fleet stays connected to.

Several replicas may point at one database: one leads (it serves agents and runs the queue),
the others stand by and take over when it dies (`coordinator.service`, docs/operations.md).
Migrations reach it through ``lockstep submit``; ``lockstep status`` shows what it does.

Signals: SIGTERM and SIGINT stop it cleanly. Nothing is rolled back: a migration in flight
stays durable where it was, and the next leader (a standby, or this one restarted) resumes
it; its agents reconnect there. The exit status is then 0.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import psycopg
import trio

from coordinator.cli import options, serving
from coordinator.cli.commands import CommandError, stderr_console
from coordinator.cli.embedded import configured_dsn
from coordinator.cli.output import Output, logging_to_stderr, safe
from coordinator.cli.results import EventPrinter
from coordinator.events import Event, MigrationFinished
from coordinator.history import SchemaTooNew
from coordinator.pg.errors import is_connection_failure, pg_message
from coordinator.service import open_service

if TYPE_CHECKING:
    from coordinator.cli.commands import Subparsers

NAME = "serve"


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="run the coordinator as a service: lead (or stand by) and run submitted migrations",
        description=(
            "Serve agents and run the migrations 'lockstep submit' queues, until SIGTERM or "
            "SIGINT. Run several replicas on one database for failover: one leads, the others "
            "stand by. Stopping never rolls back: the next leader resumes the migration."
        ),
    )
    options.add_database(parser)
    options.add_output(parser)
    serving.add_serving(parser)
    serving.add_sql_limits(parser)
    serving.add_leases(parser)
    parser.add_argument(
        "--http-host", default="127.0.0.1", help="address of /healthz, /readyz and /metrics"
    )
    parser.add_argument(
        "--http-port",
        type=options.port,
        default=None,
        help="serve /healthz, /readyz and /metrics on this port (default: not served)",
    )
    parser.add_argument(
        "--poll-interval",
        type=options.positive,
        default=2.0,
        help="seconds between queue polls (NOTIFY wakes the leader at once anyway)",
    )
    parser.add_argument(
        "--relay",
        action="store_true",
        help="while standing by, serve agents for the leader (relay its notices, forward "
        "its agents' acks and leases) instead of sending them away (docs/replicas.md)",
    )
    parser.set_defaults(func=run)


class _Finished:
    """Prints each migration's result when it ends (the leader's own log of its work)."""

    def __init__(self, out: Output) -> None:
        self.out = out

    def __call__(self, event: Event) -> None:
        if isinstance(event, MigrationFinished):
            colour = "green" if event.status.value == "completed" else "red"
            self.out.event(
                f"[bold {colour}]{event.status.value}[/] {safe(event.migration)}"
                + (f": {safe(event.reason)}" if event.reason else "")
            )


async def _serve(args: argparse.Namespace, dsn: str, out: Output) -> None:
    async with open_service(
        dsn,
        host=args.host,
        port=args.port,
        ssl_context=args.ssl_context,
        ack_timeout=args.ack_timeout,
        lock_timeout=args.lock_timeout,
        statement_timeout=args.statement_timeout,
        lock_retry=serving.retry_policy(args),
        poll_interval=args.poll_interval,
        relay=args.relay,
        http_host=args.http_host,
        http_port=args.http_port,
        token=args.fleet_secret,
        shared_token=args.shared_token,
        **serving.lease_options(args),  # type: ignore[arg-type]
    ) as service:
        service.coordinator.subscribe(EventPrinter(out))
        service.coordinator.subscribe(_Finished(out))
        out.event(f"listening for agents on {safe(service.url)}")
        if service.http_port is not None:
            out.event(f"HTTP endpoints on http://{safe(args.http_host)}:{service.http_port}")
        if not service.is_leader():
            out.event(
                "relaying for the leader until this replica can lead the database..."
                if args.relay
                else "standing by until this replica can lead the database..."
            )
        await service.wait_until_leader()
        out.event(f"[bold]leading[/] with epoch {service.epoch()}")
        await trio.sleep_forever()


def run(args: argparse.Namespace) -> int:
    args.fleet_secret = options.token(args)
    serving.check_exposure(args, stderr_console())
    serving.check_lease_fits(args, stderr_console())
    dsn = configured_dsn(args.dsn)
    if dsn is None:
        raise CommandError("serve needs a database: pass --dsn or set LOCKSTEP_DSN")
    dsn = options.with_connect_timeout(dsn, args.connect_timeout)
    args.ssl_context = serving.server_tls(args.tls_cert, args.tls_key)
    out = Output(json_mode=False, verbosity=options.verbosity(args))
    try:
        with logging_to_stderr(options.verbosity(args)):
            trio.run(_serve, args, dsn, out)
    except KeyboardInterrupt:
        out.event("stopped; a migration in flight stays durable and the next leader resumes it")
        return 0
    except SchemaTooNew as exc:
        raise CommandError(str(exc)) from exc
    except psycopg.Error as exc:
        # OperationalError also covers a deadlock or a cancelled statement: only a lost or
        # refused connection is "cannot reach".
        what = "cannot reach the database" if is_connection_failure(exc) else "database error"
        raise CommandError(f"{what}: {pg_message(exc)}") from exc
    except OSError as exc:
        raise CommandError(f"cannot serve on {args.host}:{args.port}: {exc}") from exc
    return 0
