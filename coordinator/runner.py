"""Drives one migration's FSM through its phases: broadcasts, deadlines and SQL.

The runner is the only code that awaits during a migration. It asks the pure
`MigrationMachine` what state it is in and does that state's work: broadcast a notice and
wait for the ledger to settle (a trio cancel scope is the deadline; acks wake it through an
event, nothing polls), or run the phase's SQL through the `Executor`. Answers from agents
arrive through `on_ack`/`on_nack`/`on_join`/`on_leave`, called by the connection handlers.

Before a run starts, `check_lint` (the lint gate) and `resolve_rollback` decide whether the
migration may run at all and what ROLLBACK would execute; they are pure and run before ANNOUNCE.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Sequence

import trio

from coordinator.backfill import BackfillFailed
from coordinator.events import AnswerReceived, EventBus, PhaseStarted, SqlProgress
from coordinator.executor import Executor, Reporter, ReportingExecutor, SqlFailure
from coordinator.fleet import Fleet
from statemachine.ledger import AckOutcome
from statemachine.migration import Migration
from statemachine.migration_fsm import MigrationMachine
from statemachine.phases import MigrationState, MigrationStatus, Phase
from statemachine.protocol import PhaseNotice, encode
from statemachine.result import BackfillStats, MigrationResult, PhaseRecord, SqlAttempt
from statemachine.sql import Finding, RollbackSource, lint_migration, try_derive_rollback

log = logging.getLogger("lockstep.coordinator")
S = MigrationState


class MigrationRejected(Exception):
    """The lint gate refused a migration before ANNOUNCE: nothing ran, nothing was recorded.

    `findings` holds every error (and warning) lint reported; run it anyway with
    ``run_migration(migration, force=True)`` once you know why the rule does not apply.
    """

    def __init__(self, migration: str, findings: Sequence[Finding]) -> None:
        self.migration = migration
        self.findings = tuple(findings)
        errors = [f for f in self.findings if f.severity == "error"]
        lines = [
            f"migration {migration!r} rejected by lint: {len(errors)} error(s) "
            "(run_migration(..., force=True) runs it anyway)"
        ]
        for finding in errors:
            lines.append(f"  {finding}")
            lines.append(f"    statement: {' '.join(finding.statement.split())}")
            lines.append(f"    fix: {finding.recipe}")
        super().__init__("\n".join(lines))


def check_lint(migration: Migration, *, force: bool = False) -> list[str]:
    """The lint gate: raise `MigrationRejected` on errors unless `force`; return warnings.

    With `force`, errors are returned as warnings too ("forced past ..."), so the result still
    says what was overridden.
    """
    findings = lint_migration(migration)
    errors = [f for f in findings if f.severity == "error"]
    if errors and not force:
        raise MigrationRejected(migration.name, findings)
    warnings = []
    for finding in findings:
        prefix = "lint (forced past error)" if finding.severity == "error" else "lint"
        warnings.append(f"{prefix}: {finding}")
    return warnings


@dataclasses.dataclass(frozen=True)
class RollbackChoice:
    """What ROLLBACK would run: given, derived from `sql`, or nothing (schema left expanded)."""

    source: RollbackSource
    statements: tuple[str, ...] | None
    reasons: tuple[str, ...] = ()

    @property
    def note(self) -> str | None:
        """The result warning when ROLLBACK has nothing to run."""
        if self.statements is not None:
            return None
        return (
            "no rollback_sql was given and none could be derived, so the schema was left "
            "expanded: " + "; ".join(self.reasons)
        )


def resolve_rollback(migration: Migration) -> RollbackChoice:
    """Given `rollback_sql` wins; else derive it (`statemachine.sql`); else say why not."""
    if migration.rollback_sql is not None:
        return RollbackChoice("given", migration.rollback_sql)
    derivation = try_derive_rollback(migration.sql)
    if derivation.statements is not None:
        return RollbackChoice("derived", derivation.statements)
    return RollbackChoice("none", None, derivation.reasons)


class MigrationRun:
    def __init__(
        self,
        migration: Migration,
        *,
        fleet: Fleet,
        executor: Executor,
        events: EventBus,
        ack_timeout: float,
        rollback_sql: Sequence[str] | None,
        rollback_note: str | None = None,
        warnings: Sequence[str] = (),
    ) -> None:
        self.migration = migration
        self.fleet = fleet
        self.executor = executor
        self.events = events
        self.ack_timeout = migration.ack_timeout or ack_timeout
        self.rollback_sql = rollback_sql
        self.rollback_note = rollback_note
        self.machine = MigrationMachine(
            migration.id,
            has_contract=bool(migration.contract_sql),
            connected=fleet.agent_ids,
        )
        self.attempts: list[SqlAttempt] = []
        self.backfills: list[BackfillStats] = []
        #: Warnings known before the run (lint) or found outside the FSM (partial CONTRACT).
        self.warnings: list[str] = list(warnings)
        self.report = Reporter(migration.name, events.emit)
        self._changed = trio.Event()

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

    def on_leave(self, agent_id: str) -> None:
        if self.machine.agent_disconnected(agent_id) is AckOutcome.RECORDED:
            self._wake()

    def _answered(
        self, agent_id: str, phase: Phase, ok: bool, outcome: AckOutcome, error: str | None
    ) -> None:
        self.events.emit(AnswerReceived(self.migration.name, agent_id, phase, ok, outcome, error))
        if outcome is AckOutcome.RECORDED:
            self._wake()

    def _wake(self) -> None:
        self._changed.set()

    # ------------------------------------------------------------- the drive
    async def run(self) -> MigrationResult:
        try:
            await self._drive()
        except* trio.Cancelled:
            # The host cancelled us mid-migration: put things back before going away. (except*
            # because an executor's nursery may deliver the cancellation inside a group.)
            with trio.CancelScope(shield=True), trio.move_on_after(self.ack_timeout + 60):
                if self.machine.cancelled("the migration was cancelled by its host"):
                    await self._drive()
            raise
        return self.result()

    async def _drive(self) -> None:
        m = self.machine
        if m.state is S.PENDING:
            m.begin()
        while not m.is_terminal:
            # A checkpoint per step: should the FSM ever fail to move, the loop stays
            # cancellable instead of spinning the event loop.
            await trio.lowlevel.checkpoint()
            state = m.state
            if state in (S.ANNOUNCE, S.APPLY):
                await self._collect_answers()
            elif state is S.EXECUTE:
                self._notify_phase(Phase.EXECUTE)
                await self._run_sql(Phase.EXECUTE, self.migration.sql, expand=True)
            elif state is S.CONTRACT:
                self._notify_phase(Phase.CONTRACT)
                await self._run_sql(Phase.CONTRACT, self.migration.contract_sql)
            elif state is S.CONFIRM:
                await self._collect_answers()
                m.finish_confirm()
            elif state is S.ROLLBACK:
                await self._collect_answers()
                await self._restore_schema()
            else:  # pragma: no cover - the FSM has no other non-terminal state
                raise AssertionError(f"runner has no work for state {state}")

    def _notify_phase(self, phase: Phase, *, ack_required: bool = False) -> None:
        cohort = self.machine.ledger.cohort if self.machine.ledger else frozenset()
        self.events.emit(
            PhaseStarted(self.migration.name, phase, tuple(sorted(cohort)), ack_required)
        )
        frame = encode(
            PhaseNotice(
                migration_id=self.migration.id,
                migration=self.migration.name,
                phase=phase,
                ack_required=ack_required,
                ack_timeout=self.ack_timeout,
            )
        )
        # Acked phases go to their cohort; notices, and ROLLBACK (which must reach even the
        # agents it does not wait for), go to everybody connected.
        only = cohort if ack_required and phase is not Phase.ROLLBACK else None
        self.fleet.broadcast(frame, only=only)

    async def _collect_answers(self) -> None:
        """Broadcast the phase and wait until its ledger settles or the deadline passes."""
        m = self.machine
        state = m.state
        assert state.phase is not None
        self._notify_phase(state.phase, ack_required=True)
        with trio.move_on_after(self.ack_timeout):
            while m.state is state and m.awaiting_acks:
                self._changed = trio.Event()
                await self._changed.wait()
        if m.state is state:
            m.deadline_passed(self.ack_timeout)

    async def _execute(self, phase: Phase, statements: Sequence[str]) -> list[SqlAttempt]:
        """Run a phase's SQL, with progress events when the executor can report them."""
        if isinstance(self.executor, ReportingExecutor):
            return await self.executor.run_phase_reporting(phase, statements, self.report)
        return await self.executor.run_phase(phase, statements)

    async def _run_sql(self, phase: Phase, statements: Sequence[str], expand: bool = False) -> None:
        m = self.machine
        try:
            self.attempts += await self._execute(phase, statements)
            if expand:
                m.expand_committed()
                await self._run_backfills()
        except SqlFailure as exc:
            self.attempts += exc.attempts
            if exc.committed_groups:
                # Autocommit statements make a phase non-atomic: what committed stays.
                if phase is Phase.EXECUTE:
                    m.expand_committed()  # so ROLLBACK runs rollback_sql (IF EXISTS-safe)
                else:
                    self.warnings.append(
                        f"{phase.name} failed after {exc.committed_groups} of its execution "
                        "group(s) committed; rollback_sql cannot restore what they changed"
                    )
            m.sql_error(exc.statement, exc.message)
            return
        m.sql_succeeded()

    async def _run_backfills(self) -> None:
        """Between EXECUTE's commit and APPLY: each backfill in short batches, in order."""
        if not self.migration.backfills:
            return
        if not isinstance(self.executor, ReportingExecutor):
            raise SqlFailure(None, "this executor cannot run backfills")
        for backfill in self.migration.backfills:
            try:
                stats = await self.executor.run_backfill(backfill, self.report)
            except BackfillFailed as exc:
                self.backfills.append(exc.stats)
                raise
            self.backfills.append(stats)

    async def _restore_schema(self) -> None:
        m = self.machine
        if not m.needs_rollback_sql:
            m.finish_rollback(schema_restored=None)  # nothing was committed
            return
        if not self.rollback_sql:
            note = self.rollback_note or "no rollback_sql: the schema was left expanded"
            m.finish_rollback(schema_restored=False, note=note)
            return
        self.events.emit(SqlProgress(self.migration.name, Phase.ROLLBACK, "running rollback_sql"))
        try:
            self.attempts += await self._execute(Phase.ROLLBACK, self.rollback_sql)
        except SqlFailure as exc:
            self.attempts += exc.attempts
            m.finish_rollback(
                schema_restored=False,
                note=f"rollback_sql failed, schema left expanded: {exc}",
            )
            return
        m.finish_rollback(schema_restored=True)

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
        status = {
            S.COMPLETED: MigrationStatus.COMPLETED,
            S.FAILED: MigrationStatus.FAILED,
            S.PENDING: MigrationStatus.PENDING,
        }.get(m.state, MigrationStatus.RUNNING)
        return MigrationResult(
            migration_id=self.migration.id,
            name=self.migration.name,
            status=status,
            phases=tuple(phases),
            failure=m.failure,
            schema_restored=m.schema_restored if m.state is S.FAILED else None,
            warnings=(*self.warnings, *m.warnings),
            sql_attempts=tuple(self.attempts),
            backfills=tuple(self.backfills),
        )
