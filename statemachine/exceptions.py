"""Exception helpers shared by the coordinator and the agent (pure Python, no trio)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def unwrap_single_group() -> Iterator[None]:
    """Re-raise the lone exception of an `ExceptionGroup` as itself.

    trio's strict exception groups wrap even a single error raised in a nursery; users of
    `open_coordinator`/`open_agent` should see their own `ValueError`, not a group around it.
    Groups of several errors are left alone: nothing would be honest to pick.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        inner: BaseException = group
        while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
            inner = inner.exceptions[0]
        if inner is group:
            raise
        raise inner from None
