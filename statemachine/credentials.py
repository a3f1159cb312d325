"""Per-agent credentials: an HMAC-SHA256 of the agent id under the fleet secret.

With one shared token every agent can speak for every other: a client that knows it can take
an absent agent's id and ack its phases. Instead the coordinator holds the *fleet secret* and
each agent gets only `agent_credential(secret, agent_id)`, which it sends as `hello.token`.
The coordinator recomputes it for the id in the hello and compares in constant time, so a
credential is good for exactly one id and a leaked one exposes one agent, not the fleet.

Deriving a credential needs the secret, so it is done where the secret lives: by the operator
(``lockstep agent-token AGENT_ID``) or the deploy tooling, never by the agents. The plain
fleet secret as a token is accepted only when the coordinator is told to
(``shared_token=True``), for fleets that have not moved to per-agent credentials yet.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

#: Prefix of a derived credential, so one can never be mistaken for a plain secret.
CREDENTIAL_PREFIX: Final = "ls1."


def agent_credential(secret: str, agent_id: str) -> str:
    """The credential agent `agent_id` presents: ``ls1.`` + hex HMAC-SHA256(secret, id)."""
    digest = hmac.new(secret.encode(), agent_id.encode(), hashlib.sha256).hexdigest()
    return CREDENTIAL_PREFIX + digest


def credential_ok(
    secret: str, agent_id: str, presented: str | None, *, shared_token: bool = False
) -> bool:
    """Whether `presented` authenticates `agent_id` (constant-time comparisons only).

    Accepted: the agent's own derived credential; the plain `secret` too when `shared_token`.
    """
    if presented is None:
        return False
    given = presented.encode()
    ok = hmac.compare_digest(given, agent_credential(secret, agent_id).encode())
    if shared_token:
        ok |= hmac.compare_digest(given, secret.encode())
    return ok


__all__ = ["CREDENTIAL_PREFIX", "agent_credential", "credential_ok"]
