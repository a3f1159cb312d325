"""Restart the test PostgreSQL server for real (``pg_ctl restart -m fast``), for fault tests.

Every session of the server is cut at once and the server is unreachable for about a second,
as in a failover or a crash-restart. Works for the embedded server and any local server this
process may run ``pg_ctl`` for; `RestartUnavailable` says why not otherwise (the test skips).
"""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

import psycopg


class RestartUnavailable(Exception):
    """Raised by `restart_postgres` when this process cannot restart the server at `dsn`
    (not local, no ``pg_ctl`` next to the server's binaries, not allowed)."""


def restart_postgres(dsn: str, timeout: float = 60) -> None:
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT current_setting('data_directory'), "
                "(SELECT setting FROM pg_config WHERE name = 'BINDIR')"
            ).fetchone()
    except psycopg.Error as exc:
        raise RestartUnavailable(f"cannot ask the server where it lives: {exc}") from exc
    assert row is not None
    data_dir, bin_dir = Path(row[0]), Path(row[1])
    pg_ctl = bin_dir / "pg_ctl"
    if not data_dir.is_dir() or not pg_ctl.exists():
        raise RestartUnavailable(f"the server's {data_dir} or {pg_ctl} is not on this machine")
    owner = data_dir.stat().st_uid
    user = pwd.getpwuid(owner).pw_name if os.geteuid() == 0 and owner != 0 else None
    if user is None and owner != os.geteuid():
        raise RestartUnavailable(f"{data_dir} belongs to another user")
    # With its output in a file: a server started by pg_ctl keeps inherited pipes open.
    log = data_dir / "restart.log"
    subprocess.run(
        [str(pg_ctl), "restart", "-D", str(data_dir), "-m", "fast", "-w", "-l", str(log)],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        user=user,
        timeout=timeout + 10,
    )
