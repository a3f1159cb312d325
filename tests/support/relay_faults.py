"""Two `lockstep serve` replicas, one relaying, and what the fleet lives through.

One run (`run_relay_case`): a leader and a ``--relay`` replica on one database, two
application processes (`tests.support.fault_app`): "direct" (agents ``direct-N``, given the
leader's URL, then the relay's) and "relayed" (agents ``relayed-N``, given the relay's URL
only, or the relay's then the leader's when the relay is to die). One migration with a
CONTRACT is submitted; the first relayed agent holds or refuses a hook as the case says; at
that point the case strikes (SIGKILL of the relay or of the leader), then the run checks
what failover.py checks: the final status matches the schema, every agent uses the query
set that matches it, no application query failed, exactly one history row, no traceback.

Everything is real: processes, signals, loopback sockets, PostgreSQL.
"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import trio
from trio_websocket import ConnectionClosed, HandshakeError

from tests.support.failover import (
    MIGRATION,
    POINTS,
    AppProcess,
    Outcome,
    _judge,
    final_status,
    leader_epoch,
    new_leader,
    stop_coordinators,
    tracebacks,
)
from tests.support.flow import make_users, raw_client, say_hello
from tests.support.processes import free_port, leading, lockstep_process, reap, serve

#: A short lease: a new leader waits out its predecessor's leases before CONTRACT.
LEASE = "3"


@dataclasses.dataclass(frozen=True)
class Case:
    """What a run does: which hook the first relayed agent holds or refuses, what is
    killed at that point, and the status it must end in."""

    name: str
    hold: str | None = None
    nack: str | None = None
    kill: str | None = None  # "relay" or "leader"
    expect: str = "completed"
    #: The relayed agents know only the relay's URL, even when it is killed: they cannot
    #: reconnect, must fence themselves, and the migration waits out their leases.
    stranded: bool = False


CASES = {
    c.name: c
    for c in (
        Case("complete"),
        Case("relayed-nack", nack="on_apply", expect="failed"),
        Case("relay-sigkill-apply", hold="on_apply", kill="relay"),
        Case("leader-sigkill-apply", hold="on_apply", kill="leader"),
        Case("relay-sigkill-stranded", hold="on_apply", kill="relay", stranded=True),
    )
}


async def _relay_linked(url: str, timeout: float = 30) -> None:
    """Wait until the relay at `url` welcomes an agent (it is linked to the leader)."""
    with trio.fail_after(timeout):
        while True:
            try:
                async with raw_client(url) as ws:
                    await say_hello(ws, "probe")
                    return
            except (OSError, HandshakeError, ConnectionClosed, AssertionError):
                await trio.sleep(0.1)


async def _all_connected(app: AppProcess, timeout: float = 60) -> dict[str, Any]:
    with trio.fail_after(timeout):
        while True:
            report = await app.report()
            if all(a["connected"] for a in report["agents"]):
                return report
            await trio.sleep(0.1)


def _judge_stranded(outcome: Outcome, report: dict[str, Any]) -> None:
    """Agents whose only coordinator died: fenced (their requests refused), never a failed
    query, whatever the schema became meanwhile."""
    for agent in report["agents"]:
        outcome.queries_ok += agent["ok"]["old"] + agent["ok"]["new"]
        outcome.queries_failed += agent["failed_count"]
        outcome.refused += agent["refused"]
        if agent["connected"]:
            outcome.problems.append(f"{agent['id']} is connected to a relay that was killed")
        if agent["failed_count"]:
            outcome.problems.append(f"{agent['id']} failed queries: {agent['failed']}")
    if not outcome.refused:
        outcome.problems.append("the stranded agents never refused a request: not fenced?")


async def run_relay_case(dsn: str, case: Case, workdir: Path) -> Outcome:
    make_users(dsn)
    path = workdir / f"{MIGRATION}.sql"
    path.write_text(POINTS["apply-wait"].migration_text())
    outcome = Outcome(case.name, "relay")
    ports = [free_port(), free_port()]
    leader_url, relay_url = (f"ws://127.0.0.1:{port}" for port in ports)
    names = ("leader", "relay", "direct", "relayed")
    paths = [workdir / f"{name}.log" for name in names]
    logs = [p.open("w+") for p in paths]
    procs: list[subprocess.Popen[str] | None] = [None, None]
    apps: list[AppProcess] = []
    options = ("--poll-interval", "0.5", "--lease", LEASE)
    try:
        procs[0] = serve(dsn, ports[0], *options, output=logs[0])
        await leading(dsn)
        procs[1] = serve(dsn, ports[1], *options, "--relay", output=logs[1])
        await _relay_linked(relay_url)
        relayed_urls = [relay_url]
        if case.kill == "relay" and not case.stranded:
            relayed_urls.append(leader_url)
        hooks = [f"--{k}={v}" for k, v in (("hold", case.hold), ("nack", case.nack)) if v]
        apps.append(AppProcess(dsn, [leader_url, relay_url], logs[2], "--id-prefix=direct"))
        apps.append(AppProcess(dsn, relayed_urls, logs[3], "--id-prefix=relayed", *hooks))
        for app in apps:
            await app.wait_for("synced")
        submitted = lockstep_process("submit", str(path), "--dsn", dsn)
        out, _ = await trio.to_thread.run_sync(submitted.communicate)
        if submitted.returncode != 0:
            raise RuntimeError(f"lockstep submit failed: {out}")
        epoch = await leader_epoch(dsn)
        struck_at = time.monotonic()
        if case.hold is not None:
            await apps[1].wait_for("hold")
        if case.kill is not None:
            victim = procs[0 if case.kill == "leader" else 1]
            assert victim is not None
            struck_at = time.monotonic()
            victim.send_signal(signal.SIGKILL)
            await trio.to_thread.run_sync(victim.wait)
        apps[1].send("release")
        if case.kill == "leader":
            outcome.takeover = time.monotonic() - struck_at
            await new_leader(dsn, epoch)
            outcome.takeover = time.monotonic() - struck_at
        outcome.status = await final_status(dsn)
        outcome.finished = time.monotonic() - struck_at
        judged = apps[:1] if case.stranded else apps
        for app in judged:
            await _all_connected(app)
        outcome.agents_back = time.monotonic() - struck_at
        await trio.sleep(0.5)  # the query loops run on the final schema for a while
        reports = [await app.report() for app in judged]
        if case.stranded:
            _judge_stranded(outcome, await apps[1].report())
        merged = {
            "agents": [a for r in reports for a in r["agents"]],
            "calls": [c for r in reports for c in r["calls"]],
        }
        _judge(outcome, dsn, dataclasses.replace(POINTS["apply-wait"], expect=case.expect), merged)
    except Exception as exc:  # a timeout or a dead process: reported with the logs
        outcome.problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        for app in apps:
            await app.quit()
        await stop_coordinators(outcome, *procs)
        reap(*procs, *(app.proc for app in apps))
        texts = []
        for log in logs:
            log.seek(0)
            texts.append(log.read())
            log.close()
        texts += ["".join(app.lines) for app in apps]
        outcome.problems += [f"traceback: {t}" for t in tracebacks(*texts)]
        if outcome.problems:
            labels = (*names, "direct stdout", "relayed stdout")
            outcome.logs = {n: t[-3000:] for n, t in zip(labels, texts, strict=False)}
    return outcome
