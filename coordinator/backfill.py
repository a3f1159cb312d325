"""Batched backfills: rewrite existing rows in short transactions between EXECUTE and APPLY.

Why batches: one ``UPDATE users SET full_name = name`` on a big table holds row locks on every
row until it commits and writes one huge transaction; the application's writes to those rows
wait the whole time. A backfill instead updates at most `batch_size` rows per transaction,
ordered by `key`, each batch with the executor's `lock_timeout`/`statement_timeout` and
lock-timeout retries, optionally sleeping `delay` seconds between batches to leave room for the
application.

Resuming: batches follow the key (keyset pagination: each batch starts after the last key of
the previous one), so progress never depends on the WHERE clause and each row is visited once,
even when the SET does not change whether the row matches. The position lives in memory: if the
coordinator restarts, the backfill starts again from the lowest key. Give it a WHERE that
excludes done rows (``where="full_name IS NULL"``) and a restarted backfill only rewrites the
rows still to do: it resumes naturally, paying only an index scan over the done ones.

`key` must be unique and NOT NULL (a primary key is ideal, and an index on it keeps each batch
cheap): rows sharing a key value across a batch boundary, or with a NULL key, would be skipped.

Rows inserted while the backfill runs with a key below the current position are not visited:
the expand step must keep new rows correct itself (a sync trigger or a default), as the
rename recipe does.

The fragments of a `Backfill` (`table`, `set`, `key`, `where`) are SQL written by the migration
author, like the migration's statements; the batch statement built from them is parsed with
PostgreSQL's parser before the first batch, so a fragment that does not fit (or that smuggles a
second statement in) fails clearly before anything runs.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import psycopg
import trio

from coordinator.events import Reporter, SqlProgress
from coordinator.pg.attempts import AttemptOutcome, LockSafeSession
from coordinator.pg.errors import SqlFailure
from statemachine.migration import Backfill
from statemachine.phases import Phase
from statemachine.result import BackfillStats
from statemachine.sql import SqlSyntaxError, parse_statement


@dataclasses.dataclass(frozen=True)
class BackfillProgress(SqlProgress):
    """A batch committed: totals so far for `table`."""

    table: str
    batches: int
    rows: int


class BackfillFailed(SqlFailure):
    """A batch failed; `stats` holds what the batches before it did (they stay committed)."""

    def __init__(self, statement: str | None, message: str, stats: BackfillStats, **kw: Any):
        super().__init__(statement, message, **kw)
        self.stats = stats


@dataclasses.dataclass(frozen=True)
class BatchQuery:
    """The batch statement, for the first batch and for the ones after a key."""

    first: str
    next: str
    display: str
    checked: str  # the same statement with $1/$2 parameters, as the parser saw it


def _batch_sql(backfill: Backfill, *, after: str | None, limit: str) -> str:
    key, table = backfill.key, backfill.table
    conditions = []
    if backfill.where:
        conditions.append(f"({backfill.where})")
    if after is not None:
        conditions.append(f"{key} > {after}")
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    recheck = f" AND ({backfill.where})" if backfill.where else ""
    return (
        f"WITH lockstep_batch AS (SELECT {key} AS k FROM {table}{where} "
        f"ORDER BY {key} LIMIT {limit}), "
        f"lockstep_updated AS (UPDATE {table} SET {backfill.set} "
        f"WHERE {key} IN (SELECT k FROM lockstep_batch){recheck} RETURNING 1) "
        "SELECT (SELECT k FROM lockstep_batch ORDER BY k DESC LIMIT 1), "
        "(SELECT count(*) FROM lockstep_batch), (SELECT count(*) FROM lockstep_updated)"
    )


def batch_query(backfill: Backfill) -> BatchQuery:
    """Build and check the batch statement; `SqlFailure` if the fragments do not make one.

    The executed text uses psycopg placeholders, so a ``%`` in a fragment is doubled; the
    parser checks the same text with PostgreSQL's ``$n`` parameters.
    """
    checked = _batch_sql(backfill, after="$1", limit="$2")
    try:
        parse_statement(checked)
    except SqlSyntaxError as exc:
        raise SqlFailure(None, f"backfill of {backfill.table}: invalid SQL: {exc.message}") from exc
    except ValueError as exc:
        raise SqlFailure(None, f"backfill of {backfill.table}: {exc}") from exc
    escaped = dataclasses.replace(
        backfill,
        table=backfill.table.replace("%", "%%"),
        set=backfill.set.replace("%", "%%"),
        key=backfill.key.replace("%", "%%"),
        where=None if backfill.where is None else backfill.where.replace("%", "%%"),
    )
    where = f" WHERE {backfill.where}" if backfill.where else ""
    return BatchQuery(
        first=_batch_sql(escaped, after=None, limit="%(limit)s"),
        next=_batch_sql(escaped, after="%(last)s", limit="%(limit)s"),
        checked=checked,
        display=f"UPDATE {backfill.table} SET {backfill.set}{where} "
        f"(batches of {backfill.batch_size} by {backfill.key})",
    )


_Work = Callable[[psycopg.Connection[Any], list[str | None]], tuple[Any, int, int]]


def _batch_work(sql_text: str, params: dict[str, Any], display: str) -> _Work:
    """One batch: returns (last key of the batch, rows selected, rows updated)."""

    def work(conn: psycopg.Connection[Any], current: list[str | None]) -> tuple[Any, int, int]:
        current[0] = display
        row = conn.execute(sql_text.encode(), params).fetchone()
        assert row is not None
        return row[0], int(row[1]), int(row[2])

    return work


async def run_backfill(
    session: LockSafeSession, backfill: Backfill, report: Reporter
) -> BackfillStats:
    """Update every matching row in batches; raise `BackfillFailed` if a batch fails."""
    query = batch_query(backfill)
    started = time.monotonic()
    batches = rows = lock_retries = 0
    last: Any = None
    report.say(Phase.EXECUTE, f"backfill {backfill.table}: {query.display}")

    def stats(complete: bool) -> BackfillStats:
        return BackfillStats(
            backfill.table, rows, batches, time.monotonic() - started, lock_retries, complete
        )

    def record(
        number: int, ok: bool, seconds: float, error: str | None, detail: str | None
    ) -> None:
        nonlocal lock_retries
        if error == "lock_timeout":
            lock_retries += 1

    while True:
        if batches == 0:
            work = _batch_work(query.first, {"limit": backfill.batch_size}, query.display)
        else:
            params = {"limit": backfill.batch_size, "last": last}
            work = _batch_work(query.next, params, query.display)

        async def attempt(work: _Work = work) -> AttemptOutcome[tuple[Any, int, int]]:
            return await session.transaction_attempt([query.display], work)

        label = f"backfill {backfill.table} batch {batches + 1}"
        try:
            value = await session.with_lock_retries(
                Phase.EXECUTE, label, [query.checked], attempt, record, report
            )
        except SqlFailure as exc:
            raise BackfillFailed(
                query.display,
                f"backfill of {backfill.table} failed in batch {batches + 1} "
                f"(after {rows} rows in {batches} batches): {exc.message}",
                stats(False),
                sqlstate=exc.sqlstate,
                blockers=exc.blockers,
            ) from exc
        assert value is not None
        last_key, selected, updated = value
        if selected == 0:
            break
        batches += 1
        rows += updated
        last = last_key
        report.event(
            BackfillProgress(
                report.migration,
                Phase.EXECUTE,
                f"backfill {backfill.table}: batch {batches} updated {updated} rows "
                f"({rows} so far)",
                table=backfill.table,
                batches=batches,
                rows=rows,
            )
        )
        if selected < backfill.batch_size:
            break  # a short batch was the last one: no need to ask for an empty one
        if backfill.delay:
            await trio.sleep(backfill.delay)
    done = stats(True)
    report.say(
        Phase.EXECUTE,
        f"backfill {backfill.table} done: {done.rows} rows in {done.batches} batches "
        f"({done.seconds:.1f} s)",
    )
    return done


__all__ = ["BackfillFailed", "BackfillProgress", "BatchQuery", "batch_query", "run_backfill"]
