"""`make bench-fleet`: how the coordinator's cost grows with the number of agents.

    python -m tests.bench.fleet [--agents 10,100,1000] [--repeat 3] [--dsn URI] [--out FILE]

The design claims a broadcast encodes its frame once, recording an ack is O(1) and nothing
polls, so the time an acked phase takes should grow linearly with the fleet: its cost *per
agent* should stay flat. For each fleet size, in a fresh database: one coordinator, N real
agents over loopback WebSockets in this same trio process, then --repeat trivial additive
migrations. The exit status is 1 if a migration did not complete, or if the per-agent time of
ANNOUNCE+APPLY at the largest size is more than 4x that at the middle size (a ratio, so a slow
or loaded machine does not fail it; the smallest sizes are not the reference because fixed
costs dominate them).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psycopg
import trio
from rich.console import Console
from rich.table import Table

from agent import open_agent
from coordinator import open_coordinator
from coordinator.admission import ConnectionLimits
from coordinator.cli import options
from coordinator.cli.embedded import resolve_dsn
from statemachine import Migration, MigrationStatus, Phase
from tests.bench.markdown import replace_section
from tests.bench.markdown import table as markdown_table
from tests.support.scratchdb import fresh_database

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"
BEGIN_MARK = "<!-- bench-fleet:begin -->"
END_MARK = "<!-- bench-fleet:end -->"
SECTION_TITLE = "## Fleet scale"
#: The phases in which every agent of the cohort must ack before the migration moves on.
ACKED_PHASES = (Phase.ANNOUNCE, Phase.APPLY)
#: Largest allowed growth of ANNOUNCE+APPLY time per agent, largest size vs the reference size.
MAX_GROWTH = 4.0
CONNECT_TIMEOUT = 120.0


@dataclasses.dataclass(frozen=True)
class FleetRow:
    """Means over the migrations run at one fleet size (times in seconds)."""

    agents: int
    connect_s: float
    completed: int
    attempted: int
    migration_s: float
    phase_s: dict[str, float]
    acked_s: float
    cpu_s_per_migration: float

    @property
    def ok(self) -> bool:
        return self.completed == self.attempted

    @property
    def acks(self) -> int:
        """Acks one migration collects: every agent, once per acked phase."""
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


def _sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated agent counts like 10,100,1000, got {text!r}"
        ) from None
    if not sizes or sizes[0] <= 0:
        raise argparse.ArgumentTypeError(f"agent counts must be > 0, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench.fleet",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument(
        "--agents",
        type=_sizes,
        default=_sizes("10,100,1000"),
        help="fleet sizes, comma-separated (default 10,100,1000)",
    )
    p.add_argument(
        "--repeat", type=options.at_least_one, default=3, help="migrations per fleet size (3)"
    )
    p.add_argument("--dsn", help="PostgreSQL server to use (default: $LOCKSTEP_DSN or embedded)")
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"markdown file whose fleet section is rewritten (default {DEFAULT_OUT})",
    )
    p.add_argument("--no-write", action="store_true", help="print the markdown, write nothing")
    return p


async def _hold_agent(url: str, agent_id: str, stop: trio.Event) -> None:
    """One application instance: connected, answering phases, until `stop` is set."""
    async with open_agent(url, agent_id=agent_id, connect_timeout=CONNECT_TIMEOUT):
        await stop.wait()


async def _measure(dsn: str, agents: int, repeat: int, console: Console) -> FleetRow:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE fleet_bench (id bigint PRIMARY KEY)")
    durations: list[float] = []
    acked: list[float] = []
    cpu: list[float] = []
    phases: dict[str, list[float]] = {}
    completed = 0
    # Every benchmark agent connects from 127.0.0.1 at once: lift the per-address cap on
    # handshakes in progress that protects a real coordinator from floods.
    limits = ConnectionLimits(max_pending=100_000, max_pending_per_address=100_000)
    async with open_coordinator(
        dsn, port=0, ack_timeout=60, heartbeat_interval=30, limits=limits
    ) as coord:
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            started = time.perf_counter()
            for i in range(agents):
                nursery.start_soon(_hold_agent, coord.url, f"agent-{i}", stop)
            await coord.wait_for_agents(agents, timeout=CONNECT_TIMEOUT)
            connect_s = time.perf_counter() - started
            for i in range(repeat):
                migration = Migration(
                    f"fleet_add_c{i}", [f"ALTER TABLE fleet_bench ADD COLUMN c{i} int"]
                )
                cpu_before = time.process_time()
                t0 = time.perf_counter()
                result = await coord.run_migration(migration)
                durations.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - cpu_before)
                if result.status is MigrationStatus.COMPLETED:
                    completed += 1
                else:
                    console.print(f"  [red]{migration.name}: {result.reason}[/]")
                for record in result.phases:
                    phases.setdefault(record.phase.name, []).append(record.duration)
                acked.append(sum(r.duration for r in result.phases if r.phase in ACKED_PHASES))
            stop.set()
    return FleetRow(
        agents=agents,
        connect_s=connect_s,
        completed=completed,
        attempted=repeat,
        migration_s=statistics.fmean(durations),
        phase_s={name: statistics.fmean(values) for name, values in phases.items()},
        acked_s=statistics.fmean(acked),
        cpu_s_per_migration=statistics.fmean(cpu),
    )


async def _bench(server: str, sizes: list[int], repeat: int, console: Console) -> list[FleetRow]:
    rows = []
    for agents in sizes:
        console.print(f"[bold]{agents} agents[/], {repeat} migrations")
        with fresh_database(server, "lockstep_bench_fleet") as dsn:
            row = await _measure(dsn, agents, repeat, console)
        console.print(
            f"  connected in {row.connect_s:.2f} s; ANNOUNCE+APPLY {row.acked_s * 1000:.1f} ms"
            f" ({row.acked_ms_per_agent:.3f} ms per agent), {row.completed}/{row.attempted}"
            " completed"
        )
        rows.append(row)
    return rows


def reference_row(rows: Sequence[FleetRow]) -> FleetRow:
    """The size the largest is compared with: the middle one (the smaller for an even count)."""
    return rows[(len(rows) - 1) // 2]


def growth(rows: Sequence[FleetRow]) -> float:
    """ANNOUNCE+APPLY time per agent at the largest size over that at the reference size."""
    return rows[-1].acked_ms_per_agent / reference_row(rows).acked_ms_per_agent


_HEADERS = [
    "agents",
    "connect s",
    "completed",
    "migration ms",
    "ANNOUNCE ms",
    "EXECUTE ms",
    "APPLY ms",
    "CONFIRM ms",
    "ANNOUNCE+APPLY ms per agent",
    "acks/s",
    "CPU µs per ack",
]


def _cells(row: FleetRow) -> list[str]:
    def ms(phase: Phase) -> str:
        value = row.phase_s.get(phase.name)
        return "-" if value is None else f"{value * 1000:.1f}"

    return [
        str(row.agents),
        f"{row.connect_s:.2f}",
        f"{row.completed}/{row.attempted}",
        f"{row.migration_s * 1000:.1f}",
        ms(Phase.ANNOUNCE),
        ms(Phase.EXECUTE),
        ms(Phase.APPLY),
        ms(Phase.CONFIRM),
        f"{row.acked_ms_per_agent:.3f}",
        f"{row.acks_per_s:,.0f}",
        f"{row.cpu_us_per_ack:.0f}",
    ]


def table(rows: Sequence[FleetRow]) -> Table:
    out = Table(title="Fleet scale (means per migration)")
    for header in _HEADERS:
        out.add_column(header, justify="right")
    for row in rows:
        out.add_row(*_cells(row))
    return out


def markdown(rows: Sequence[FleetRow], header: Sequence[str]) -> str:
    """The measured part of the fleet section (without the markers)."""

    lines = markdown_table(_HEADERS, [_cells(r) for r in rows])
    return "\n".join([*header, "", *lines, ""])


def write_section(path: Path, section: str) -> None:
    """Replace the text between the fleet markers; append a "## Fleet scale" section if none."""
    replace_section(path, section, begin=BEGIN_MARK, end=END_MARK, title=SECTION_TITLE)


def _server_version(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


def _header(args: argparse.Namespace, server: str, seconds: float) -> list[str]:
    extra = " ".join(sys.argv[1:]) if __name__ == "__main__" else ""
    command = f"make bench-fleet ARGS='{extra}'" if extra else "make bench-fleet"
    return [
        f"Measured with `{command}` ({args.repeat} migrations per size, agents and coordinator"
        f" in one process, PostgreSQL {_server_version(server)}, {os.cpu_count()} CPUs,"
        f" {platform.system()} {platform.machine()}, {seconds:.0f} s in total)."
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=200)
    started = time.monotonic()
    with resolve_dsn(args.dsn) as server:
        try:
            rows = trio.run(_bench, server, args.agents, args.repeat, console)
        except trio.TooSlowError:
            console.print(
                f"[bold red]the fleet did not connect within {CONNECT_TIMEOUT:g} s[/]"
                " (try smaller --agents)"
            )
            return 1
        header = _header(args, server, time.monotonic() - started)
    console.print(table(rows))
    ratio = growth(rows)
    reference = reference_row(rows)
    console.print(
        f"ANNOUNCE+APPLY per agent: {rows[-1].agents} agents / {reference.agents} agents ="
        f" {ratio:.2f}x (limit {MAX_GROWTH:g}x)"
    )
    text = markdown(
        rows,
        [
            *header,
            "",
            f"Per-agent ANNOUNCE+APPLY time, {rows[-1].agents} agents vs {reference.agents}:"
            f" {ratio:.2f}x (the check fails above {MAX_GROWTH:g}x).",
        ],
    )
    if args.no_write:
        console.print(text, markup=False, highlight=False, soft_wrap=True)
    else:
        write_section(args.out, text)
        console.print(f"wrote the fleet section of {args.out}")
    status = 0
    if not all(row.ok for row in rows):
        console.print("[bold red]a migration did not complete[/]")
        status = 1
    if ratio > MAX_GROWTH:
        console.print(f"[bold red]per-agent cost grew {ratio:.2f}x, more than {MAX_GROWTH:g}x[/]")
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
