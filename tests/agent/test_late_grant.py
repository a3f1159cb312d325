"""`AgentSession`'s late-grant window: after a lapse, how long the agent keeps the link.

Pure (an injected clock, frames built by hand): the trio and asyncio agents only sleep for
what `late_grant_wait` says and drop the link when `lapse_is_final` says so.
"""

from __future__ import annotations

import pytest

from agent.session import AgentSession
from statemachine.lease import certainly_expired_after, renew_interval
from statemachine.protocol import (
    PROTOCOL_VERSION,
    LeaseGrant,
    Renew,
    Welcome,
    decode_agent_message,
    encode,
)

LEASE = 15.0
WINDOW = certainly_expired_after(LEASE) - LEASE  # 0.1 L + 1 s = 2.5 s


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def welcomed(clock: Clock) -> AgentSession:
    session = AgentSession("a", clock=clock)
    session.hello(None)  # the Welcome's lease counts from here: until 115
    welcome = Welcome(
        protocol=PROTOCOL_VERSION, applied=[], heartbeat_interval=5, lease_seconds=LEASE
    )
    session.adopt_welcome(welcome)
    session.session_started()
    return session


def renew_seq(session: AgentSession) -> int:
    msg = decode_agent_message(session.renew_frame())
    assert isinstance(msg, Renew)
    return msg.seq


def test_no_wait_while_the_lease_is_valid() -> None:
    clock = Clock()
    session = welcomed(clock)
    clock.now = 114.9
    assert not session.lease_lapsed()
    assert session.late_grant_wait() == 0
    assert not session.lapse_is_final()


def test_the_window_ends_when_the_coordinator_counts_the_lease_expired() -> None:
    """The wait is in steps (a tenth of a renewal interval) up to valid_until + 0.1 L + 1,
    the earliest instant the coordinator may count the lease certainly expired."""
    clock = Clock()
    session = welcomed(clock)
    clock.now = 115.0
    assert session.lease_lapsed() and session.fenced
    assert session.late_grant_wait() == pytest.approx(renew_interval(LEASE) / 10)
    clock.now = 115.0 + WINDOW - 0.2
    assert session.late_grant_wait() == pytest.approx(0.2)
    clock.now = 115.0 + WINDOW
    assert session.late_grant_wait() == 0
    assert session.lapse_is_final(), "no grant came: drop the link and reconnect"


def test_a_late_grant_ends_the_wait_and_keeps_the_link() -> None:
    """A renewal sent at 110 is granted at 116, after the lapse at 115: valid until 125."""
    clock = Clock()
    session = welcomed(clock)
    clock.now = 110.0
    seq = renew_seq(session)
    clock.now = 116.0
    assert session.lease_lapsed() and session.late_grant_wait() > 0
    assert session.read_frame(encode(LeaseGrant(seq=seq, seconds=LEASE))) is None
    assert session.late_grant_wait() == 0
    assert not session.lapse_is_final()
    assert session.ready
    with session.using("anything"):
        pass


def test_a_grant_of_an_old_request_does_not_end_the_wait() -> None:
    """Granted, but counted from a send too long ago to vouch for now: still fenced."""
    clock = Clock()
    session = welcomed(clock)
    clock.now = 100.5
    seq = renew_seq(session)
    clock.now = 116.0
    session.read_frame(encode(LeaseGrant(seq=seq, seconds=LEASE)))
    assert session.lease_lapsed() and session.late_grant_wait() > 0
    clock.now = 115.5 + WINDOW
    assert session.lapse_is_final()
