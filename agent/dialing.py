"""How an agent finds a coordinator: which URL next, how long to wait, what to log.

Shared by the trio and asyncio agents, which only open sockets. A fleet may list several
coordinator URLs (a leader and its standbys); the agent tries them in turn. A standby closes
with `CLOSE_NOT_LEADER` and the agent moves to the next URL at once; any other failure waits
an exponential backoff with jitter first, so a restarted coordinator is not stampeded.

Logs are for operators watching hundreds of instances: the first failure of an outage is one
warning naming the real cause, then one summary line per minute, then one INFO line when the
agent is back.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable, Sequence

from agent.errors import AgentConfigError, HandshakeRejected, StaleLeader
from statemachine.protocol import CLOSE_NOT_LEADER

log = logging.getLogger("lockstep.agent")

#: Rejections that retrying cannot fix: stop reconnecting and say why in the log.
FINAL_REJECTIONS = frozenset({"unauthorized", "version_mismatch", "invalid_message"})

#: Answers at boot that mean the URL or the credentials are wrong (or it is not lockstep at
#: all): the app hears of them at once instead of running on uncoordinated. A duplicate id at
#: boot is two instances configured alike: the second would run outside every cohort, so
#: CONTRACT could drop what it still reads. (After the boot a duplicate is the coordinator
#: not having noticed our own previous connection die yet, and is retried.)
BOOT_FATAL_REJECTIONS = FINAL_REJECTIONS | {
    "duplicate_agent",
    "malformed_frame",
    "unknown_type",
    "frame_too_large",
    "frame_too_deep",
    "protocol",
}

SUMMARY_INTERVAL = 60.0
#: While no coordinator answers and the durable state could not be read either, how often to
#: try reading it again.
DURABLE_RETRY_INTERVAL = 5.0


def coordinator_urls(url: str | Sequence[str]) -> tuple[str, ...]:
    """One URL or several, checked: each must be ``ws://`` or ``wss://`` with a host."""
    urls = (url,) if isinstance(url, str) else tuple(url)
    if not urls:
        raise AgentConfigError("no coordinator URL given")
    for each in urls:
        if not isinstance(each, str):
            raise AgentConfigError(f"a coordinator URL must be a string, got {each!r}")
        parts = urllib.parse.urlsplit(each)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise AgentConfigError(
                f"coordinator URL {each!r} is not ws://host:port or wss://host:port"
            )
    return urls


def backoff(attempt: int, cap: float) -> float:
    """Exponential backoff with jitter, so a restarted coordinator is not stampeded."""
    return float(min(cap, 0.1 * 2**attempt) * random.uniform(0.5, 1.0))


class Rotation:
    """Which coordinator URL to try next, and how long to wait before trying it."""

    def __init__(self, urls: Sequence[str], max_backoff: float) -> None:
        self.urls = tuple(urls)
        self.max_backoff = max_backoff
        self.index = 0
        self.attempt = 0
        self._standbys_in_a_row = 0

    @property
    def url(self) -> str:
        return self.urls[self.index]

    def joined(self) -> None:
        """The current URL accepted us: stay on it, start the backoff afresh."""
        self.attempt = 0
        self._standbys_in_a_row = 0

    def failed(self, *, not_leader: bool = False) -> float:
        """Move to the next URL; returns the seconds to wait before trying it."""
        self.index = (self.index + 1) % len(self.urls)
        if not_leader:
            self._standbys_in_a_row += 1
            if self._standbys_in_a_row < len(self.urls):
                return 0.0  # a standby: the leader is elsewhere, try it now
        self._standbys_in_a_row = 0
        self.attempt += 1
        return backoff(self.attempt, self.max_backoff)


def _find(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """`exc` or the first exception of type `kind` among its causes and group members."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        each = todo.pop(0)
        if id(each) in seen:
            continue
        seen.add(id(each))
        if isinstance(each, kind):
            return each
        if isinstance(each, BaseExceptionGroup):
            todo.extend(each.exceptions)
        for linked in (each.__cause__, each.__context__):
            if linked is not None:
                todo.append(linked)
    return None


def describe_network_error(exc: BaseException, timeout: float) -> str:
    """The plain cause of a failed connect, for operators: refused, DNS, TLS, timeout..."""
    rejected = _find(exc, HandshakeRejected)
    if isinstance(rejected, HandshakeRejected):
        return describe_rejection(rejected)
    tls = _find(exc, ssl.SSLError)
    if isinstance(tls, ssl.SSLCertVerificationError):
        return f"TLS error: {tls.verify_message or tls} ({tls})"
    if isinstance(tls, ssl.SSLError):
        return f"TLS error: {tls.reason or tls} ({tls})"
    dns = _find(exc, socket.gaierror)
    if isinstance(dns, socket.gaierror):
        return f"DNS lookup failed: {dns.strerror or dns}"
    if _find(exc, ConnectionRefusedError) is not None:
        return "connection refused"
    if _find(exc, TimeoutError) is not None:
        return f"no answer within {timeout:g} s"
    os_error = _find(exc, OSError)
    if isinstance(os_error, OSError):
        return str(os_error.strerror or os_error)
    return str(exc) or type(exc).__name__


def is_not_leader(exc: BaseException) -> bool:
    """A standby's close, or a deposed leader's Welcome: the leader is at another URL."""
    return isinstance(exc, StaleLeader) or (
        isinstance(exc, HandshakeRejected) and exc.close_code == CLOSE_NOT_LEADER
    )


def describe_rejection(exc: HandshakeRejected) -> str:
    if exc.close_code is not None:
        return f"handshake rejected with close code {exc.close_code}: {exc.message}"
    return f"handshake rejected: {exc.code}: {exc.message}"


class FailureLog:
    """Rate-limited reporting of one agent's connection failures (see the module docstring)."""

    def __init__(
        self,
        agent_id: str,
        *,
        interval: float = SUMMARY_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger = log,
    ) -> None:
        self.agent_id = agent_id
        self.interval = interval
        self.clock = clock
        self.log = logger
        self.failures = 0
        self._outage_since: float | None = None
        self._last_line = 0.0

    def lost(self) -> None:
        """A joined connection dropped (already logged by the session): an outage begins."""
        now = self.clock()
        self._outage_since = self._last_line = now

    def failed(self, url: str, cause: str) -> None:
        now = self.clock()
        self.failures += 1
        if self._outage_since is None:
            self._outage_since = self._last_line = now
            self.log.warning(
                "agent %s: cannot reach the coordinator at %s: %s; retrying in the background",
                self.agent_id,
                url,
                cause,
            )
        elif now - self._last_line >= self.interval:
            self._last_line = now
            self.log.warning(
                "agent %s: still cannot reach the coordinator: %d attempts in %.0f s, "
                "last error at %s: %s",
                self.agent_id,
                self.failures,
                now - self._outage_since,
                url,
                cause,
            )

    def not_leader(self, url: str) -> None:
        self.log.debug("agent %s: %s is a standby; trying the next URL", self.agent_id, url)

    def giving_up(self, url: str, cause: str) -> None:
        self.log.error(
            "agent %s: the coordinator at %s refused us for good: %s; not retrying",
            self.agent_id,
            url,
            cause,
        )

    def joined(self, url: str, sessions: int) -> None:
        now = self.clock()
        if self._outage_since is not None:
            self.log.info(
                "agent %s: %s the coordinator at %s after %.0f s (%d failed attempts)",
                self.agent_id,
                "reconnected to" if sessions > 1 else "reached",
                url,
                now - self._outage_since,
                self.failures,
            )
        else:
            self.log.info("agent %s: joined the coordinator at %s", self.agent_id, url)
        self.failures = 0
        self._outage_since = None


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What the connect loop does after a failed attempt."""

    raise_it: bool = False  # at boot: the app must hear of it (`open_agent` raises it)
    give_up: bool = False  # a final rejection after boot: stop, keep the last known schema
    boot_now: bool = False  # the boot round is over: fall back to the durable state, boot
    #: Still unsynced after another round (the database was down at boot too): read the
    #: durable state again. At most once per `DURABLE_RETRY_INTERVAL`.
    read_durable_again: bool = False
    delay: float = 0.0  # seconds before the next attempt


class Dialer:
    """The connect loop's decisions, for both event loops: URL order, backoff, boot, logs.

    The boot round is one attempt per URL: if none joined, the agent boots without a
    coordinator (`boot_now`), or, with `wait_connected`, the last failure is raised. A
    rejection no retry can fix is raised at boot and ends the loop after it.
    """

    def __init__(
        self,
        agent_id: str,
        urls: Sequence[str],
        *,
        max_backoff: float,
        wait_connected: bool = False,
        failures: FailureLog | None = None,
    ) -> None:
        self.rotation = Rotation(urls, max_backoff)
        self.failures = failures or FailureLog(agent_id)
        self.wait_connected = wait_connected
        self.booting = True
        self._tried = 0
        self._failed_in_a_row = 0
        self._next_durable_read = 0.0

    @property
    def url(self) -> str:
        return self.rotation.url

    def joined(self, sessions: int) -> bool:
        """The current URL accepted us; True if that ends the boot."""
        self.rotation.joined()
        self._failed_in_a_row = 0
        self.failures.joined(self.url, sessions)
        return self.boot_over()

    def boot_over(self) -> bool:
        was, self.booting = self.booting, False
        return was

    def dropped(self) -> float:
        """A joined link dropped: try again (the next URL, if the leader moved) after a pause."""
        self.failures.lost()
        return self.rotation.failed()

    def failed(
        self,
        cause: str,
        *,
        code: str | None = None,
        not_leader: bool = False,
        synced: bool = True,
    ) -> Verdict:
        """An attempt failed; `code` is the rejection's code, if the coordinator answered;
        `synced` whether the agent knows the applied set already."""
        fatal = code is not None and code in (
            BOOT_FATAL_REJECTIONS if self.booting else FINAL_REJECTIONS
        )
        self._tried += 1
        self._failed_in_a_row += 1
        round_over = self.booting and self._tried >= len(self.rotation.urls)
        if self.booting and (fatal or (self.wait_connected and round_over)):
            return Verdict(raise_it=True)
        if fatal:
            self.failures.giving_up(self.url, cause)
            return Verdict(give_up=True)
        if not_leader:
            self.failures.not_leader(self.url)
            delay = self.rotation.failed(not_leader=True)
        else:
            self.failures.failed(self.url, cause)
            delay = self.rotation.failed()
        return Verdict(
            boot_now=round_over, delay=delay, read_durable_again=self._durable_due(synced)
        )

    def _durable_due(self, synced: bool) -> bool:
        if synced or self.booting or self._failed_in_a_row % len(self.rotation.urls):
            return False
        now = self.failures.clock()
        if now < self._next_durable_read:
            return False
        self._next_durable_read = now + DURABLE_RETRY_INTERVAL
        return True


__all__ = [
    "BOOT_FATAL_REJECTIONS",
    "FINAL_REJECTIONS",
    "Dialer",
    "FailureLog",
    "Rotation",
    "Verdict",
    "backoff",
    "coordinator_urls",
    "describe_network_error",
    "describe_rejection",
    "is_not_leader",
]
