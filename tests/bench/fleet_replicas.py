"""`make bench-fleet ARGS='--replicas 2'`: each replica's CPU per migration against one coordinator.

    python -m tests.bench.fleet --replicas 2 [--agents 1000] [--repeat 3] [--workers 2]

For each fleet size N, in a fresh database each time, two setups in the same run:

- *single*: one ``lockstep serve`` process with all N agents;
- *replicas*: one ``lockstep serve`` leader and R-1 ``lockstep serve --relay`` replicas,
  the N agents split evenly, each agent given only its own replica's URL.

Each coordinator process runs `open_service` as ``lockstep serve`` does (``python -m
tests.bench.fleet_replicas``), with the per-address cap on handshakes in progress lifted as
bench-fleet does: every agent connects from 127.0.0.1.

The agents are real `open_agent` agents in `--workers` processes per replica
(`tests.bench.fleet_procs`). Each setup runs `--repeat` trivial additive migrations
(``lockstep submit``, then waiting for the history to say completed and for the CONFIRM
acks to come in: 1 s); the CPU of each coordinator process (``/proc/PID/stat``: user +
system) is read before and after each. Reported per process, as medians: CPU per migration,
the same minus the process's idle CPU over as long (lease renewals go on during a
migration too; measured over 5 s, so only indicative), and the CPU per migration over the
single coordinator's. The target of issue 12: with 2
replicas each costs about half of the single coordinator.

A benchmark, not a test: nothing is asserted on times; the exit status is 1 if a migration
did not complete.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import psycopg
import trio
from rich.console import Console
from rich.table import Table

from coordinator.admission import ConnectionLimits
from coordinator.cli.embedded import resolve_dsn
from coordinator.queue import submit
from coordinator.service import open_service
from statemachine import Migration
from statemachine.lease import DEFAULT_LEASE_SECONDS
from tests.bench import scaffold
from tests.bench.markdown import table as markdown_table
from tests.support.processes import free_port, reap
from tests.support.scratchdb import fresh_database

ROOT = Path(__file__).resolve().parents[2]
BEGIN_MARK = "<!-- bench-fleet-replicas:begin -->"
END_MARK = "<!-- bench-fleet-replicas:end -->"
SECTION_TITLE = "## Fleet scale over relaying replicas"
CONNECT_TIMEOUT = 600.0
MIGRATION_TIMEOUT = 300.0
#: How long after the history says completed the CONFIRM acks are given to arrive (and be
#: counted in the migration's CPU): CONFIRM is not waited for by the coordinator.
CONFIRM_SETTLE = 1.0
#: Seconds over which each process's idle CPU is measured (fleet connected, no migration).
IDLE_SECONDS = 5.0
TICKS = os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass(frozen=True)
class ReplicaRow:
    """One coordinator process of one setup (CPU in seconds, medians per migration)."""

    setup: str
    agents: int
    process: str
    its_agents: int
    completed: int
    attempted: int
    migration_s: float
    cpu_s: float
    idle_cpu: float  # fraction of a core while idle

    @property
    def busy_cpu_s(self) -> float:
        """CPU per migration less what the process spends idle over as long."""
        return self.cpu_s - self.idle_cpu * self.migration_s


def _serve(dsn: str, port: int, *extra: str, output: IO[str]) -> subprocess.Popen[str]:
    """A coordinator process: `serve_main` below (``lockstep serve`` with bench limits)."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.bench.fleet_replicas",
            "--dsn",
            dsn,
            "--port",
            str(port),
            *extra,
        ],
        stdout=output,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )


async def _serve_forever(args: argparse.Namespace) -> None:
    # Every benchmark agent connects from 127.0.0.1 at once: lift the per-address cap on
    # handshakes in progress that protects a real coordinator from floods (as bench-fleet).
    limits = ConnectionLimits(max_pending=100_000, max_pending_per_address=100_000)
    async with open_service(
        args.dsn,
        port=args.port,
        ack_timeout=120.0,
        poll_interval=0.5,
        http_port=args.http_port,
        relay=args.relay,
        limits=limits,
        lease_seconds=args.lease,
    ):
        await trio.sleep_forever()


def serve_main(argv: Sequence[str] | None = None) -> int:
    """`lockstep serve` as the benchmark runs it: the same `open_service`, bench limits."""
    p = argparse.ArgumentParser(prog="python -m tests.bench.fleet_replicas")
    p.add_argument("--dsn", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--http-port", type=int)
    p.add_argument("--relay", action="store_true")
    p.add_argument("--lease", type=float, default=DEFAULT_LEASE_SECONDS)
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(_serve_forever, p.parse_args(argv))
    return 0


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def _log_file(args: argparse.Namespace, setup: str, index: int) -> IO[str]:
    """Where serve process `index` of `setup` writes its log: `--serve-logs`, or nowhere.
    Why keep them: a leader that deposes itself or refuses agents says so only there."""
    if args.serve_logs is None:
        return open(os.devnull, "w")
    args.serve_logs.mkdir(parents=True, exist_ok=True)
    name = f"{setup.replace(' ', '-')}-{index}.log"
    return open(args.serve_logs / name, "w")


def _connected(http_port: int) -> int | None:
    """Agents the leader counts; None while its /metrics does not answer (not up yet, or a
    leader busy accepting thousands of agents and slow to answer: not a failure here)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
    except OSError:  # URLError, TimeoutError, ConnectionResetError
        return None
    for line in text.splitlines():
        if line.startswith("lockstep_agents_connected "):
            return int(float(line.split()[1]))
    return 0


async def _wait_connected(http_port: int, count: int) -> None:
    with trio.fail_after(CONNECT_TIMEOUT):
        while (await trio.to_thread.run_sync(_connected, http_port) or 0) < count:
            await trio.sleep(0.5)


def _status(dsn: str, name: str) -> str | None:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT status FROM lockstep.migrations WHERE name = %s", (name,)
        ).fetchone()
    return None if row is None else str(row[0])


async def _run_setup(
    server: str, setup: str, agents: int, replicas: int, args: argparse.Namespace
) -> list[ReplicaRow]:
    from tests.bench.fleet import _Child, _split  # the agent workers of bench-fleet

    rows: list[ReplicaRow] = []
    with fresh_database(server, f"lockstep_bench_replicas_{replicas}") as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE fleet_bench (id bigint PRIMARY KEY)")
        ports = [free_port() for _ in range(replicas)]
        http_port = free_port()
        logs = [_log_file(args, f"{agents}-{setup}", i) for i in range(len(ports))]
        procs = []
        workers: list[_Child] = []
        try:
            lease = ("--lease", str(args.lease))
            procs.append(
                _serve(dsn, ports[0], "--http-port", str(http_port), *lease, output=logs[0])
            )
            await _wait_up(http_port)
            for port, log in zip(ports[1:], logs[1:], strict=True):
                procs.append(_serve(dsn, port, "--relay", *lease, output=log))
            await trio.sleep(2.0)  # the relays link (they poll for the leader's URL)
            shares = _split(agents, replicas)
            for index, (port, share) in enumerate(zip(ports, shares, strict=True)):
                for part, count in enumerate(_split(share, args.workers)):
                    workers.append(
                        await _Child.start(
                            "agents",
                            "--coordinator",
                            f"ws://127.0.0.1:{port}",
                            "--count",
                            str(count),
                            "--prefix",
                            f"r{index}w{part}-",
                        )
                    )
            await _wait_connected(http_port, agents)
            before = [process_cpu(p.pid) for p in procs]
            await trio.sleep(IDLE_SECONDS)
            idle = [
                (process_cpu(p.pid) - b) / IDLE_SECONDS for p, b in zip(procs, before, strict=True)
            ]
            cpu: list[list[float]] = [[] for _ in procs]
            walls: list[float] = []
            completed = 0
            for i in range(args.repeat):
                name = f"replicas_add_c{i}"
                migration = Migration(name, [f"ALTER TABLE fleet_bench ADD COLUMN c{i} int"])
                start = [process_cpu(p.pid) for p in procs]
                t0 = time.perf_counter()
                await submit(dsn, [migration])
                with trio.fail_after(MIGRATION_TIMEOUT):
                    while (status := await trio.to_thread.run_sync(_status, dsn, name)) in (
                        None,
                        "queued",
                        "running",
                    ):
                        await trio.sleep(0.02)
                await trio.sleep(CONFIRM_SETTLE)
                walls.append(time.perf_counter() - t0)
                for k, p in enumerate(procs):
                    cpu[k].append(process_cpu(p.pid) - start[k])
                completed += status == "completed"
            for k in range(len(procs)):
                rows.append(
                    ReplicaRow(
                        setup=setup,
                        agents=agents,
                        process="leader" if k == 0 else f"relay {k}",
                        its_agents=shares[k],
                        completed=completed,
                        attempted=args.repeat,
                        migration_s=statistics.median(walls),
                        cpu_s=statistics.median(cpu[k]),
                        idle_cpu=idle[k],
                    )
                )
        finally:
            for worker in workers:
                await worker.stop()
            reap(*procs)
            for log in logs:
                log.close()
    return rows


async def _wait_up(http_port: int) -> None:
    with trio.fail_after(60):
        while await trio.to_thread.run_sync(_connected, http_port) is None:
            await trio.sleep(0.2)


async def _bench(server: str, args: argparse.Namespace, console: Console) -> list[ReplicaRow]:
    rows: list[ReplicaRow] = []
    for agents in args.agents:
        for setup, replicas in (("single", 1), (f"{args.replicas} replicas", args.replicas)):
            console.print(f"[bold]{agents} agents[/], {setup}, {args.repeat} migrations")
            got = await _run_setup(server, setup, agents, replicas, args)
            for row in got:
                console.print(
                    f"  {row.process}: {row.its_agents} agents, CPU {row.cpu_s * 1000:.0f} ms"
                    f" per migration ({row.busy_cpu_s * 1000:.0f} ms over idle),"
                    f" {row.completed}/{row.attempted} completed"
                )
            rows += got
    return rows


_HEADERS = [
    "agents",
    "setup",
    "process",
    "its agents",
    "completed",
    "migration ms",
    "CPU ms per migration",
    "idle CPU %",
    "CPU over idle ms",
    "vs single",
]


def _cells(row: ReplicaRow, single: ReplicaRow | None) -> list[str]:
    # Over the whole CPU per migration: the idle figure is measured over a few seconds
    # and, at thousands of agents on a shared machine, too noisy to subtract reliably.
    versus = "-" if single is None else f"{row.cpu_s / single.cpu_s:.2f}"
    return [
        str(row.agents),
        row.setup,
        row.process,
        str(row.its_agents),
        f"{row.completed}/{row.attempted}",
        f"{row.migration_s * 1000:.0f}",
        f"{row.cpu_s * 1000:.0f}",
        f"{row.idle_cpu * 100:.1f}",
        f"{row.busy_cpu_s * 1000:.0f}",
        versus,
    ]


def _all_cells(rows: Sequence[ReplicaRow]) -> list[list[str]]:
    singles = {r.agents: r for r in rows if r.setup == "single"}
    return [_cells(r, singles.get(r.agents)) for r in rows]


def table(rows: Sequence[ReplicaRow]) -> Table:
    out = Table(title="Relaying replicas (medians per migration)")
    for header in _HEADERS:
        out.add_column(header, justify="right")
    for cells in _all_cells(rows):
        out.add_row(*cells)
    return out


def write_section(path: Path, section: str) -> None:
    scaffold.write_section(path, section, BEGIN_MARK, END_MARK, SECTION_TITLE)


def run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """The replica run of `tests.bench.fleet` (its parser's options)."""
    console = scaffold.console()
    started = time.monotonic()
    with resolve_dsn(args.dsn) as server:
        rows = trio.run(_bench, server, args, console)
        header = scaffold.header(
            "bench-fleet",
            argv,
            server,
            time.monotonic() - started,
            f"{args.repeat} migrations per setup, {args.workers} agent processes per replica,"
            " each coordinator an `open_service` process (bench connection limits),"
            f" lease {args.lease:g} s",
        )
    console.print(table(rows))
    lines = markdown_table(_HEADERS, _all_cells(rows))
    scaffold.publish(args, console, "\n".join([*header, "", *lines, ""]), write_section, "replicas")
    if not all(r.completed == r.attempted for r in rows):
        console.print("[bold red]a migration did not complete[/]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(serve_main())
