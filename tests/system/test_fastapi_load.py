"""A real uvicorn serving a FastAPI app under load while a migration drops a column it used.

The app (`tests/support/fastapi_app.py`) embeds the asyncio agent and wraps each request in
``agent.using("add_email")``; client threads hit it without pause while the coordinator runs
EXECUTE (add ``email``), APPLY (switch queries) and CONTRACT (drop ``old_name``). Every
request must succeed: the agent acks APPLY only once no request on the old query is running,
so CONTRACT never drops ``old_name`` under one. Bounded: the load stops when the migration
ends, and each client stops after a fixed number of requests anyway.
"""

from __future__ import annotations

import collections
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import trio

from coordinator import open_coordinator
from statemachine import Migration, MigrationStatus
from tests.support.flow import columns, make_users

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLIENTS = 16
MAX_REQUESTS_PER_CLIENT = 20_000

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Load:
    """Client threads requesting GET /users until told to stop; counts what came back."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]

    def _client(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        for _ in range(MAX_REQUESTS_PER_CLIENT):
            if self.stop.is_set():
                break
            try:
                conn.request("GET", "/users")
                response = conn.getresponse()
                body = json.loads(response.read())
                outcome = f"{response.status} new={body.get('new')}"
                error = body.get("error")
            except (OSError, http.client.HTTPException, ValueError) as exc:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                outcome, error = "transport error", repr(exc)
            with self.lock:
                self.outcomes[outcome] += 1
                if error is not None and len(self.errors) < 5:
                    self.errors.append(error)
        conn.close()

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(15)


def _wait_ready(port: int, server: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"uvicorn exited: {server.stdout.read() if server.stdout else ''}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/ready")
            if json.loads(conn.getresponse().read()).get("connected"):
                return
        except (OSError, http.client.HTTPException, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError("the app did not become ready")


async def test_fastapi_under_load_while_contract_drops_a_column(dsn: str) -> None:
    make_users(dsn, "old_name TEXT")
    port = _free_port()
    async with open_coordinator(dsn, ack_timeout=30) as coord:
        env = {
            **os.environ,
            "LOCKSTEP_TEST_URL": coord.url,
            "LOCKSTEP_TEST_APP_DSN": dsn,
            "LOCKSTEP_TEST_AGENT_ID": "fastapi-1",
        }
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "tests.support.fastapi_app:app",
             "--port", str(port), "--log-level", "warning"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            await trio.to_thread.run_sync(_wait_ready, port, server)
            await coord.wait_for_agents(1, timeout=10)
            with Load(port) as load:
                await trio.sleep(1.0)  # traffic on the old query first
                started = time.perf_counter()
                result = await coord.run_migration(
                    Migration(
                        "add_email",
                        "ALTER TABLE users ADD COLUMN email TEXT",
                        contract_sql="ALTER TABLE users DROP COLUMN old_name",
                    )
                )
                took = time.perf_counter() - started
                await trio.sleep(1.0)  # and on the new one after
            server.send_signal(signal.SIGTERM)
            stopping = time.perf_counter()
            await trio.to_thread.run_sync(server.wait, 30)
            stopped = time.perf_counter() - stopping
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
    total = sum(load.outcomes.values())
    print(
        f"{total} requests from {CLIENTS} clients; migration took {took:.2f} s; "
        f"uvicorn stopped in {stopped:.2f} s; outcomes: {dict(load.outcomes)}"
    )
    assert result.status is MigrationStatus.COMPLETED, result.reason
    failed = {k: v for k, v in load.outcomes.items() if not k.startswith("200 ")}
    assert failed == {}, (failed, load.errors)
    assert load.outcomes["200 new=False"] > 0 and load.outcomes["200 new=True"] > 0
    assert "old_name" not in columns(dsn) and "email" in columns(dsn)
    # uvicorn shuts down gracefully on SIGTERM, then exits by the signal it handled.
    assert server.returncode in (0, -signal.SIGTERM)
    output = server.stdout.read() if server.stdout else ""
    assert "Traceback" not in output, output
