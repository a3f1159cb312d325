"""What every agent knows and decides, whatever its event loop: the I/O-free half of an agent.

The trio agent (`agent/client.py`) and the asyncio agent (`agent/aio.py`) only move frames and
await hooks; everything they decide is here, once: what the hello says, whether a Welcome or a
notice counts (the leader epoch fence), which hook a notice runs (the pure `AgentMachine`),
what a hook's failure means, what the reply is, which migrations a reconnect must switch or
revert, and when the agent may vouch for the schema at all (`synced`, and `fenced_reason`:
the lease of `statemachine.lease`, or a fresh read of the durable state).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable

from agent.errors import AgentFenced, HandshakeRejected, StaleLeader
from agent.inflight import InFlight
from statemachine.agent_fsm import AgentMachine, AgentState, Hook, Step
from statemachine.lease import (
    DEFAULT_LEASE_SECONDS,
    AgentLease,
    certainly_expired_after,
    check_lease_seconds,
    renew_interval,
)
from statemachine.phases import Phase
from statemachine.protocol import (
    PROTOCOL_VERSION,
    Ack,
    Error,
    Hello,
    LeaseGrant,
    Nack,
    PhaseNotice,
    ProtocolError,
    Release,
    Renew,
    Welcome,
    decode_coordinator_message,
    encode,
)

log = logging.getLogger("lockstep.agent")

#: How long a stopping agent waits for its `using` blocks to end before it closes: if they
#: did, it sends `Release` (departed at once); if not, the coordinator waits out its lease.
LEAVE_DRAIN = 1.0


@dataclasses.dataclass(frozen=True)
class MigrationInfo:
    """What a hook is told about the migration that reached it."""

    migration_id: str  # "" when `resynced` (the Welcome names migrations, not ids)
    name: str
    phase: Phase
    ack_timeout: float
    #: True when the hook runs because a reconnect found the fleet had moved on without us.
    resynced: bool = False


HookFn = Callable[[MigrationInfo], Awaitable[object]]


@dataclasses.dataclass(frozen=True)
class ResyncStep:
    """One hook a (re)join runs to match the coordinator's applied list."""

    name: str
    phase: Phase  # APPLY (switch) or ROLLBACK (revert)
    hook: Hook

    def info(self) -> MigrationInfo:
        return MigrationInfo("", self.name, self.phase, 0.0, resynced=True)


class EpochFence:
    """The highest leader epoch seen: a lower non-zero one is a deposed leader's, ignored.

    Epoch 0 is what a coordinator that does not send epochs implies; it is always accepted
    and never raises the bar, so old coordinators keep working.
    """

    def __init__(self) -> None:
        self.highest = 0
        self._logged: set[int] = set()

    def admits(self, epoch: int, agent_id: str, what: str) -> bool:
        if epoch == 0 or epoch >= self.highest:
            self.highest = max(self.highest, epoch)
            return True
        if epoch not in self._logged:  # once per stale epoch: a deposed leader may insist
            self._logged.add(epoch)
            log.info(
                "agent %s: ignoring %s from a deposed coordinator (epoch %d < %d)",
                agent_id,
                what,
                epoch,
                self.highest,
            )
        return False


class AgentSession:
    """One application instance's view of the migration protocol, without any I/O."""

    def __init__(
        self,
        agent_id: str,
        *,
        on_announce: HookFn | None = None,
        on_apply: HookFn | None = None,
        on_confirm: HookFn | None = None,
        on_rollback: HookFn | None = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        has_durable: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.agent_id = agent_id
        #: How long one read of the durable state vouches for the schema (the coordinator's
        #: lease, which its destructive SQL waits out for such readers; docs/leases.md).
        self.durable_lease = check_lease_seconds(lease_seconds)
        #: Whether a dsn=/connect= was given (only for the fence's reason).
        self.has_durable = has_durable
        self.clock = clock
        #: The coordinator's lease, on this process's monotonic clock.
        self.lease = AgentLease()
        self._hello_sent_at = -math.inf
        self._welcome_lease = 0.0
        #: Until when the last successful read of the durable state vouches.
        self.durable_valid_until = -math.inf
        self.hooks: dict[Hook, HookFn | None] = {
            Hook.ON_ANNOUNCE: on_announce,
            Hook.ON_APPLY: on_apply,
            Hook.ON_CONFIRM: on_confirm,
            Hook.ON_ROLLBACK: on_rollback,
        }
        self.machine = AgentMachine()
        self.errors: list[Error] = []
        self.connected = False
        self.inflight = InFlight()
        self.epochs = EpochFence()
        #: Completed handshakes; more than one means the agent reconnected.
        self.sessions = 0
        #: True once the agent knows which migrations are applied: from a Welcome, or from the
        #: durable state in PostgreSQL while no coordinator could be reached.
        self.synced = False
        #: Set when the app stops the agent: the close that follows is ours, not news.
        self.leaving = False
        #: Where the applied set came from: "coordinator", "database" or None (not synced).
        self.synced_from: str | None = None

    # ------------------------------------------------------------ for the app
    def is_applied(self, name: str) -> bool:
        """True once this instance switched to the schema of migration `name`."""
        return self.machine.is_applied(name)

    def using(self, name: str) -> contextlib.AbstractContextManager[bool]:
        """Wrap one unit of work (a request, a job) that picks its queries by migration `name`.

        ``with agent.using("add_email") as new: ...`` yields whether to use the new query set,
        and holds that choice until the block ends: the agent acks APPLY only when no block
        that chose the old set is still running (and ROLLBACK only when no block on the new
        set is), so CONTRACT or rollback SQL never runs under work that still needs the old
        (or new) schema. Safe to use from any thread.
        """
        reason = self.fenced_reason()
        if reason is not None:
            raise AgentFenced(self.agent_id, reason)
        return self.inflight.using(name, self.machine.is_applied)

    def fenced_reason(self) -> str | None:
        """Why the agent cannot vouch for the schema now, or None when it can."""
        if self.leaving:
            return "the agent was stopped"
        if not self.synced:
            if not self.has_durable:
                return "no coordinator reached and no database to read (no dsn= or connect=)"
            return "no coordinator reached and the durable state could not be read yet"
        now = self.clock()
        if self.synced_from == "database":
            if now < self.durable_valid_until:
                return None
            return (
                f"no coordinator reached and the durable state was not re-read within "
                f"{self.durable_lease:g} s"
            )
        if self.lease.seconds == 0:
            return None  # a coordinator that grants no leases: vouched while it is up
        if self.lease.valid(now):
            return None
        return (
            f"its lease ({self.lease.seconds:g} s) lapsed without renewal; waiting for a "
            f"late grant, or reconnecting"
        )

    @property
    def fenced(self) -> bool:
        return self.fenced_reason() is not None

    @property
    def ready(self) -> bool:
        """For readiness probes: connected (or vouched by a fresh durable read), synced, and
        the lease valid. False means `using` raises `AgentFenced`."""
        return self.fenced_reason() is None

    def health(self) -> dict[str, object]:
        """What a readiness endpoint may show: ready, and why not."""
        reason = self.fenced_reason()
        return {
            "ready": reason is None,
            "reason": reason,
            "connected": self.connected,
            "synced_from": self.synced_from,
        }

    @property
    def applied(self) -> frozenset[str]:
        return frozenset(self.machine.applied)

    @property
    def state(self) -> AgentState:
        return self.machine.state

    @property
    def phase(self) -> Phase | None:
        return self.machine.phase

    @property
    def seen(self) -> list[tuple[str, Phase]]:
        """(migration name, phase) of every notice received, in order."""
        return list(self.machine.seen)

    # ------------------------------------------------------------ the handshake
    def hello(self, token: str | None) -> str:
        self._hello_sent_at = self.clock()
        return encode(Hello(protocol=PROTOCOL_VERSION, agent_id=self.agent_id, token=token))

    def read_welcome(self, frame: str | bytes) -> Welcome:
        """The coordinator's answer to hello; `HandshakeRejected` unless it is a Welcome,
        `StaleLeader` if a deposed coordinator sent it."""
        try:
            msg = decode_coordinator_message(frame)
        except ProtocolError as exc:
            raise HandshakeRejected(exc.code, f"unreadable answer to hello: {exc}") from None
        if isinstance(msg, Error):
            raise HandshakeRejected(msg.code, msg.message)
        if not isinstance(msg, Welcome):
            raise HandshakeRejected("protocol", f"expected welcome, got {msg!r}")
        if not self.epochs.admits(msg.epoch, self.agent_id, "a welcome"):
            raise StaleLeader(f"welcome from a deposed coordinator (epoch {msg.epoch})")
        return msg

    def adopt_welcome(self, welcome: Welcome) -> list[ResyncStep]:
        """Take the Welcome's applied list; returns the hooks to run for what changed.

        The first time the agent learns the applied set it simply adopts it. Once it was
        synced (an earlier session, or the durable state at boot), a difference means the
        fleet moved on while we were away: revert what was rolled back, switch to what
        completed.
        """
        if not self.synced:
            self.machine.applied.update(welcome.applied)
            steps: list[ResyncStep] = []
        else:
            added, removed = self.machine.resync(welcome.applied)
            steps = [
                *(ResyncStep(n, Phase.ROLLBACK, Hook.ON_ROLLBACK) for n in sorted(removed)),
                *(ResyncStep(n, Phase.APPLY, Hook.ON_APPLY) for n in sorted(added)),
            ]
        self._welcome_lease = welcome.lease_seconds
        self.mark_synced("coordinator")
        return steps

    def session_started(self) -> None:
        """The handshake (and any resync hooks) are done: the agent is a fleet member, and
        the Welcome's lease (counted from the hello) vouches for its schema."""
        self.sessions += 1
        self.connected = True
        self.lease.welcomed(self._welcome_lease, self._hello_sent_at)

    # ------------------------------------------------------------ the lease
    @property
    def renew_every(self) -> float | None:
        """Seconds between renewals, or None when the coordinator grants no leases."""
        return renew_interval(self.lease.seconds) if self.lease.seconds else None

    def renew_frame(self) -> str:
        """The next `Renew`; the lease it obtains counts from now."""
        return encode(Renew(seq=self.lease.request(self.clock())))

    def lease_lapsed(self) -> bool:
        """The lease ran out (the agent is fenced: `using` raises `AgentFenced`)."""
        return self.lease.seconds != 0 and not self.lease.valid(self.clock())

    def late_grant_wait(self) -> float:
        """After the lease lapsed: seconds to sleep before looking again whether a late
        grant renewed it; 0 once one did, or once none can come any more.

        Why wait at all: a renewal that an overloaded coordinator reads late is granted
        late, and the coordinator counts it from when it reads it. Until it counts the
        lease certainly expired (`certainly_expired_after`: 0.1 L + 1 s after the agent's
        own lapse at the earliest) it still grants, and a grant, counted here from the
        request's send time, makes the lease valid again safely. Dropping the link at once
        would turn one slow renewal into a reconnect, a Welcome and a resync: at 10,000
        agents, a storm that slows the coordinator further. After that window the
        coordinator grants nothing more (it closes the link), so waiting longer is useless.
        Looked at ten times per renewal interval: a few wake-ups per lapse, and the agent
        renews again soon after a late grant.
        """
        return min(self._late_grant_left(), renew_interval(self.lease.seconds) / 10)

    def _late_grant_left(self) -> float:
        if not self.lease_lapsed():
            return 0.0
        window = certainly_expired_after(self.lease.seconds) - self.lease.seconds
        return max(0.0, self.lease.valid_until + window - self.clock())

    def log_lease_lapsed(self) -> None:
        left = self._late_grant_left()
        if left > 0:
            log.warning(
                "agent %s: lease lapsed (no renewal within %g s): fenced; waiting %.1f s "
                "for a late grant before reconnecting",
                self.agent_id,
                self.lease.seconds,
                left,
            )
        else:  # this loop itself ran late (a starved process): no grant can come now
            log.warning(
                "agent %s: lease lapsed (no renewal within %g s) longer ago than a grant "
                "can come: fenced, reconnecting",
                self.agent_id,
                self.lease.seconds,
            )

    def lapse_is_final(self) -> bool:
        """After `late_grant_wait`: True if the lease is still lapsed (drop the link,
        reconnect and resync), False if a late grant renewed it."""
        if self.lease_lapsed():
            log.info("agent %s: no late grant: dropping the link to reconnect", self.agent_id)
            return True
        log.info("agent %s: a late grant renewed the lease: serving again", self.agent_id)
        return False

    def adopt_durable(self, applied: Iterable[str], read_at: float | None = None) -> bool:
        """Take the applied set read from PostgreSQL (the read began at `read_at`), unless a
        Welcome already came; it vouches for one lease from then."""
        if self.synced:
            return False
        self.machine.applied.update(applied)
        self.mark_synced("database")
        self.durable_valid_until = (self.clock() if read_at is None else read_at) + (
            self.durable_lease
        )
        return True

    def refresh_durable(self, applied: frozenset[str], read_at: float) -> None:
        """A later read of the durable state while still without a coordinator: follow it
        (switch or revert) and vouch for one more lease from when the read began."""
        if self.synced_from != "database":
            return
        added, removed = self.machine.resync(applied)
        for name in sorted(added | removed):
            log.warning(
                "agent %s: the durable state says %s is %s now",
                self.agent_id,
                name,
                "applied" if name in added else "rolled back",
            )
        self.durable_valid_until = max(self.durable_valid_until, read_at + self.durable_lease)

    def mark_synced(self, source: str) -> None:
        self.synced = True
        self.synced_from = source

    def log_resync(self, step: ResyncStep) -> None:
        log.warning(
            "agent %s: resync after reconnect: %s %s", self.agent_id, step.phase.name, step.name
        )

    def log_resync_failure(self, step: ResyncStep) -> None:
        log.exception("agent %s: %s hook failed during resync", self.agent_id, step.hook.value)

    # ------------------------------------------------------------ notices
    def read_frame(self, frame: str | bytes) -> PhaseNotice | None:
        """Decode a frame after the handshake: the notice to handle, or None (logged)."""
        try:
            msg = decode_coordinator_message(frame)
        except ProtocolError as exc:
            log.error("agent %s: bad frame from coordinator: %s", self.agent_id, exc)
            return None
        if isinstance(msg, PhaseNotice):
            return msg
        if isinstance(msg, LeaseGrant):
            if not self.lease.granted(msg.seq, msg.seconds):
                log.debug("agent %s: lease grant %d nobody asked for", self.agent_id, msg.seq)
            return None
        if isinstance(msg, Error):
            log.warning("agent %s: coordinator error %s: %s", self.agent_id, msg.code, msg.message)
            self.errors.append(msg)
        return None

    def begin_notice(self, notice: PhaseNotice) -> Step | None:
        """What to do for `notice`, or None to ignore it (a deposed coordinator sent it)."""
        if not self.epochs.admits(notice.epoch, self.agent_id, f"{notice.phase.name} notice"):
            return None
        step = self.machine.on_notice(
            notice.migration_id, notice.migration, notice.phase, notice.ack_required
        )
        if step.problem:
            log.warning("agent %s: %s", self.agent_id, step.problem)
        return step

    @staticmethod
    def hook_info(notice: PhaseNotice) -> MigrationInfo:
        return MigrationInfo(
            notice.migration_id, notice.migration, notice.phase, notice.ack_timeout
        )

    def hook_raised(self, notice: PhaseNotice, hook: Hook, exc: Exception) -> str:
        """The app's hook failed: record it in the machine; returns the NACK text."""
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        log.warning("agent %s: %s hook failed: %s", self.agent_id, hook.value, error)
        self.machine.hook_failed(notice.phase)
        return error

    def hook_returned(self, notice: PhaseNotice) -> None:
        self.machine.hook_succeeded(notice.phase)

    @staticmethod
    def drain_target(notice: PhaseNotice) -> tuple[str, bool] | None:
        """After switching (APPLY) or reverting (ROLLBACK), the (name, version) of work that
        must end before the ack; None for the other phases."""
        if notice.phase not in (Phase.APPLY, Phase.ROLLBACK):
            return None
        return notice.migration, notice.phase is Phase.ROLLBACK  # the version just left

    def drain_failure(self, notice: PhaseNotice) -> str:
        """The NACK text when work on the version just left outlived the ack timeout."""
        target = self.drain_target(notice)
        assert target is not None
        left = self.inflight.count(*target)
        return (
            f"{left} unit(s) of work on the {'new' if target[1] else 'old'} query set of "
            f"{notice.migration!r} still running after {notice.ack_timeout:g} s"
        )

    @staticmethod
    def reply(notice: PhaseNotice, error: str | None) -> str:
        if error is None:
            return encode(Ack(migration_id=notice.migration_id, phase=notice.phase))
        return encode(
            Nack(migration_id=notice.migration_id, phase=notice.phase, error=error[:4000])
        )

    # ------------------------------------------------------------ leaving
    def stop_serving(self) -> None:
        """The app is stopping the agent: fenced from now on, and new `using` blocks are
        refused (under the lock that counts them in, so none starts unseen)."""
        self.leaving = True
        self.inflight.close(lambda: AgentFenced(self.agent_id, "the agent was stopped"))

    @staticmethod
    def release_frame() -> str:
        """The `Release` an agent sends once nothing is in flight after `stop_serving`."""
        return encode(Release())

    def lost(self, reason: object) -> None:
        if self.leaving:
            log.debug("agent %s: left the coordinator: %s", self.agent_id, reason)
            return
        log.warning("agent %s: coordinator closed the connection: %s", self.agent_id, reason)


__all__ = ["AgentSession", "EpochFence", "HookFn", "MigrationInfo", "ResyncStep"]
