"""AckLedger: who of a phase's cohort answered, and what each kind of answer does.

The migration FSM's guards read only `complete`, `failed` and `settled`, so these outcomes are
what decide when a phase may end; every refusal must leave the counts untouched.
"""

from __future__ import annotations

import pytest

from statemachine import AckLedger, AckOutcome, Phase


def _ledger(*cohort: str, phase: Phase = Phase.ANNOUNCE) -> AckLedger:
    return AckLedger(phase, cohort)


def test_recorded_ack_counts_once_and_completes_the_cohort() -> None:
    ledger = _ledger("a", "b")
    assert ledger.record_ack("a", Phase.ANNOUNCE) is AckOutcome.RECORDED
    assert not ledger.complete
    assert not ledger.settled
    assert ledger.missing() == ["b"]
    assert ledger.record_ack("b", Phase.ANNOUNCE) is AckOutcome.RECORDED
    assert ledger.complete
    assert ledger.settled
    assert not ledger.failed
    assert ledger.acked == frozenset({"a", "b"})
    assert ledger.missing() == []


@pytest.mark.parametrize("first", ["ack", "nack", "lost"])
@pytest.mark.parametrize("second", ["ack", "nack", "lost"])
def test_a_second_answer_of_any_kind_is_a_duplicate(first: str, second: str) -> None:
    ledger = _ledger("a", "b")
    answers = {
        "ack": lambda: ledger.record_ack("a", Phase.ANNOUNCE),
        "nack": lambda: ledger.record_nack("a", Phase.ANNOUNCE, "boom"),
        "lost": lambda: ledger.record_lost("a"),
    }
    assert answers[first]() is AckOutcome.RECORDED
    before = (ledger.acked, ledger.nacks, ledger.lost)
    assert answers[second]() is AckOutcome.DUPLICATE
    assert (ledger.acked, ledger.nacks, ledger.lost) == before


def test_an_answer_for_another_phase_is_stale() -> None:
    ledger = _ledger("a", phase=Phase.APPLY)
    assert ledger.record_ack("a", Phase.ANNOUNCE) is AckOutcome.STALE
    assert ledger.record_nack("a", Phase.CONFIRM, "late") is AckOutcome.STALE
    assert ledger.acked == frozenset()
    assert ledger.nacks == {}
    assert ledger.missing() == ["a"]


def test_an_agent_outside_the_cohort_is_a_stranger() -> None:
    ledger = _ledger("a")
    assert ledger.record_ack("z", Phase.ANNOUNCE) is AckOutcome.STRANGER
    assert ledger.record_nack("z", Phase.ANNOUNCE, "no") is AckOutcome.STRANGER
    assert ledger.record_lost("z") is AckOutcome.STRANGER
    assert not ledger.complete
    assert not ledger.failed


def test_a_closed_ledger_refuses_everything() -> None:
    ledger = _ledger("a", "b")
    ledger.closed = True
    assert ledger.record_ack("a", Phase.ANNOUNCE) is AckOutcome.CLOSED
    assert ledger.record_nack("b", Phase.ANNOUNCE, "x") is AckOutcome.CLOSED
    assert ledger.record_lost("b") is AckOutcome.CLOSED
    # CLOSED wins over the other refusals: once a phase is over nothing is judged any more.
    assert ledger.record_ack("z", Phase.CONFIRM) is AckOutcome.CLOSED
    assert ledger.acked == frozenset()


def test_nack_fails_and_settles_but_never_completes() -> None:
    ledger = _ledger("a", "b")
    ledger.record_ack("a", Phase.ANNOUNCE)
    assert ledger.record_nack("b", Phase.ANNOUNCE, "RuntimeError: nope") is AckOutcome.RECORDED
    assert ledger.failed
    assert ledger.settled
    assert not ledger.complete
    assert ledger.nacks == {"b": "RuntimeError: nope"}
    assert ledger.missing() == []


def test_lost_agent_fails_the_phase_and_is_not_missing() -> None:
    ledger = _ledger("a", "b", "c")
    assert ledger.record_lost("b") is AckOutcome.RECORDED
    assert ledger.failed
    assert not ledger.settled
    assert ledger.lost == frozenset({"b"})
    assert ledger.missing() == ["a", "c"]


def test_empty_cohort_is_vacuously_complete_and_settled() -> None:
    ledger = _ledger()
    assert ledger.complete
    assert ledger.settled
    assert not ledger.failed
    assert ledger.missing() == []


def test_missing_is_sorted_for_stable_messages() -> None:
    ledger = _ledger("zeta", "alpha", "mid")
    assert ledger.missing() == ["alpha", "mid", "zeta"]


def test_views_are_copies_that_cannot_change_the_ledger() -> None:
    ledger = _ledger("a")
    ledger.record_nack("a", Phase.ANNOUNCE, "x")
    ledger.nacks.clear()
    assert ledger.nacks == {"a": "x"}
    assert ledger.cohort == frozenset({"a"})
