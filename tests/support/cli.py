"""Run the `lockstep` command line as a subprocess, the way users and CI do."""

from __future__ import annotations

import subprocess
import sys

from tests.support import REPO_ROOT


def run_lockstep(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`lockstep ARGS...` with no stdin; output captured as text; never raises on exit status."""
    return subprocess.run(
        [sys.executable, "-m", "coordinator.cli", *args],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
