"""The wire protocol between agents and the coordinator: JSON text frames, one message each.

Every message is a msgspec tagged struct (`"type"` names it). Decoding is strict: an unknown
`type`, a missing or mistyped field or an unknown field is a `ProtocolError` whose message says
exactly what was wrong, which the coordinator sends back in an `Error` frame. See
`docs/protocol.md` for examples, the handshake and close codes.

Versioning: `PROTOCOL_VERSION` changes only for incompatible changes; the coordinator rejects a
`Hello` whose version it does not speak (close code 4002).
"""

from __future__ import annotations

import re
from typing import Annotated, Final

import msgspec

from statemachine.exceptions import LockstepError
from statemachine.phases import Phase

PROTOCOL_VERSION: Final = 1

#: WebSocket close codes used by lockstep (4000-4999 is the application range).
CLOSE_PROTOCOL_ERROR: Final = 4000  # a frame could not be decoded during the handshake
CLOSE_HANDSHAKE_TIMEOUT: Final = 4001
CLOSE_VERSION_MISMATCH: Final = 4002
CLOSE_UNAUTHORIZED: Final = 4003
CLOSE_TOO_MANY_ERRORS: Final = 4008  # more than MAX_BAD_FRAMES bad frames in a row
CLOSE_DUPLICATE_AGENT: Final = 4009
#: "This coordinator is a standby: try another URL." Agents given several URLs move on to the
#: next one at once, without a warning.
CLOSE_NOT_LEADER: Final = 4011

CLOSE_BUSY: Final = 1013  # "try again later": too many connections are still in their handshake
CLOSE_COORDINATOR_SHUTDOWN: Final = 1001  # "going away"

#: ASCII only (``\w`` would admit look-alike Unicode letters) and anchored with ``\Z``: msgspec
#: searches the pattern, and ``$`` also matches before a final newline (``"victim-9\n"``).
AGENT_ID_PATTERN: Final = r"^[A-Za-z0-9_.@:\-]+\Z"
AgentId = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=AGENT_ID_PATTERN)]
MigrationId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
ErrorText = Annotated[str, msgspec.Meta(max_length=4096)]


class _Message(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="type"):
    pass


# ---------------------------------------------------------------- agent -> coordinator
class Hello(_Message, frozen=True, tag="hello"):
    """First frame of every connection."""

    protocol: int
    agent_id: AgentId
    token: str | None = None


class Ack(_Message, frozen=True, tag="ack"):
    migration_id: MigrationId
    phase: Phase


class Nack(_Message, frozen=True, tag="nack"):
    migration_id: MigrationId
    phase: Phase
    error: ErrorText


class Renew(_Message, frozen=True, tag="renew"):
    """Ask for the lease to be extended (every lease/3 seconds, see `statemachine.lease`).
    The agent counts the granted lease from the moment it sent this frame; `seq` matches
    the `LeaseGrant` to the request."""

    seq: Annotated[int, msgspec.Meta(ge=0, le=2**53)]


class Release(_Message, frozen=True, tag="release"):
    """The agent's last frame when the app stops it: it serves no more work (every `using`
    block ended and new ones are refused), so its lease may be counted as expired now instead
    of at its certain expiry. The coordinator closes the connection after it. An agent that
    cannot say so truthfully (work still in flight) closes without it."""


# ---------------------------------------------------------------- coordinator -> agent
class Welcome(_Message, frozen=True, tag="welcome", omit_defaults=True):
    """Handshake accepted. `applied` lists the migrations whose new code agents must run."""

    protocol: int
    applied: list[str]
    heartbeat_interval: float
    #: The leader epoch of the coordinator that sent it (0: a coordinator that does not say).
    #: An agent ignores a Welcome or notice whose non-zero epoch is below one it already saw.
    #: Omitted from the frame when 0 (`omit_defaults`), so such frames are exactly what agents
    #: that predate the field decode; a non-zero epoch needs agents that know the field.
    epoch: int = 0
    #: The lease (seconds) the Welcome grants, counted by the agent from when it sent its
    #: hello; renewed with `Renew`. 0 (omitted): a coordinator without leases.
    lease_seconds: float = 0.0


class PhaseNotice(_Message, frozen=True, tag="phase", omit_defaults=True):
    """A migration entered `phase`; if `ack_required`, answer with Ack or Nack before
    `ack_timeout` seconds have passed."""

    migration_id: str
    migration: str
    phase: Phase
    ack_required: bool
    ack_timeout: float
    epoch: int = 0  # as in Welcome: a deposed leader's notices are ignored


class LeaseGrant(_Message, frozen=True, tag="lease"):
    """The answer to `Renew` number `seq`: the lease is `seconds` long from that request."""

    seq: int
    seconds: float


class Error(_Message, frozen=True, tag="error"):
    """Something the peer sent was refused; `fatal` errors are followed by a close."""

    code: str
    message: str
    fatal: bool = False


AgentMessage = Hello | Ack | Nack | Renew | Release
CoordinatorMessage = Welcome | PhaseNotice | LeaseGrant | Error


class ProtocolError(LockstepError, ValueError):
    """Raised by the decoders for a frame that is not a valid message; `code` is sent back in
    the Error frame (or the close reason before the handshake)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


AGENT_TYPES: Final = ("hello", "ack", "nack", "renew", "release")
COORDINATOR_TYPES: Final = ("welcome", "phase", "lease", "error")

_agent_decoder = msgspec.json.Decoder(AgentMessage)
_coordinator_decoder = msgspec.json.Decoder(CoordinatorMessage)
_encoder = msgspec.json.Encoder()

MAX_FRAME_BYTES: Final = 64 * 1024
#: Deepest nesting of arrays and objects a frame may have. Valid agent messages are flat
#: objects (depth 1); msgspec recurses per level and raises RecursionError (not DecodeError)
#: near 1,000 levels, so depth is checked before decoding.
MAX_FRAME_DEPTH: Final = 16
#: Bad frames in a row after which the coordinator gives up on a connection (close 4008).
MAX_BAD_FRAMES: Final = 32

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"?', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


def frame_depth(frame: str | bytes) -> int:
    """The deepest nesting of ``[``/``{`` in `frame`, ignoring brackets inside JSON strings.

    Cheap for real frames (two C-level counts); a frame with many brackets costs one regex
    pass to drop strings and a loop over the brackets alone.
    """
    text = frame.decode("utf-8", "replace") if isinstance(frame, bytes) else frame
    if text.count("[") + text.count("{") <= MAX_FRAME_DEPTH:
        return text.count("[") + text.count("{")
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_STRINGS.sub("", text)):
        if bracket in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth = max(depth - 1, 0)
    return deepest


def decode_frame(
    decoder: msgspec.json.Decoder[object],
    frame: str | bytes,
    types: tuple[str, ...],
    *,
    max_bytes: int = MAX_FRAME_BYTES,
) -> object:
    """Decode `frame` with `decoder` under the size and depth bounds; `types` name the
    expected tags in the error for an unknown one. Shared by the relay frames
    (`statemachine.relay`), which allow larger frames (`max_bytes`)."""
    size = len(frame)
    if isinstance(frame, str) and size * 4 > max_bytes:
        size = len(frame.encode())  # a character is up to 4 bytes in UTF-8
    if size > max_bytes:
        raise ProtocolError("frame_too_large", f"frame of {size} bytes exceeds {max_bytes}")
    depth = frame_depth(frame)
    if depth > MAX_FRAME_DEPTH:
        raise ProtocolError(
            "frame_too_deep", f"frame nests {depth} levels deep; at most {MAX_FRAME_DEPTH} allowed"
        )
    try:
        return decoder.decode(frame)
    except RecursionError:  # a safety net: the depth check above should make this unreachable
        raise ProtocolError("frame_too_deep", "frame nests too deeply to decode") from None
    except msgspec.ValidationError as exc:
        text = str(exc)
        if text.endswith("at `$.type`"):
            raise ProtocolError(
                "unknown_type",
                f"unknown message type ({text.split(' - ')[0]}); expected one of "
                + ", ".join(types),
            ) from None
        raise ProtocolError("invalid_message", f"invalid message: {text}") from None
    except msgspec.DecodeError as exc:
        raise ProtocolError("malformed_frame", f"frame is not valid JSON: {exc}") from None


def decode_agent_message(frame: str | bytes) -> Hello | Ack | Nack | Renew | Release:
    """Parse a frame an agent sent; raises `ProtocolError` with a precise reason."""
    msg = decode_frame(_agent_decoder, frame, AGENT_TYPES)
    assert isinstance(msg, Hello | Ack | Nack | Renew | Release)
    return msg


def decode_coordinator_message(frame: str | bytes) -> Welcome | PhaseNotice | LeaseGrant | Error:
    """Parse a frame the coordinator sent; raises `ProtocolError` with a precise reason."""
    msg = decode_frame(_coordinator_decoder, frame, COORDINATOR_TYPES)
    assert isinstance(msg, Welcome | PhaseNotice | LeaseGrant | Error)
    return msg


def encode(message: _Message) -> str:
    """Encode to the JSON text sent in one WebSocket text frame."""
    return _encoder.encode(message).decode()


def unknown_path_message(path: str) -> str:
    """The body of the HTTP 404 a coordinator answers an upgrade for any path but ``/``."""
    shown = path[:100].encode("ascii", "backslashreplace").decode("ascii")
    return f"lockstep agents connect to the path / (ws://host:port/), not {shown}"


__all__ = [
    "AGENT_ID_PATTERN",
    "CLOSE_BUSY",
    "CLOSE_COORDINATOR_SHUTDOWN",
    "CLOSE_DUPLICATE_AGENT",
    "CLOSE_HANDSHAKE_TIMEOUT",
    "CLOSE_NOT_LEADER",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_TOO_MANY_ERRORS",
    "CLOSE_UNAUTHORIZED",
    "CLOSE_VERSION_MISMATCH",
    "MAX_BAD_FRAMES",
    "MAX_FRAME_BYTES",
    "MAX_FRAME_DEPTH",
    "PROTOCOL_VERSION",
    "Ack",
    "AgentMessage",
    "CoordinatorMessage",
    "Error",
    "Hello",
    "LeaseGrant",
    "Nack",
    "PhaseNotice",
    "ProtocolError",
    "Release",
    "Renew",
    "Welcome",
    "decode_agent_message",
    "decode_coordinator_message",
    "decode_frame",
    "encode",
    "frame_depth",
    "unknown_path_message",
]
