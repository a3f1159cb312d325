"""The HTTP endpoints over real loopback sockets: status codes, readiness, hostile clients.

Readiness is probed against the test's real PostgreSQL and against a closed port; the hostile
clients (garbage bytes, a huge header, too many headers, a slowloris, a connection flood) must
each get a status or a closed socket, leave no traceback in the logs, and leave the server
serving everyone else.
"""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import AsyncIterator

import h11
import pytest
import trio
from psycopg.conninfo import make_conninfo

from coordinator import Coordinator
from coordinator.executor import PostgresExecutor
from coordinator.http import (
    HttpEndpoint,
    HttpLimits,
    PostgresProbe,
    StaticLeadership,
    open_http,
    serve_http,
)
from tests.support.http_client import exchange, get, read_reply, status_of

#: Short deadlines so the hostile cases end quickly (the defaults are 5 s).
LIMITS = HttpLimits(max_connections=4, max_request_bytes=2048, max_headers=16, request_timeout=0.5)


class Standby:
    """Readiness of a replica that is not the leader (its database would be fine)."""

    def __init__(self) -> None:
        self.database_asked = 0

    def is_leader(self) -> bool:
        return False

    def epoch(self) -> int:
        return 7

    def leader_description(self) -> str:
        return "pid 42 on host-a (epoch 7)"

    async def database_reachable(self) -> tuple[bool, str]:
        self.database_asked += 1
        return True, "fine"


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def coordinator() -> Coordinator:
    """A coordinator that never runs a migration here: only its HTTP side is under test."""
    return Coordinator(executor=PostgresExecutor("dbname=unused"))


@pytest.fixture
async def http(coordinator: Coordinator) -> AsyncIterator[HttpEndpoint]:
    async with open_http(coordinator, readiness=StaticLeadership(), limits=LIMITS) as endpoint:
        yield endpoint


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    logged = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not logged, [r.getMessage() for r in logged]


async def still_serves(http: HttpEndpoint) -> None:
    assert (await get(http.port, "/healthz")).status == 200


# ------------------------------------------------------------------ endpoints
async def test_healthz_answers_get_and_head(
    http: HttpEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    reply = await get(http.port, "/healthz")
    assert (reply.status, reply.text) == (200, "ok\n")
    assert reply.headers["content-type"].startswith("text/plain")
    head = await get(http.port, "/healthz", method="HEAD")
    assert head.status == 200
    assert head.body == b""
    assert head.headers["content-length"] == str(len(reply.body))
    no_tracebacks(caplog)


async def test_an_http_1_0_request_is_answered_and_closed(http: HttpEndpoint) -> None:
    raw = await exchange(http.port, b"GET /healthz HTTP/1.0\r\n\r\n", timeout=2)
    assert status_of(raw) == 200
    assert raw.endswith(b"\r\n\r\nok\n")


async def test_a_query_string_does_not_change_the_endpoint(http: HttpEndpoint) -> None:
    assert (await get(http.port, "/healthz?verbose=1")).status == 200


async def test_unknown_paths_are_404(http: HttpEndpoint) -> None:
    for path in ("/", "/health", "/metrics/x", "/HEALTHZ"):
        assert (await get(http.port, path)).status == 404, path


async def test_only_get_and_head_are_allowed(http: HttpEndpoint) -> None:
    for method in ("POST", "PUT", "DELETE", "OPTIONS", "PATCH"):
        reply = await get(http.port, "/readyz", method=method)
        assert reply.status == 405, method
        assert reply.headers["allow"] == "GET, HEAD"
    posted = await get(http.port, "/metrics", method="POST", body=b"x" * 100)
    assert posted.status == 405


async def test_a_get_with_a_body_is_refused(http: HttpEndpoint) -> None:
    assert (await get(http.port, "/healthz", body=b"hello")).status == 413
    await still_serves(http)


async def test_metrics_is_the_prometheus_text_format(http: HttpEndpoint) -> None:
    reply = await get(http.port, "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain; version=")
    assert "# TYPE lockstep_agents_connected gauge" in reply.text


async def test_requests_share_a_kept_alive_connection(http: HttpEndpoint) -> None:
    conn = h11.Connection(h11.CLIENT)
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", http.port)
        async with stream:
            for path in ("/healthz", "/readyz", "/metrics"):
                request = h11.Request(method="GET", target=path, headers=[("Host", "x")])
                await stream.send_all(conn.send(request) or b"")
                await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
                assert (await read_reply(stream, conn)).status == 200, path
                conn.start_next_cycle()


async def test_serve_http_returns_the_bound_port(coordinator: Coordinator) -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            functools.partial(serve_http, coordinator, "127.0.0.1", 0, readiness=StaticLeadership())
        )
        assert isinstance(port, int) and port > 0
        assert (await get(port, "/healthz")).status == 200
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ readiness
async def test_ready_when_leader_and_the_database_answers(
    coordinator: Coordinator, dsn: str
) -> None:
    readiness = StaticLeadership(PostgresProbe(dsn))
    async with open_http(coordinator, readiness=readiness) as http:
        reply = await get(http.port, "/readyz")
    assert (reply.status, reply.text) == (200, "ready: leader, epoch 0\n")


async def test_a_standby_is_not_ready_and_says_who_leads(coordinator: Coordinator) -> None:
    standby = Standby()
    async with open_http(coordinator, readiness=standby) as http:
        reply = await get(http.port, "/readyz")
        assert (await get(http.port, "/healthz")).status == 200  # alive all the same
    assert reply.status == 503
    assert reply.text == "standby: the leader is pid 42 on host-a (epoch 7)\n"
    assert standby.database_asked == 0  # a standby's answer costs no database call


async def test_not_ready_when_the_database_is_unreachable(coordinator: Coordinator) -> None:
    dsn = make_conninfo(host="127.0.0.1", port=closed_port(), dbname="x", user="x")
    async with open_http(coordinator, readiness=StaticLeadership(PostgresProbe(dsn))) as http:
        reply = await get(http.port, "/readyz")
        assert (await get(http.port, "/healthz")).status == 200  # liveness asks no database
    assert reply.status == 503
    assert reply.text.startswith("database unreachable: ")
    assert "refused" in reply.text.lower(), reply.text


async def test_readiness_follows_the_database(coordinator: Coordinator, dsn: str) -> None:
    """The same probe object answers 200, then 503 once its DSN points at a closed port."""
    probe = PostgresProbe(dsn, interval=0.0)
    async with open_http(coordinator, readiness=StaticLeadership(probe)) as http:
        assert (await get(http.port, "/readyz")).status == 200
        probe.dsn = make_conninfo(dsn, host="127.0.0.1", port=closed_port(), connect_timeout=1)
        assert (await get(http.port, "/readyz")).status == 503


async def test_the_probe_checks_at_most_once_per_interval(dsn: str) -> None:
    probe = PostgresProbe(dsn, interval=60.0)
    answers: list[tuple[bool, str]] = []

    async def ask() -> None:
        answers.append(await probe.database_reachable())

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(ask)
        for _ in range(5):
            await ask()
    assert probe.checks == 1
    assert answers == [(True, "SELECT 1 answered")] * 25


async def test_the_probe_checks_again_after_its_interval(dsn: str) -> None:
    probe = PostgresProbe(dsn, interval=0.2)
    await probe.database_reachable()
    await trio.sleep(0.3)
    await probe.database_reachable()
    assert probe.checks == 2


def test_the_probe_refuses_a_timeout_of_zero() -> None:
    with pytest.raises(ValueError, match="timeout"):
        PostgresProbe("dbname=x", timeout=0)


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        HttpLimits(max_connections=0)
    with pytest.raises(ValueError):
        HttpLimits(request_timeout=0)


# ------------------------------------------------------------ hostile clients
async def test_garbage_bytes_get_400(http: HttpEndpoint, caplog: pytest.LogCaptureFixture) -> None:
    for garbage in (
        b"\x00\xff\xfe garbage\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        bytes(range(256)) * 4,
    ):
        raw = await exchange(http.port, garbage)
        assert status_of(raw) == 400, (garbage[:40], raw[:200])
    await still_serves(http)
    no_tracebacks(caplog)


async def test_an_unknown_http_version_gets_505(http: HttpEndpoint) -> None:
    raw = await exchange(http.port, b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n")
    assert status_of(raw) == 505


async def test_a_huge_header_gets_431(http: HttpEndpoint, caplog: pytest.LogCaptureFixture) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n"
    raw = await exchange(http.port, request)
    assert status_of(raw) == 431
    await still_serves(http)
    no_tracebacks(caplog)


async def test_too_many_headers_get_431(
    http: HttpEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    headers = b"".join(b"X-%d: 1\r\n" % i for i in range(LIMITS.max_headers + 1))
    raw = await exchange(http.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert status_of(raw) == 431
    assert b"too many headers" in raw
    await still_serves(http)
    no_tracebacks(caplog)


async def test_a_slowloris_is_answered_408_and_closed(
    http: HttpEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    """Trickling a header a byte at a time does not reset the deadline: it counts the head."""
    received = bytearray()
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", http.port)
        async with stream:
            closed = False
            for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                try:
                    await stream.send_all(bytes([byte]))
                except trio.BrokenResourceError:
                    break
                with trio.move_on_after(0.05):
                    chunk = await stream.receive_some(4096)
                    received += chunk
                    if not chunk:
                        closed = True
                        break
            while not closed:
                chunk = await stream.receive_some(4096)
                received += chunk
                closed = not chunk
    assert status_of(bytes(received)) == 408
    await still_serves(http)
    no_tracebacks(caplog)


async def test_an_idle_connection_is_closed(http: HttpEndpoint) -> None:
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", http.port)
        async with stream:
            assert await stream.receive_some(4096) == b""  # closed without a word


async def test_connections_beyond_the_limit_are_closed_at_once(
    http: HttpEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    held = [await trio.open_tcp_stream("127.0.0.1", http.port) for _ in range(4)]
    try:
        for stream in held:  # the four are served: each sends a partial head and waits
            await stream.send_all(b"GET /healthz HTTP/1.1\r\n")
        await trio.sleep(0.05)
        with trio.fail_after(LIMITS.request_timeout / 2):
            extra = await trio.open_tcp_stream("127.0.0.1", http.port)
            async with extra:
                # Refused before the head deadline of the held ones, with nothing read.
                assert await extra.receive_some(4096) == b""
    finally:
        for stream in held:
            await stream.aclose()
    await trio.sleep(0.05)
    await still_serves(http)
    no_tracebacks(caplog)


async def test_a_client_that_vanishes_mid_request_leaves_no_trace(
    http: HttpEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    for partial in (b"GET /heal", b"GET /healthz HTTP/1.1\r\nHost:", b"G"):
        stream = await trio.open_tcp_stream("127.0.0.1", http.port)
        await stream.send_all(partial)
        await trio.aclose_forcefully(stream)
    await trio.sleep(0.1)
    await still_serves(http)
    no_tracebacks(caplog)
