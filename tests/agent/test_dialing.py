"""Connection failures are logged with their real cause, once, then once a minute.

The failures are real: a refused loopback port, an unresolvable name, WebSocket servers that
refuse the upgrade or close the handshake with a code. The once-a-minute summary is checked
with `FailureLog`'s injectable clock rather than by waiting a minute.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Awaitable, Callable

import pytest
import trio
from trio_websocket import WebSocketRequest, serve_websocket

from agent import AgentConfigError, open_agent
from agent.dialing import FailureLog, Rotation, coordinator_urls
from coordinator import open_coordinator

REFUSED = "ws://127.0.0.1:1"


def _agent_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "lockstep.agent" and text in r.getMessage()]


async def test_a_refused_port_is_one_warning_naming_the_cause(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="lockstep.agent")
    async with open_agent(REFUSED, agent_id="app-1", max_backoff=0.05) as agent:
        await trio.sleep(1.0)  # many attempts, well under the summary interval
        assert not agent.connected
    first = _agent_lines(caplog, "cannot reach the coordinator")
    assert len(first) == 1 and first[0].levelno == logging.WARNING
    assert "connection refused" in first[0].getMessage() and REFUSED in first[0].getMessage()
    assert _agent_lines(caplog, "still cannot reach") == []
    assert "HandshakeError()" not in caplog.text


async def test_reconnecting_is_one_info_line(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lockstep.agent")
    async with (
        open_coordinator(dsn) as coord,
        open_agent([REFUSED, coord.url], agent_id="app-1") as agent,
    ):
        assert agent.connected
    back = _agent_lines(caplog, "reached the coordinator")
    assert len(back) == 1 and back[0].levelno == logging.INFO
    assert "1 failed attempts" in back[0].getMessage()


def test_failure_log_summarises_once_a_minute() -> None:
    now = [0.0]
    logger = logging.getLogger("test.failure_log")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger.addHandler(Keep())
    logger.setLevel(logging.DEBUG)
    failures = FailureLog("app-1", clock=lambda: now[0], logger=logger)
    for _ in range(30):  # 30 attempts over 59 s: the first warning only
        failures.failed("ws://a:1", "connection refused")
        now[0] += 59 / 30
    assert [r.levelno for r in records] == [logging.WARNING]
    now[0] = 60.5
    failures.failed("ws://b:2", "DNS lookup failed: Name or service not known")
    assert len(records) == 2
    summary = records[1].getMessage()
    assert "still cannot reach" in summary and "31 attempts" in summary
    assert "ws://b:2: DNS lookup failed" in summary
    failures.failed("ws://a:1", "connection refused")  # within the next minute: silent
    assert len(records) == 2
    failures.joined("ws://a:1", sessions=2)
    assert records[-1].levelno == logging.INFO
    assert "reconnected" in records[-1].getMessage() and "32 failed" in records[-1].getMessage()


Handler = Callable[[WebSocketRequest], Awaitable[None]]


async def _refusing(handler: Handler, caplog: pytest.LogCaptureFixture) -> str:
    caplog.set_level(logging.INFO, logger="lockstep.agent")
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
        async with open_agent(f"ws://127.0.0.1:{server.port}", agent_id="app-1"):
            pass
        nursery.cancel_scope.cancel()
    (line,) = _agent_lines(caplog, "cannot reach the coordinator")
    return line.getMessage()


async def test_an_http_refusal_of_the_upgrade_names_the_status(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def forbid(request: WebSocketRequest) -> None:
        await request.reject(403)

    assert "handshake rejected: HTTP 403" in await _refusing(forbid, caplog)


async def test_a_close_during_the_handshake_names_code_and_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def close(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.get_message()
        await ws.aclose(1013, "too many handshakes")

    line = await _refusing(close, caplog)
    assert "handshake rejected with close code 1013: too many handshakes" in line


async def test_a_dns_failure_is_named(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lockstep.agent")
    async with open_agent("ws://no-such-host.invalid:9", agent_id="app-1", connect_timeout=5):
        pass
    (line,) = _agent_lines(caplog, "cannot reach the coordinator")
    assert "DNS lookup failed" in line.getMessage()


def test_bad_urls_are_a_clear_error() -> None:
    with pytest.raises(AgentConfigError, match="no coordinator URL"):
        coordinator_urls([])
    with pytest.raises(AgentConfigError, match="is not ws://host:port"):
        coordinator_urls("http://coordinator:8765")
    assert coordinator_urls("ws://a:1") == ("ws://a:1",)


def test_rotation_moves_on_at_once_from_a_standby_and_backs_off_otherwise() -> None:
    rotation = Rotation(["ws://a:1", "ws://b:2"], max_backoff=5)
    assert rotation.failed(not_leader=True) == 0.0 and rotation.url == "ws://b:2"
    # Every URL a standby (a failover in progress): back off rather than spin.
    assert rotation.failed(not_leader=True) > 0 and rotation.url == "ws://a:1"
    assert rotation.failed() > 0 and rotation.url == "ws://b:2"


@pytest.mark.parametrize(
    ("setup", "expected"),
    [("", "WARNING"), ("logging.getLogger('transitions').setLevel(logging.DEBUG)", "DEBUG")],
)
def test_transitions_stays_quiet_unless_the_app_asked(setup: str, expected: str) -> None:
    script = (
        f"import logging\n{setup}\nimport agent\n"
        "print(logging.getLevelName(logging.getLogger('transitions').level))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == expected
