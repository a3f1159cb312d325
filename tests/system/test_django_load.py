"""A Django project served by gunicorn under load while a migration drops a column it used,
and Django's management commands, which must start no agent.

The project (`tests/support/django_app/`) installs `agent.integrations.django.LockstepConfig`
and its middleware and picks a model per request with ``choose``; nothing else is glue. Two
gunicorn gthread workers each start their own agent in ``ready()``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import pytest
import trio

from tests.support.load import ROOT, gunicorn, run_under_load

pytest.importorskip("django")
pytest.importorskip("gunicorn")

pytestmark = pytest.mark.slow

SETTINGS = "tests.support.django_app.settings"


@pytest.mark.parametrize(
    "preload",
    [
        pytest.param([], id="ready-in-each-worker"),
        # ready() runs in the master: the hooks stop its agent and start one per worker.
        pytest.param(["--preload", "--config", "python:tests.support.gunicorn_conf"], id="preload"),
    ],
)
async def test_django_on_gunicorn_under_load_while_contract_drops_a_column(
    dsn: str, preload: list[str]
) -> None:
    argv = gunicorn(
        "tests.support.django_app.wsgi:application",
        "--workers", "2", "--worker-class", "gthread", "--threads", "8", *preload,
    )  # fmt: skip
    server = "gunicorn gthread (8 threads)" + (", --preload" if preload else "")
    with trio.fail_after(90):
        run = await run_under_load(dsn, argv, framework="Django", server=server, workers=2)
    run.check(dsn)
    run.check_one_agent_per_worker()
    assert run.returncode == 0, run.summary()


class Listener:
    """A TCP port that accepts and never answers: counts who dials the "coordinator"."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while not self.done.is_set():
            try:
                self.accepted.append(self.sock.accept()[0])
            except TimeoutError:
                continue

    def __enter__(self) -> Listener:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(5)
        for conn in self.accepted:
            conn.close()
        self.sock.close()


def _django(*args: str, url: str, commands: str = "") -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "LOCKSTEP_TEST_URL": url,
        "LOCKSTEP_TEST_COMMANDS": commands,
        "LOCKSTEP_TEST_JOIN_GRACE": "0.5",  # the listener never answers: do not wait 5 s
        "DJANGO_SETTINGS_MODULE": SETTINGS,
    }
    env.pop("LOCKSTEP_TEST_APP_DSN", None)
    return subprocess.run(
        [sys.executable, "-m", "django", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_manage_check_runs_with_the_coordinator_down_and_starts_no_agent() -> None:
    down = _django("check", url="ws://127.0.0.1:1")  # nothing listens on port 1
    assert down.returncode == 0, down.stdout + down.stderr
    assert "System check identified no issues" in down.stdout
    assert "lockstep" not in down.stderr, down.stderr  # no agent, so no "cannot reach" warning
    with Listener() as coordinator:
        listening = _django("check", url=f"ws://127.0.0.1:{coordinator.port}")
    assert listening.returncode == 0, listening.stdout + listening.stderr
    assert coordinator.accepted == [], "manage.py check dialled the coordinator"


def test_a_command_listed_in_settings_starts_the_agent() -> None:
    # The control of the test above: the same listener sees an agent when one is asked for.
    with Listener() as coordinator:
        listed = _django("check", url=f"ws://127.0.0.1:{coordinator.port}", commands="check")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert len(coordinator.accepted) >= 1, listed.stderr
