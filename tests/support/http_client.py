"""A small HTTP client over real loopback sockets, for the coordinator's HTTP endpoints.

`get` is a well-behaved client (h11 on the client side); `exchange` sends raw bytes, the way a
hostile client would, and returns whatever came back before the server closed. `scrape` parses
``/metrics`` with prometheus_client's own parser, so the tests read what Prometheus would.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence

import h11
import trio
from prometheus_client.parser import text_string_to_metric_families

#: No exchange in a test may take longer than this (a hung server fails the test instead).
GUARD = 10.0


@dataclasses.dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


async def get(
    port: int,
    path: str,
    *,
    method: str = "GET",
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
) -> Reply:
    """One request on a new connection, read to the end of the response."""
    conn = h11.Connection(h11.CLIENT)
    with trio.fail_after(GUARD):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            request_headers = [("Host", "127.0.0.1"), *headers]
            if body:
                request_headers.append(("Content-Length", str(len(body))))
            await stream.send_all(
                conn.send(h11.Request(method=method, target=path, headers=request_headers)) or b""
            )
            if body:
                await stream.send_all(conn.send(h11.Data(data=body)) or b"")
            await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
            return await read_reply(stream, conn)


async def read_reply(stream: trio.SocketStream, conn: h11.Connection) -> Reply:
    """The next response on `conn` (one connection may carry several)."""
    response: h11.Response | None = None
    chunks: list[bytes] = []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            break
    assert response is not None, "the server closed without answering"
    return Reply(
        response.status_code,
        {name.decode().lower(): value.decode() for name, value in response.headers},
        b"".join(chunks),
    )


async def exchange(port: int, data: bytes, *, timeout: float = GUARD) -> bytes:
    """Send `data` as is, then read until the server closes; fails after `timeout`."""
    received = bytearray()
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            # The server may close before taking it all: what it answered counts.
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(data)
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not chunk:
                    break
                received += chunk
    return bytes(received)


def status_of(raw: bytes) -> int:
    """The status code of the first response in `raw` (a status line ``HTTP/1.1 NNN ...``)."""
    line = raw.split(b"\r\n", 1)[0]
    assert line.startswith(b"HTTP/1.1 "), raw[:200]
    return int(line.split()[1])


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int) -> Samples:
    """Every sample of ``/metrics``, keyed by (name, labels)."""
    reply = await get(port, "/metrics")
    assert reply.status == 200, reply
    samples: Samples = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The sample `name` with exactly `labels`, or None when it is absent."""
    return samples.get((name, frozenset(labels.items())))
