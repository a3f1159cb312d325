"""The connect loop both agents run: one coroutine, whatever the event loop.

It awaits only what it is handed (one connection attempt, a sleep, a durable-state read in a
worker thread), so the trio agent (`agent/client.py`) and the asyncio agent (`agent/aio.py`)
run the very same loop; its decisions are `Dialer`'s (`agent/dialing.py`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from agent.dialing import Dialer, describe_rejection, is_not_leader
from agent.durable import boot_without_coordinator, log
from agent.errors import CoordinatorUnreachable, HandshakeRejected, StaleLeader
from agent.session import AgentSession

#: One connection to `url`: open, handshake, call `joined()`, serve until it closes. Raises
#: `CoordinatorUnreachable`, `HandshakeRejected` or `StaleLeader` when it fails.
Attempt = Callable[[str, Callable[[], None]], Awaitable[None]]
Sleep = Callable[[float], Awaitable[None]]
#: Reads the durable state in a worker thread: see `agent.durable.read_for_boot`.
ReadDurable = Callable[[], Awaitable[frozenset[str] | str | None]]


def _cause(exc: BaseException) -> str:
    if isinstance(exc, CoordinatorUnreachable):
        return exc.cause
    if isinstance(exc, HandshakeRejected):
        return describe_rejection(exc)
    return str(exc)


async def stay_connected(
    agent: AgentSession,
    dialer: Dialer,
    *,
    attempt: Attempt,
    sleep: Sleep,
    read_durable: ReadDurable | None,
    reconnect: bool,
    booted: Callable[[], None],
) -> None:
    """Serve `agent` on the dialer's URLs, reconnecting whenever the link drops.

    `booted()` is called once, when the agent joined a coordinator or the boot round failed
    and it fell back to the durable state. What the boot must not swallow (see `Dialer`) is
    raised; after the boot, failures are logged and retried, and a final rejection returns.
    """

    def joined() -> None:
        if dialer.joined(agent.sessions):
            booted()

    while True:
        sessions = agent.sessions
        try:
            await attempt(dialer.url, joined)
            delay = dialer.dropped()
        except (CoordinatorUnreachable, HandshakeRejected, StaleLeader) as exc:
            if agent.sessions > sessions:  # it failed after joining: the link dropped
                delay = dialer.dropped()
            else:
                verdict = dialer.failed(
                    _cause(exc),
                    code=exc.code if isinstance(exc, HandshakeRejected) else None,
                    not_leader=is_not_leader(exc),
                    synced=agent.synced,
                )
                if verdict.raise_it:
                    raise
                if verdict.give_up:
                    return
                if verdict.boot_now:
                    read_at = agent.clock()
                    outcome = None if read_durable is None else await read_durable()
                    boot_without_coordinator(agent, outcome, read_at=read_at)
                    dialer.boot_over()
                    booted()
                elif verdict.read_durable_again and read_durable is not None:
                    read_at = agent.clock()
                    outcome = await read_durable()
                    boot_without_coordinator(agent, outcome, again=True, read_at=read_at)
                delay = verdict.delay
        if not reconnect and not dialer.booting:
            return
        await sleep(delay)


async def keep_durable_fresh(agent: AgentSession, read_durable: ReadDurable, sleep: Sleep) -> None:
    """While the agent vouches from the durable state (no coordinator), re-read it every
    lease/3: each read vouches for one lease from when it began, so a database that stays
    unreadable for a whole lease fences the agent. Runs beside `stay_connected`."""
    while True:
        await sleep(agent.durable_lease / 3)
        if agent.synced_from == "coordinator":
            continue  # the coordinator's lease vouches now
        read_at = agent.clock()
        outcome = await read_durable()
        if not agent.synced:
            boot_without_coordinator(agent, outcome, again=True, read_at=read_at)
        elif isinstance(outcome, frozenset):
            agent.refresh_durable(outcome, read_at)
        else:
            log.warning("agent %s: cannot re-read the durable state: %s", agent.agent_id, outcome)


__all__ = ["Attempt", "ReadDurable", "Sleep", "keep_durable_fresh", "stay_connected"]
