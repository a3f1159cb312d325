"""SIGKILL a real ``lockstep apply`` mid-backfill, start it again: the backfill continues.

The migration's backfill counts its visits (``hits = hits + 1``, no WHERE, so nothing but the
stored position keeps a restarted backfill from visiting a row twice). The first process is
killed once a few batches committed; the second one, on the same database and file, must
report that it resumes after the stored key, its first batch must start right after that key
(no row below it visited again, none skipped), and every row ends with exactly one visit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import trio

from tests.support.flow import execute, history

ROWS = 3000
MIGRATION = """\
-- lockstep:sql
COMMENT ON TABLE items IS 'counted';
-- lockstep:rollback
COMMENT ON TABLE items IS NULL;
-- lockstep:backfill
table=items set="hits = hits + 1, visited_at = now()" batch_size=50 pacing=fixed delay=0.05
"""


def _apply(dsn: str, path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "coordinator.cli",
            "apply",
            str(path),
            "--dsn",
            dsn,
            "--port",
            "0",
            "--allow-no-agents",
            "-v",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
    )


def _position(dsn: str) -> tuple[str, int, int] | None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            row = conn.execute(
                "SELECT last_key, rows, batches FROM lockstep.backfill_position"
            ).fetchone()
        except psycopg.errors.UndefinedTable:
            return None
    return None if row is None else (str(row[0]), int(row[1]), int(row[2]))


@pytest.mark.slow
async def test_sigkill_mid_backfill_then_restart_continues_after_the_stored_key(
    dsn: str, tmp_path: Path
) -> None:
    execute(
        dsn,
        "CREATE TABLE items (id int PRIMARY KEY, hits int NOT NULL DEFAULT 0, "
        "visited_at timestamptz)",
        f"INSERT INTO items (id) SELECT g FROM generate_series(1, {ROWS}) g",
    )
    path = tmp_path / "001_count.sql"
    path.write_text(MIGRATION)
    first = _apply(dsn, path)
    second: subprocess.Popen[str] | None = None
    try:
        with trio.fail_after(60):
            while (position := _position(dsn)) is None or position[2] < 5:
                assert first.poll() is None, "the first apply ended before it was killed"
                await trio.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        await trio.to_thread.run_sync(first.wait)
        at_kill = _position(dsn)
        assert at_kill is not None
        last_key, rows, batches = at_kill
        assert 0 < rows < ROWS, "killed mid-backfill"
        with psycopg.connect(dsn) as conn:
            done = conn.execute("SELECT count(*), max(id) FROM items WHERE hits > 0").fetchone()
        assert done == (rows, int(last_key)), "the position is exactly what committed"

        second = _apply(dsn, path)
        with trio.fail_after(120):
            out, _ = await trio.to_thread.run_sync(second.communicate)
        assert second.returncode == 0, out
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert f"resuming after key {last_key} ({rows} rows in {batches} batches done before)" in out
    with psycopg.connect(dsn) as conn:
        visits = conn.execute("SELECT array_agg(DISTINCT hits) FROM items").fetchone()
        # The first row the second process visited is the one right after the stored key.
        first_resumed = conn.execute(
            "SELECT id FROM items WHERE id > %s ORDER BY visited_at, id LIMIT 1", (int(last_key),)
        ).fetchone()
        before = conn.execute(
            "SELECT max(visited_at) FROM items WHERE id <= %s", (int(last_key),)
        ).fetchone()
        after = conn.execute(
            "SELECT min(visited_at) FROM items WHERE id > %s", (int(last_key),)
        ).fetchone()
    assert visits == ([1],), "every row visited exactly once"
    assert first_resumed == (int(last_key) + 1,)
    assert before is not None and after is not None and before[0] < after[0]
    assert [row["status"] for row in history(dsn)] == ["completed"]
    assert _position(dsn) == (str(ROWS), ROWS, ROWS // 50)
