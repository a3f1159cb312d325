"""`lockstep agent-token AGENT_ID`: the credential one agent presents to the coordinator.

Prints `statemachine.agent_credential(secret, AGENT_ID)`, derived from the fleet secret in
``$LOCKSTEP_TOKEN`` or ``--token-file`` (never an argument: ``ps`` would show it). Give each
agent only its own line: it is good for that id alone (see `statemachine.credentials`).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import TYPE_CHECKING

from coordinator.cli import options
from coordinator.cli.commands import CommandError
from coordinator.cli.output import safe
from statemachine.credentials import agent_credential
from statemachine.protocol import AGENT_ID_PATTERN

if TYPE_CHECKING:
    from coordinator.cli.commands import Subparsers

NAME = "agent-token"


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="print the credential an agent presents (derived from the fleet secret)",
        description=(
            "Print the per-agent credential for AGENT_ID: an HMAC-SHA256 of the id under the "
            "fleet secret ($LOCKSTEP_TOKEN or --token-file). The agent passes it as token=."
        ),
    )
    parser.add_argument("agent_id", metavar="AGENT_ID")
    parser.add_argument(
        "--token-file", type=Path, default=None, metavar="FILE", help="the fleet secret"
    )
    parser.add_argument("--token", default=None, help=argparse.SUPPRESS)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not re.match(AGENT_ID_PATTERN, args.agent_id) or len(args.agent_id) > 128:
        raise CommandError(
            f"{safe(repr(args.agent_id))} is not a valid agent id: 1-128 of A-Za-z0-9_.@:-"
        )
    secret = options.token(args)
    if secret is None:
        raise CommandError("no fleet secret: set LOCKSTEP_TOKEN or pass --token-file")
    print(agent_credential(secret, args.agent_id))
    return 0
