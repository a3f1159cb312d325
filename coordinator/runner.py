"""Drives one migration's FSM through its phases: broadcasts, deadlines and SQL.

The runner is the only code that awaits during a migration. It asks the pure
`MigrationMachine` what state it is in and does that state's work: broadcast a notice and
wait for the ledger to settle (a trio cancel scope is the deadline; acks wake it through an
event, nothing polls), or run the phase's planned SQL groups through the `Executor`. Answers
from agents arrive through `on_ack`/`on_nack`/`on_join`/`on_leave`, called by the connection
handlers, and lease expiries through `on_lease_expired`, called by the fleet's one lease
sweeper. It decides nothing itself: which state follows, what a partial commit means and
which status the result has are the FSM's; what may run at all is `statemachine.gate`'s, and
the statements come from the migration's `statemachine.sql.Plan`.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence

import psycopg
import trio

from coordinator.backfill import BackfillFailed, BackfillProgress
from coordinator.events import (
    AnswerReceived,
    Event,
    EventBus,
    PhaseStarted,
    Reporter,
    SqlProgress,
)
from coordinator.executor import Executor, ReportingExecutor
from coordinator.fleet import Fleet
from coordinator.history import GroupJournal, History, backfill_positions
from coordinator.pg.attempts import LockRetry
from coordinator.pg.errors import SqlFailure, pg_message
from statemachine.checkpoint import Checkpoint
from statemachine.gate import rollback_note
from statemachine.lease import certainly_expired_after
from statemachine.ledger import AckOutcome
from statemachine.migration import Migration
from statemachine.migration_fsm import MigrationMachine
from statemachine.phases import ACKED_PHASES, MigrationState, Phase
from statemachine.protocol import PhaseNotice, encode
from statemachine.result import BackfillStats, MigrationResult, PhaseRecord, SqlAttempt
from statemachine.sql import ExecutionGroup, Plan

log = logging.getLogger("lockstep.coordinator")
S = MigrationState

#: How often, at most, the acks of a phase still collecting are written to its checkpoint.
ACK_CHECKPOINT_INTERVAL = 0.5


class MigrationRun:
    def __init__(
        self,
        migration: Migration,
        plan: Plan,
        *,
        fleet: Fleet,
        executor: Executor,
        events: EventBus,
        ack_timeout: float,
        history: History | None = None,
        warnings: Sequence[str] = (),
        machine: MigrationMachine | None = None,
        journal: GroupJournal | None = None,
        on_agent_loss: str = "wait",
        durable_readers: bool = False,
    ) -> None:
        self.migration = migration
        self.plan = plan
        self.fleet = fleet
        self.executor = executor
        self.events = events
        self.ack_timeout = migration.ack_timeout or ack_timeout
        self.history = history
        #: A resumed run is given the machine `statemachine.checkpoint.restore` rebuilt and
        #: the journal of what already committed; a new one starts PENDING with an empty one.
        self.machine = machine or MigrationMachine(
            migration.id,
            has_contract=bool(migration.contract_sql),
            connected=fleet.agent_ids,
            departing=fleet.departing,
            on_agent_loss=on_agent_loss,
            lease_seconds=fleet.lease_seconds,
        )
        #: Agents may read the durable state instead of a coordinator (`dsn=`/`connect=`):
        #: then destructive SQL waits one lease after the state change they must see.
        self.durable_readers = durable_readers
        #: When (trio clock) each state's checkpoint was first written by this process.
        self._persisted_at: dict[MigrationState, float] = {}
        self.journal = (
            journal
            if journal is not None
            else (history.journal(migration) if history is not None else None)
        )
        self._saved: Checkpoint | None = None
        self._confirm_sent = False
        self.attempts: list[SqlAttempt] = []
        self.backfills: list[BackfillStats] = []
        #: Warnings known before the run (lint).
        self.warnings: list[str] = list(warnings)
        self.report = Reporter(migration.name, self._reported)
        #: What `lockstep status` shows of the SQL work beyond the checkpoint: lock retries,
        #: backfill totals per table and the last progress message (`progress`).
        self.lock_retries = 0
        self.backfilled: dict[str, dict[str, int]] = {}
        self.last_message = ""
        self.progress_version = 0
        self._changed = trio.Event()
        #: Whether a recorded answer that settles nothing still wakes the runner, and the
        #: state whose answers it collects (an answer that moved the machine on always does).
        self._wake_on_answer = True
        self._collecting: MigrationState | None = None
        #: An operator's abort request (``lockstep abort``), applied at the next safe point.
        self.abort_reason: str | None = None

    # ------------------------------------------------ inputs from connections
    def on_ack(self, agent_id: str, migration_id: str, phase: Phase) -> AckOutcome:
        outcome = self.machine.receive_ack(agent_id, migration_id, phase)
        self._answered(agent_id, phase, True, outcome, None)
        return outcome

    def on_nack(self, agent_id: str, migration_id: str, phase: Phase, error: str) -> AckOutcome:
        outcome = self.machine.receive_nack(agent_id, migration_id, phase, error)
        self._answered(agent_id, phase, False, outcome, error)
        return outcome

    def on_join(self, agent_id: str) -> None:
        self.machine.agent_connected(agent_id)
        ledger = self.machine.ledger
        if (
            ledger is not None
            and not ledger.closed
            and agent_id in ledger.cohort
            and agent_id in ledger.missing()
        ):
            # A cohort agent that (re)joins mid-phase missed the notice: without it the phase
            # could only time out. Its Welcome goes out first, then this from its outbox.
            self.fleet.send(agent_id, self._notice(ledger.phase, ack_required=True))

    def on_leave(self, agent_id: str) -> None:
        if self.machine.agent_disconnected(agent_id) is AckOutcome.RECORDED:
            self._wake()

    def catch_up_with_fleet(self) -> None:
        """Report what the fleet did since the machine took its snapshot of it.

        The machine copies the fleet when the run is built, but the coordinator routes
        joins, departures and expired leases to a run only once it is the active one, and
        between the two the start is written to the history (a database round trip). An
        agent that left in that gap would otherwise stay in the cohort and ANNOUNCE would
        wait the whole ack timeout for it; one that joined would not be counted.
        """
        fleet, machine = self.fleet, self.machine
        connected = fleet.agent_ids
        for agent_id in sorted(machine.connected - connected):
            if agent_id in fleet.leases:
                self.on_leave(agent_id)  # gone, but its lease may still be valid
            else:
                self.on_lease_expired(agent_id)  # its lease expired or it released it
        for agent_id in sorted(machine.departing - fleet.leases.holders):
            self.on_lease_expired(agent_id)
        for agent_id in sorted(connected - machine.connected):
            self.on_join(agent_id)

    def on_lease_expired(self, agent_id: str, *, released: bool = False) -> None:
        """The agent's lease certainly expired, or it gave it back (`released`: it stopped
        cleanly): either way it is fenced (see statemachine.lease)."""
        if self.machine.lease_expired(agent_id) is AckOutcome.RECORDED:
            log.warning(
                "%s: agent %s departed: %s before it answered %s",
                self.migration.name,
                agent_id,
                "it stopped (released its lease)" if released else "its lease expired",
                self.machine.state.name,
            )
            self._wake()

    def _answered(
        self, agent_id: str, phase: Phase, ok: bool, outcome: AckOutcome, error: str | None
    ) -> None:
        self.events.emit(AnswerReceived(self.migration.name, agent_id, phase, ok, outcome, error))
        m = self.machine
        if outcome is AckOutcome.RECORDED and (
            self._wake_on_answer or m.state is not self._collecting or not m.awaiting_acks
        ):
            # Only what the runner acts on wakes it: the phase settled or moved on, or the
            # first answer since its last checkpoint of the acks (`_collect_answers`). A
            # wake-up per ack was a task switch per agent per phase.
            self._wake()

    def _wake(self) -> None:
        self._changed.set()

    def _reported(self, event: Event) -> None:
        if isinstance(event, LockRetry):
            self.lock_retries += 1
        if isinstance(event, BackfillProgress):
            self.backfilled[event.table] = {"rows": event.rows, "batches": event.batches}
        if isinstance(event, SqlProgress):
            self.last_message = event.message
        self.progress_version += 1
        self.events.emit(event)

    def progress(self) -> dict[str, object]:
        """The run's live progress as JSON-able data (see `History.save_progress`)."""
        return {
            "lock_retries": self.lock_retries,
            "backfills": self.backfilled,
            "message": self.last_message,
            "abort_requested": self.abort_reason,
        }

    def abort(self, reason: str) -> None:
        """Roll the migration back at its next safe point, as an operator asked.

        While acks are collected that is at once. While EXECUTE's SQL runs it is right after
        it commits (a transaction cut in the middle would leave the journal and the schema
        to reconcile; after the commit ROLLBACK simply runs rollback_sql). While CONTRACT
        runs it is too late if CONTRACT commits: the migration then only goes forward, and
        its warnings say the abort came too late.
        """
        if self.abort_reason is None:
            self.abort_reason = reason
            self.progress_version += 1
            self._wake()

    def _abort_now(self) -> bool:
        return self.abort_reason is not None and self.machine.may_cancel()

    def _apply_abort(self) -> None:
        self.machine.cancel(message=f"aborted by an operator: {self.abort_reason}")

    # ------------------------------------------------------------- the drive
    async def run(self, *, rollback_on_cancel: bool = True) -> MigrationResult:
        """Drive the machine to a terminal state and return the result.

        Cancelled, the run rolls back what can still be rolled back, shielded, unless
        `rollback_on_cancel` is False: then it stops at once and its last checkpoint stays
        durable for a successor to resume.
        """
        try:
            await self._drive()
        except* trio.Cancelled:
            if not rollback_on_cancel or (self.history is not None and self.history.deposed):
                # Deposed: the new leader owns the migration now; acting would fight it.
                raise
            # The host cancelled us mid-migration: put things back before going away. (except*
            # because an executor's nursery may deliver the cancellation inside a group.)
            with trio.CancelScope(shield=True), trio.move_on_after(self.ack_timeout + 60):
                if self.machine.may_cancel():
                    self.machine.cancel(message="the migration was cancelled by its host")
                    await self._drive()
            raise
        return self.result()

    async def _drive(self) -> None:
        m = self.machine
        if m.state is S.PENDING:
            m.start()
        while not m.is_terminal:
            # Write-ahead: the state is durable before any agent hears of it or any SQL runs.
            # (This await is also the loop's checkpoint: should the FSM ever fail to move,
            # the loop stays cancellable instead of spinning the event loop.) CONFIRM is the
            # exception: nothing is sent or run for it before the finish is recorded (its
            # notice goes out after `record_finish`, which writes the terminal checkpoint),
            # so a checkpoint of it would be a round trip that protects nothing: a successor
            # finding the previous state resumes there and reaches the same end.
            if m.state is S.CONFIRM:
                await trio.lowlevel.checkpoint()
            else:
                await self.persist()
            state = m.state
            phase = state.phase
            if self._abort_now() and state not in (S.EXECUTE, S.CONTRACT):
                self._apply_abort()
                continue
            if state is S.EXECUTE:
                self._report_phase(Phase.EXECUTE)
                await self._run_sql(Phase.EXECUTE, self.plan.execute.groups, expand=True)
            elif state is S.CONTRACT:
                await self._wait_out_leases(S.APPLY)
                self._report_phase(Phase.CONTRACT)
                await self._run_sql(Phase.CONTRACT, self.plan.contract.groups)
                if self.abort_reason is not None and m.contracted:
                    m.warnings.append(
                        f"an abort was requested ({self.abort_reason}) while CONTRACT ran; "
                        "CONTRACT committed, so the migration went forward"
                    )
            elif state is S.CONFIRM:
                # Nothing is awaited here (`MigrationMachine.acks_awaited`): the run finishes
                # now and the notice goes out once the result is recorded (`send_confirm`),
                # so the last writes do not queue behind a fleet's worth of frames and acks.
                m.finish()
            elif phase in ACKED_PHASES:
                await self._collect_answers()
                if state is S.ROLLBACK:
                    await self._restore_schema()
            else:  # pragma: no cover - the FSM has no other non-terminal state
                raise AssertionError(f"runner has no work for state {state}")
        if self.history is None:
            await self.persist()
        # With a history, the terminal checkpoint is written with the finish (`record_finish`).

    def send_confirm(self) -> None:
        """Send CONFIRM to its cohort, once, if the run completed (the coordinator calls it
        after recording the finish). Its answers still count, late (docs/state-machine.md)."""
        if self.machine.state is S.COMPLETED and not self._confirm_sent:
            self._confirm_sent = True
            self._notify_phase(Phase.CONFIRM)

    async def record_finish(self, result: MigrationResult, *, patience: float) -> None:
        """Record the finished run: its terminal checkpoint and its history row, in one
        statement (one round trip instead of two; the coordinator calls it once `run`
        returned a terminal result). While the database is unreachable it retries as
        `persist` does, for at most `patience` seconds, then raises the last error: the run
        then stays unfinished in the database, for a successor to resume. `Deposed`
        propagates."""
        if self.history is None:
            return
        checkpoint = Checkpoint.of(self.machine)
        history = self.history
        await self._durably(
            lambda: history.record_finish(self.migration, result, checkpoint),
            until=trio.current_time() + patience,
        )
        self._saved = checkpoint
        self._persisted_at.setdefault(checkpoint.state, trio.current_time())

    async def _durably(
        self, write: Callable[[], Awaitable[None]], *, until: float = math.inf
    ) -> None:
        """Run `write` until it succeeds, retrying with backoff while the database cannot
        be reached (an `OperationalError`, raised as it is once `until` passed); other
        errors, and `Deposed`, propagate."""
        delay = 0.1
        while True:
            try:
                await write()
                return
            except psycopg.OperationalError as exc:
                if trio.current_time() + delay > until:
                    raise
                log.warning(
                    "%s: cannot write the migration's state (%s); retrying in %.1f s",
                    self.migration.name,
                    pg_message(exc),
                    delay,
                )
                await trio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def mark_durable(self, checkpoint: Checkpoint) -> None:
        """`checkpoint` was written by the caller (the start of the run): `persist` does
        not write it again."""
        self._saved = checkpoint

    async def persist(self) -> None:
        """Write the machine's checkpoint if it changed since the last write.

        While the database is unreachable the run waits here, retrying with backoff: it
        never tells agents, or runs SQL for, a state that is not durable. `Deposed` (another
        coordinator took the lock) propagates: this one must stop acting at once.
        """
        if self.history is None:
            self._persisted_at.setdefault(self.machine.state, trio.current_time())
            await trio.lowlevel.checkpoint()
            return
        checkpoint = Checkpoint.of(self.machine)
        if checkpoint == self._saved:
            await trio.lowlevel.checkpoint()
            return
        history = self.history
        await self._durably(lambda: history.save(self.migration, checkpoint))
        self._saved = checkpoint
        self._persisted_at.setdefault(checkpoint.state, trio.current_time())

    async def _wait_out_leases(self, seen: MigrationState) -> None:
        """Before destructive SQL: wait until no lease this coordinator cannot account for
        (a predecessor's) may be valid, and, with durable readers, one whole lease after
        the state they must see (`seen`) was written, so every agent that vouches from the
        database has re-read it or fenced itself (docs/leases.md)."""
        until = self.fleet.unaccounted_until
        if self.durable_readers:
            first = min(self._persisted_at.values(), default=trio.current_time())
            written = self._persisted_at.get(seen, first)
            until = max(until, written + certainly_expired_after(self.fleet.lease_seconds))
        if until > trio.current_time():
            wait = until - trio.current_time()
            log.info("%s: waiting %.1f s for leases to expire", self.migration.name, wait)
            self.events.emit(
                SqlProgress(
                    self.migration.name,
                    self.machine.state.phase or Phase.CONTRACT,
                    f"waiting {wait:.1f} s for leases that may still be valid to expire",
                )
            )
            await trio.sleep_until(until)

    def _notice(self, phase: Phase, *, ack_required: bool) -> str:
        return encode(
            PhaseNotice(
                migration_id=self.migration.id,
                migration=self.migration.name,
                phase=phase,
                ack_required=ack_required,
                ack_timeout=self.ack_timeout,
                epoch=self.history.epoch if self.history is not None else 0,
            )
        )

    def _report_phase(self, phase: Phase, *, ack_required: bool = False) -> frozenset[str]:
        """Emit `PhaseStarted`; returns the phase's cohort.

        EXECUTE and CONTRACT stop here: their notices used to go to every agent "for
        information", but an agent does nothing with them (no hook, no answer; it accepts
        APPLY and CONFIRM without them, docs/protocol.md), and at fleet scale the broadcast
        cost more than the SQL. Agents still accept them, so older coordinators stay
        compatible.
        """
        cohort = self.machine.ledger.cohort if self.machine.ledger else frozenset()
        self.events.emit(
            PhaseStarted(self.migration.name, phase, tuple(sorted(cohort)), ack_required)
        )
        return cohort

    def _notify_phase(self, phase: Phase) -> None:
        """Report an acked phase and send its notice."""
        cohort = self._report_phase(phase, ack_required=True)
        frame = self._notice(phase, ack_required=True)
        # Acked phases go to their cohort; ROLLBACK (which must reach even the agents it
        # does not wait for) goes to everybody connected.
        only = cohort if phase is not Phase.ROLLBACK else None
        self.fleet.broadcast(frame, only=only)

    async def _collect_answers(self) -> None:
        """Broadcast the phase and wait until its ledger settles or the deadline passes."""
        m = self.machine
        state = m.state
        assert state.phase is not None
        self._notify_phase(state.phase)
        # Who acked so far is made durable (for `lockstep status`; resuming does not need
        # it) at most every ACK_CHECKPOINT_INTERVAL: a checkpoint per wake-up, with the
        # whole acked set in it, cost more than the acks themselves at fleet scale.
        next_write = trio.current_time() + ACK_CHECKPOINT_INTERVAL
        unsaved = False
        self._collecting = state
        with trio.move_on_after(self.ack_timeout):
            while m.state is state and m.awaiting_acks and not self._abort_now():
                self._changed = trio.Event()
                # Acks already unsaved are written at `next_write` anyway: until then only a
                # settled phase (or a departure, an abort) needs to wake this loop.
                self._wake_on_answer = not unsaved
                with trio.move_on_at(next_write if unsaved else math.inf):
                    await self._changed.wait()
                if m.state is not state:
                    break
                if trio.current_time() >= next_write:
                    await self.persist()
                    next_write = trio.current_time() + ACK_CHECKPOINT_INTERVAL
                    unsaved = False
                else:
                    unsaved = True
        self._wake_on_answer = True
        if m.state is state and self._abort_now():
            self._apply_abort()
        elif m.state is state:
            m.deadline_passed(self.ack_timeout)

    async def _execute(self, phase: Phase, groups: Sequence[ExecutionGroup]) -> list[SqlAttempt]:
        """Run a phase's planned groups, with progress events when the executor reports them."""
        if not groups:
            return []
        if isinstance(self.executor, ReportingExecutor):
            return await self.executor.run_phase_reporting(
                phase, groups, self.report, journal=self.journal
            )
        return await self.executor.run_phase(phase, groups)

    async def _run_sql(
        self, phase: Phase, groups: Sequence[ExecutionGroup], expand: bool = False
    ) -> None:
        m = self.machine
        try:
            self.attempts += await self._execute(phase, groups)
            if expand:
                m.expand_committed()
                await self._run_backfills()
        except SqlFailure as exc:
            self.attempts += exc.attempts
            m.sql_failed(
                statement=exc.statement,
                message=exc.message,
                committed_groups=exc.committed_groups,
            )
            return
        m.sql_committed()

    async def _run_backfills(self) -> None:
        """Between EXECUTE's commit and APPLY: each backfill in short batches, in order."""
        if not self.migration.backfills:
            return
        if not isinstance(self.executor, ReportingExecutor):
            raise SqlFailure(None, "this executor cannot run backfills")
        # Durable positions: a resumed run continues each backfill after its last batch.
        positions = backfill_positions(self.history, self.migration)
        for index, backfill in enumerate(self.migration.backfills):
            try:
                stats = await self.executor.run_backfill(
                    backfill, self.report, positions=positions, index=index
                )
            except BackfillFailed as exc:
                self.backfills.append(exc.stats)
                raise
            self.backfills.append(stats)

    async def _restore_schema(self) -> None:
        m = self.machine
        if not m.needs_rollback_sql:
            m.finish(schema_restored=None)  # nothing was committed
            return
        groups = self.plan.rollback.phase.groups
        if not groups:
            note = rollback_note(self.plan) or "no rollback_sql: the schema was left expanded"
            m.finish(schema_restored=False, note=note)
            return
        await self._wait_out_leases(S.ROLLBACK)
        self.events.emit(SqlProgress(self.migration.name, Phase.ROLLBACK, "running rollback_sql"))
        try:
            self.attempts += await self._execute(Phase.ROLLBACK, groups)
        except SqlFailure as exc:
            self.attempts += exc.attempts
            m.finish(
                schema_restored=False,
                note=f"rollback_sql failed, schema left expanded: {exc}",
            )
            return
        m.finish(schema_restored=True)

    # ----------------------------------------------------------------- result
    def result(self) -> MigrationResult:
        m = self.machine
        history = m.history
        phases = []
        for record, following in itertools.pairwise(history):
            if record.state.phase is not None:
                phases.append(
                    PhaseRecord(record.state.phase, record.entered_at, following.entered_at)
                )
        if history and history[-1].state.phase is not None:
            phases.append(PhaseRecord(history[-1].state.phase, history[-1].entered_at, time.time()))
        return MigrationResult(
            migration_id=self.migration.id,
            name=self.migration.name,
            status=m.status,
            phases=tuple(phases),
            failure=m.failure,
            schema_restored=m.schema_restored if m.state is S.FAILED else None,
            warnings=(*self.warnings, *m.warnings),
            sql_attempts=tuple(self.attempts),
            backfills=tuple(self.backfills),
            departed=tuple(sorted(m.departed)),
        )
