"""The large-table scenario: a foreign key and a NOT NULL (via a CHECK) on a big table.

    make bench-traffic ARGS='--rows 1000000'

Small tables hide the difference between "locks briefly, then scans" and "scans while
locked": both take milliseconds. On a million rows each VALIDATE scans for a noticeable time,
so the application's longest stall shows whether a lock that blocks it is held during a scan.
The same SQL runs twice under the same traffic, each time in a fresh database: through lockstep
(which runs each VALIDATE alone, after the ADD's lock committed) and in one transaction
(ADD ... NOT VALID, VALIDATE, ... all under the ADD's locks, as a plain migration tool would).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import psycopg
import trio

from statemachine.migration import Migration
from statemachine.sql.files import parse_migration_text
from tests.bench import harness
from tests.bench.apploop import QueryLoop
from tests.bench.recipes import ROWS, Recipe

MIGRATION = """\
-- lockstep:sql
ALTER TABLE orders ADD CONSTRAINT orders_customer_fk
    FOREIGN KEY (customer_id) REFERENCES customers (id) NOT VALID;
ALTER TABLE orders VALIDATE CONSTRAINT orders_customer_fk;
ALTER TABLE orders ADD CONSTRAINT orders_note_not_null CHECK (note IS NOT NULL) NOT VALID;
ALTER TABLE orders VALIDATE CONSTRAINT orders_note_not_null;
-- lockstep:contract
ALTER TABLE orders ALTER COLUMN note SET NOT NULL;
ALTER TABLE orders DROP CONSTRAINT orders_note_not_null;
"""

_QUERIES = (
    "SELECT id, note FROM orders WHERE id = %(id)s",
    "INSERT INTO orders (customer_id, note) VALUES (1 + %(n)s, %(s)s)",
    "UPDATE orders SET note = %(s)s WHERE id = %(id)s",
)


def _check(conn: psycopg.Connection[Any]) -> list[str]:
    row = conn.execute(
        "SELECT count(*) FROM pg_constraint WHERE conname = 'orders_customer_fk' AND convalidated"
    ).fetchone()
    problems = [] if row and row[0] == 1 else ["orders_customer_fk is missing or not validated"]
    row = conn.execute(
        "SELECT attnotnull FROM pg_attribute WHERE attrelid = 'orders'::regclass"
        " AND attname = 'note'"
    ).fetchone()
    return problems if row and row[0] else [*problems, "orders.note is not NOT NULL"]


def recipe(rows: int) -> Recipe:
    """The scenario as a `Recipe`, so the harness drives it like any other."""
    return Recipe(
        key="big_table",
        title=f"FK + NOT NULL via CHECK on {rows:,} rows",
        file="",
        table="orders",
        setup=(
            "CREATE TABLE customers (id bigint PRIMARY KEY)",
            "INSERT INTO customers SELECT generate_series(1, 1000)",
            "CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id bigint, note text)",
            f"INSERT INTO orders (customer_id, note) SELECT 1 + g % 1000, 'n' || g"
            f" FROM generate_series(1, {max(rows, ROWS)}) g",
            "VACUUM ANALYZE orders",
        ),
        old_queries=_QUERIES,
        new_queries=_QUERIES,
        check=_check,
        breaks_old_code=False,
    )


def migration() -> Migration:
    return parse_migration_text(MIGRATION, default_name="big_table_constraints")


@dataclasses.dataclass(frozen=True)
class BigRow:
    mode: str
    seconds: float
    queries: int
    failed: int
    longest_stall_ms: float
    error: str | None = None


def _longest(traffic: harness.Traffic) -> tuple[int, int, float]:
    during = traffic.during(traffic.ddl)
    failed = sum(1 for s in during if s.error is not None)
    longest = max((s.seconds for s in during), default=0.0) * 1000
    return len(during), failed, longest


def _one_transaction(dsn: str, statements: list[str]) -> str | None:
    try:
        with psycopg.connect(dsn) as conn:
            for statement in statements:
                conn.execute(statement.encode())
    except psycopg.Error as exc:
        return f"{type(exc).__name__}: {str(exc).strip()}"
    return None


async def _in_one_transaction(
    dsn: str, big: Recipe, *, instances: int, min_queries: int, pause: float
) -> harness.DirectRun:
    await harness.setup_schema(dsn, big)
    m = migration()
    loops = [
        QueryLoop(dsn, m.name, big.old_queries, big.new_queries, pause=pause, seed=i)
        for i in range(instances)
    ]
    async with trio.open_nursery() as nursery:
        for loop in loops:
            nursery.start_soon(loop.run)
        try:
            await harness.each_serves(loops, min_queries, since=0.0, stuck_after=120.0)
            baseline = await harness.measure_baseline(loops, 0.0, min_queries, 120.0)
            started = time.monotonic()
            error = await trio.to_thread.run_sync(_one_transaction, dsn, [*m.sql, *m.contract_sql])
            ddl = harness.Window(started, time.monotonic())
            await harness.each_serves(loops, min_queries, since=ddl.end, stuck_after=120.0)
        finally:
            for loop in loops:
                loop.stop()
    traffic = harness.Traffic(harness.merged_samples(loops), baseline, ddl)
    return harness.DirectRun(big, traffic, error)


async def run_big_table(
    server: str, rows: int, *, agents: int, min_queries: int, pause: float, lock_timeout: float
) -> list[BigRow]:
    """Both runs, each in a fresh database: the rows of the report."""
    big = recipe(rows)
    out: list[BigRow] = []
    with harness.fresh_database(server) as dsn:
        run = await harness.run_with_lockstep(
            dsn,
            big,
            agents=agents,
            min_queries=min_queries,
            pause=pause,
            lock_timeout=lock_timeout,
            migration=migration(),
            stuck_after=600.0,
        )
    queries, failed, longest = _longest(run.traffic)
    problems = "; ".join(run.schema_problems) or run.result.reason
    out.append(BigRow("lockstep", run.traffic.ddl.seconds, queries, failed, longest, problems))
    with harness.fresh_database(server) as dsn:
        direct = await _in_one_transaction(
            dsn, big, instances=agents, min_queries=min_queries, pause=pause
        )
    queries, failed, longest = _longest(direct.traffic)
    out.append(
        BigRow(
            "same SQL in one transaction",
            direct.traffic.ddl.seconds,
            queries,
            failed,
            longest,
            direct.ddl_error,
        )
    )
    return out


def markdown(rows: int, results: list[BigRow]) -> str:
    lines = [
        f"Large table ({rows:,} rows): add a foreign key and a NOT NULL via a CHECK under traffic.",
        "",
        "| mode | migration s | queries during | failed | longest stall ms |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r.mode} | {r.seconds:.2f} | {r.queries} | {r.failed} | {r.longest_stall_ms:.0f} |"
        )
    return "\n".join(lines) + "\n"
