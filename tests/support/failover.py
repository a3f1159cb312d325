"""Kill a serving leader at a chosen point of a migration and see what the fleet lives through.

One run (`run_fault`): two `lockstep serve` processes on one database (a leader and a standby;
or, in "restart" mode, one leader restarted on the same port after the kill), an application
process (`tests.support.fault_app`) whose agents know both URLs and run a query loop with
``agent.using``, one migration submitted with ``lockstep submit``. When the migration reaches
the point (a hook held open by the app, or a statement seen running in ``pg_stat_activity``),
the leader gets SIGKILL. Then the run measures how long until another coordinator leads, until
the migration ends and until every agent is back on the new leader, and checks what a user
cares about: the final status matches the schema, every agent uses the query set that matches
the schema, no application query failed, no process printed a traceback.

Everything is real: processes, signals, loopback sockets, PostgreSQL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import psycopg
import trio

from coordinator.snapshot import read_snapshot
from tests.support.flow import columns, history, make_users
from tests.support.pgrestart import restart_postgres
from tests.support.processes import free_port, leading, listening, lockstep_process, reap, serve

MIGRATION = "001_add_email"
#: A statement that runs long enough to be caught mid-way, and is harmless to run twice.
SLEEP = "SELECT pg_sleep(2);"
FINAL = ("completed", "failed")
#: Bounds of one run: a run that has not ended by then is a failure, never a hang.
STEP_TIMEOUT = 60.0


@dataclasses.dataclass(frozen=True)
class Point:
    """Where in a migration the leader is killed, and what must come out of it."""

    name: str
    hold: str | None = None  # the app holds this hook open (the coordinator waits for acks)
    nack: str | None = None  # the app NACKs this hook first (so the migration rolls back)
    sleep_in: str | None = None  # the section whose statement is running at the kill
    expect: str = "completed"

    def migration_text(self) -> str:
        sql = ["ALTER TABLE users ADD COLUMN email text;"]
        contract = ["ALTER TABLE users DROP COLUMN name;"]
        rollback = ["ALTER TABLE users DROP COLUMN IF EXISTS email;"]
        if self.sleep_in == "sql":
            sql.append(SLEEP)  # after the ALTER: its ACCESS EXCLUSIVE lock is held meanwhile
        elif self.sleep_in == "contract":
            contract.insert(0, SLEEP)
        elif self.sleep_in == "rollback":
            rollback.insert(0, SLEEP)
        sections = ("sql", sql), ("contract", contract), ("rollback", rollback)
        return "".join(
            f"-- lockstep:{name}\n" + "\n".join(lines) + "\n" for name, lines in sections
        )


#: The seven points of issue "lockstep serve" item 4, in migration order.
POINTS: dict[str, Point] = {
    p.name: p
    for p in (
        Point("announce-wait", hold="on_announce"),
        Point("execute-statement", sleep_in="sql"),
        Point("apply-wait", hold="on_apply"),
        Point("contract-statement", sleep_in="contract"),
        Point("confirm", hold="on_confirm"),
        Point("rollback-wait", nack="on_apply", hold="on_rollback", expect="failed"),
        Point("rollback-statement", nack="on_apply", sleep_in="rollback", expect="failed"),
    )
}


@dataclasses.dataclass
class Outcome:
    point: str
    mode: str
    status: str | None = None
    schema: str = ""
    problems: list[str] = dataclasses.field(default_factory=list)
    #: Seconds from the SIGKILL until another coordinator held the leader lock.
    takeover: float | None = None
    #: Seconds from the SIGKILL until the migration's final status was written.
    finished: float | None = None
    #: Seconds from the fault until the struck leader (alive) said it lost the leadership.
    deposed: float | None = None
    #: Seconds from the SIGKILL until every agent had a session with the new leader.
    agents_back: float | None = None
    queries_ok: int = 0
    queries_failed: int = 0
    #: Queries the app could not send because the database itself was down (restart case).
    unreachable: int = 0
    reconnects: int = 0
    #: Requests the agents refused because they were fenced (the app's 503s; no query ran).
    refused: int = 0
    saw: str = ""
    #: The processes' output, kept for a run that went wrong (the test prints it).
    logs: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return not self.problems


class AppProcess:
    """`tests.support.fault_app` in a child process: JSON events out, commands in."""

    def __init__(self, dsn: str, urls: Iterable[str], log: IO[str], *options: str) -> None:
        command = [sys.executable, "-m", "tests.support.fault_app", "--dsn", dsn]
        for url in urls:
            command += ["--url", url]
        self.proc = subprocess.Popen(
            [*command, *options],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**os.environ, "NO_COLOR": "1"},
        )
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            with contextlib.suppress(json.JSONDecodeError):  # not ours: see `lines`
                self.events.put(json.loads(line))

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    async def wait_for(self, event: str, timeout: float = STEP_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout

        def next_matching() -> dict[str, Any]:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"the app process never said {event!r}")
                try:
                    got = self.events.get(timeout=min(left, 0.5))
                except queue.Empty:
                    if self.proc.poll() is not None:
                        code = self.proc.returncode
                        raise RuntimeError(f"the app process exited ({code})") from None
                    continue
                if got["ev"] == event:
                    return got

        return await trio.to_thread.run_sync(next_matching, abandon_on_cancel=True)

    async def report(self) -> dict[str, Any]:
        self.send("report")
        return await self.wait_for("report", timeout=10)

    async def quit(self) -> None:
        if self.proc.poll() is None:
            self.send("quit")
            try:
                await trio.to_thread.run_sync(self.proc.wait, 15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


async def statement_running(dsn: str, text: str, timeout: float = STEP_TIMEOUT) -> None:
    """Wait until another session of this database runs a statement containing `text`."""

    def look() -> bool:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state = 'active' AND pid <> pg_backend_pid() AND query LIKE %s",
                (f"%{text}%",),
            ).fetchone()
            return bool(row and row[0])

    with trio.fail_after(timeout):
        while not await trio.to_thread.run_sync(look):
            await trio.sleep(0.02)


async def leader_epoch(dsn: str) -> int:
    snap = await read_snapshot(dsn, limit=1)
    return 0 if snap.leader is None or not snap.leader.alive else snap.leader.epoch


async def new_leader(dsn: str, above: int, timeout: float = STEP_TIMEOUT) -> int:
    """Wait until a coordinator holds the leader lock with an epoch above `above`."""
    with trio.fail_after(timeout):
        while (epoch := await leader_epoch(dsn)) <= above:
            await trio.sleep(0.02)
    return epoch


async def final_status(dsn: str, timeout: float = STEP_TIMEOUT) -> str:
    with trio.fail_after(timeout):
        while True:
            rows = await trio.to_thread.run_sync(history, dsn)
            if rows and rows[-1]["status"] in FINAL:
                return str(rows[-1]["status"])
            await trio.sleep(0.05)


async def agents_on(app: AppProcess, epoch: int, timeout: float = STEP_TIMEOUT) -> dict[str, Any]:
    """Wait until every agent is connected to the leader of `epoch`; returns that report."""
    with trio.fail_after(timeout):
        while True:
            report = await app.report()
            if all(a["connected"] and a["epoch"] >= epoch for a in report["agents"]):
                return report
            await trio.sleep(0.1)


def tracebacks(*texts: str) -> list[str]:
    return [t[t.index("Traceback") :][:800] for t in texts if "Traceback" in t]


def schema_of(dsn: str) -> str:
    cols = set(columns(dsn))
    if {"email", "name"} <= cols:
        return "expanded"
    if "email" in cols:
        return "contracted"
    if "name" in cols:
        return "original"
    return f"unknown {sorted(cols)}"


#: The schema each final status must leave (the migration has a CONTRACT).
SCHEMA_FOR = {"completed": "contracted", "failed": "original"}


#: What is done to the leader at the point: SIGKILL of its process, termination of its lock
#: session (the process lives on and must notice it no longer leads), or a restart of the
#: whole database server (every session is cut, the leader included).
FAULTS = ("sigkill", "lock-session", "database-restart")


async def run_fault(
    dsn: str,
    point: Point,
    workdir: Path,
    *,
    mode: str = "standby",
    fault: str = "sigkill",
    lease: float | None = None,
) -> Outcome:
    """One fault at `point`; `mode` "standby" (a second replica runs from the start) or
    "restart" (after the fault the killed leader is started again on its port). `lease`
    (seconds) is given to the replicas as ``--lease``; None keeps lockstep's default."""
    make_users(dsn)
    path = workdir / f"{MIGRATION}.sql"
    path.write_text(point.migration_text())
    outcome = Outcome(point.name, mode if fault == "sigkill" else fault)
    ports = [free_port(), free_port()]
    urls = [f"ws://127.0.0.1:{port}" for port in ports]
    logs = [(workdir / f"{name}.log").open("w+") for name in ("leader", "second", "app")]
    leader: subprocess.Popen[str] | None = None
    second: subprocess.Popen[str] | None = None
    app: AppProcess | None = None
    replica = ["--poll-interval", "0.5", *(["--lease", f"{lease:g}"] if lease else [])]
    try:
        leader = serve(dsn, ports[0], *replica, output=logs[0])
        await leading(dsn)
        if mode == "standby":
            second = serve(dsn, ports[1], *replica, output=logs[1])
            await listening(ports[1])
        options = [f"--{k}={v}" for k, v in (("hold", point.hold), ("nack", point.nack)) if v]
        app = AppProcess(dsn, urls, logs[2], *options)
        await app.wait_for("synced")
        submitted = lockstep_process("submit", str(path), "--dsn", dsn)
        out, _ = await trio.to_thread.run_sync(submitted.communicate)
        if submitted.returncode != 0:
            raise RuntimeError(f"lockstep submit failed: {out}")
        if point.hold is not None:
            await app.wait_for("hold")
        else:
            await statement_running(dsn, "pg_sleep")
        epoch = await leader_epoch(dsn)
        struck_at, struck_wall = time.monotonic(), time.time()
        await _strike(fault, dsn, leader)
        app.send("release")
        if mode == "restart":
            second = serve(dsn, ports[0], *replica, output=logs[1])
        new_epoch = await new_leader(dsn, epoch)
        outcome.takeover = time.monotonic() - struck_at
        outcome.status = await final_status(dsn)
        outcome.finished = time.monotonic() - struck_at
        await agents_on(app, new_epoch)
        outcome.agents_back = time.monotonic() - struck_at
        await trio.sleep(0.5)  # the query loops run on the final schema for a while
        _judge(outcome, dsn, point, await app.report())
    except Exception as exc:  # a timeout or a dead process: reported with the logs
        outcome.problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        if app is not None:
            await app.quit()
        await stop_coordinators(outcome, leader, second)
        reap(leader, second, None if app is None else app.proc)
        texts = []
        for log in logs:
            log.seek(0)
            texts.append(log.read())
            log.close()
        if app is not None:
            texts.append("".join(app.lines))
        outcome.problems += [f"traceback: {t}" for t in tracebacks(*texts)]
        if outcome.problems:
            names = ("leader", "second", "app stderr", "app stdout")
            outcome.logs = {name: text[-3000:] for name, text in zip(names, texts, strict=False)}
        if fault != "sigkill" and outcome.takeover is not None:
            outcome.deposed = _logged_after(texts[0], "lost the leadership", struck_wall)
            if outcome.deposed is None:
                outcome.problems.append("the leader never said it lost the leadership")
    return outcome


async def stop_coordinators(outcome: Outcome, *procs: subprocess.Popen[str] | None) -> None:
    """SIGTERM each coordinator still running; one that does not stop is a problem."""
    for survivor in procs:
        if survivor is not None and survivor.poll() is None:
            survivor.send_signal(signal.SIGTERM)
            try:
                await trio.to_thread.run_sync(survivor.wait, 30)
            except subprocess.TimeoutExpired:
                outcome.problems.append("a coordinator did not stop on SIGTERM")


def _logged_after(log: str, text: str, since: float) -> float | None:
    """Seconds from `since` (wall clock) to the first line of `log` containing `text`; the
    lines start with the ISO timestamp ``lockstep serve`` writes."""
    for line in log.splitlines():
        if text in line:
            stamp = line.split(" ", 1)[0].rstrip("Z")
            try:
                at = datetime.datetime.fromisoformat(stamp).replace(tzinfo=datetime.UTC)
            except ValueError:
                return None
            return at.timestamp() - since
    return None


async def _strike(fault: str, dsn: str, leader: subprocess.Popen[str]) -> None:
    if fault == "sigkill":
        leader.send_signal(signal.SIGKILL)
        await trio.to_thread.run_sync(leader.wait)
    elif fault == "lock-session":
        await trio.to_thread.run_sync(terminate_lock_session, dsn)
    elif fault == "database-restart":
        await trio.to_thread.run_sync(restart_postgres, dsn)
    else:
        raise ValueError(f"unknown fault {fault!r}")


def terminate_lock_session(dsn: str) -> None:
    """``pg_terminate_backend`` of the session that holds the leader lock (as a DBA, or an
    ``idle_session_timeout``, would): the leader process lives on, without its lock."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pg_terminate_backend(backend_pid) FROM lockstep.leader WHERE id = 1"
        ).fetchone()
    if not (row and row[0]):
        raise RuntimeError("no leader lock session to terminate")


def _judge(outcome: Outcome, dsn: str, point: Point, report: dict[str, Any]) -> None:
    outcome.schema = schema_of(dsn)
    if outcome.status != point.expect:
        outcome.problems.append(f"status {outcome.status}, expected {point.expect}")
    if outcome.status is not None and SCHEMA_FOR.get(outcome.status) != outcome.schema:
        outcome.problems.append(f"status {outcome.status} but the schema is {outcome.schema}")
    rows = history(dsn)
    if len(rows) != 1:
        outcome.problems.append(f"{len(rows)} history rows: {[r['status'] for r in rows]}")
    applied_expected = outcome.status == "completed"
    for agent in report["agents"]:
        outcome.queries_ok += agent["ok"]["old"] + agent["ok"]["new"]
        outcome.queries_failed += agent["failed_count"]
        outcome.unreachable += agent["unreachable"]
        outcome.refused += agent["refused"]
        outcome.reconnects += max(0, agent["sessions"] - 1)
        if agent["applied"] != applied_expected:
            outcome.problems.append(
                f"{agent['id']} uses the {'new' if agent['applied'] else 'old'} query set on "
                f"a {outcome.schema} schema"
            )
        if agent["failed_count"]:
            outcome.problems.append(f"{agent['id']} failed queries: {agent['failed']}")
    resynced = sum(1 for call in report["calls"] if call["resynced"])
    repeated = sorted(
        {p.split(":")[-1] for a in report["agents"] for p in a["seen"] if a["seen"].count(p) > 1}
    )
    agents = len(report["agents"])
    outcome.saw = (
        f"{outcome.reconnects / agents:g} reconnect(s) each; "
        + (f"{'+'.join(repeated)} notice sent again" if repeated else "no notice repeated")
        + (f"; {resynced} resync hook(s)" if resynced else "")
    )


def summary_table(outcomes: list[Outcome]) -> str:
    """The markdown table of docs/durability.md: point x runs -> outcomes and times."""
    lines = [
        "| point | mode | runs | outcomes | takeover median / max (s) | finished median / max "
        "(s) | queries ok / failed | what the agents saw |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[Outcome]] = {}
    for o in outcomes:
        groups.setdefault((o.point, o.mode), []).append(o)
    for (point, mode), runs in groups.items():
        statuses: dict[str, int] = {}
        for o in runs:
            key = f"{o.status} ({o.schema})" if o.ok else f"FAULT: {o.problems[0][:60]}"
            statuses[key] = statuses.get(key, 0) + 1
        lines.append(
            f"| {point} | {mode} | {len(runs)} | "
            + ", ".join(f"{n}x {s}" for s, n in statuses.items())
            + f" | {_spread([o.takeover for o in runs])} | {_spread([o.finished for o in runs])}"
            f" | {sum(o.queries_ok for o in runs)} / {sum(o.queries_failed for o in runs)}"
            f" | {'; '.join(sorted({o.saw for o in runs}))} |"
        )
    return "\n".join(lines)


def _spread(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    return f"{statistics.median(known):.2f} / {max(known):.2f}"
