"""A Flask app served by gunicorn under load while a migration drops a column it used.

The app (`tests/support/flask_app.py`) uses the `Lockstep` extension; gunicorn preloads it in
the master and the hooks of `agent.integrations.gunicorn` (tests/support/gunicorn_conf.py,
one import line) start one agent per worker after the fork, under the worker's own id.
"""

from __future__ import annotations

import pytest
import trio

from tests.support.load import gunicorn, run_under_load

pytest.importorskip("flask")
pytest.importorskip("gunicorn")

pytestmark = pytest.mark.slow


ARGV = gunicorn(
    "tests.support.flask_app:app",
    "--preload",
    "--config", "python:tests.support.gunicorn_conf",
    "--workers", "2",
    "--worker-class", "gthread",
    "--threads", "8",
)  # fmt: skip


async def test_flask_on_gunicorn_under_load_while_contract_drops_a_column(dsn: str) -> None:
    with trio.fail_after(90):
        run = await run_under_load(
            dsn,
            ARGV,
            framework="Flask",
            server="gunicorn gthread (8 threads), --preload",
            workers=2,
        )
    run.check(dsn)
    run.check_one_agent_per_worker()
    assert run.returncode == 0, run.summary()
