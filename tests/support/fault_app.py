"""An application process for the fault tests: agents, a query loop each, and a control pipe.

    python -m tests.support.fault_app --dsn DSN --url ws://A --url ws://B [--agents 2]
        [--migration NAME] [--hold on_apply] [--nack on_apply] [--id-prefix app]

It stands for a real app instance set: each agent is a `ThreadedAgent` (given `dsn=` so it
could boot without a coordinator) with one thread running the app's query in a loop, wrapped
in ``agent.using(NAME)``: ``SELECT id, email FROM users`` once the migration is applied,
``SELECT id, name FROM users`` before. A migration that adds ``email`` and whose CONTRACT
drops ``name`` breaks any query that runs on the wrong schema, so every failed query is a
fault the suite must see.

The process prints one JSON object per line on stdout (the test reads them):
``{"ev": "synced"}`` once every agent knows its query set, ``{"ev": "hold", "hook": H}`` when
the held hook is entered (it then waits for ``release``), ``{"ev": "report", ...}`` on request.
It reads commands from stdin, one per line: ``release`` (let the held hook return), ``report``
(print the counts and what each agent saw), ``quit``.

``--hold H`` holds hook H of the first agent the first time it runs; ``--nack H`` makes hook H
of the first agent raise the first time (the agent NACKs, the migration rolls back).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

import psycopg

from agent import AgentFenced, MigrationInfo, ThreadedAgent

HOOKS = ("on_announce", "on_apply", "on_confirm", "on_rollback")
NEW_QUERY = "SELECT id, email FROM users"
OLD_QUERY = "SELECT id, name FROM users"

_print_lock = threading.Lock()


def emit(event: str, **fields: Any) -> None:
    with _print_lock:
        sys.stdout.write(json.dumps({"ev": event, "t": time.time(), **fields}) + "\n")
        sys.stdout.flush()


class QueryLoop:
    """One app thread: the migration's query, new or old set as the agent says, over and over."""

    def __init__(self, agent: ThreadedAgent, dsn: str, migration: str) -> None:
        self.agent = agent
        self.dsn = dsn
        self.migration = migration
        self.ok = {"old": 0, "new": 0}
        self.refused = 0  # requests the agent refused to vouch for (fenced): 503s
        self.failed: list[str] = []
        #: Queries or connects that failed because the database itself was down (restarted).
        self.unreachable: list[str] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                # A generous statement timeout: a query may queue behind a migration's lock for
                # a while; that is a slow request, not a failed one.
                conn = psycopg.connect(
                    self.dsn, autocommit=True, options="-c statement_timeout=20000"
                )
            except psycopg.OperationalError as exc:
                self.unreachable.append(f"{time.time():.3f} connect: {exc}".strip())
                time.sleep(0.2)
                continue
            with conn:
                self._queries(conn)

    def _queries(self, conn: psycopg.Connection[Any]) -> None:
        while not self.stopping.is_set():
            try:
                with self.agent.using(self.migration) as new:
                    conn.execute(NEW_QUERY if new else OLD_QUERY).fetchall()
                    self.ok["new" if new else "old"] += 1
            except AgentFenced:
                self.refused += 1  # the app answers 503: no query ran
            except psycopg.Error as exc:
                line = f"{time.time():.3f} {type(exc).__name__}: {exc}".strip()
                if conn.broken:  # the database went away: not a wrong query, reconnect
                    self.unreachable.append(line)
                    return
                self.failed.append(line)
            time.sleep(0.002)


class App:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.release = threading.Event()
        self.calls: list[dict[str, Any]] = []
        self.agents: list[ThreadedAgent] = []
        self.loops: list[QueryLoop] = []
        self._fired: set[str] = set()

    def hook(self, index: int, name: str) -> Any:
        def run(info: MigrationInfo) -> None:
            self.calls.append(
                {"agent": index, "hook": name, "migration": info.name, "resynced": info.resynced}
            )
            if index != 0 or name in self._fired:
                return
            if name == self.args.hold:
                self._fired.add(name)
                emit("hold", hook=name)
                self.release.wait(120)
            elif name == self.args.nack:
                self._fired.add(name)
                emit("nack", hook=name)
                raise RuntimeError(f"the app refuses {name} (fault test)")

        return run

    def start(self) -> None:
        for i in range(self.args.agents):
            agent = ThreadedAgent(
                self.args.url,
                agent_id=f"{self.args.id_prefix}-{i}",
                dsn=self.args.dsn,
                connect_timeout=5,
                **{h: self.hook(i, h) for h in HOOKS},
            ).start()
            self.agents.append(agent)
        for agent in self.agents:
            loop = QueryLoop(agent, self.args.dsn, self.args.migration)
            loop.thread.start()
            self.loops.append(loop)
        threading.Thread(target=self._announce_synced, daemon=True).start()

    def _announce_synced(self) -> None:
        while not all(a.connected and a.synced for a in self.agents):
            time.sleep(0.02)
        emit("synced")

    def report(self) -> dict[str, Any]:
        agents = []
        for agent, loop in zip(self.agents, self.loops, strict=True):
            inner = agent.agent
            agents.append(
                {
                    "id": agent.agent_id,
                    "connected": agent.connected,
                    "applied": agent.is_applied(self.args.migration),
                    "sessions": 0 if inner is None else inner.sessions,
                    "epoch": 0 if inner is None else inner.epochs.highest,
                    "seen": [] if inner is None else [f"{m}:{p.name}" for m, p in inner.seen],
                    "ok": loop.ok,
                    "refused": loop.refused,
                    "failed": loop.failed[:20],
                    "failed_count": len(loop.failed),
                    "unreachable": len(loop.unreachable),
                }
            )
        return {"agents": agents, "calls": self.calls}

    def stop(self) -> None:
        for loop in self.loops:
            loop.stopping.set()
        for loop in self.loops:
            loop.thread.join(5)
        for agent in self.agents:
            agent.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fault_app")
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--url", action="append", required=True)
    parser.add_argument("--agents", type=int, default=2)
    parser.add_argument("--migration", default="001_add_email")
    parser.add_argument("--hold", choices=HOOKS)
    parser.add_argument("--nack", choices=HOOKS)
    parser.add_argument("--id-prefix", default="app", help="agent ids: PREFIX-0, PREFIX-1...")
    args = parser.parse_args(argv)
    app = App(args)
    app.start()
    try:
        for line in sys.stdin:
            command = line.strip()
            if command == "release":
                app.release.set()
            elif command == "report":
                emit("report", **app.report())
            elif command == "quit":
                break
    finally:
        app.release.set()
        app.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
