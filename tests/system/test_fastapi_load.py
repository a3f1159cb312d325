"""A real uvicorn serving a FastAPI app under load while a migration drops a column it used.

The app (`tests/support/fastapi_app.py`) embeds the asyncio agent with `lockstep_lifespan`
and wraps each request in ``agent.using("add_email")``; client threads hit it without pause
while the coordinator runs EXECUTE (add ``email``), APPLY (switch queries) and CONTRACT (drop
``old_name``). Every request must succeed: the agent acks APPLY only once no request on the
old query is running, so CONTRACT never drops ``old_name`` under one.
"""

from __future__ import annotations

import signal
import sys

import pytest
import trio

from tests.support.load import run_under_load

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

pytestmark = pytest.mark.slow


async def test_fastapi_under_load_while_contract_drops_a_column(dsn: str) -> None:
    with trio.fail_after(90):
        run = await run_under_load(
            dsn,
            [sys.executable, "-m", "uvicorn", "tests.support.fastapi_app:app",
             "--port", "{port}", "--log-level", "warning"],
            framework="FastAPI", server="uvicorn", workers=1,
        )  # fmt: skip
    run.check(dsn)
    # uvicorn shuts down gracefully on SIGTERM, then exits by the signal it handled.
    assert run.returncode in (0, -signal.SIGTERM), run.summary()
