"""Regenerate docs/diagrams/ from the transition tables: ``python docs/gen_diagrams.py [--check]``.

The same code as ``lockstep diagram`` (`coordinator.cli.commands.diagram`), pinned to this folder so
it works from any working directory. ``--check`` writes nothing and exits 1 when a committed
diagram differs from what the code generates.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing lockstep

from coordinator.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["diagram", "--out", str(HERE / "diagrams"), *sys.argv[1:]]))
