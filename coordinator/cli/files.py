"""Reading migration files from disk: one ``.sql`` file, or a directory of them in order.

The parsing itself is pure (`statemachine.sql.files`); this module adds the file system: it
reads text, names each migration after its file, orders a directory naturally (``2_x`` before
``10_x``, via `sort_migration_filenames`) and turns every problem into a `MigrationLoadError`
that starts with ``path:line:`` like a compiler error, so editors and CI logs can jump to it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from coordinator.cli.reading import MAX_MIGRATION_BYTES, UnreadableFile, read_regular_file
from statemachine.exceptions import LockstepError
from statemachine.migration import Migration
from statemachine.sql import (
    MigrationFileError,
    MigrationSource,
    migration_name_from_filename,
    parse_migration_source,
    sort_migration_filenames,
)

SUFFIX = ".sql"


class MigrationLoadError(LockstepError):
    """Raised by `load_path(s)` when a path is not a usable migration file or directory; `line`
    is None for whole-file errors."""

    def __init__(self, path: Path, message: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line
        self.message = message


@dataclasses.dataclass(frozen=True)
class MigrationFile:
    """A migration read from `path`, with the file line of each statement (for lint)."""

    path: Path
    source: MigrationSource

    @property
    def migration(self) -> Migration:
        return self.source.migration


def load_file(path: Path) -> MigrationFile:
    """Read and parse one migration file (its name defaults to the file name).

    Only regular files of at most `MAX_MIGRATION_BYTES` are read: a symlink to /dev/zero or
    a FIFO is an error, not a hang.
    """
    try:
        text = read_regular_file(path, MAX_MIGRATION_BYTES).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MigrationLoadError(
            path, f"not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from exc
    except UnreadableFile as exc:
        raise MigrationLoadError(path, str(exc)) from exc
    try:
        source = parse_migration_source(text, default_name=migration_name_from_filename(path.name))
    except MigrationFileError as exc:
        raise MigrationLoadError(path, exc.message, exc.line) from exc
    return MigrationFile(path, source)


def migration_paths(directory: Path) -> list[Path]:
    """The ``.sql`` files directly in `directory`, in natural order (not recursive)."""
    try:
        names = [p.name for p in directory.iterdir() if p.is_file() and p.suffix.lower() == SUFFIX]
    except OSError as exc:
        raise MigrationLoadError(directory, f"cannot list: {exc.strerror or exc}") from exc
    return [directory / name for name in sort_migration_filenames(names)]


def load_path(path: Path) -> list[MigrationFile]:
    """A file gives one migration; a directory gives its ``.sql`` files in natural order.

    Raises `MigrationLoadError` for a missing path, an empty directory, a file that does not
    parse, or two files that declare the same migration name.
    """
    if path.is_dir():
        paths = migration_paths(path)
        if not paths:
            raise MigrationLoadError(path, f"no {SUFFIX} migration files in this directory")
    elif path.exists():
        paths = [path]
    else:
        raise MigrationLoadError(path, "no such file or directory")
    return _unique([load_file(p) for p in paths])


def load_paths(paths: list[Path]) -> list[MigrationFile]:
    """`load_path` for each argument, in the order given (names must be unique overall)."""
    return _unique([f for path in paths for f in load_path(path)])


def _unique(files: list[MigrationFile]) -> list[MigrationFile]:
    """Names identify migrations in the history: two files with one name would collide."""
    seen: dict[str, Path] = {}
    for f in files:
        name = f.migration.name
        if name in seen:
            raise MigrationLoadError(
                f.path, f"migration name {name!r} is also used by {seen[name]}"
            )
        seen[name] = f.path
    return files


__all__ = [
    "MigrationFile",
    "MigrationLoadError",
    "load_file",
    "load_path",
    "load_paths",
    "migration_paths",
]
