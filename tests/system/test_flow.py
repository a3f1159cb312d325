"""The whole flow on a real PostgreSQL with real agents over real WebSockets.

Each test builds its own coordinator (`port=0`) on the fresh database of the `dsn` fixture and
connects agents with `open_agent`. Hooks observe the database from inside the phases, which is
how these tests check the ordering rules of docs/design.md (EXECUTE after every ANNOUNCE
ack, APPLY after the EXECUTE commit, CONTRACT after every APPLY ack). Ack timeouts are short so a
missing ack costs under a second; tests that must prove "at once" use a long ack timeout and a
`fail_after` guard instead of measuring time.
"""

from __future__ import annotations

import itertools
import socket

import pytest
import trio

from agent import CoordinatorUnreachable, HandshakeRejected, MigrationInfo, open_agent
from coordinator import AlreadyApplied, open_coordinator
from coordinator.events import AgentLeft, AnswerReceived, MigrationFinished, PhaseStarted
from statemachine import FailureKind, Migration, MigrationStatus, Phase, agent_credential
from tests.support.flow import (
    EventLog,
    HookFn,
    HookLog,
    agents,
    columns,
    columns_async,
    confirmed,
    failing,
    hang,
    history,
    make_users,
    phase_names_of,
    until,
)

USERS = ["id", "name", "created_at"]
THREE = ["app-1", "app-2", "app-3"]
#: Long enough never to expire in a test that expects an immediate rollback; the run is
#: wrapped in `trio.fail_after(GUARD)`, so waiting for this timeout fails the test.
NEVER = 60.0
GUARD = 30.0


def add_email(**overrides: object) -> Migration:
    spec: dict[str, object] = {
        "sql": [
            "ALTER TABLE users ADD COLUMN email TEXT",
            "ALTER TABLE users ADD COLUMN email_verified BOOLEAN DEFAULT FALSE",
        ],
        "rollback_sql": [
            "ALTER TABLE users DROP COLUMN email_verified",
            "ALTER TABLE users DROP COLUMN email",
        ],
    }
    spec.update(overrides)
    return Migration("add_user_email", **spec)  # type: ignore[arg-type]


# ------------------------------------------------------------------- happy path
async def test_happy_path_three_agents(dsn: str) -> None:
    make_users(dsn)
    log = HookLog()
    seen_columns: dict[tuple[str, Phase], list[str]] = {}

    def observing(agent_id: str) -> dict[str, HookFn]:
        async def look(info: MigrationInfo) -> None:
            if agent_id == "app-3":
                await trio.sleep(0.3)  # slow but in time: the others must wait for it
            seen_columns[(agent_id, info.phase)] = await columns_async(dsn)

        return {"on_announce": look, "on_apply": look}

    async with open_coordinator(dsn, port=0, ack_timeout=5) as coord:
        events = EventLog()
        coord.subscribe(events)
        behaviour = {a: observing(a) for a in THREE}
        async with agents(coord.url, THREE, log, behaviour) as fleet:
            await coord.wait_for_agents(3, timeout=5)
            assert coord.agents == frozenset(THREE)
            result = await coord.run_migration(add_email())

            assert result.status is MigrationStatus.COMPLETED, result.reason
            assert result.reason is None
            assert result.phase_names == ["ANNOUNCE", "EXECUTE", "APPLY", "CONFIRM"]
            assert result.schema_restored is None
            assert result.warnings == ()
            await confirmed(log, "add_user_email", THREE)  # CONFIRM is not waited for
            for agent_id, agent in fleet.items():
                assert agent.seen == [  # no EXECUTE notice: agents need none
                    ("add_user_email", Phase.ANNOUNCE),
                    ("add_user_email", Phase.APPLY),
                    ("add_user_email", Phase.CONFIRM),
                ]
                assert agent.is_applied("add_user_email")
                assert log.of(agent_id) == ["on_announce", "on_apply", "on_confirm"]
                # Invariant 1 and 2, seen from inside the hooks on their own connections:
                assert seen_columns[(agent_id, Phase.ANNOUNCE)] == USERS
                assert seen_columns[(agent_id, Phase.APPLY)] == [*USERS, "email", "email_verified"]

    assert columns(dsn) == [*USERS, "email", "email_verified"]
    assert events.phases("add_user_email") == [
        ("add_user_email", p) for p in (Phase.ANNOUNCE, Phase.EXECUTE, Phase.APPLY, Phase.CONFIRM)
    ]
    [row] = history(dsn)
    assert row["name"] == "add_user_email"
    assert row["status"] == "completed"
    assert row["reason"] is None
    assert row["finished_at"] is not None
    assert phase_names_of(row) == result.phase_names
    phases = result.phases
    assert all(p.started_at <= p.ended_at for p in phases)
    assert all(a.ended_at <= b.started_at for a, b in itertools.pairwise(phases))


# ---------------------------------------------------------------- silent agents
@pytest.mark.parametrize("hook", ["on_announce", "on_apply"])
async def test_silent_agent_rolls_back_and_names_the_agent(dsn: str, hook: str) -> None:
    make_users(dsn)
    log = HookLog()
    async with open_coordinator(dsn, port=0, ack_timeout=0.75) as coord:
        ids = ["app-1", "quiet", "app-3"]
        async with agents(coord.url, ids, log, {"quiet": {hook: hang}}) as fleet:
            await coord.wait_for_agents(3, timeout=5)
            result = await coord.run_migration(add_email())
            others_applied = [fleet[a].is_applied("add_user_email") for a in ("app-1", "app-3")]
            other_hooks = log.of("app-1")

    phase = Phase.ANNOUNCE if hook == "on_announce" else Phase.APPLY
    assert result.status is MigrationStatus.FAILED
    assert result.phase_names[-1] == "ROLLBACK"
    assert result.failure is not None
    assert result.failure.kind is FailureKind.TIMEOUT
    assert result.failure.agents == ("quiet",)
    assert result.reason == (
        f"timeout in {phase.name}: agent(s) quiet did not ack (no ack within 0.75 s)"
    )
    assert columns(dsn) == USERS, "the schema is the one the migration started from"
    assert others_applied == [False, False]
    if phase is Phase.APPLY:
        assert result.phase_names == ["ANNOUNCE", "EXECUTE", "APPLY", "ROLLBACK"]
        assert result.schema_restored is True, "rollback_sql ran"
        assert other_hooks == ["on_announce", "on_apply", "on_rollback"]
        # The quiet agent is still stuck in on_apply, so it cannot ack ROLLBACK either.
        assert any("ROLLBACK" in w and "quiet" in w for w in result.warnings)
    else:
        assert result.phase_names == ["ANNOUNCE", "ROLLBACK"]
        assert result.schema_restored is None, "nothing was committed, nothing to undo"
        assert other_hooks == ["on_announce", "on_rollback"]
    [row] = history(dsn)
    assert row["status"] == "failed"
    assert row["reason"] == result.reason


# ------------------------------------------------------------------------ NACKs
@pytest.mark.parametrize("hook", ["on_announce", "on_apply"])
async def test_nack_rolls_back_at_once(dsn: str, hook: str) -> None:
    make_users(dsn)
    log = HookLog()
    async with open_coordinator(dsn, port=0, ack_timeout=NEVER) as coord:
        behaviour = {"grumpy": {hook: failing("not today")}}
        async with agents(coord.url, ["app-1", "grumpy"], log, behaviour) as fleet:
            await coord.wait_for_agents(2, timeout=5)
            with trio.fail_after(GUARD):
                result = await coord.run_migration(add_email())
            assert not fleet["app-1"].is_applied("add_user_email")
            assert not fleet["grumpy"].is_applied("add_user_email")

    phase = "ANNOUNCE" if hook == "on_announce" else "APPLY"
    assert result.status is MigrationStatus.FAILED
    assert result.reason == f"nack in {phase} from agent grumpy: RuntimeError: not today"
    assert result.failure is not None and result.failure.kind is FailureKind.NACK
    assert result.phase_names[-1] == "ROLLBACK"
    assert columns(dsn) == USERS
    assert log.of("grumpy")[-1] == "on_rollback"


# ------------------------------------------------------------------ SQL failure
async def test_failing_second_statement_leaves_no_partial_change(dsn: str) -> None:
    make_users(dsn)
    log = HookLog()
    bad = "ALTER TABLE no_such_table ADD COLUMN x INT"
    migration = Migration(
        "half_done",
        sql=["ALTER TABLE users ADD COLUMN email TEXT", bad],
        rollback_sql=["ALTER TABLE users DROP COLUMN email"],
    )
    async with (
        open_coordinator(dsn, port=0, ack_timeout=5) as coord,
        agents(coord.url, THREE, log) as fleet,
    ):
        await coord.wait_for_agents(3, timeout=5)
        result = await coord.run_migration(migration)
        seen = {a: [p for _, p in agent.seen] for a, agent in fleet.items()}

    assert result.status is MigrationStatus.FAILED
    assert result.phase_names == ["ANNOUNCE", "EXECUTE", "ROLLBACK"]
    assert result.failure is not None
    assert result.failure.kind is FailureKind.SQL_ERROR
    assert result.failure.statement == bad
    assert bad in (result.reason or "")
    assert 'relation "no_such_table" does not exist' in (result.reason or "")
    assert "SQLSTATE 42P01" in (result.reason or "")
    assert result.schema_restored is None, "EXECUTE never committed: nothing to undo"
    assert columns(dsn) == USERS, "the first statement's column must not exist"
    for agent_id in THREE:
        assert seen[agent_id] == [Phase.ANNOUNCE, Phase.ROLLBACK]
        assert "on_apply" not in log.of(agent_id)


# ------------------------------------------------------ rollback after EXECUTE
async def test_rollback_after_execute_runs_rollback_sql(dsn: str) -> None:
    make_users(dsn)
    log = HookLog()
    async with open_coordinator(dsn, port=0, ack_timeout=NEVER) as coord:
        behaviour = {"app-2": {"on_apply": failing("bad deploy")}}
        async with agents(coord.url, THREE, log, behaviour):
            await coord.wait_for_agents(3, timeout=5)
            with trio.fail_after(GUARD):
                result = await coord.run_migration(add_email())

    assert result.status is MigrationStatus.FAILED
    assert result.schema_restored is True
    assert result.warnings == ()
    assert [a.phase for a in result.sql_attempts] == [Phase.EXECUTE, Phase.ROLLBACK]
    assert all(a.ok for a in result.sql_attempts)
    assert columns(dsn) == USERS
    [row] = history(dsn)
    assert row["schema_restored"] is True


async def test_rollback_without_rollback_sql_leaves_the_schema_expanded(dsn: str) -> None:
    """The UPDATE makes the expand script impossible to undo mechanically, so nothing may be
    guessed: the column stays and the result says so."""
    make_users(dsn)
    log = HookLog()
    migration = Migration(
        "add_email_copy",
        sql=["ALTER TABLE users ADD COLUMN email TEXT", "UPDATE users SET email = name"],
    )
    assert migration.rollback_sql is None
    async with open_coordinator(dsn, port=0, ack_timeout=NEVER) as coord:
        behaviour = {"app-1": {"on_apply": failing("nope")}}
        async with agents(coord.url, ["app-1"], log, behaviour):
            await coord.wait_for_agents(1, timeout=5)
            with trio.fail_after(GUARD):
                result = await coord.run_migration(migration)

    assert result.status is MigrationStatus.FAILED
    assert result.schema_restored is False
    assert any("left expanded" in w for w in result.warnings), result.warnings
    assert columns(dsn) == [*USERS, "email"]
    [row] = history(dsn)
    assert row["schema_restored"] is False


async def test_failing_rollback_sql_is_reported_not_raised(dsn: str) -> None:
    make_users(dsn)
    migration = add_email(rollback_sql=["ALTER TABLE users DROP COLUMN not_there"])
    async with (
        open_coordinator(dsn, port=0, ack_timeout=NEVER) as coord,
        agents(coord.url, ["a"], HookLog(), {"a": {"on_apply": failing("x")}}),
    ):
        await coord.wait_for_agents(1, timeout=5)
        with trio.fail_after(GUARD):
            result = await coord.run_migration(migration)

    assert result.status is MigrationStatus.FAILED
    assert result.schema_restored is False
    assert any(
        w.startswith("rollback_sql failed") and 'column "not_there"' in w for w in result.warnings
    ), result.warnings
    assert columns(dsn) == [*USERS, "email", "email_verified"]


# ----------------------------------------------------------------------- contract
def _rename_with_contract() -> Migration:
    return Migration(
        "rename_old_name",
        sql=["ALTER TABLE users ADD COLUMN full_name TEXT"],
        rollback_sql=["ALTER TABLE users DROP COLUMN full_name"],
        contract_sql=["ALTER TABLE users DROP COLUMN old_name"],
    )


async def test_contract_runs_only_after_every_apply_ack(dsn: str) -> None:
    make_users(dsn, "old_name TEXT")
    log = HookLog()
    at_apply: dict[str, list[str]] = {}

    async def fast(info: MigrationInfo) -> None:
        at_apply["fast"] = await columns_async(dsn)

    async def slow(info: MigrationInfo) -> None:
        await trio.sleep(0.5)  # well within the ack timeout: slow is allowed
        at_apply["slow"] = await columns_async(dsn)  # just before acking

    async with open_coordinator(dsn, port=0, ack_timeout=10) as coord:
        events = EventLog()
        coord.subscribe(events)
        behaviour = {"fast": {"on_apply": fast}, "slow": {"on_apply": slow}}
        async with agents(coord.url, ["fast", "slow"], log, behaviour):
            await coord.wait_for_agents(2, timeout=5)
            result = await coord.run_migration(_rename_with_contract())

    assert result.status is MigrationStatus.COMPLETED, result.reason
    assert result.phase_names == ["ANNOUNCE", "EXECUTE", "APPLY", "CONTRACT", "CONFIRM"]
    expanded = [*USERS, "old_name", "full_name"]
    assert at_apply == {"fast": expanded, "slow": expanded}, "CONTRACT ran before an APPLY ack"
    assert columns(dsn) == [*USERS, "full_name"]
    contract = events.started("rename_old_name", Phase.CONTRACT)
    apply_acks = [
        i
        for i, e in enumerate(events.events)
        if isinstance(e, AnswerReceived) and e.phase is Phase.APPLY and e.ok
    ]
    assert len(apply_acks) == 2
    assert max(apply_acks) < contract


async def test_contract_never_runs_when_apply_is_refused(dsn: str) -> None:
    make_users(dsn, "old_name TEXT")
    log = HookLog()
    async with open_coordinator(dsn, port=0, ack_timeout=NEVER) as coord:
        events = EventLog()
        coord.subscribe(events)
        behaviour = {"refuser": {"on_apply": failing("old code still deployed")}}
        async with agents(coord.url, ["ok", "refuser"], log, behaviour):
            await coord.wait_for_agents(2, timeout=5)
            with trio.fail_after(GUARD):
                result = await coord.run_migration(_rename_with_contract())

    assert result.status is MigrationStatus.FAILED
    assert "CONTRACT" not in result.phase_names
    assert not any(isinstance(e, PhaseStarted) and e.phase is Phase.CONTRACT for e in events.events)
    assert result.schema_restored is True
    assert columns(dsn) == [*USERS, "old_name"], "the old column must survive a failed migration"


# --------------------------------------------------------------------- disconnect
@pytest.mark.parametrize("hook", ["on_announce", "on_apply"])
async def test_cohort_agent_disconnecting_rolls_back_at_once(dsn: str, hook: str) -> None:
    """on_agent_loss="rollback" (the behaviour before leases; the default "wait" is in
    tests/system/test_leases.py)."""
    make_users(dsn)
    stalled = trio.Event()

    async def stall(info: MigrationInfo) -> None:
        stalled.set()
        await trio.sleep_forever()

    async with open_coordinator(dsn, port=0, ack_timeout=NEVER, on_agent_loss="rollback") as coord:
        events = EventLog()
        coord.subscribe(events)
        leaver_scope = trio.CancelScope()

        async def leaver(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with leaver_scope:
                async with open_agent(
                    coord.url,
                    agent_id="leaver",
                    on_announce=stall if hook == "on_announce" else None,
                    on_apply=stall if hook == "on_apply" else None,
                ):
                    task_status.started()
                    await trio.sleep_forever()

        async def cut_when_stalled() -> None:
            await stalled.wait()
            leaver_scope.cancel()  # the app instance dies mid-phase

        async with agents(coord.url, ["steady"], HookLog()) as fleet, trio.open_nursery() as n:
            await n.start(leaver)
            await coord.wait_for_agents(2, timeout=5)
            n.start_soon(cut_when_stalled)
            with trio.fail_after(GUARD):
                result = await coord.run_migration(add_email())
            assert not fleet["steady"].is_applied("add_user_email")

    phase = "ANNOUNCE" if hook == "on_announce" else "APPLY"
    assert result.status is MigrationStatus.FAILED
    assert result.failure is not None and result.failure.kind is FailureKind.DISCONNECT
    assert result.reason == f"agent leaver disconnected in {phase} before acking"
    assert columns(dsn) == USERS
    assert any(isinstance(e, AgentLeft) and e.agent_id == "leaver" for e in events.events)
    rollback = events.started("add_user_email", Phase.ROLLBACK)
    rollback_event = events.events[rollback]
    assert isinstance(rollback_event, PhaseStarted)
    assert rollback_event.cohort == ("steady",), "a gone agent is not waited for in ROLLBACK"


# -------------------------------------------------------------------------- queue
async def test_migrations_submitted_while_one_runs_wait_their_turn(dsn: str) -> None:
    make_users(dsn)
    second_submitted = trio.Event()

    async def hold_first_announce(info: MigrationInfo) -> None:
        if info.name == "first":
            await second_submitted.wait()

    async def slow_first_apply(info: MigrationInfo) -> None:
        if info.name == "first":
            await trio.sleep(0.5)  # in time; gives a queue-jumping second run room to show

    first = Migration("first", sql=["ALTER TABLE users ADD COLUMN a INT"])
    second = Migration("second", sql=["ALTER TABLE users ADD COLUMN b INT"])
    results = {}
    async with open_coordinator(dsn, port=0, ack_timeout=10) as coord:
        events = EventLog()
        coord.subscribe(events)
        behaviour = {
            "app-1": {"on_announce": hold_first_announce},
            "app-2": {"on_apply": slow_first_apply},
        }
        async with agents(coord.url, ["app-1", "app-2"], HookLog(), behaviour) as fleet:
            await coord.wait_for_agents(2, timeout=5)
            first_announced = trio.Event()
            coord.subscribe(
                lambda e: (
                    first_announced.set()
                    if isinstance(e, PhaseStarted) and e.migration == "first"
                    else None
                )
            )

            async def run(m: Migration) -> None:
                results[m.name] = await coord.run_migration(m)

            async def submit_second() -> None:
                await first_announced.wait()
                second_submitted.set()  # run_migration below is entered before any await
                await run(second)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run, first)
                nursery.start_soon(submit_second)
            await until(lambda: ("second", Phase.CONFIRM) in fleet["app-2"].seen)
            seen = fleet["app-2"].seen

    assert results["first"].status is MigrationStatus.COMPLETED, results["first"].reason
    assert results["second"].status is MigrationStatus.COMPLETED, results["second"].reason
    assert events.finished("first") < events.started("second", Phase.ANNOUNCE)
    names = [name for name, _ in seen]
    assert names == ["first"] * 3 + ["second"] * 3, "phases of two migrations interleaved"
    first_row, second_row = history(dsn)
    assert (first_row["name"], second_row["name"]) == ("first", "second")
    assert first_row["finished_at"] <= second_row["started_at"]


# -------------------------------------------------------------------- misuse
async def test_running_a_completed_migration_again_raises(dsn: str) -> None:
    make_users(dsn)
    async with open_coordinator(dsn, port=0, ack_timeout=5) as coord:
        first = await coord.run_migration(add_email())
        assert first.status is MigrationStatus.COMPLETED
        with pytest.raises(AlreadyApplied, match="'add_user_email' already completed"):
            await coord.run_migration(add_email())
        with pytest.raises(AlreadyApplied, match="checksum changed"):
            await coord.run_migration(add_email(rollback_sql=["SELECT 1"]))
    assert [row["status"] for row in history(dsn)] == ["completed"]


async def test_a_failed_migration_may_run_again(dsn: str) -> None:
    make_users(dsn)
    async with open_coordinator(dsn, port=0, ack_timeout=NEVER) as coord:
        async with agents(coord.url, ["a"], HookLog(), {"a": {"on_announce": failing("later")}}):
            await coord.wait_for_agents(1, timeout=5)
            with trio.fail_after(GUARD):
                failed = await coord.run_migration(add_email())
        assert failed.status is MigrationStatus.FAILED
        retried = await coord.run_migration(add_email())
    assert retried.status is MigrationStatus.COMPLETED, retried.reason
    assert [row["status"] for row in history(dsn)] == ["failed", "completed"]


# ------------------------------------------------------------------ agent errors
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_unreachable_coordinator() -> None:
    url = f"ws://127.0.0.1:{_free_port()}"
    with pytest.raises(CoordinatorUnreachable, match=f"cannot reach the coordinator at {url}"):
        async with open_agent(url, agent_id="app-1", connect_timeout=5, wait_connected=True):
            pytest.fail("connected to nothing")


async def test_wrong_token_is_rejected(dsn: str) -> None:
    async with open_coordinator(dsn, port=0, token="s3cret") as coord:
        # The plain fleet secret is not a credential unless shared_token=True.
        for token in ("wrong", None, "s3cret", agent_credential("s3cret", "app-2")):
            with pytest.raises(HandshakeRejected) as info:
                async with open_agent(coord.url, agent_id="app-1", token=token):
                    pytest.fail("joined with a bad token")
            assert info.value.code == "unauthorized"
        async with open_agent(
            coord.url, agent_id="app-1", token=agent_credential("s3cret", "app-1")
        ) as agent:
            assert agent.connected
            await coord.wait_for_agents(1, timeout=5)


async def test_duplicate_agent_id_is_rejected_and_the_first_stays(dsn: str) -> None:
    make_users(dsn)
    async with (
        open_coordinator(dsn, port=0, ack_timeout=5) as coord,
        open_agent(coord.url, agent_id="app-1") as original,
    ):
        await coord.wait_for_agents(1, timeout=5)
        with pytest.raises(HandshakeRejected) as info:
            async with open_agent(coord.url, agent_id="app-1"):
                pytest.fail("a second app-1 joined")
        assert info.value.code == "duplicate_agent"
        assert "'app-1' is already connected" in info.value.message
        assert coord.agents == frozenset({"app-1"})
        assert original.connected
        result = await coord.run_migration(add_email())
        assert result.status is MigrationStatus.COMPLETED, result.reason
        assert original.is_applied("add_user_email")


# ----------------------------------------------------------------- late joiners
async def test_late_joiner_after_completion_is_told_it_is_applied(dsn: str) -> None:
    make_users(dsn)
    failed = Migration("never_lands", sql=["ALTER TABLE users ADD COLUMN x INT"])

    async def refuse_never_lands(info: MigrationInfo) -> None:
        if info.name == "never_lands":
            raise RuntimeError("no")

    async with open_coordinator(dsn, port=0, ack_timeout=NEVER) as coord:
        behaviour = {"early": {"on_announce": refuse_never_lands}}
        async with agents(coord.url, ["early"], HookLog(), behaviour):
            await coord.wait_for_agents(1, timeout=5)
            with trio.fail_after(GUARD):
                assert (await coord.run_migration(add_email())).status is MigrationStatus.COMPLETED
                assert (await coord.run_migration(failed)).status is MigrationStatus.FAILED
        async with open_agent(coord.url, agent_id="late") as late:
            assert late.is_applied("add_user_email")
            assert not late.is_applied("never_lands")
            assert late.seen == []
    # A restarted coordinator reads the history table for its Welcome.
    async with (
        open_coordinator(dsn, port=0) as restarted,
        open_agent(restarted.url, agent_id="later") as later,
    ):
        assert later.applied == frozenset({"add_user_email"})


async def test_agent_joining_during_announce_must_ack_apply(dsn: str) -> None:
    make_users(dsn)
    log = HookLog()
    announcing = trio.Event()
    late_joined = trio.Event()

    async def wait_for_late(info: MigrationInfo) -> None:
        announcing.set()
        await late_joined.wait()

    async with open_coordinator(dsn, port=0, ack_timeout=10) as coord:
        events = EventLog()
        coord.subscribe(events)
        async with (
            agents(coord.url, ["early"], log, {"early": {"on_announce": wait_for_late}}),
            trio.open_nursery() as nursery,
        ):
            await coord.wait_for_agents(1, timeout=5)
            results = []
            finished = trio.Event()

            async def run() -> None:
                results.append(await coord.run_migration(add_email()))
                finished.set()

            nursery.start_soon(run)
            await announcing.wait()
            async with agents(coord.url, ["late"], log) as late_fleet:
                late = late_fleet["late"]
                assert not late.is_applied("add_user_email"), "Welcome during ANNOUNCE"
                late_joined.set()
                with trio.fail_after(GUARD):
                    await finished.wait()
                assert late.is_applied("add_user_email")
                await confirmed(log, "add_user_email", ["early", "late"])
                assert [p for _, p in late.seen] == [Phase.APPLY, Phase.CONFIRM]

    [result] = results
    assert result.status is MigrationStatus.COMPLETED, result.reason
    assert log.of("late") == ["on_apply", "on_confirm"]
    apply = events.events[events.started("add_user_email", Phase.APPLY)]
    assert isinstance(apply, PhaseStarted)
    assert apply.cohort == ("early", "late")
    assert any(
        isinstance(e, AnswerReceived) and e.agent_id == "late" and e.phase is Phase.APPLY
        for e in events.events
    )
    assert any(isinstance(e, MigrationFinished) for e in events.events)
