"""The renewal loop both agents run: one coroutine, whatever the event loop.

Like `agent.connecting`, it awaits only what it is handed (a send of one frame, a sleep), so
the trio agent (`agent/client.py`) and the asyncio agent (`agent/aio.py`) run the very same
loop; its decisions (lapsed, how long a late grant may still come, whether the lapse is
final) are `AgentSession`'s.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from agent.connecting import Sleep
from agent.session import AgentSession

#: Sends one frame on the agent's link; a link that closed meanwhile is not an error here
#: (the reader sees the close and ends the session).
Send = Callable[[str], Awaitable[None]]


async def renew_until_lapsed(agent: AgentSession, *, send: Send, sleep: Sleep) -> None:
    """Renew every lease/3 s; return once the lease lapsed and no late grant came (the link
    is dead even if it looks open: a partition), or at once if the coordinator grants none."""
    while (interval := agent.renew_every) is not None:
        await sleep(interval)
        if agent.lease_lapsed():
            agent.log_lease_lapsed()
            if agent.late_grant_wait() > 0:
                # A grant may still come: one more renewal, counted from now, then wait for
                # it or for one in flight (`AgentSession.late_grant_wait`).
                await send(agent.renew_frame())
                while (wait := agent.late_grant_wait()) > 0:
                    await sleep(wait)
            if agent.lapse_is_final():
                return
        await send(agent.renew_frame())
