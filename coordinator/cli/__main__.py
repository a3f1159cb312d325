"""``python -m coordinator.cli``: the same as the ``lockstep`` command."""

from coordinator.cli import main

raise SystemExit(main())
