"""The bounded fuzz run of `make test`: 20,000 mutated frames over loopback, then a migration.

See `tests.support.fuzzing`; the million-frame run and the floods are in tests/fault.
"""

from __future__ import annotations

import logging

import pytest

from coordinator import open_coordinator
from tests.coordinator.test_flood import _join_and_migrate
from tests.support.fuzzing import fuzz_clients, now, rss_bytes

FRAMES = 20_000


async def test_fuzzed_frames_never_crash_and_memory_stays_flat(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A short lease: fuzz clients that said hello are departing until their lease certainly
    # expired, and the closing migration would wait that long for them.
    async with open_coordinator(dsn, port=0, lease_seconds=1.0) as coord:
        await fuzz_clients(coord.url, 1000, seed=1)  # warm-up: caches, first allocations
        before = rss_bytes()
        started = now()
        sent = await fuzz_clients(coord.url, FRAMES, seed=2)
        elapsed = now() - started
        after = rss_bytes()
        assert sent == FRAMES
        assert elapsed < 60
        assert after - before < 32 * 1024 * 1024, (before, after)
        await _join_and_migrate(coord, "after_fuzz")
    crashes = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not crashes
