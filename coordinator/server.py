"""The coordinator's listening socket: trio-websocket's server with bounded handshakes.

`trio_websocket.serve_websocket` waits up to 60 s for a WebSocket upgrade and keeps waiting
even after the client closed its socket, with no cap on how many connections do so: anyone who
reaches the port could exhaust the coordinator's file descriptors. `BoundedServer` is that
server with three changes: each accepted connection must get an `Admission` ticket first
(refused at once otherwise), the upgrade has `ConnectionLimits.upgrade_timeout`, and a client
that goes away before upgrading frees its task and descriptor at once. The handler receives
the ticket and releases it when the agent's `hello` is accepted.

It overrides trio-websocket's `_handle_connection` (and uses the connection's private
`_reader_task`/`_get_request`, exactly as the original does); trio-websocket is pinned in
pyproject.toml, and tests/coordinator/test_flood.py fails if that code path changes.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from trio_websocket import WebSocketConnection, WebSocketRequest, WebSocketServer
from wsproto import ConnectionType, WSConnection

from coordinator.admission import Admission, ConnectionLimits, Ticket

log = logging.getLogger("lockstep.coordinator")

Handler = Callable[[WebSocketRequest, Ticket], Awaitable[None]]


def _peer_address(stream: trio.abc.Stream) -> str:
    """The client's IP address (the admission key; its port would make every client new)."""
    inner: Any = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    try:
        return str(inner.socket.getpeername()[0])
    except (AttributeError, OSError, IndexError):
        return "?"


class BoundedServer(WebSocketServer):
    """A `WebSocketServer` whose pending connections are admitted, bounded and timed."""

    def __init__(
        self,
        handler: Handler,
        listeners: list[Any],
        admission: Admission,
        *,
        disconnect_timeout: float = 2.0,
    ) -> None:
        limits = admission.limits

        async def unused(request: WebSocketRequest) -> None:  # pragma: no cover
            raise AssertionError("BoundedServer calls its own handler")

        super().__init__(
            unused,
            listeners,
            max_message_size=limits.max_message_bytes,
            connect_timeout=limits.upgrade_timeout,
            disconnect_timeout=disconnect_timeout,
        )
        self.admission = admission
        self._bounded_handler = handler

    async def _handle_connection(self, stream: trio.abc.Stream) -> None:
        ticket = self.admission.admit(_peer_address(stream))
        if ticket is None:
            await trio.aclose_forcefully(stream)
            return
        try:
            await self._serve_admitted(stream, ticket)
        finally:
            ticket.release()

    async def _serve_admitted(self, stream: trio.abc.Stream, ticket: Ticket) -> None:
        async with trio.open_nursery() as nursery:
            connection = WebSocketConnection(
                stream,
                WSConnection(ConnectionType.SERVER),
                message_queue_size=self._message_queue_size,
                max_message_size=self._max_message_size,
                receive_buffer_size=self._receive_buffer_size,
            )
            reader_done = trio.Event()

            async def read() -> None:
                try:
                    await connection._reader_task()
                finally:
                    reader_done.set()

            nursery.start_soon(read)
            request = await self._upgrade_request(connection, reader_done)
            if request is None:  # timed out, or the client went away before upgrading
                nursery.cancel_scope.cancel()
                await trio.aclose_forcefully(stream)
                return
            try:
                await self._bounded_handler(request, ticket)
            finally:
                with trio.move_on_after(self._disconnect_timeout):
                    await connection.aclose()

    async def _upgrade_request(
        self, connection: WebSocketConnection, reader_done: trio.Event
    ) -> WebSocketRequest | None:
        request: WebSocketRequest | None = None
        with trio.move_on_after(self._connect_timeout):
            async with trio.open_nursery() as race:

                async def proposal() -> None:
                    nonlocal request
                    request = await connection._get_request()
                    race.cancel_scope.cancel()

                async def gone() -> None:
                    await reader_done.wait()
                    race.cancel_scope.cancel()

                race.start_soon(proposal)
                race.start_soon(gone)
        return request


async def serve_bounded(
    handler: Handler,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    limits: ConnectionLimits,
    *,
    task_status: trio.TaskStatus[WebSocketServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """`serve_websocket`'s shape for `BoundedServer`: `nursery.start` returns the server."""
    listeners: list[Any]
    if ssl_context is None:
        listeners = list(await trio.open_tcp_listeners(port, host=host))
    else:
        listeners = list(
            await trio.open_ssl_over_tcp_listeners(
                port, ssl_context, host=host, https_compatible=True
            )
        )
    server = BoundedServer(handler, listeners, Admission(limits))
    await server.run(task_status=task_status)


__all__ = ["BoundedServer", "serve_bounded"]
