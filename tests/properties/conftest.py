"""Load the ``ci`` hypothesis profile unless ``--hypothesis-profile`` chose another.

The profiles are registered by importing this package (`tests/properties/__init__.py`).
`pytest_configure` is replayed for conftests found during collection, so this also runs when
pytest was started from the repository root.
"""

from __future__ import annotations

import pytest
from hypothesis import settings

from . import DEFAULT_PROFILE


def pytest_configure(config: pytest.Config) -> None:
    requested = config.getoption("hypothesis_profile", default=None)
    settings.load_profile(requested or DEFAULT_PROFILE)
