"""Shared fixtures: a PostgreSQL server for the whole session and a fresh database per test.

Set ``LOCKSTEP_TEST_DSN`` to run against an existing server (its role must be allowed to create
and drop databases); otherwise one embedded server is started for the session and removed at the
end. Every test that takes `dsn` gets its own empty database, so tests never see each other's
tables and can run in any order.

pytest-trio runs in trio mode; these fixtures are synchronous, which trio mode allows.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# Registers the hypothesis profiles ("ci", "thorough") before hypothesis' plugin reads
# --hypothesis-profile, so `pytest --hypothesis-profile=thorough` works from the repo root.
import tests.properties  # noqa: F401
from coordinator.cli.embedded import embedded_postgres_server
from tests.support.scratchdb import fresh_database

TEST_DSN_ENV_VAR = "LOCKSTEP_TEST_DSN"


@pytest.fixture(scope="session")
def pg_server_dsn() -> Iterator[str]:
    """DSN of the session's server (its default database: use `dsn` for a scratch one)."""
    external = os.environ.get(TEST_DSN_ENV_VAR)
    if external:
        yield external
        return
    with embedded_postgres_server() as server_dsn:
        yield server_dsn


@pytest.fixture
def dsn(pg_server_dsn: str) -> Iterator[str]:
    """DSN of a new, empty database ``lockstep_test_<hex>``, dropped (WITH FORCE) afterwards."""
    with fresh_database(pg_server_dsn, "lockstep_test") as database_dsn:
        yield database_dsn
