"""Every interleaving for fleets of 1-3 agents: a breadth-first walk over the pure FSMs.

`tests.support.exploration.explore` tries, from every reachable world, every next step (an
agent reads a notice and its hook succeeds or raises, an answer arrives, an agent disconnects,
the deadline passes, the SQL commits or fails, the host cancels) and checks the invariants
after each one. The walks below are complete: they stop because no new world is reachable,
not because of the depth bound. Run with ``-s`` to see how many states each explored; with
``--hypothesis-profile=thorough`` a 4-agent walk is added (bounded in depth).
"""

from __future__ import annotations

import pytest

from statemachine.ledger import AckLedger
from statemachine.migration_fsm import MigrationMachine
from tests.support.exploration import ExplorationFailure, explore

DEPTH = 60  # far beyond the deepest state of 3 agents (~30 steps): the walks are complete


def _thorough() -> bool:
    from hypothesis import settings

    return settings.get_current_profile_name() == "thorough"


@pytest.mark.parametrize("policy", ["wait", "rollback"])
@pytest.mark.parametrize("contract", [False, True], ids=["no-contract", "contract"])
@pytest.mark.parametrize("agents", [1, 2, 3])
def test_every_interleaving_keeps_the_invariants(agents: int, contract: bool, policy: str) -> None:
    """Both answers to an agent's loss: wait for its lease (the default), or roll back."""
    report = explore(agents, depth=DEPTH, has_contract=contract, policy=policy)
    print(f"exhaustive: {report}")
    assert report.complete, f"the walk hit the depth bound: {report}"
    # Both outcomes are reachable, so the walk did explore the interesting part.
    assert report.outcomes.get("COMPLETED", 0) > 0 and report.outcomes.get("FAILED", 0) > 0


def test_four_agents_when_thorough() -> None:
    if not _thorough():
        pytest.skip("only with --hypothesis-profile=thorough (about half a minute)")
    report = explore(4, depth=16, has_contract=True)
    print(f"exhaustive: {report}")
    assert report.states > 10_000


# ------------------------------------------------ the walk finds broken guards
def test_a_guard_that_passes_on_one_ack_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mutation from issue 3: `cohort_complete` true as soon as one agent acked."""

    def one_ack_is_enough(self: MigrationMachine, event: object) -> bool:
        ledger = self.ledger
        return ledger is not None and ledger.phase is self.state.phase and bool(ledger.acked)

    monkeypatch.setattr(MigrationMachine, "cohort_complete", one_ack_is_enough)
    with pytest.raises(ExplorationFailure) as caught:
        explore(2, depth=DEPTH, has_contract=False)
    message = str(caught.value)
    print(message)
    assert message.startswith("I3 the ack deadline passes in ANNOUNCE did not roll back")
    assert "1. a1 reads its next notice" in message  # the trace that leads there


def test_a_ledger_that_completes_early_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(AckLedger, "complete", property(lambda self: len(self.acked) >= 1))
    with pytest.raises(ExplorationFailure, match=r"^I1 EXECUTE started before the whole"):
        explore(2, depth=DEPTH, has_contract=False)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match=r"n_agents must be 1\.\.26, got 0"):
        explore(0, depth=3, has_contract=False)
    with pytest.raises(ValueError, match="depth must be >= 0, got -1"):
        explore(1, depth=-1, has_contract=False)
