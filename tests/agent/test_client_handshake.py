"""An agent facing a server that does not speak lockstep fails with a clear error."""

from __future__ import annotations

import pytest
import trio
from trio_websocket import WebSocketRequest, serve_websocket

from agent import HandshakeRejected, open_agent


async def test_unreadable_answer_to_hello_is_a_handshake_rejection() -> None:
    async def not_lockstep(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.get_message()
        await ws.send_message("<html>hello</html>")
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, not_lockstep, "127.0.0.1", 0, None)
        with pytest.raises(HandshakeRejected) as caught:
            async with open_agent(f"ws://127.0.0.1:{server.port}", agent_id="app-1"):
                pass
        nursery.cancel_scope.cancel()
    assert caught.value.code == "malformed_frame"
    assert "unreadable answer to hello" in str(caught.value)
