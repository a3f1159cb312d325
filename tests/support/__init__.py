"""Everything the tests share, in one place: fixtures' helpers, fakes and oracles.

- `flow`: builders for the end-to-end tests (tables, migrations, agents, event recorders);
- `cli`: running the ``lockstep`` command in a subprocess;
- `scratchdb`: a fresh database per test or benchmark run;
- `system_harness`: the in-memory fleet and fake executor of the system property tests;
- `exploration`: the independent oracle and the exhaustive walk of the migration FSM.
"""

from pathlib import Path

#: The repository's root folder (docs/, pyproject.toml ...).
REPO_ROOT = Path(__file__).resolve().parents[2]
