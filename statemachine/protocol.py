"""The wire protocol between agents and the coordinator: JSON text frames, one message each.

Every message is a msgspec tagged struct (`"type"` names it). Decoding is strict: an unknown
`type`, a missing or mistyped field or an unknown field is a `ProtocolError` whose message says
exactly what was wrong, which the coordinator sends back in an `Error` frame. See
`docs/protocol.md` for examples, the handshake and close codes.

Versioning: `PROTOCOL_VERSION` changes only for incompatible changes; the coordinator rejects a
`Hello` whose version it does not speak (close code 4002).
"""

from __future__ import annotations

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
CLOSE_DUPLICATE_AGENT: Final = 4009
CLOSE_COORDINATOR_SHUTDOWN: Final = 1001  # "going away"

AgentId = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[\w.@:\-]+$")]
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


# ---------------------------------------------------------------- coordinator -> agent
class Welcome(_Message, frozen=True, tag="welcome"):
    """Handshake accepted. `applied` lists the migrations whose new code agents must run."""

    protocol: int
    applied: list[str]
    heartbeat_interval: float


class PhaseNotice(_Message, frozen=True, tag="phase"):
    """A migration entered `phase`; if `ack_required`, answer with Ack or Nack before
    `ack_timeout` seconds have passed."""

    migration_id: str
    migration: str
    phase: Phase
    ack_required: bool
    ack_timeout: float


class Error(_Message, frozen=True, tag="error"):
    """Something the peer sent was refused; `fatal` errors are followed by a close."""

    code: str
    message: str
    fatal: bool = False


AgentMessage = Hello | Ack | Nack
CoordinatorMessage = Welcome | PhaseNotice | Error


class ProtocolError(LockstepError, ValueError):
    """Raised by the decoders for a frame that is not a valid message; `code` is sent back in
    the Error frame (or the close reason before the handshake)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


AGENT_TYPES: Final = ("hello", "ack", "nack")
COORDINATOR_TYPES: Final = ("welcome", "phase", "error")

_agent_decoder = msgspec.json.Decoder(AgentMessage)
_coordinator_decoder = msgspec.json.Decoder(CoordinatorMessage)
_encoder = msgspec.json.Encoder()

MAX_FRAME_BYTES: Final = 64 * 1024


def _decode(
    decoder: msgspec.json.Decoder[object], frame: str | bytes, types: tuple[str, ...]
) -> object:
    size = len(frame)
    if isinstance(frame, str) and size * 4 > MAX_FRAME_BYTES:
        size = len(frame.encode())  # a character is up to 4 bytes in UTF-8
    if size > MAX_FRAME_BYTES:
        raise ProtocolError("frame_too_large", f"frame of {size} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        return decoder.decode(frame)
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


def decode_agent_message(frame: str | bytes) -> Hello | Ack | Nack:
    """Parse a frame an agent sent; raises `ProtocolError` with a precise reason."""
    msg = _decode(_agent_decoder, frame, AGENT_TYPES)
    assert isinstance(msg, Hello | Ack | Nack)
    return msg


def decode_coordinator_message(frame: str | bytes) -> Welcome | PhaseNotice | Error:
    """Parse a frame the coordinator sent; raises `ProtocolError` with a precise reason."""
    msg = _decode(_coordinator_decoder, frame, COORDINATOR_TYPES)
    assert isinstance(msg, Welcome | PhaseNotice | Error)
    return msg


def encode(message: _Message) -> str:
    """Encode to the JSON text sent in one WebSocket text frame."""
    return _encoder.encode(message).decode()


__all__ = [
    "CLOSE_COORDINATOR_SHUTDOWN",
    "CLOSE_DUPLICATE_AGENT",
    "CLOSE_HANDSHAKE_TIMEOUT",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_UNAUTHORIZED",
    "CLOSE_VERSION_MISMATCH",
    "MAX_FRAME_BYTES",
    "PROTOCOL_VERSION",
    "Ack",
    "AgentMessage",
    "CoordinatorMessage",
    "Error",
    "Hello",
    "Nack",
    "PhaseNotice",
    "ProtocolError",
    "Welcome",
    "decode_agent_message",
    "decode_coordinator_message",
    "encode",
]
