"""Recall and false alarms of lint on the labelled corpus (tests/statemachine/sql/corpus.py).

The default profile must catch at least 95% of the hazards and raise no finding at all on a
safe migration (style cases count as safe there); the strict profile adds the style hazards.
The figures are printed (``pytest -s``) so a change in coverage is visible in the log.
"""

from __future__ import annotations

import dataclasses

import pytest

from statemachine.sql import lint_migration
from statemachine.sql.rules import Profile
from tests.statemachine.sql.corpus import CASES, Case


@dataclasses.dataclass
class Score:
    hazards: int = 0
    caught: int = 0
    safe: int = 0
    false_alarms: int = 0
    missed: list[str] = dataclasses.field(default_factory=list)
    alarms: list[str] = dataclasses.field(default_factory=list)

    @property
    def recall(self) -> float:
        return self.caught / self.hazards

    @property
    def false_positive_rate(self) -> float:
        return self.false_alarms / self.safe


def score(profile: Profile, cases: tuple[Case, ...] = CASES) -> Score:
    result = Score()
    for case in cases:
        findings = lint_migration(case.migration(), profile=profile)
        section = "sql" if case.phase == "sql" else "contract_sql"
        is_hazard = case.hazard is not None and (profile == "strict" or not case.style)
        if is_hazard:
            result.hazards += 1
            if any(f.rule == case.hazard and f.section == section for f in findings):
                result.caught += 1
            else:
                result.missed.append(f"{case.id}: {[f.rule for f in findings]}")
        else:
            result.safe += 1
            if findings:
                result.false_alarms += 1
                result.alarms.append(f"{case.id}: {[str(f) for f in findings]}")
    return result


def test_corpus_is_large_and_labelled() -> None:
    assert len(CASES) >= 100
    assert len({c.id for c in CASES}) == len(CASES)
    assert sum(c.hazard is None for c in CASES) >= 30
    for case in CASES:
        assert case.phase in ("sql", "contract") and case.source


@pytest.mark.parametrize("profile", ["default", "strict"])
def test_recall_and_false_alarms(profile: Profile) -> None:
    result = score(profile)
    print(
        f"\ncorpus [{profile}]: {len(CASES)} cases, {result.hazards} hazards, {result.safe} safe;"
        f" recall {result.recall:.1%} ({result.caught}/{result.hazards}),"
        f" false-positive rate {result.false_positive_rate:.1%}"
        f" ({result.false_alarms}/{result.safe})"
    )
    assert result.false_alarms == 0, "\n".join(result.alarms)
    assert result.recall >= 0.95, "\n".join(result.missed)
