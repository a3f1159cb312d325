"""Property tests of the state machines and of the running system (hypothesis).

Importing this package registers two hypothesis profiles:

- ``ci`` (the default here): a few seconds per test on a 2-core machine;
- ``thorough``: ten times the examples, longer walks, and a 4-agent exhaustive walk in
  `tests/properties/test_exhaustive.py` (minutes).

Select one with ``--hypothesis-profile=thorough``. hypothesis' pytest plugin reads that option
while pytest configures, so the profiles must be registered by then: that is the case when
the run names this folder (``pytest tests/properties ...``: pytest loads its conftest early);
for a whole-suite run, ``tests/conftest.py`` has to ``import properties`` (see
`docs/state-machine.md`).
"""

from __future__ import annotations

from hypothesis import HealthCheck, Phase, settings

# No "explain" phase: it reruns a failing example hundreds of times to list covered lines,
# which takes a minute and buries the counterexample.
FIND_AND_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink)
COMMON = {
    "deadline": None,  # trio runs on a shared machine: per-example wall time means nothing
    "suppress_health_check": [HealthCheck.too_slow],
    "print_blob": True,  # a failure prints its @reproduce_failure line
    "report_multiple_bugs": False,  # one minimal counterexample reads better than a group
    "phases": FIND_AND_SHRINK,
}

settings.register_profile("ci", max_examples=200, stateful_step_count=50, **COMMON)
settings.register_profile("thorough", max_examples=2000, stateful_step_count=100, **COMMON)

DEFAULT_PROFILE = "ci"
