"""SIGKILL a serving leader mid-APPLY: the standby finishes the migration, the app never fails.

The smallest case of the fault suite (`make fault`, tests/fault/test_failover.py runs every
point five times, with restarts, lock-session kills, racing replicas and a database
restart): real ``lockstep serve`` leader and standby, a real application process whose
agents run a query loop through ``agent.using``, SIGKILL while the coordinator waits for the
APPLY acks. See tests/support/failover.py for what is checked.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.failover import POINTS, run_fault

pytestmark = pytest.mark.slow


async def test_sigkill_of_the_leader_in_apply_is_finished_by_the_standby(
    dsn: str, tmp_path: Path
) -> None:
    # A 3 s lease: the standby's wait for its predecessor's leases is what it is for any
    # lease (1.1 x lease + 1 s + the probe's margin), only shorter than the default's.
    outcome = await run_fault(dsn, POINTS["apply-wait"], tmp_path, lease=3.0)
    print(outcome)
    assert outcome.ok, outcome.problems
    assert outcome.status == "completed" and outcome.schema == "contracted"
    assert outcome.queries_ok > 0 and outcome.queries_failed == 0
