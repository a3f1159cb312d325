"""statemachine.relay: the relay frames decode strictly, and a relayed agent fences in time.

Plain calls with explicit clock values; no sleeping, no wall clock.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from statemachine.lease import AgentLease, LeaseTable, certainly_expired_after
from statemachine.phases import Phase
from statemachine.protocol import PhaseNotice, ProtocolError, encode
from statemachine.relay import (
    DOWN_TYPES,
    MAX_IDS_PER_FRAME,
    MAX_RELAY_FRAME_BYTES,
    MIN_GRANT_SECONDS,
    UP_TYPES,
    Answered,
    Deliver,
    Drop,
    Joined,
    RelayGrant,
    RelayHello,
    RelayWelcome,
    chunks,
    decode_relay_down,
    decode_relay_up,
    deliver_room,
    encode_relay,
    relay_grant_seconds,
    relay_hello_ok,
)


def test_frames_round_trip_both_ways() -> None:
    notice = encode(PhaseNotice("m1", "add_email", Phase.APPLY, True, 30.0, epoch=3))
    for up in (
        RelayHello(1, "replica-2:8765", "secret"),
        Joined(["a1", "a2"]),
        Answered("m1", Phase.APPLY, ["a1"]),
    ):
        assert decode_relay_up(encode_relay(up)) == up
    for down in (
        RelayWelcome(1, 3, 15.0),
        Deliver(notice, ["a1", "a2"]),
        Drop(["a1"], 4009, "duplicate"),
        RelayGrant(7, 15.0),
    ):
        assert decode_relay_down(encode_relay(down)) == down


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ('{"type": "joined", "agents": ["bad id"]}', "invalid_message"),
        ('{"type": "deliver", "frame": "x", "agents": []}', "unknown_type"),
        ('{"type": "joined", "agents": ["a"], "extra": 1}', "invalid_message"),
        ("not json", "malformed_frame"),
    ],
)
def test_a_bad_frame_from_a_relay_is_a_precise_protocol_error(frame: str, code: str) -> None:
    with pytest.raises(ProtocolError) as raised:
        decode_relay_up(frame)
    assert raised.value.code == code


def test_id_lists_are_bounded_and_cut_to_fit_a_frame() -> None:
    too_many = encode_relay(Joined([f"a{i}" for i in range(MAX_IDS_PER_FRAME + 1)]))
    with pytest.raises(ProtocolError, match="invalid message"):
        decode_relay_up(too_many)
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_relay_up("x" * (MAX_RELAY_FRAME_BYTES + 1))
    longest = [f"{i:0128d}" for i in range(3000)]
    cut = list(chunks(longest))
    assert len(cut) > 1 and [a for part in cut for a in part] == longest
    for part in cut:
        frame = encode_relay(Answered("m" * 128, Phase.APPLY, part))
        assert len(frame.encode()) <= MAX_RELAY_FRAME_BYTES
        assert decode_relay_up(frame) == Answered("m" * 128, Phase.APPLY, part)
    # A Deliver holds a large agent frame (quotes escaped) and as many ids as still fit.
    welcome = encode(PhaseNotice("m1", 'a "quoted" é name ' * 900, Phase.APPLY, True, 30.0))
    for part in chunks(longest, deliver_room(welcome)):
        assert len(encode_relay(Deliver(welcome, part)).encode()) <= MAX_RELAY_FRAME_BYTES


def test_chunks_keep_order() -> None:
    ids = [str(i) for i in range(5)]
    assert list(chunks(ids)) == [ids]
    assert list(chunks([])) == []


def test_a_relay_link_needs_the_fleet_secret_itself() -> None:
    assert relay_hello_ok("s3cret", "s3cret")
    assert not relay_hello_ok("s3cret", None)
    assert not relay_hello_ok("s3cret", "s3cre")
    assert relay_hello_ok(None, None), "a leader without a secret authenticates nobody"


def test_a_relay_grants_only_what_it_holds_and_never_zero() -> None:
    assert relay_grant_seconds(15.0, 100.0, 80.0) == 15.0
    assert relay_grant_seconds(15.0, 100.0, 95.0) == 5.0
    assert relay_grant_seconds(15.0, 100.0, 120.0) == MIN_GRANT_SECONDS


@given(
    lease=st.floats(0.5, 60.0),
    relay_rate=st.floats(0.95, 1.05),
    agent_rate=st.floats(0.95, 1.05),
    link_delay=st.floats(0.0, 5.0),
    agent_delay=st.floats(0.0, 5.0),
    later=st.floats(0.0, 1.0),
)
def test_a_relayed_agent_fences_before_the_leader_counts_it_gone(
    lease: float,
    relay_rate: float,
    agent_rate: float,
    link_delay: float,
    agent_delay: float,
    later: float,
) -> None:
    """Real time is the leader's clock; the relay's and the agent's clocks run at their own
    rates (so any two differ by < 10 %). The relay renews at real time 0, the leader grants
    at `link_delay` (and renews the relay's agents then); an agent renews with the relay at
    some real time while the relay's lease holds, its request arriving `agent_delay` later.
    The agent's lease must end before the leader's deadline for it."""
    relay_lease = AgentLease()
    seq = relay_lease.request(0.0)  # relay clock = real x relay_rate, 0 at real 0
    assert relay_lease.granted(seq, lease)
    leader = LeaseTable(lease)
    deadline = leader.grant("a1", link_delay)
    # The agent sends its renew at real time `sent`, received by the relay `agent_delay` later.
    relay_lease_end_real = relay_lease.valid_until / relay_rate
    sent = later * relay_lease_end_real
    received_real = sent + agent_delay
    if not relay_lease.valid(received_real * relay_rate):
        return  # the relay grants nothing once its own lease lapsed: the agent fences
    seconds = relay_grant_seconds(lease, relay_lease.valid_until, received_real * relay_rate)
    agent = AgentLease()
    aseq = agent.request(sent * agent_rate)
    assert agent.granted(aseq, seconds)
    agent_end_real = agent.valid_until / agent_rate
    assert agent_end_real < deadline
    assert deadline == pytest.approx(link_delay + certainly_expired_after(lease))


def test_every_relay_frame_in_protocol_md_decodes() -> None:
    """docs/protocol.md's relay examples (one frame a line) are frames the decoders accept,
    and they show every relay message."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    section = text[text.index("## Relay frames") : text.index("## Versioning")]
    lines = [line for line in section.splitlines() if line.startswith('{"type"')]
    seen = set()
    for line in lines:
        tag = line.split('"')[3]
        decode = decode_relay_up if tag in UP_TYPES else decode_relay_down
        seen.add(type(decode(line)).__name__)
    assert len(seen) == len(UP_TYPES) + len(DOWN_TYPES) == len(lines)
