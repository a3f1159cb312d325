"""The wire protocol: every message survives a round trip, every bad frame gets a precise code.

The coordinator sends the `ProtocolError` code and message back to the client verbatim, so the
codes are part of the protocol and the messages must name what was wrong.
"""

from __future__ import annotations

import json

import pytest

from statemachine import Phase
from statemachine.protocol import (
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    Ack,
    Error,
    Hello,
    Nack,
    PhaseNotice,
    ProtocolError,
    Welcome,
    decode_agent_message,
    decode_coordinator_message,
    encode,
)

AGENT_MESSAGES = [
    Hello(protocol=PROTOCOL_VERSION, agent_id="app-1"),
    Hello(protocol=PROTOCOL_VERSION, agent_id="pod_7.eu-west:9@host", token="s3cret"),
    Ack(migration_id="m-1", phase=Phase.ANNOUNCE),
    Ack(migration_id="m-1", phase=Phase.ROLLBACK),
    Nack(migration_id="m-1", phase=Phase.APPLY, error="RuntimeError: cache is cold"),
]
COORDINATOR_MESSAGES = [
    Welcome(protocol=PROTOCOL_VERSION, applied=["a", "b"], heartbeat_interval=5.0),
    Welcome(protocol=PROTOCOL_VERSION, applied=[], heartbeat_interval=0.5),
    PhaseNotice(
        migration_id="m-1",
        migration="add_email",
        phase=Phase.CONTRACT,
        ack_required=False,
        ack_timeout=30.0,
    ),
    Error(code="malformed_frame", message="frame is not valid JSON"),
    Error(code="unauthorized", message="missing or wrong token", fatal=True),
]


@pytest.mark.parametrize("message", AGENT_MESSAGES, ids=repr)
def test_agent_messages_round_trip(message: Hello | Ack | Nack) -> None:
    frame = encode(message)
    assert isinstance(frame, str)
    assert decode_agent_message(frame) == message
    assert decode_agent_message(frame.encode()) == message  # binary frames decode the same


@pytest.mark.parametrize("message", COORDINATOR_MESSAGES, ids=repr)
def test_coordinator_messages_round_trip(message: Welcome | PhaseNotice | Error) -> None:
    assert decode_coordinator_message(encode(message)) == message


def test_wire_format_is_tagged_json() -> None:
    frame = json.loads(encode(Ack(migration_id="m-1", phase=Phase.APPLY)))
    assert frame == {"type": "ack", "migration_id": "m-1", "phase": "apply"}
    notice = json.loads(
        encode(PhaseNotice("m", "n", Phase.EXECUTE, ack_required=False, ack_timeout=1.5))
    )
    assert notice["type"] == "phase"
    assert notice["phase"] == "execute"


def _error(frame: str | bytes, *, coordinator: bool = False) -> ProtocolError:
    decode = decode_coordinator_message if coordinator else decode_agent_message
    with pytest.raises(ProtocolError) as info:
        decode(frame)
    return info.value


@pytest.mark.parametrize(
    "frame",
    [b"\xff\x00garbage", b"", "{", "not json", '{"type": "ack",}'],
    ids=["binary", "empty", "truncated", "text", "trailing-comma"],
)
def test_malformed_frame(frame: str | bytes) -> None:
    err = _error(frame)
    assert err.code == "malformed_frame"
    assert err.message.startswith("frame is not valid JSON: ")
    assert str(err) == err.message


def test_unknown_type_lists_the_known_ones() -> None:
    err = _error('{"type": "bogus"}')
    assert err.code == "unknown_type"
    assert "'bogus'" in err.message
    assert err.message.endswith("expected one of hello, ack, nack, renew, release")


def test_coordinator_message_is_an_unknown_type_for_the_agent_side() -> None:
    err = _error(encode(Welcome(protocol=1, applied=[], heartbeat_interval=1.0)))
    assert err.code == "unknown_type"
    assert "'welcome'" in err.message
    err = _error(encode(Ack(migration_id="m", phase=Phase.APPLY)), coordinator=True)
    assert err.code == "unknown_type"
    assert err.message.endswith("expected one of welcome, phase, lease, error")


@pytest.mark.parametrize(
    ("frame", "names"),
    [
        ('{"type": "ack", "phase": "apply"}', "missing required field `migration_id`"),
        ('{"type": "nack", "migration_id": "m", "phase": "apply"}', "`error`"),
        ('{"type": "hello", "agent_id": "a"}', "`protocol`"),
        ('{"protocol": 1, "agent_id": "a"}', "`type`"),
        ('{"type": "ack", "migration_id": "m", "phase": "later"}', "`$.phase`"),
        ('{"type": "ack", "migration_id": 7, "phase": "apply"}', "`$.migration_id`"),
        ('{"type": "ack", "migration_id": "", "phase": "apply"}', "`$.migration_id`"),
        ('{"type": "ack", "migration_id": "m", "phase": "apply", "x": 1}', "unknown field `x`"),
        ('{"type": "hello", "protocol": 1, "agent_id": "a b"}', "`$.agent_id`"),
        ('{"type": "hello", "protocol": "1", "agent_id": "a"}', "`$.protocol`"),
        ("[1, 2]", "Expected `object`, got `array`"),
    ],
    ids=[
        "missing-migration_id",
        "missing-error",
        "missing-protocol",
        "missing-type",
        "bad-phase",
        "wrong-type",
        "empty-id",
        "unknown-field",
        "bad-agent-id",
        "protocol-as-string",
        "not-an-object",
    ],
)
def test_invalid_message_names_the_field(frame: str, names: str) -> None:
    err = _error(frame)
    assert err.code == "invalid_message"
    assert names in err.message


def test_nack_error_text_is_bounded() -> None:
    frame = encode(Nack(migration_id="m", phase=Phase.APPLY, error="x" * 4097))
    err = _error(frame)
    assert err.code == "invalid_message"
    assert "`$.error`" in err.message


def test_frame_too_large_is_refused_before_parsing() -> None:
    padding = "x" * MAX_FRAME_BYTES
    frame = encode(Nack(migration_id="m", phase=Phase.APPLY, error="e")).replace(
        '"e"', f'"{padding}"'
    )
    err = _error(frame)
    assert err.code == "frame_too_large"
    assert str(MAX_FRAME_BYTES) in err.message
    assert str(len(frame)) in err.message
    assert _error(b"\xff" * (MAX_FRAME_BYTES + 1)).code == "frame_too_large"
    assert _error(padding + "x", coordinator=True).code == "frame_too_large"


def test_frame_at_the_limit_is_parsed() -> None:
    frame = encode(Ack(migration_id="m", phase=Phase.APPLY))
    frame += " " * (MAX_FRAME_BYTES - len(frame))  # JSON allows trailing whitespace
    assert len(frame) == MAX_FRAME_BYTES
    assert decode_agent_message(frame) == Ack(migration_id="m", phase=Phase.APPLY)


def test_every_error_code_is_distinct() -> None:
    frames: dict[str, str | bytes] = {
        "malformed_frame": b"\x00",
        "unknown_type": '{"type": "nope"}',
        "invalid_message": '{"type": "ack"}',
        "frame_too_large": " " * (MAX_FRAME_BYTES + 1),
    }
    assert {code: _error(frame).code for code, frame in frames.items()} == {
        code: code for code in frames
    }
