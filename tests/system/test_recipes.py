"""Every recipe in docs/recipes.md, run end to end under live application traffic.

Each recipe runs in its own database with two real agents, each driving a real query loop on its
own connection (old queries until it switches in APPLY, new ones after). The claims the docs make
are asserted as conditions, never as timings: no application query failed, the migration
completed through the phases the file implies, both query sets actually ran on every instance,
and the schema ended as the recipe says. A control runs the same SQL without lockstep to show
the query loop does notice breakage.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from agent.client import MigrationInfo
from coordinator.pg.attempts import RetryPolicy
from statemachine import MigrationResult
from statemachine.phases import MigrationStatus, Phase
from statemachine.sql import Plan, build_plan, lint_migration
from tests.bench import harness, heldlock, recipes, traffic
from tests.bench.apploop import QueryLoop, Sample
from tests.bench.report import BEGIN_MARK, END_MARK, Latency, percentile, write_section
from tests.support import REPO_ROOT

DOCS = REPO_ROOT / "docs" / "recipes.md"
RECIPES = pytest.mark.parametrize("recipe", recipes.RECIPES, ids=lambda r: r.key)


def _failures(samples: list[Sample]) -> str:
    return "\n".join(sorted({s.error or "" for s in samples})[:5])


@RECIPES
async def test_recipe_runs_under_traffic_without_failed_queries(
    dsn: str, recipe: recipes.Recipe
) -> None:
    run = await harness.run_with_lockstep(dsn, recipe, agents=2, min_queries=10)

    assert run.result.status is MigrationStatus.COMPLETED, run.result.reason
    expected = ["ANNOUNCE", "EXECUTE", "APPLY"]
    if recipe.migration().contract_sql:
        expected.append("CONTRACT")
    assert run.result.phase_names == [*expected, "CONFIRM"]
    assert run.traffic.failures == [], _failures(run.traffic.failures)
    # Both query sets really ran: 2 instances x 10 queries before and after the switch.
    assert run.old_queries >= 20
    assert run.new_queries >= 20
    # The switch was rolling: app-1's new code ran while app-2 still ran the old code.
    assert run.traffic.side_by_side >= 10
    assert run.schema_problems == ()
    # One plan: what ran is exactly what `lockstep plan` shows for the file.
    assert _executed_groups(run.result) == _planned_groups(build_plan(recipe.migration()))


def _planned_groups(plan: Plan) -> list[tuple[Phase, int, bool, tuple[str, ...]]]:
    return [
        (section.phase, index, group.transactional, group.statements)
        for section in (plan.execute, plan.contract)
        for index, group in enumerate(section.groups)
    ]


def _executed_groups(result: MigrationResult) -> list[tuple[Phase, int, bool, tuple[str, ...]]]:
    return [
        (a.phase, a.group, a.transactional, a.statements)
        for a in result.sql_attempts
        if a.ok and a.phase in (Phase.EXECUTE, Phase.CONTRACT)
    ]


@RECIPES
async def test_recipe_applied_directly_breaks_old_code_only_when_destructive(
    dsn: str, recipe: recipes.Recipe
) -> None:
    """Control: without lockstep the destructive recipes break the old code still running."""
    run = await harness.run_direct(dsn, recipe, instances=2, min_queries=10)

    assert run.ddl_error is None
    failures = run.traffic.failures
    if recipe.breaks_old_code:
        assert failures, "old code kept working after its column was dropped"
        assert any("UndefinedColumn" in (s.error or "") for s in failures), _failures(failures)
    else:
        assert failures == [], _failures(failures)


@RECIPES
def test_recipe_file_passes_lint(recipe: recipes.Recipe) -> None:
    findings = lint_migration(recipe.migration())
    assert findings == [], [str(f) for f in findings]


@RECIPES
def test_docs_show_the_exact_recipe_file_and_name_its_test(recipe: recipes.Recipe) -> None:
    docs = DOCS.read_text()
    blocks = re.findall(r"```sql\n(.*?)```", docs, re.DOTALL)
    assert recipe.source() in blocks, f"docs/recipes.md does not show {recipe.file} verbatim"
    assert f"test_recipe_runs_under_traffic_without_failed_queries[{recipe.key}]" in docs


def test_recipe_keys_and_files_are_unique() -> None:
    assert len({r.key for r in recipes.RECIPES}) == len(recipes.RECIPES)
    files = sorted(p.name for p in recipes.RECIPES_DIR.glob("*.sql"))
    assert files == sorted(r.file for r in recipes.RECIPES)


def test_unknown_recipe_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="known: add_column"):
        recipes.get("add_colum")


# ------------------------------------------------------------------ report arithmetic
def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7
    tens = [float(v) for v in range(1, 11)]
    assert percentile(tens, 25) == 3  # rank ceil(2.5) = 3
    assert percentile(tens, 0) == 1
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match=r"within 0\.\.100"):
        percentile(values, 101)


def test_latency_in_milliseconds() -> None:
    samples = [Sample(0.0, s / 1000, False, None) for s in (1, 2, 3, 400)]
    assert Latency.of(samples) == Latency(4, 2, 400, 400)


def test_write_section_replaces_only_the_marked_block(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Title\n\nintro\n")
    write_section(doc, "first")
    assert doc.read_text() == f"# Title\n\nintro\n\n{BEGIN_MARK}\nfirst\n{END_MARK}\n"
    doc.write_text(doc.read_text() + "\nafter\n")
    write_section(doc, "second")
    assert doc.read_text() == f"# Title\n\nintro\n\n{BEGIN_MARK}\nsecond\n{END_MARK}\n\nafter\n"


# ------------------------------------------------------------------ the application loop
async def test_on_apply_returns_only_once_no_old_query_is_in_flight(dsn: str) -> None:
    """The hook contract docs/recipes.md asks of apps: no old-code query after the ack."""

    def connect() -> psycopg.Connection[Any]:
        return psycopg.connect(dsn)

    blocker = await trio.to_thread.run_sync(connect)
    try:
        blocker.execute("CREATE TABLE t (id int)")
        blocker.commit()
        blocker.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")  # old query will wait on it
        loop = QueryLoop(dsn, "m", ["SELECT count(*) FROM t"], ["SELECT 1"], pause=0)
        info = MigrationInfo("id", "m", Phase.APPLY, 30.0)
        switched = trio.Event()

        async def apply() -> None:
            await loop.on_apply(info)
            switched.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop.run)
            while loop.in_flight is not False:
                await trio.sleep(0.01)
            nursery.start_soon(apply)
            await trio.sleep(0.3)
            assert not switched.is_set(), "on_apply returned while an old query was running"
            assert loop.count() == 0
            await trio.to_thread.run_sync(blocker.commit)
            await switched.wait()
            while loop.count(new=True) < 5:
                await trio.sleep(0.01)
            loop.stop()
        # The blocked old query finished (before the hook returned); every later one is new.
        assert [s.new for s in loop.samples][:1] == [False]
        assert all(s.new for s in loop.samples[1:])
        assert loop.failures() == []
    finally:
        await trio.to_thread.run_sync(blocker.close)


# ------------------------------------------------------------------ a long transaction in the way
async def test_held_lock_is_waited_out_by_retrying_without_failing_queries(dsn: str) -> None:
    """The benchmark's second scenario, released by a condition instead of a clock."""
    recipe = recipes.get("add_column")
    run = await heldlock.run_hold(
        dsn, recipe, lockstep=True, hold=None, agents=2, release_after_retries=2
    )

    assert run.result is not None
    assert run.result.status is MigrationStatus.COMPLETED, run.result.reason
    assert run.result.lock_retries >= 2
    assert run.traffic.failures == [], _failures(run.traffic.failures)
    assert await harness.check_schema(dsn, recipe) == []


async def test_held_lock_past_the_retry_budget_rolls_back_and_names_the_blocker(dsn: str) -> None:
    recipe = recipes.get("add_column")
    run = await heldlock.run_hold(
        dsn, recipe, lockstep=True, hold=None, agents=2, lock_retry=RetryPolicy(max_attempts=2)
    )

    assert run.result is not None
    assert run.result.status is MigrationStatus.FAILED
    assert "SELECT count(*) FROM" in (run.result.reason or "")
    assert run.result.lock_retries >= 1
    assert run.traffic.failures == [], _failures(run.traffic.failures)
    assert await harness.check_schema(dsn, recipe) == ["users.email is missing"]


# ------------------------------------------------------------------ the benchmark's entry point
def test_bench_traffic_main_writes_its_section_and_exits_0(
    pg_server_dsn: str, tmp_path: Path
) -> None:
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n")
    argv = ["--dsn", pg_server_dsn, "--agents", "2", "--recipes", "drop_column"]
    argv += ["--baseline", "0", "--min-queries", "5", "--hold", "1", "--out", str(out)]

    assert traffic.main(argv) == 0

    text = out.read_text()
    assert text.startswith("# Benchmarks\n")
    assert "| Drop a column | completed | 0 |" in text
    assert "| plain ALTER TABLE | 1 | completed |" in text


def test_bench_traffic_rejects_an_unknown_recipe_before_starting_anything() -> None:
    with pytest.raises(SystemExit, match="unknown recipe 'nope'"):
        traffic.main(["--recipes", "nope", "--dsn", "postgresql://nowhere.invalid/x"])


def test_bench_traffic_exits_1_when_a_recipe_ends_with_the_wrong_schema(
    pg_server_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = recipes.get("add_column")
    wrong = dataclasses.replace(recipe, check=lambda conn: ["users.email is the wrong type"])
    monkeypatch.setitem(recipes.BY_KEY, "add_column", wrong)
    argv = ["--dsn", pg_server_dsn, "--agents", "1", "--recipes", "add_column", "--skip-hold"]
    argv += ["--skip-direct", "--baseline", "0", "--min-queries", "5", "--no-write"]

    assert traffic.main(argv) == 1
