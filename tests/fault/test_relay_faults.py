"""`make fault`: a relaying replica or the leader is SIGKILLed while a relayed agent holds APPLY.

Real ``lockstep serve`` processes (a leader and a ``--relay`` replica), two application
processes with a query loop per agent, real PostgreSQL (tests/support/relay_faults.py):

- the relay dies: its agents (given the relay's URL, then the leader's) reconnect to the
  leader, which sends them APPLY again; the migration completes, no query fails;
- the relay dies and its agents know no other URL: they fence themselves when their lease
  runs out (requests refused, no query fails); the leader waits their leases out, then
  finishes the migration;
- a relayed agent NACKs APPLY: the migration rolls back, the schema is the original;
- the leader dies: the relay takes the lead (its agents are sent on and come back to it as
  the leader), waits out the dead leader's leases and finishes the migration exactly once.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.failover import Outcome
from tests.support.relay_faults import CASES, run_relay_case

pytestmark = pytest.mark.fault


@pytest.mark.parametrize(
    "case", ["relay-sigkill-apply", "leader-sigkill-apply", "relay-sigkill-stranded"]
)
@pytest.mark.parametrize("run", range(2))
async def test_a_replica_dies_mid_apply(dsn: str, tmp_path: Path, case: str, run: int) -> None:
    outcome = await _run(dsn, case, tmp_path)
    assert outcome.status == "completed" and outcome.schema == "contracted"


async def test_a_relayed_agents_nack_rolls_back_across_processes(dsn: str, tmp_path: Path) -> None:
    outcome = await _run(dsn, "relayed-nack", tmp_path)
    assert outcome.status == "failed" and outcome.schema == "original"


async def _run(dsn: str, case: str, tmp_path: Path) -> Outcome:
    outcome = await run_relay_case(dsn, CASES[case], tmp_path)
    print(outcome)
    for name, text in outcome.logs.items():
        print(f"--- {name}\n{text}")
    assert outcome.ok, outcome.problems
    assert outcome.queries_ok > 0 and outcome.queries_failed == 0
    return outcome
