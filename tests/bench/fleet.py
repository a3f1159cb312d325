"""`make bench-fleet`: the coordinator's cost at fleet scale, against a raw baseline.

    python -m tests.bench.fleet [--agents 100,1000] [--repeat 3] [--workers 2] [--idle 10]
                                [--lease 15] [--heartbeat 0] [--dsn URI] [--out FILE]
                                [--no-write]

For each fleet size N, in a fresh database: one coordinator in this process (so its CPU is
this process's `time.process_time()`), the raw baseline server in a process of its own, and
`--workers` agent processes holding N real agents on each (`tests.bench.fleet_procs`).
Then `--repeat` pairs, alternated (lockstep first, then raw first, ...): one trivial
additive migration through lockstep, and the same rounds on the raw server (ANNOUNCE and
APPLY broadcast and collected, CONFIRM sent). Reported per size, as medians: the
migration's and the raw rounds' wall time and their ratio, per-phase times, the
coordinator's CPU and GC time per migration (`gc.callbacks`), the transport floor (the raw
server's CPU for its direct sends and the receives of the two acked rounds: what moving
the frames costs at least), agents lost, idle CPU (over `--idle` seconds with the fleet
connected: the agents renew their leases every lease/3, as real agents do, so idle CPU is
mostly the renewals, given per renewal under the table) and memory per agent (this process's
RSS growth while the fleet connects / N).

It is a benchmark, not a test: nothing is asserted on times. The exit status is 1 if a
migration did not complete, an agent was lost, or the per-agent time of ANNOUNCE+APPLY at the
largest size is more than 4x that at the middle size (a ratio: a loaded machine does not
fail it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
import trio
from rich.console import Console
from rich.table import Table

from coordinator import open_coordinator
from coordinator.admission import ConnectionLimits
from coordinator.cli import options
from coordinator.cli.embedded import resolve_dsn
from coordinator.events import AgentLeft, AnswerReceived, Event
from statemachine import Migration, MigrationStatus, Phase
from statemachine.lease import DEFAULT_LEASE_SECONDS, renew_interval
from tests.bench import scaffold
from tests.bench.markdown import table as markdown_table
from tests.support.scratchdb import fresh_database

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "docs" / "benchmarks.md"
BEGIN_MARK = "<!-- bench-fleet:begin -->"
END_MARK = "<!-- bench-fleet:end -->"
SECTION_TITLE = "## Fleet scale"
#: The phases in which every agent of the cohort must ack before the migration moves on.
ACKED_PHASES = (Phase.ANNOUNCE, Phase.APPLY)
#: Largest allowed growth of ANNOUNCE+APPLY time per agent, largest size vs the reference size.
MAX_GROWTH = 4.0
CONNECT_TIMEOUT = 600.0
ACK_TIMEOUT = 120.0


@dataclasses.dataclass(frozen=True)
class FleetRow:
    """Medians over the pairs run at one fleet size (times in seconds)."""

    agents: int
    connect_s: float
    completed: int
    attempted: int
    migration_s: float
    phase_s: dict[str, float]
    acked_s: float
    cpu_s_per_migration: float
    raw_s: float = float("nan")
    raw_phase_s: dict[str, float] = dataclasses.field(default_factory=dict)
    floor_s: float = float("nan")
    send_us: float = float("nan")
    receive_us: float = float("nan")
    gc_s_per_migration: float = float("nan")
    lost: int = 0
    idle_cpu: float = float("nan")
    lease_s: float = DEFAULT_LEASE_SECONDS
    rss_kib_per_agent: float = float("nan")

    @property
    def ok(self) -> bool:
        return self.completed == self.attempted and self.lost == 0

    @property
    def acks(self) -> int:
        """Acks one migration waits for: every agent, once per acked phase."""
        return self.agents * len(ACKED_PHASES)

    @property
    def acks_per_s(self) -> float:
        return self.acks / self.acked_s if self.acked_s > 0 else float("nan")

    @property
    def acked_ms_per_agent(self) -> float:
        return self.acked_s * 1000 / self.agents

    @property
    def cpu_us_per_ack(self) -> float:
        return self.cpu_s_per_migration * 1e6 / self.acks

    @property
    def ratio(self) -> float:
        """Lockstep's migration over the raw rounds (wall time): 1.0 = no overhead."""
        return self.migration_s / self.raw_s

    @property
    def renew_us(self) -> float:
        """Idle CPU per lease renewal (each agent renews every lease/3), in µs."""
        renewals_per_s = self.agents / renew_interval(self.lease_s)
        return self.idle_cpu * 1e6 / renewals_per_s

    @property
    def floor_ratio(self) -> float:
        """The coordinator's CPU per migration over the transport floor."""
        return self.cpu_s_per_migration / self.floor_s


def _sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated agent counts like 100,1000, got {text!r}"
        ) from None
    if not sizes or sizes[0] <= 0:
        raise argparse.ArgumentTypeError(f"agent counts must be > 0, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    p = scaffold.parser("python -m tests.bench.fleet", __doc__, DEFAULT_OUT, "fleet")
    p.add_argument(
        "--agents",
        type=_sizes,
        default=_sizes("100,1000"),
        help="fleet sizes, comma-separated (default 100,1000; 5000 and 10000 take minutes)",
    )
    p.add_argument(
        "--repeat", type=options.at_least_one, default=3, help="pairs per fleet size (3)"
    )
    p.add_argument("--workers", type=options.at_least_one, default=2, help="agent processes (2)")
    p.add_argument(
        "--idle",
        type=float,
        default=10.0,
        help="seconds of idle fleet over which idle CPU is measured (10; 0 skips it)",
    )
    p.add_argument(
        "--lease",
        type=float,
        default=DEFAULT_LEASE_SECONDS,
        help=f"the coordinator's lease in seconds; agents renew every lease/3"
        f" ({DEFAULT_LEASE_SECONDS:g})",
    )
    # Kept to compare with the ping-based liveness of before leases; off by default, as in
    # the coordinator: the lease renewals are what keeps an agent counted alive now.
    p.add_argument(
        "--heartbeat",
        type=float,
        default=0.0,
        help="the coordinator's WebSocket ping interval in seconds (0: off, the default)",
    )
    p.add_argument(
        "--replicas",
        type=int,
        default=0,
        help="instead: a leader and REPLICAS-1 relaying `lockstep serve` replicas against one"
        " coordinator, CPU per process (tests/bench/fleet_replicas.py)",
    )
    p.add_argument(
        "--serve-logs",
        type=Path,
        metavar="DIR",
        help="with --replicas: keep each `lockstep serve` process's log in DIR (agents-setup-index"
        ".log); without it they are discarded",
    )
    return p


# ------------------------------------------------------------------ processes
class _Child:
    """A helper process spoken to in JSON lines over its stdin and stdout."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self._buffer = b""

    @classmethod
    async def start(cls, *args: str) -> _Child:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "tests.bench.fleet_procs", *args],
            stdin=-1,  # subprocess.PIPE
            stdout=-1,
            cwd=ROOT,
        )
        return cls(process)

    async def send(self, data: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(json.dumps(data).encode() + b"\n")

    async def read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some(65536)
            if not chunk:
                raise RuntimeError(f"bench process {self.process.args!r} ended")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        result: dict[str, Any] = json.loads(line)
        return result

    async def ask(self, data: dict[str, Any]) -> dict[str, Any]:
        await self.send(data)
        return await self.read()

    async def stop(self) -> None:
        with trio.CancelScope(shield=True):
            if self.process.stdin is not None:
                await self.process.stdin.aclose()
            with trio.move_on_after(30):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()


def rss_kib() -> float:
    """This process's resident memory now (Linux /proc; elsewhere the peak, from rusage)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        import resource

        return pages * resource.getpagesize() / 1024
    except OSError:
        import resource

        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# ------------------------------------------------------------------ one size
@dataclasses.dataclass
class _Samples:
    lockstep_s: list[float] = dataclasses.field(default_factory=list)
    acked_s: list[float] = dataclasses.field(default_factory=list)
    phases: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    cpu_s: list[float] = dataclasses.field(default_factory=list)
    gc_s: list[float] = dataclasses.field(default_factory=list)
    raw_s: list[float] = dataclasses.field(default_factory=list)
    raw_phases: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    floor_s: list[float] = dataclasses.field(default_factory=list)
    send_s: list[float] = dataclasses.field(default_factory=list)
    completed: int = 0


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def _measure(dsn: str, agents: int, args: argparse.Namespace, console: Console) -> FleetRow:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE fleet_bench (id bigint PRIMARY KEY)")
    # Every benchmark agent connects from 127.0.0.1 at once: lift the per-address cap on
    # handshakes in progress that protects a real coordinator from floods.
    limits = ConnectionLimits(max_pending=100_000, max_pending_per_address=100_000)
    left: list[str] = []

    def watch(event: Event) -> None:
        if isinstance(event, AgentLeft):
            left.append(event.agent_id)

    samples = _Samples()
    async with open_coordinator(
        dsn,
        port=0,
        ack_timeout=ACK_TIMEOUT,
        heartbeat_interval=args.heartbeat,
        lease_seconds=args.lease,
        limits=limits,
    ) as coord:
        # As with `limits`: the whole fleet's hellos arrive at once on a shared machine, and
        # an agent refused for a slow hello retries outside its worker's connect throttle.
        coord.handshake_timeout = 60.0
        coord.subscribe(watch)
        raw = await _Child.start("raw")
        workers: list[_Child] = []
        try:
            raw_url = (await raw.read())["url"]
            rss_before = rss_kib()
            started = time.perf_counter()
            for index, count in enumerate(_split(agents, args.workers)):
                worker = await _Child.start(
                    "agents",
                    "--coordinator",
                    coord.url,
                    "--raw",
                    raw_url,
                    "--count",
                    str(count),
                    "--prefix",
                    f"w{index}-",
                )
                workers.append(worker)
            await coord.wait_for_agents(agents, timeout=CONNECT_TIMEOUT)
            await raw.ask({"wait": agents, "timeout": CONNECT_TIMEOUT})
            connect_s = time.perf_counter() - started
            rss_per_agent = (rss_kib() - rss_before) / agents
            idle_cpu = float("nan")
            if args.idle > 0:
                cpu = time.process_time()
                await trio.sleep(args.idle)
                idle_cpu = (time.process_time() - cpu) / args.idle
            lost_before = len(left)
            for i in range(args.repeat):
                steps = (_lockstep_once, _raw_once) if i % 2 == 0 else (_raw_once, _lockstep_once)
                for step in steps:
                    await step(coord, raw, i, samples, console)
            lost = len(left) - lost_before
        finally:
            for child in (*workers, raw):
                await child.stop()
    return FleetRow(
        agents=agents,
        connect_s=connect_s,
        completed=samples.completed,
        attempted=args.repeat,
        migration_s=_median(samples.lockstep_s),
        phase_s={name: _median(values) for name, values in samples.phases.items()},
        acked_s=_median(samples.acked_s),
        cpu_s_per_migration=_median(samples.cpu_s),
        raw_s=_median(samples.raw_s),
        raw_phase_s={name: _median(values) for name, values in samples.raw_phases.items()},
        floor_s=_median(samples.floor_s),
        send_us=_median(samples.send_s) * 1e6 / (agents * 3),
        receive_us=_median([f - s for f, s in zip(samples.floor_s, samples.send_s, strict=True)])
        * 1e6
        / (agents * 3),
        gc_s_per_migration=_median(samples.gc_s),
        lost=lost,
        idle_cpu=idle_cpu,
        lease_s=args.lease,
        rss_kib_per_agent=rss_per_agent,
    )


async def _lockstep_once(
    coord: Any, raw: _Child, i: int, samples: _Samples, console: Console
) -> None:
    migration = Migration(f"fleet_add_c{i}", [f"ALTER TABLE fleet_bench ADD COLUMN c{i} int"])
    confirmed: set[str] = set()

    def count(event: Event) -> None:
        if (
            isinstance(event, AnswerReceived)
            and event.migration == migration.name
            and event.phase is Phase.CONFIRM
        ):
            confirmed.add(event.agent_id)

    unsubscribe = coord.subscribe(count)
    with scaffold.GcClock() as clock:
        cpu = time.process_time()
        t0 = time.perf_counter()
        result = await coord.run_migration(migration)
        samples.lockstep_s.append(time.perf_counter() - t0)
        # CONFIRM is not waited for: its acks arrive after the result. Their cost is the
        # migration's all the same (CPU, GC), and the next step must not run beside them.
        with trio.move_on_after(ACK_TIMEOUT):
            # len(fleet), not len(coord.agents): that builds a frozenset of the whole fleet,
            # which every 5 ms at 10,000 agents was 6 % of the CPU charged to the migration.
            while len(confirmed) < len(coord.fleet):
                await trio.sleep(0.005)
        samples.cpu_s.append(time.process_time() - cpu)
    unsubscribe()
    samples.gc_s.append(clock.total)
    if result.status is MigrationStatus.COMPLETED:
        samples.completed += 1
    else:
        console.print(f"  [red]{migration.name}: {result.reason}[/]")
    for record in result.phases:
        samples.phases.setdefault(record.phase.name, []).append(record.duration)
    samples.acked_s.append(sum(r.duration for r in result.phases if r.phase in ACKED_PHASES))


async def _raw_once(coord: Any, raw: _Child, i: int, samples: _Samples, console: Console) -> None:
    answer = await raw.ask({"round": f"raw_{i}"})
    samples.raw_s.append(answer["total_s"])
    samples.floor_s.append(answer["cpu_s"])
    samples.send_s.append(answer["send_cpu_s"])
    for phase in ACKED_PHASES:
        samples.raw_phases.setdefault(phase.name, []).append(answer[phase.name])


async def _bench(server: str, args: argparse.Namespace, console: Console) -> list[FleetRow]:
    rows = []
    for agents in args.agents:
        console.print(f"[bold]{agents} agents[/], {args.repeat} pairs")
        with fresh_database(server, "lockstep_bench_fleet") as dsn:
            row = await _measure(dsn, agents, args, console)
        console.print(
            f"  connected in {row.connect_s:.2f} s; migration {row.migration_s * 1000:.1f} ms,"
            f" raw {row.raw_s * 1000:.1f} ms ({row.ratio:.2f}x);"
            f" {row.completed}/{row.attempted} completed, {row.lost} lost"
        )
        rows.append(row)
    return rows


def reference_row(rows: Sequence[FleetRow]) -> FleetRow:
    """The size the largest is compared with: the middle one (the smaller for an even count)."""
    return rows[(len(rows) - 1) // 2]


def growth(rows: Sequence[FleetRow]) -> float:
    """ANNOUNCE+APPLY time per agent at the largest size over that at the reference size."""
    return rows[-1].acked_ms_per_agent / reference_row(rows).acked_ms_per_agent


# ------------------------------------------------------------------ report
_HEADERS = [
    "agents",
    "connect s",
    "completed",
    "lockstep ms",
    "raw ms",
    "ratio",
    "ANNOUNCE ms (raw)",
    "EXECUTE ms",
    "APPLY ms (raw)",
    "CONFIRM ms",
    "CPU ms per migration",
    "floor ms",
    "CPU / floor",
    "GC ms",
    "lost",
    "idle CPU %",
    "KiB per agent",
]


def _ms(value: float | None) -> str:
    if value is None or value != value:  # NaN
        return "-"
    return f"{value * 1000:.1f}" if value < 10 else f"{value * 1000:,.0f}"


def _cells(row: FleetRow) -> list[str]:
    def phase(p: Phase, raw: bool = False) -> str:
        text = _ms(row.phase_s.get(p.name))
        if raw:
            text += f" ({_ms(row.raw_phase_s.get(p.name))})"
        return text

    return [
        str(row.agents),
        f"{row.connect_s:.2f}",
        f"{row.completed}/{row.attempted}",
        _ms(row.migration_s),
        _ms(row.raw_s),
        f"{row.ratio:.2f}",
        phase(Phase.ANNOUNCE, raw=True),
        phase(Phase.EXECUTE),
        phase(Phase.APPLY, raw=True),
        phase(Phase.CONFIRM),
        _ms(row.cpu_s_per_migration),
        _ms(row.floor_s),
        f"{row.floor_ratio:.2f}",
        _ms(row.gc_s_per_migration),
        str(row.lost),
        "-" if row.idle_cpu != row.idle_cpu else f"{row.idle_cpu * 100:.2f}",
        f"{row.rss_kib_per_agent:.1f}",
    ]


def table(rows: Sequence[FleetRow]) -> Table:
    out = Table(title="Fleet scale (medians per migration)")
    for header in _HEADERS:
        out.add_column(header, justify="right")
    for row in rows:
        out.add_row(*_cells(row))
    return out


def floor_lines(rows: Sequence[FleetRow]) -> list[str]:
    """The transport floor per size, as a sentence each."""
    return [
        f"- {r.agents} agents: a direct send costs {r.send_us:.0f} µs of CPU per frame, a"
        f" receive {r.receive_us:.0f} µs; lockstep {_ms(r.migration_s)} ms vs floor"
        f" {_ms(r.floor_s)} ms ({r.migration_s / r.floor_s:.2f}x wall over floor CPU)"
        + (
            ""
            if r.idle_cpu != r.idle_cpu
            else f"; idle, {r.agents / renew_interval(r.lease_s):,.0f} lease renewals a second"
            f" cost {r.renew_us:.0f} µs of coordinator CPU each"
        )
        + "."
        for r in rows
    ]


def markdown(rows: Sequence[FleetRow], header: Sequence[str]) -> str:
    """The measured part of the fleet section (without the markers)."""
    lines = markdown_table(_HEADERS, [_cells(r) for r in rows])
    return "\n".join([*header, "", *lines, "", *floor_lines(rows), ""])


def write_section(path: Path, section: str) -> None:
    """Replace the text between the fleet markers; append a "## Fleet scale" section if none."""
    scaffold.write_section(path, section, BEGIN_MARK, END_MARK, SECTION_TITLE)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.replicas:
        from tests.bench import fleet_replicas

        return fleet_replicas.run(args, argv)
    console = scaffold.console()
    started = time.monotonic()
    with resolve_dsn(args.dsn) as server:
        try:
            rows = trio.run(_bench, server, args, console)
        except trio.TooSlowError:
            console.print(
                f"[bold red]the fleet did not connect within {CONNECT_TIMEOUT:g} s[/]"
                " (try smaller --agents)"
            )
            return 1
        header = scaffold.header(
            "bench-fleet",
            argv,
            server,
            time.monotonic() - started,
            f"{args.repeat} pairs per size, {args.workers} agent processes,"
            f" lease {args.lease:g} s (renewals every {renew_interval(args.lease):g} s),"
            f" heartbeat {'off' if args.heartbeat <= 0 else f'{args.heartbeat:g} s'}",
        )
    console.print(table(rows))
    for line in floor_lines(rows):
        console.print(line)
    lines = [*header, ""]
    ratio = growth(rows)
    if len(rows) > 1:
        reference = reference_row(rows)
        sentence = (
            f"Per-agent ANNOUNCE+APPLY time, {rows[-1].agents} agents vs {reference.agents}:"
            f" {ratio:.2f}x (the check fails above {MAX_GROWTH:g}x)."
        )
        console.print(sentence)
        lines.append(sentence)
    scaffold.publish(args, console, markdown(rows, lines), write_section, "fleet")
    status = 0
    if not all(row.ok for row in rows):
        console.print("[bold red]a migration did not complete, or an agent was lost[/]")
        status = 1
    if ratio > MAX_GROWTH:
        console.print(f"[bold red]per-agent cost grew {ratio:.2f}x, more than {MAX_GROWTH:g}x[/]")
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
