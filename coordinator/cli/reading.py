"""Reading a user-named file safely: regular files only, with a size bound.

A path the user gives may be a symlink to ``/dev/zero`` (an endless read), a FIFO (a read
that blocks forever) or a huge file. `read_regular_file` opens without blocking, checks on
the open descriptor (no race with a swapped path) that it is a regular file, and reads at
most the bound.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from statemachine.exceptions import LockstepError

#: The largest migration file lockstep reads (a migration is SQL, not a data dump).
MAX_MIGRATION_BYTES = 8 * 1024 * 1024


class UnreadableFile(LockstepError):
    """Raised by `read_regular_file` for a missing, special, unreadable or oversized file;
    the message names the reason (not the path: callers prefix it)."""


def read_regular_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of `path`, which must be a regular file of at most `max_bytes` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise UnreadableFile(f"cannot read: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableFile("not a regular file")
        if info.st_size > max_bytes:
            raise UnreadableFile(f"{info.st_size} bytes, more than the limit of {max_bytes}")
        chunks: list[bytes] = []
        total = 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:
            raise UnreadableFile(f"more than the limit of {max_bytes} bytes")
        return b"".join(chunks)
    except OSError as exc:
        raise UnreadableFile(f"cannot read: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


__all__ = ["MAX_MIGRATION_BYTES", "UnreadableFile", "read_regular_file"]
