"""The backfill pacing rule, without a database: batch time and signals in, next size out."""

from __future__ import annotations

import pytest

from statemachine import Backfill, InvalidMigration, Migration
from statemachine.backfill_pacing import (
    COMMIT_MARGIN,
    MAX_GROWTH,
    MAX_LAG_SLEEP,
    MAX_REST,
    BatchSignals,
    PacingPolicy,
    commit_slowdown,
    next_pace,
)
from statemachine.sql.files import MigrationFileError, parse_migration_text

POLICY = PacingPolicy(start=1000, target=0.05, min_batch=100, max_batch=50_000, max_lag=1.0)
QUIET = BatchSignals()


def test_a_fast_batch_grows_at_most_twofold() -> None:
    # 1,000 rows in 5 ms would fit 10,000 in the target: grow, but only by MAX_GROWTH.
    pace = next_pace(POLICY, 1000, 0.005, QUIET)
    assert pace.size == 1000 * MAX_GROWTH
    assert pace.sleep == 0 and pace.why == "fast"


def test_a_batch_just_under_the_target_grows_to_fit_it() -> None:
    assert next_pace(POLICY, 1000, 0.04, QUIET).size == 1250


def test_a_slow_batch_shrinks_at_once_to_what_fits_the_target() -> None:
    pace = next_pace(POLICY, 10_000, 0.5, QUIET)  # ten times the target
    assert pace.size == 1000
    assert pace.why == "slow"


def test_sizes_stay_between_min_and_max() -> None:
    assert next_pace(POLICY, 200, 10.0, QUIET).size == 100
    assert next_pace(POLICY, 40_000, 0.001, QUIET).size == 50_000


def test_blocking_the_application_halves_the_target_and_never_grows() -> None:
    blocked = BatchSignals(blocked_sessions=2)
    fast = next_pace(POLICY, 1000, 0.005, blocked)
    assert fast.size == 1000  # would have doubled without the blocked sessions
    assert fast.why == "blocking the application"
    # 50 ms was on target; with someone waiting on our locks, aim at 25 ms.
    assert next_pace(POLICY, 1000, 0.05, blocked).size == 500


def test_replication_lag_halves_and_sleeps_for_the_excess() -> None:
    pace = next_pace(POLICY, 4000, 0.01, BatchSignals(replication_lag=1.5))
    assert pace.size == 2000
    assert pace.sleep == pytest.approx(0.5)
    assert "replication lag 1.5 s" in pace.why
    assert next_pace(POLICY, 4000, 0.01, BatchSignals(replication_lag=60)).sleep == MAX_LAG_SLEEP


def test_lag_within_the_limit_and_no_standby_change_nothing() -> None:
    for signals in (BatchSignals(replication_lag=0.9), BatchSignals(replication_lag=None)):
        assert next_pace(POLICY, 1000, 0.005, signals) == next_pace(POLICY, 1000, 0.005, QUIET)


WATCHED = PacingPolicy(start=1000, commit_baseline=0.002)  # limit: 2x, i.e. 4 ms


def test_slow_commits_rest_in_proportion_and_stop_growth() -> None:
    pace = next_pace(WATCHED, 1000, 0.01, BatchSignals(commit_seconds=0.008))  # 2x the limit
    assert pace.size == 1000  # would have doubled
    assert pace.sleep == pytest.approx(0.02)  # the batch's time, times 2
    assert pace.why == "commits 2.0x over their limit"
    worst = next_pace(WATCHED, 1000, 0.01, BatchSignals(commit_seconds=1.0))
    assert worst.sleep == pytest.approx(0.01 * MAX_REST)


def test_commits_within_the_limit_or_unwatched_change_nothing() -> None:
    fast = next_pace(WATCHED, 1000, 0.01, QUIET)
    for signals in (BatchSignals(commit_seconds=0.004), BatchSignals(commit_seconds=None)):
        assert next_pace(WATCHED, 1000, 0.01, signals) == fast
    unwatched = next_pace(POLICY, 1000, 0.01, BatchSignals(commit_seconds=10.0))
    assert unwatched == next_pace(POLICY, 1000, 0.01, QUIET)


def test_the_commit_limit_has_an_absolute_margin_for_fast_disks() -> None:
    fast_disk = PacingPolicy(start=1000, commit_baseline=0.0001)
    # 3x a 0.1 ms baseline is within the 1 ms margin: no rest.
    assert commit_slowdown(fast_disk, BatchSignals(commit_seconds=0.0003)) < 1
    over = commit_slowdown(fast_disk, BatchSignals(commit_seconds=2 * (0.0001 + COMMIT_MARGIN)))
    assert over == pytest.approx(2.0)


def test_a_zero_time_batch_does_not_divide_by_zero() -> None:
    assert next_pace(POLICY, 1000, 0.0, QUIET).size == 2000


def test_fixed_pacing_keeps_the_batch_size_whatever_it_sees() -> None:
    fixed = PacingPolicy.of(Backfill("t", "x = 1", batch_size=700, pacing="fixed"))
    for elapsed, signals in ((0.001, QUIET), (9.0, BatchSignals(3, 30.0))):
        pace = next_pace(fixed, 700, elapsed, signals)
        assert (pace.size, pace.sleep) == (700, 0.0)


def test_policy_defaults_follow_batch_size() -> None:
    small = PacingPolicy.of(Backfill("t", "x = 1", batch_size=10))
    assert (small.start, small.min_batch, small.max_batch, small.adaptive) == (10, 10, 50_000, True)
    big = PacingPolicy.of(Backfill("t", "x = 1", batch_size=80_000))
    assert (big.min_batch, big.max_batch, big.target) == (100, 80_000, 0.05)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"pacing": "fast"}, "pacing must be one of adaptive, fixed"),
        ({"target_seconds": 0}, "target_seconds must be > 0"),
        ({"min_batch": 2000}, r"min_batch must be between 1 and batch_size \(1000\)"),
        ({"min_batch": 0}, "min_batch must be between"),
        ({"max_batch": 999}, r"max_batch must be >= batch_size \(1000\)"),
        ({"max_lag": -1}, "max_lag must be > 0"),
    ],
)
def test_bad_options_are_refused_clearly(options: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidMigration, match=message):
        Backfill("t", "x = 1", **options)  # type: ignore[arg-type]


def test_stored_specs_round_trip_the_options_and_old_ones_get_the_defaults() -> None:
    tuned = Backfill("t", "x = 1", pacing="fixed", target_seconds=0.1, min_batch=5, max_lag=2)
    m = Migration("m", ["SELECT 1"], backfills=[tuned])
    assert Migration.from_json(m.to_json()).backfills == (tuned,)
    old = m.to_json()
    old["backfills"] = [{"table": "t", "set": "x = 1", "batch_size": 10}]
    (loaded,) = Migration.from_json(old).backfills
    assert (loaded.pacing, loaded.target_seconds, loaded.smallest_batch) == ("adaptive", 0.05, 10)


def test_a_migration_file_sets_the_pacing_options() -> None:
    text = (
        "SELECT 1;\n-- lockstep:backfill\n"
        "table=t set=x=1 pacing=fixed target_seconds=0.2 min_batch=10 max_batch=5000 max_lag=3\n"
    )
    (b,) = parse_migration_text(text, default_name="m").backfills
    assert (b.pacing, b.target_seconds, b.min_batch, b.max_batch, b.max_lag) == (
        "fixed",
        0.2,
        10,
        5000,
        3.0,
    )
    with pytest.raises(MigrationFileError, match="min_batch must be an integer, got 'few'"):
        parse_migration_text(text.replace("min_batch=10", "min_batch=few"), default_name="m")
    with pytest.raises(MigrationFileError, match="pacing must be one of"):
        parse_migration_text(text.replace("pacing=fixed", "pacing=quick"), default_name="m")
