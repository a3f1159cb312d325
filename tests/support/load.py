"""A real app server under load while a migration drops a column its old query reads.

Shared by the framework load tests (tests/system/test_*_load.py). Each app (the
tests/support/*_app.py modules) serves ``GET /users``, choosing its query by migration
``add_email`` inside the agent's ``using``: the old query reads ``old_name`` (which CONTRACT
drops), the new one ``email`` (which EXECUTE adds); a query that fails is a 500 with the
error. `run_under_load` starts the server in its own process, waits until its agents joined a
real coordinator, drives client threads at it while the migration runs, stops the server with
SIGTERM and returns a `LoadRun`. Bounded: every client stops after a fixed number of
requests, the load stops when the migration ends, and every wait has a timeout.
"""

from __future__ import annotations

import collections
import dataclasses
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

import trio

from coordinator import open_coordinator
from statemachine import Migration, MigrationResult, MigrationStatus
from tests.support.flow import columns, make_users
from tests.support.processes import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLIENTS = 16
MAX_REQUESTS_PER_CLIENT = 20_000
MIGRATION = Migration(
    "add_email",
    "ALTER TABLE users ADD COLUMN email TEXT",
    contract_sql="ALTER TABLE users DROP COLUMN old_name",
)

#: What the apps share: the migration they pick by, their two queries, and the work a request
#: does between choosing its query set and querying (auth, validation...), the window in which
#: a schema change would break a request that chose the old set.
MIGRATION_NAME = MIGRATION.name
OLD_QUERY = "SELECT id, old_name FROM users ORDER BY id"
NEW_QUERY = "SELECT id, email FROM users ORDER BY id"
WORK_BEFORE_QUERY = 0.15


class Load:
    """Client threads requesting GET /users until told to stop; counts what came back."""

    def __init__(self, port: int, clients: int = CLIENTS) -> None:
        self.port = port
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

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


@dataclasses.dataclass
class LoadRun:
    """What one run measured; `summary` is the line the tests print and fail with."""

    framework: str
    server: str
    workers: int
    outcomes: collections.Counter[str]
    errors: list[str]
    result: MigrationResult
    migration_seconds: float
    stop_seconds: float
    returncode: int | None
    output: str
    #: The agent ids in the fleet when the migration started, and the server's (master's) pid.
    agents: list[str]
    server_pid: int

    @property
    def requests(self) -> int:
        return sum(self.outcomes.values())

    @property
    def failed(self) -> dict[str, int]:
        return {k: v for k, v in self.outcomes.items() if not k.startswith("200 ")}

    def summary(self) -> str:
        return (
            f"{self.framework} on {self.server} ({self.workers} workers): {self.requests} "
            f"requests from {CLIENTS} clients, {sum(self.failed.values())} failed; migration "
            f"{self.result.status.value} in {self.migration_seconds:.2f} s; server stopped in "
            f"{self.stop_seconds:.2f} s; agents: {self.agents}; outcomes: {dict(self.outcomes)}; "
            f"errors: {self.errors}"
        )

    def check(self, dsn: str) -> None:
        """Every request succeeded, on both query sets, and the column really went."""
        print(self.summary())
        assert self.result.status is MigrationStatus.COMPLETED, (self.result.reason, self.summary())
        assert self.failed == {}, self.summary()
        assert self.outcomes["200 new=False"] > 0, self.summary()
        assert self.outcomes["200 new=True"] > 0, self.summary()
        assert "old_name" not in columns(dsn) and "email" in columns(dsn)
        assert "Traceback" not in self.output, self.output

    def check_one_agent_per_worker(self) -> None:
        """As many agents as workers, none of them the master's (gunicorn: a preloaded app)."""
        assert len(self.agents) == self.workers, self.summary()
        assert not any(a.endswith(f"-{self.server_pid}") for a in self.agents), self.summary()


def _wait_listening(port: int, server: subprocess.Popen[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            output = server.stdout.read() if server.stdout else ""
            raise AssertionError(f"the server exited with {server.returncode}: {output}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/ready")
            if conn.getresponse().status == 200:
                return
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.1)
    raise AssertionError("the server did not answer GET /ready")


async def run_under_load(
    dsn: str,
    argv: Sequence[str],
    *,
    framework: str,
    server: str,
    workers: int,
    env: dict[str, str] | None = None,
) -> LoadRun:
    """Serve with `argv` (``{port}`` in it is replaced) and run `MIGRATION` under load.

    The server process gets the coordinator's URL as ``LOCKSTEP_TEST_URL`` and the database
    as ``LOCKSTEP_TEST_APP_DSN``; it must start `workers` agents.
    """
    make_users(dsn, "old_name TEXT")
    port = free_port()
    async with open_coordinator(dsn, ack_timeout=30) as coord:
        server_env = {
            **os.environ,
            **(env or {}),
            "LOCKSTEP_TEST_URL": coord.url,
            "LOCKSTEP_TEST_APP_DSN": dsn,
            "PYTHONUNBUFFERED": "1",
        }
        process = subprocess.Popen(
            [arg.replace("{port}", str(port)) for arg in argv],
            cwd=ROOT, env=server_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            await trio.to_thread.run_sync(_wait_listening, port, process, 60)
            await coord.wait_for_agents(workers, timeout=30)
            with Load(port) as load:
                await trio.sleep(1.0)  # traffic on the old query first
                agents = sorted(coord.agents)
                started = time.perf_counter()
                result = await coord.run_migration(MIGRATION)
                took = time.perf_counter() - started
                await trio.sleep(1.0)  # and on the new one after
            process.send_signal(signal.SIGTERM)
            stopping = time.perf_counter()
            await trio.to_thread.run_sync(process.wait, 30)
            stopped = time.perf_counter() - stopping
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    return LoadRun(
        framework=framework,
        server=server,
        workers=workers,
        outcomes=load.outcomes,
        errors=load.errors,
        result=result,
        migration_seconds=took,
        stop_seconds=stopped,
        returncode=process.returncode,
        output=process.stdout.read() if process.stdout else "",
        agents=agents,
        server_pid=process.pid,
    )


def gunicorn(app: str, *options: str) -> list[str]:
    """The command line of a gunicorn serving `app` on 127.0.0.1:{port}."""
    return [
        sys.executable, "-m", "gunicorn", app, "--bind", "127.0.0.1:{port}",
        "--log-level", "warning", "--graceful-timeout", "10", *options,
    ]  # fmt: skip
