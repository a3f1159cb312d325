"""Real coordinator processes for system and CLI tests: free ports, readiness, serve."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import IO

import trio


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def listening(port: int, timeout: float = 30) -> None:
    """Wait until a process accepts connections on `port`."""
    with trio.fail_after(timeout):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


async def leading(dsn: str, timeout: float = 30) -> None:
    """Wait until some coordinator holds the leader lock of the database at `dsn`."""
    from coordinator.snapshot import read_snapshot

    with trio.fail_after(timeout):
        while True:
            snap = await read_snapshot(dsn, limit=1)
            if snap.leader is not None and snap.leader.alive:
                # It serves agents once it has read the durable state, just after the lock.
                await trio.sleep(0.5)
                return
            await trio.sleep(0.05)


def lockstep_process(*args: str, output: IO[str] | None = None) -> subprocess.Popen[str]:
    """`lockstep ARGS...` as a background process, stdout and stderr merged, no colour.

    The output goes to a pipe (read it with `stop` or ``communicate``) or, for processes
    that run long or are killed, to the file `output`, which never fills up and blocks them.
    """
    return subprocess.Popen(
        [sys.executable, "-m", "coordinator.cli", *args],
        stdout=subprocess.PIPE if output is None else output,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
    )


def serve(dsn: str, port: int, *extra: str, output: IO[str] | None = None) -> subprocess.Popen[str]:
    """`lockstep serve` on 127.0.0.1:`port`, with short intervals for tests."""
    return lockstep_process(
        "serve", "--dsn", dsn, "--port", str(port), "--ack-timeout", "20", *extra, output=output
    )


async def stop(proc: subprocess.Popen[str], sig: int) -> str:
    """Send `sig`, wait for the exit, return everything it printed."""
    proc.send_signal(sig)
    out, _ = await trio.to_thread.run_sync(proc.communicate)
    return out


def reap(*procs: subprocess.Popen[str] | None) -> None:
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
