"""The errors an agent raises on purpose, shared by the trio, threaded and asyncio agents."""

from __future__ import annotations

from statemachine.exceptions import LockstepError


class AgentError(LockstepError):
    """Base class of the errors the agents raise (see the subclasses)."""


class AgentConfigError(AgentError, ValueError):
    """Raised when an agent is built with arguments it cannot work with (no URL, a URL that
    is not ``ws://`` or ``wss://``, both `dsn` and `connect`)."""


class CoordinatorUnreachable(AgentError):
    """Raised by an agent opened with ``wait_connected=True`` when no coordinator URL could
    be reached on the first round (nothing listening, DNS, TLS, an HTTP refusal of the
    upgrade...). `url` is the last URL tried and `cause` the plain reason."""

    def __init__(self, url: str, cause: str) -> None:
        super().__init__(f"cannot reach the coordinator at {url}: {cause}")
        self.url = url
        self.cause = cause


class HandshakeRejected(AgentError):
    """Raised when the coordinator answered the hello with an error (protocol version,
    token...) or with something that is not lockstep: retrying would be refused the same
    way. `close_code` is the WebSocket close code when the refusal was a close."""

    def __init__(self, code: str, message: str, close_code: int | None = None) -> None:
        super().__init__(f"coordinator rejected the handshake: {code}: {message}")
        self.code = code
        self.message = message
        self.close_code = close_code


class AgentFenced(AgentError):
    """Raised by `agent.using(...)` while the agent cannot vouch for the schema: its lease
    lapsed (no renewal from the coordinator within the lease; it reconnects and resyncs), it
    never reached a coordinator and has no durable state to read, the durable state was not
    re-read within a lease, or the agent was stopped. `reason` says which. An app answers
    503 for the request: running a query on a schema nobody vouches for could hit a column
    CONTRACT already dropped."""

    def __init__(self, agent_id: str, reason: str) -> None:
        super().__init__(f"agent {agent_id} is fenced: {reason}")
        self.agent_id = agent_id
        self.reason = reason


class StaleLeader(AgentError):
    """Raised inside the connect loop (never to the app) when a coordinator's Welcome carries
    a lower leader epoch than one the agent already saw: a deposed leader, so the agent moves
    on to the next URL."""


class AgentForked(AgentError):
    """Raised when a `ThreadedAgent` started in a parent process is used in a forked child
    (gunicorn preloading the app): its thread did not survive the fork, and sharing its agent
    id would make two fleet members one. Start one agent per worker, in ``post_fork``."""


class MissingExtra(AgentError, ImportError):
    """Raised on importing the asyncio agent when its WebSocket library is not installed;
    the message names the extra to install."""


__all__ = [
    "AgentConfigError",
    "AgentError",
    "AgentFenced",
    "AgentForked",
    "CoordinatorUnreachable",
    "HandshakeRejected",
    "MissingExtra",
    "StaleLeader",
]
