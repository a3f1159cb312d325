"""The relay sub-protocol between a leading coordinator and a relaying replica, and its lease rule.

A *relay* is a ``lockstep serve`` replica that does not lead: it accepts agents exactly as the
leader would (agents need no change) and holds one WebSocket to the leader, on the path
`RELAY_PATH`, over which it speaks these frames (docs/replicas.md):

- relay -> leader: `RelayHello` (first frame: the fleet secret), `Joined`, `Left` and
  `Released` (its agents' membership, batched), `Answered` / `RelayedNack` (its agents'
  acks and nacks, batched per migration and phase), `RelayRenew` (its own lease);
- leader -> relay: `RelayWelcome`, `Deliver` (one already-encoded agent frame and the agents
  it is for: a phase notice crosses the link once per relay, not once per agent), `Drop`
  (close these agents' connections), `RelayGrant`.

Why batched lists of agent ids: the leader's per-agent cost for a relayed agent is then a few
dictionary operations, and the WebSocket framing, JSON parsing and per-connection tasks of
each agent are the relay's. Lists are cut to size (`chunks`) so a frame stays below
`MAX_RELAY_FRAME_BYTES` whatever the ids' lengths.

The lease rule (`relay_grant_seconds`): a relay grants its agents only lease time it holds
itself from the leader, so an agent's lease never outlives what the leader believes.

Pure: no I/O.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator, Sequence
from typing import Annotated, Final

import msgspec

from statemachine.phases import Phase
from statemachine.protocol import (
    AgentId,
    ErrorText,
    MigrationId,
    ProtocolError,
    decode_frame,
)

#: The path of the leader's listening socket a relay links to (agents use ``/``).
RELAY_PATH: Final = "/relay"
#: Incompatible changes of the relay frames change it; a leader refuses other versions.
RELAY_PROTOCOL_VERSION: Final = 1
#: Largest relay frame accepted: below the 128 KiB WebSocket message limit of the leader's
#: listening socket (`coordinator.admission.ConnectionLimits.max_message_bytes`), which
#: would close the link (1009) before the decoder could say why. Larger than an agent's
#: (`MAX_FRAME_BYTES`, 64 kB) because a relay frame carries lists of ids and whole agent
#: frames; the peer is authenticated after the first frame, which is small.
MAX_RELAY_FRAME_BYTES: Final = 120 * 1024
#: Largest frame a relay accepts from the leader: trio-websocket's default message limit of
#: a client (1 MiB). Lists of ids are cut to `MAX_RELAY_FRAME_BYTES` both ways; only a
#: `Deliver` of one large agent frame (a Welcome listing many migrations) needs more.
MAX_DOWN_FRAME_BYTES: Final = 1024 * 1024
#: Room a frame needs besides its list of ids (type, other fields, brackets).
FRAME_OVERHEAD: Final = 1024
#: Agent ids per list, at most (the lists are cut by size first: `chunks`).
MAX_IDS_PER_FRAME: Final = 10_000
#: A relay grants no lease shorter than this: a grant of 0 would read "no leases" to an
#: agent, so a relay whose own lease is about to lapse grants an instant instead.
MIN_GRANT_SECONDS: Final = 0.001

RelayId = AgentId
AgentIds = Annotated[list[AgentId], msgspec.Meta(max_length=MAX_IDS_PER_FRAME)]
#: A whole agent frame inside a `Deliver` (agent frames are at most 64 kB).
AgentFrame = Annotated[str, msgspec.Meta(max_length=MAX_DOWN_FRAME_BYTES // 2)]


class _RelayMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="type"):
    pass


# ---------------------------------------------------------------- relay -> leader
class RelayHello(_RelayMessage, frozen=True, tag="relay_hello"):
    """First frame of a relay link; `token` is the fleet secret itself (a relay is a trusted
    peer: it verifies its agents' credentials with that secret)."""

    protocol: int
    relay_id: RelayId
    token: str | None = None


class Joined(_RelayMessage, frozen=True, tag="joined"):
    """These agents said a valid hello to the relay: the leader welcomes them."""

    agents: AgentIds


class Left(_RelayMessage, frozen=True, tag="left"):
    """These agents' connections to the relay ended."""

    agents: AgentIds


class Released(_RelayMessage, frozen=True, tag="released"):
    """These agents sent `Release` (they serve no more work) before their connection ended:
    the leader counts them departed at the `Left` that follows, not at their lease's end."""

    agents: AgentIds


class Answered(_RelayMessage, frozen=True, tag="answered"):
    """These agents acked `phase` of `migration_id`."""

    migration_id: MigrationId
    phase: Phase
    agents: AgentIds


class RelayedNack(_RelayMessage, frozen=True, tag="relayed_nack"):
    """One agent refused a phase (rare: sent one by one, with its error)."""

    agent_id: AgentId
    migration_id: MigrationId
    phase: Phase
    error: ErrorText


class RelayRenew(_RelayMessage, frozen=True, tag="relay_renew"):
    """The relay asks for its own lease to be extended, counted from when it sent this."""

    seq: Annotated[int, msgspec.Meta(ge=0, le=2**53)]


# ---------------------------------------------------------------- leader -> relay
class RelayWelcome(_RelayMessage, frozen=True, tag="relay_welcome"):
    """The link is accepted: the first lease, counted by the relay from its hello."""

    protocol: int
    epoch: int
    lease_seconds: float


class Deliver(_RelayMessage, frozen=True, tag="deliver"):
    """Send agent frame `frame` (a Welcome, notice, error...) to each of `agents`, in order."""

    frame: AgentFrame
    agents: AgentIds


class Drop(_RelayMessage, frozen=True, tag="drop"):
    """Close these agents' connections with WebSocket close `code` and `reason`."""

    agents: AgentIds
    code: int
    reason: ErrorText


class RelayGrant(_RelayMessage, frozen=True, tag="relay_grant"):
    """The answer to `RelayRenew` number `seq`: `seconds` from when it was sent."""

    seq: int
    seconds: float


RelayUpMessage = RelayHello | Joined | Left | Released | Answered | RelayedNack | RelayRenew
RelayDownMessage = RelayWelcome | Deliver | Drop | RelayGrant
UP_TYPES: Final = (
    "relay_hello",
    "joined",
    "left",
    "released",
    "answered",
    "relayed_nack",
    "relay_renew",
)
DOWN_TYPES: Final = ("relay_welcome", "deliver", "drop", "relay_grant")

_up_decoder = msgspec.json.Decoder(RelayUpMessage)
_down_decoder = msgspec.json.Decoder(RelayDownMessage)
_encoder = msgspec.json.Encoder()


def decode_relay_up(frame: str | bytes) -> RelayUpMessage:
    """Parse a frame a relay sent; `ProtocolError` with a precise reason otherwise."""
    msg = decode_frame(_up_decoder, frame, UP_TYPES, max_bytes=MAX_RELAY_FRAME_BYTES)
    assert isinstance(
        msg, RelayHello | Joined | Left | Released | Answered | RelayedNack | RelayRenew
    )
    return msg


def decode_relay_down(frame: str | bytes) -> RelayDownMessage:
    """Parse a frame the leader sent to a relay; `ProtocolError` otherwise."""
    msg = decode_frame(_down_decoder, frame, DOWN_TYPES, max_bytes=MAX_DOWN_FRAME_BYTES)
    assert isinstance(msg, RelayWelcome | Deliver | Drop | RelayGrant)
    return msg


def encode_relay(message: _RelayMessage) -> str:
    return _encoder.encode(message).decode()


def chunks(agents: Sequence[str], room: int = 0) -> Iterator[list[str]]:
    """`agents` cut into lists, in order, each small enough for one frame that also holds
    `room` bytes of other content (a `Deliver`'s agent frame): by their JSON size (ids are
    ASCII: each costs its length plus quotes and a comma) and `MAX_IDS_PER_FRAME`. Yields
    nothing for no agents."""
    budget = max(MAX_RELAY_FRAME_BYTES - FRAME_OVERHEAD - room, 256)
    batch: list[str] = []
    size = 0
    for agent_id in agents:
        cost = len(agent_id) + 3
        if batch and (size + cost > budget or len(batch) >= MAX_IDS_PER_FRAME):
            yield batch
            batch, size = [], 0
        batch.append(agent_id)
        size += cost
    if batch:
        yield batch


def deliver_room(frame: str) -> int:
    """What an agent frame costs inside a `Deliver`: its UTF-8 bytes, plus the escaping of
    its quotes and backslashes as a JSON string."""
    return len(frame.encode()) + frame.count('"') + frame.count("\\") + 2


def relay_hello_ok(secret: str | None, presented: str | None) -> bool:
    """Whether a relay's hello may link: it must present the fleet secret itself (constant
    time), or the leader must have none (then it authenticates nobody, agents included)."""
    if secret is None:
        return True
    return presented is not None and hmac.compare_digest(secret.encode(), presented.encode())


def relay_grant_seconds(lease_seconds: float, relay_valid_until: float, now: float) -> float:
    """How long a lease a relay may grant an agent at `now` (the relay's clock).

    Why it is safe: the agent counts the grant from when it *sent* its request, which is
    before `now`, so its lease ends before ``now + result <= relay_valid_until``: before the
    relay's own lease from the leader ends. The leader counts the relay's agents gone no
    earlier than its own grant of the relay's lease + 1.1 x lease + 1 s (each renewal of
    the relay renews every agent the leader knows on it), which is after the relay's lease
    ends exactly as an agent's direct lease ends before (statemachine.lease). Never 0: a
    Welcome or grant of 0 s reads "no leases" to an agent, so a lapsing relay grants
    `MIN_GRANT_SECONDS` (the agent fences at once) and should refuse agents instead.
    """
    return max(MIN_GRANT_SECONDS, min(lease_seconds, relay_valid_until - now))


__all__ = [
    "DOWN_TYPES",
    "FRAME_OVERHEAD",
    "MAX_DOWN_FRAME_BYTES",
    "MAX_IDS_PER_FRAME",
    "MAX_RELAY_FRAME_BYTES",
    "MIN_GRANT_SECONDS",
    "RELAY_PATH",
    "RELAY_PROTOCOL_VERSION",
    "UP_TYPES",
    "Answered",
    "Deliver",
    "Drop",
    "Joined",
    "Left",
    "ProtocolError",
    "RelayDownMessage",
    "RelayGrant",
    "RelayHello",
    "RelayRenew",
    "RelayUpMessage",
    "RelayWelcome",
    "RelayedNack",
    "Released",
    "chunks",
    "decode_relay_down",
    "decode_relay_up",
    "deliver_room",
    "encode_relay",
    "relay_grant_seconds",
    "relay_hello_ok",
]
