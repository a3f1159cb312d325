"""Two real `lockstep serve` processes, one relaying: the relayed agents are the leader's.

Agents given only the relay's URL take part in the migration like the leader's own: it
completes with every agent switched. A relayed agent's NACK (in-process in
tests/coordinator/test_relay.py) and the SIGKILL cases are in tests/fault/test_relay_faults.py
(`make fault`); see tests/support/relay_faults.py for what is checked.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.relay_faults import CASES, run_relay_case

pytestmark = pytest.mark.slow


async def test_a_migration_through_a_relay(dsn: str, tmp_path: Path) -> None:
    case = "complete"
    outcome = await run_relay_case(dsn, CASES[case], tmp_path)
    print(outcome)
    for name, text in outcome.logs.items():
        print(f"--- {name}\n{text}")
    assert outcome.ok, outcome.problems
    assert outcome.status == CASES[case].expect
    assert outcome.queries_ok > 0 and outcome.queries_failed == 0
