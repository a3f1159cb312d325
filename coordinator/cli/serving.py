"""Options and checks shared by the commands that serve agents (``apply``, ``serve``).

One definition each, so ``lockstep apply`` and ``lockstep serve`` spell, validate, configure
(``LOCKSTEP_*``, lockstep.toml) and document them the same way.
"""

from __future__ import annotations

import argparse
import ssl
from pathlib import Path

from rich.console import Console

from coordinator.cli import config, options
from coordinator.cli.failures import CommandError
from coordinator.cli.output import safe
from coordinator.pg.attempts import DEFAULT_STATEMENT_TIMEOUT, RetryPolicy
from statemachine.lease import DEFAULT_LEASE_SECONDS, certainly_expired_after, check_lease_seconds
from statemachine.migration_fsm import AGENT_LOSS_POLICIES


def add_serving(parser: argparse.ArgumentParser) -> None:
    """Where agents connect and how they authenticate: host, port, token, TLS."""
    parser.add_argument("--host", default="127.0.0.1", help="address agents connect to")
    parser.add_argument(
        "--port", type=options.port, default=8765, help="port agents connect to (0: any free)"
    )
    options.add_token(parser)
    parser.add_argument(
        "--shared-token",
        action="store_true",
        help="also accept the plain fleet secret as a token (default: per-agent credentials "
        "from 'lockstep agent-token' only)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow serving without a token on a non-loopback address (anyone reaching the "
        "port could veto or stall migrations)",
    )
    parser.add_argument(
        "--tls-cert",
        type=Path,
        default=None,
        metavar="PEM",
        help="serve agents over TLS (wss://) with this certificate chain; needs --tls-key",
    )
    parser.add_argument(
        "--tls-key", type=Path, default=None, metavar="PEM", help="the certificate's private key"
    )


def add_sql_limits(parser: argparse.ArgumentParser) -> None:
    """The ack deadline and the bounds on each statement's locks, time and retries."""
    parser.add_argument(
        "--ack-timeout",
        type=options.positive,
        default=30.0,
        help="seconds agents have to ack a phase",
    )
    parser.add_argument(
        "--lock-timeout",
        type=options.positive,
        default=0.5,
        help="seconds a statement waits for a lock",
    )
    parser.add_argument(
        "--statement-timeout",
        type=options.positive,
        default=DEFAULT_STATEMENT_TIMEOUT,
        help="seconds a statement inside a phase transaction may run",
    )
    defaults = RetryPolicy()
    parser.add_argument(
        "--lock-retries",
        type=options.at_least_one,
        default=defaults.max_attempts,
        help="attempts per statement group when its lock is not granted",
    )
    parser.add_argument(
        "--lock-retry-seconds",
        type=options.non_negative,
        default=defaults.max_seconds,
        help="seconds after which no new attempt starts",
    )


def _lease(text: str) -> float:
    try:
        return check_lease_seconds(float(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_leases(parser: argparse.ArgumentParser) -> None:
    """Agents' leases and what losing a cohort agent means (docs/leases.md)."""
    parser.add_argument(
        "--lease",
        type=_lease,
        default=DEFAULT_LEASE_SECONDS,
        metavar="SECONDS",
        help="each agent's lease: renewed every lease/3 s; an agent whose lease lapses fences "
        "itself, and is counted gone 1.1 x lease + 1 s after its last renewal",
    )
    parser.add_argument(
        "--on-agent-loss",
        choices=AGENT_LOSS_POLICIES,
        default="wait",
        help="a cohort agent that disconnects mid-phase: 'wait' for it to come back or for "
        "its lease to expire (default), or 'rollback' at once",
    )
    parser.add_argument(
        "--durable-readers",
        action="store_true",
        help="agents may run on the durable state (dsn=/connect=) while no coordinator is "
        "up: CONTRACT and rollback SQL then wait one lease after the state change",
    )


def lease_options(args: argparse.Namespace) -> dict[str, object]:
    """The coordinator keywords of `add_leases`."""
    return {
        "lease_seconds": args.lease,
        "on_agent_loss": args.on_agent_loss,
        "durable_readers": args.durable_readers,
    }


def check_lease_fits(args: argparse.Namespace, err: Console) -> None:
    """Warn when a dead agent would outlast the ack timeout: the phase would then time out
    and roll back instead of letting it depart."""
    gone = certainly_expired_after(args.lease)
    if args.on_agent_loss == "wait" and gone >= args.ack_timeout:
        err.print(
            f"[yellow]warning:[/] a lost agent is counted gone only {gone:g} s after its last "
            f"renewal (--lease {args.lease:g}), not before --ack-timeout {args.ack_timeout:g}: "
            "a phase waiting for it will time out and roll back instead"
        )


def retry_policy(args: argparse.Namespace) -> RetryPolicy:
    return RetryPolicy(max_attempts=args.lock_retries, max_seconds=args.lock_retry_seconds)


def server_tls(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """The server context for --tls-cert/--tls-key, or None for plain ws://."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise CommandError("--tls-cert and --tls-key go together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise CommandError(f"cannot load the TLS certificate {cert} / key {key}: {exc}") from exc
    return context


def check_exposure(args: argparse.Namespace, err: Console) -> None:
    """No unauthenticated coordinator on a reachable address without an explicit --insecure."""
    if args.fleet_secret is not None or options.is_loopback(args.host):
        return
    if not args.insecure:
        raise config.ConfigError(
            f"serving on {args.host} without a token lets anyone who reaches the port veto or "
            "stall every migration: set LOCKSTEP_TOKEN or --token-file, or pass --insecure"
        )
    err.print(
        f"[yellow]warning:[/] serving on {safe(args.host)} without authentication (--insecure)"
    )
