"""The coordinator's HTTP side: liveness, readiness and Prometheus metrics.

Three read-only endpoints for an orchestrator and a monitoring system:

- ``/healthz``: 200 as long as the event loop serves requests (no database call, so a slow
  database never gets a healthy process killed);
- ``/readyz``: 200 only when this replica is the leader and the database answers, 503 with a
  one-line reason otherwise, so a Kubernetes Service sends operators to the leader only;
- ``/metrics``: the Prometheus text exposition of `coordinator.metrics`.

HTTP/1.1 is h11 (a sans-I/O parser, like wsproto under the agents' WebSockets) driven by trio.
The port is reachable by whoever reaches the network, so every client is bounded
(`HttpLimits`): the size of a request head, its number of headers, the time to send it, the
time to read the answer, the connections open at once. Anything a client sends gets a status
(400, 404, 405, 408, 413, 431, 505) or a closed socket, never a traceback. docs/operations.md
describes the endpoints, the metrics and how to probe them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus
from typing import Any, Protocol

import h11
import psycopg
import trio
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from psycopg.conninfo import make_conninfo

from coordinator.metrics import (
    CoordinatorMetrics,
    CoordinatorView,
    MigrationCounts,
    PostgresMigrationCounts,
)
from coordinator.pg import thread as pgthread
from coordinator.pg.errors import pg_message
from statemachine.text import printable

log = logging.getLogger("lockstep.coordinator")


class Readiness(Protocol):
    """What ``/readyz`` asks: is this replica the leader, and does its database answer.

    `StaticLeadership` is the one for a coordinator without leader election; `lockstep
    serve` passes its leader-election object.
    """

    def is_leader(self) -> bool: ...

    def epoch(self) -> int: ...

    def leader_description(self) -> str:
        """Who leads, for a standby's 503 ("pid 12 on host-a since 10:02, epoch 7")."""
        ...

    async def database_reachable(self) -> tuple[bool, str]:
        """(True, detail) when the database answers; (False, why) otherwise. Must be cheap
        to call often: probes arrive every few seconds from every probing client."""
        ...


class DatabaseProbe(Protocol):
    async def database_reachable(self) -> tuple[bool, str]: ...


class PostgresProbe:
    """Is the database reachable: ``SELECT 1`` on a new connection, cached for `interval`.

    However many probes arrive, at most one check runs per `interval` (concurrent callers
    wait for the check in progress and share its answer), so a flood of ``/readyz`` requests
    cannot become a flood of connections. `timeout` bounds the connection (libpq's
    ``connect_timeout``, whole seconds, at least 1) and the statement (``statement_timeout``;
    a cancelled wait also cancels the statement on the server, see `coordinator.pg.thread`).
    """

    def __init__(self, dsn: str, *, timeout: float = 2.0, interval: float = 1.0) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self.dsn = make_conninfo(dsn, connect_timeout=max(1, round(timeout)))
        self.timeout = timeout
        self.interval = interval
        #: Checks actually run against the database (the cache's effect, for tests).
        self.checks = 0
        self._lock = trio.Lock()
        self._checked_at: float | None = None
        self._answer: tuple[bool, str] = (False, "not probed yet")

    async def database_reachable(self) -> tuple[bool, str]:
        async with self._lock:
            now = trio.current_time()
            if self._checked_at is None or now - self._checked_at >= self.interval:
                self._answer = await self._check()
                self._checked_at = trio.current_time()
            return self._answer

    async def _check(self) -> tuple[bool, str]:
        self.checks += 1
        try:
            conn = await pgthread.connect(self.dsn, autocommit=True)
        except psycopg.Error as exc:
            return False, printable(pg_message(exc), limit=300)
        try:

            def work() -> None:
                conn.execute(
                    "SELECT set_config('statement_timeout', %s, false)",
                    (f"{max(1, int(self.timeout * 1000))}ms",),
                )
                conn.execute("SELECT 1").fetchone()

            with trio.move_on_after(self.timeout * 2) as scope:
                await pgthread.run_in_thread(conn, work)
            if scope.cancelled_caught:
                return False, f"SELECT 1 got no answer within {self.timeout * 2:g} s"
            return True, "SELECT 1 answered"
        except psycopg.Error as exc:
            return False, printable(pg_message(exc), limit=300)
        finally:
            await pgthread.close(conn)


class StaticLeadership:
    """`Readiness` for a coordinator without leader election: always the leader, epoch 0.

    `database` (a `PostgresProbe`) answers the database half; without one the database is
    taken as reachable, so ``/readyz`` only says the process serves.
    """

    def __init__(self, database: DatabaseProbe | None = None) -> None:
        self.database = database

    def is_leader(self) -> bool:
        return True

    def epoch(self) -> int:
        return 0

    def leader_description(self) -> str:
        return "this process (no leader election)"

    async def database_reachable(self) -> tuple[bool, str]:
        if self.database is None:
            return True, "not probed (no database probe configured)"
        return await self.database.database_reachable()


@dataclasses.dataclass(frozen=True)
class HttpLimits:
    """What one client may hold of the HTTP server (stated in docs/operations.md).

    `request_timeout` bounds the arrival of a whole request head, counted from its first
    byte's wait, and the idle time between requests on a kept-alive connection: a client that
    trickles a header a byte at a time (slowloris) is answered 408 and closed when it runs out.
    `write_timeout` bounds sending one answer to a client that does not read.
    """

    max_connections: int = 64
    max_request_bytes: int = 8 * 1024
    max_headers: int = 64
    request_timeout: float = 5.0
    write_timeout: float = 5.0
    max_requests_per_connection: int = 100

    def __post_init__(self) -> None:
        if min(self.max_connections, self.max_headers, self.max_requests_per_connection) < 1:
            raise ValueError("HTTP connection, header and request limits must be >= 1")
        if self.max_request_bytes < 256:
            raise ValueError(f"max_request_bytes must be >= 256, got {self.max_request_bytes}")
        if not (self.request_timeout > 0 and self.write_timeout > 0):
            raise ValueError("HTTP timeouts must be > 0")


@dataclasses.dataclass(frozen=True)
class _Answer:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


def _text(status: int, text: str, **kw: Any) -> _Answer:
    return _Answer(status, (text + "\n").encode(), **kw)


class _ClientGone(Exception):
    """The client closed, timed out, or broke the connection: stop serving it."""


#: How much is read from a socket at once.
_RECEIVE_BYTES = 16 * 1024
#: After an error answer, how long and how much of what the client still sends is read
#: (and dropped) before closing, so the answer is not lost to a TCP reset.
_LINGER_SECONDS = 0.5
_LINGER_BYTES = 256 * 1024


class HttpServer:
    """Serves the three endpoints to each accepted stream (`serve_http` runs it)."""

    def __init__(
        self, readiness: Readiness, metrics: CoordinatorMetrics, limits: HttpLimits
    ) -> None:
        self.readiness = readiness
        self.metrics = metrics
        self.limits = limits
        #: Connections open right now, and refused since start because of `max_connections`.
        self.open_connections = 0
        self.refused_connections = 0
        self._routes: dict[bytes, Callable[[], Awaitable[_Answer]]] = {
            b"/healthz": self._healthz,
            b"/readyz": self._readyz,
            b"/metrics": self._metrics,
        }

    # -------------------------------------------------------------- endpoints
    async def _healthz(self) -> _Answer:
        return _text(200, "ok")

    async def _readyz(self) -> _Answer:
        readiness = self.readiness
        if not readiness.is_leader():
            leader = printable(readiness.leader_description(), limit=300)
            return _text(503, f"standby: the leader is {leader}")
        reachable, detail = await readiness.database_reachable()
        if not reachable:
            return _text(503, f"database unreachable: {printable(detail, limit=300)}")
        return _text(200, f"ready: leader, epoch {readiness.epoch()}")

    async def _metrics(self) -> _Answer:
        await self.metrics.refresh()
        return _Answer(200, self.metrics.render(), CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------ connections
    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serve one connection until it closes; never raises (but Cancelled)."""
        if self.open_connections >= self.limits.max_connections:
            self.refused_connections += 1
            await trio.aclose_forcefully(stream)
            return
        self.open_connections += 1
        try:
            await self._serve(stream)
        except _ClientGone:
            pass
        except Exception:  # our own bug: log it, keep serving everyone else
            log.exception("HTTP: unexpected error serving a client")
        finally:
            self.open_connections -= 1
            await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_request_bytes)
        for served in range(self.limits.max_requests_per_connection):
            try:
                request = await self._next_request(stream, conn)
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                reason = "request head too large" if status == 431 else "malformed request"
                detail = printable(str(exc), limit=120)
                await self._fail(stream, conn, _text(status, f"{reason}: {detail}"))
                return
            if request is None:
                return
            last = served + 1 == self.limits.max_requests_per_connection
            answer, close = await self._answer(request)
            await self._respond(stream, conn, request, answer, close=close or last)
            if close or conn.our_state is h11.MUST_CLOSE:
                await _linger(stream)
                return
            try:
                await self._finish_request(stream, conn)
            except h11.RemoteProtocolError:
                return
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _next_request(
        self, stream: trio.abc.Stream, conn: h11.Connection
    ) -> h11.Request | None:
        """The next request head, or None when the client closed or sat idle too long."""
        received = False
        with trio.move_on_after(self.limits.request_timeout):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await _receive(stream)
                    received = received or bool(data)
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    return event
                else:  # ConnectionClosed, or PAUSED after a protocol switch we refuse
                    return None
        if received:  # a head that did not arrive in time (slowloris): say so, then close
            await self._fail(stream, conn, _text(408, "request head not received in time"))
        return None

    async def _answer(self, request: h11.Request) -> tuple[_Answer, bool]:
        """The answer to `request`, and whether to close the connection after it."""
        if request.http_version not in (b"1.0", b"1.1"):
            return _text(505, "only HTTP/1.0 and HTTP/1.1"), True
        if len(request.headers) > self.limits.max_headers:
            return _text(431, f"too many headers (limit {self.limits.max_headers})"), True
        has_body = any(
            name == b"transfer-encoding" or (name == b"content-length" and value != b"0")
            for name, value in request.headers
        )
        path = request.target.split(b"?", 1)[0]
        endpoint = self._routes.get(path)
        if endpoint is None:
            return _text(404, "not found: try /healthz, /readyz or /metrics"), has_body
        if request.method not in (b"GET", b"HEAD"):
            return _text(405, "only GET and HEAD", headers=(("Allow", "GET, HEAD"),)), True
        if has_body:  # nothing here reads a body: refuse it rather than read it
            return _text(413, "a request body is not accepted here"), True
        return await endpoint(), False

    async def _respond(
        self,
        stream: trio.abc.Stream,
        conn: h11.Connection,
        request: h11.Request | None,
        answer: _Answer,
        *,
        close: bool,
    ) -> None:
        headers = [
            ("Content-Type", answer.content_type),
            ("Content-Length", str(len(answer.body))),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
            *answer.headers,
        ]
        if close:
            headers.append(("Connection", "close"))
        with trio.move_on_after(self.limits.write_timeout) as scope:
            response = h11.Response(
                status_code=answer.status,
                headers=headers,
                reason=HTTPStatus(answer.status).phrase,
            )
            await _send(stream, conn.send(response))
            if request is None or request.method != b"HEAD":
                await _send(stream, conn.send(h11.Data(data=answer.body)))
            await _send(stream, conn.send(h11.EndOfMessage()))
        if scope.cancelled_caught:
            raise _ClientGone

    async def _fail(self, stream: trio.abc.Stream, conn: h11.Connection, answer: _Answer) -> None:
        """Answer a request that cannot be served (when h11 still may), then close gently."""
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            await self._respond(stream, conn, None, answer, close=True)
        await _linger(stream)

    async def _finish_request(self, stream: trio.abc.Stream, conn: h11.Connection) -> None:
        """Read the request's end (a body-less request has nothing more) before the next."""
        with trio.move_on_after(self.limits.request_timeout):
            while conn.their_state is h11.SEND_BODY:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await _receive(stream))
                elif isinstance(event, h11.ConnectionClosed):
                    return


async def _receive(stream: trio.abc.Stream) -> bytes:
    try:
        return bytes(await stream.receive_some(_RECEIVE_BYTES))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise _ClientGone from exc


async def _send(stream: trio.abc.Stream, data: bytes | None) -> None:
    if not data:
        return
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise _ClientGone from exc


async def _linger(stream: trio.abc.Stream) -> None:
    """Half-close, then drop what the client still sends for a moment: closing a socket
    with unread input resets it, and the client would lose the answer just sent."""
    if isinstance(stream, trio.SocketStream):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await stream.send_eof()
    dropped = 0
    with trio.move_on_after(_LINGER_SECONDS), contextlib.suppress(_ClientGone):
        while dropped < _LINGER_BYTES:
            data = await _receive(stream)
            if not data:
                break
            dropped += len(data)


def _history_counts(coordinator: CoordinatorView) -> MigrationCounts | None:
    """Counts from the coordinator's history when it lives in PostgreSQL (it has a dsn)."""
    dsn = getattr(getattr(coordinator, "history", None), "dsn", None)
    return PostgresMigrationCounts(dsn) if isinstance(dsn, str) else None


async def serve_http(
    coordinator: CoordinatorView,
    host: str,
    port: int,
    *,
    readiness: Readiness,
    limits: HttpLimits | None = None,
    migration_counts: MigrationCounts | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/healthz``, ``/readyz`` and ``/metrics`` on `host:port` until cancelled.

    `port = await nursery.start(serve_http, coordinator, host, 0, readiness=...)` returns the
    bound port (0 picks a free one). Migrations by status are read from the coordinator's
    PostgreSQL history unless `migration_counts` says otherwise.
    """
    limits = limits if limits is not None else HttpLimits()
    listeners = await trio.open_tcp_listeners(port, host=host)
    metrics = CoordinatorMetrics(
        coordinator,
        readiness,
        migration_counts=migration_counts or _history_counts(coordinator),
        database_probe=readiness.database_reachable,
    )
    server = HttpServer(readiness, metrics, limits)
    with metrics:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(trio.serve_listeners, server.handle, [listener])
            bound = listeners[0].socket.getsockname()[1]
            log.info("HTTP endpoints on %s:%s (/healthz, /readyz, /metrics)", host, bound)
            task_status.started(int(bound))


@dataclasses.dataclass(frozen=True)
class HttpEndpoint:
    """Where `open_http` serves: its `port` and the `url` to prefix the paths with."""

    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


@contextlib.asynccontextmanager
async def open_http(
    coordinator: CoordinatorView,
    host: str = "127.0.0.1",
    port: int = 0,
    readiness: Readiness | None = None,
    *,
    limits: HttpLimits | None = None,
    migration_counts: MigrationCounts | None = None,
) -> AsyncIterator[HttpEndpoint]:
    """Serve the HTTP endpoints of `coordinator` for the duration of the ``async with``.

    Without `readiness`, the coordinator is taken as the only one (`StaticLeadership`) and
    its database is probed through its history's DSN when it has one (`PostgresProbe`)::

        async with open_coordinator(dsn) as coord, open_http(coord, "0.0.0.0", 8080) as http:
            ...
    """
    if readiness is None:
        dsn = getattr(getattr(coordinator, "history", None), "dsn", None)
        readiness = StaticLeadership(PostgresProbe(dsn) if isinstance(dsn, str) else None)
    async with trio.open_nursery() as nursery:
        bound: int = await nursery.start(
            functools.partial(
                serve_http,
                coordinator,
                host,
                port,
                readiness=readiness,
                limits=limits,
                migration_counts=migration_counts,
            )
        )
        try:
            yield HttpEndpoint(host, bound)
        finally:
            nursery.cancel_scope.cancel()


__all__ = [
    "DatabaseProbe",
    "HttpEndpoint",
    "HttpLimits",
    "HttpServer",
    "PostgresProbe",
    "Readiness",
    "StaticLeadership",
    "open_http",
    "serve_http",
]
