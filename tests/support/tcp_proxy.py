"""A TCP proxy on 127.0.0.1 that can partition its connections: a blackhole, not a close.

`blackhole()` stops forwarding in both directions while every socket stays open, the way a
network partition looks to both ends (no RST, no FIN: bytes just stop arriving); what was
sent meanwhile waits in the proxy and the kernel buffers. `forward()` heals the partition:
the held bytes flow again, in order, like TCP retransmitting after a partition. Connections
accepted during a blackhole are held too and connected upstream only when it heals.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

import trio


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._flowing = trio.Event()
        self._flowing.set()
        self.connections = 0

    @property
    def partitioned(self) -> bool:
        return not self._flowing.is_set()

    def blackhole(self) -> None:
        """Stop forwarding (both ways, every connection), closing nothing."""
        if self._flowing.is_set():
            self._flowing = trio.Event()

    def forward(self) -> None:
        """Forward again; held bytes are delivered first."""
        self._flowing.set()

    async def partition_for(self, seconds: float, *, watch: Callable[[], bool]) -> bool:
        """Blackhole for `seconds`, then forward again; whether `watch()` held at some point
        meanwhile (looked at every 5 ms: a fence that lasts less than that may be missed)."""
        self.blackhole()
        seen = False
        with trio.move_on_after(seconds):
            while True:
                seen = seen or watch()
                await trio.sleep(0.005)
        self.forward()
        return seen

    async def _until_flowing(self) -> None:
        while not self._flowing.is_set():
            await self._flowing.wait()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        async with client:
            await self._until_flowing()
            try:
                upstream = await trio.open_tcp_stream(*self.target)
            except OSError:
                return
            async with upstream, trio.open_nursery() as nursery:

                async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        while True:
                            await self._until_flowing()
                            data = await src.receive_some(65536)
                            if not data:
                                break
                            await self._until_flowing()  # read just as the partition began
                            await dst.send_all(data)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(pump, client, upstream)
                nursery.start_soon(pump, upstream, client)


@contextlib.asynccontextmanager
async def open_tcp_proxy(url: str) -> AsyncIterator[TcpProxy]:
    """A proxy to the ``ws://127.0.0.1:PORT`` `url`; `proxy.port` is where to connect."""
    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
    proxy = TcpProxy(host, int(port))
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()
