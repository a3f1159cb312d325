"""ThreadedAgent fits app servers: quick stop, exit without stop(), refusal after a fork.

The exit and fork tests run real interpreters (subprocesses), with a real coordinator for the
script that must exit by itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import trio

from agent import AgentForked, MigrationInfo, ThreadedAgent
from coordinator import open_coordinator
from statemachine import Migration
from tests.support.flow import make_users

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _python(script: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


async def test_stop_is_quick_while_connected(dsn: str) -> None:
    async with open_coordinator(dsn) as coord:
        app = ThreadedAgent(coord.url, agent_id="web-1")
        await trio.to_thread.run_sync(app.start)
        await coord.wait_for_agents(1, timeout=10)
        assert app.connected
        started = time.perf_counter()
        await trio.to_thread.run_sync(app.stop)
        took = time.perf_counter() - started
        print(f"ThreadedAgent.stop() took {took * 1000:.1f} ms while connected")
        assert app.agent is not None and not app.agent.connected
        assert took < 3, "a sanity bound only: stop() should take well under a second"


def test_stop_is_quick_while_still_connecting() -> None:
    app = ThreadedAgent("ws://127.0.0.1:1", agent_id="web-1").start()
    started = time.perf_counter()
    app.stop()
    took = time.perf_counter() - started
    print(f"ThreadedAgent.stop() took {took * 1000:.1f} ms while reconnecting")
    assert took < 3


def test_the_agent_thread_is_a_daemon() -> None:
    app = ThreadedAgent("ws://127.0.0.1:1", agent_id="web-1").start()
    try:
        assert app._thread is not None and app._thread.daemon
    finally:
        app.stop()


async def test_a_script_that_never_calls_stop_exits(dsn: str) -> None:
    async with open_coordinator(dsn) as coord:
        script = f"""
            import time
            from agent import ThreadedAgent
            app = ThreadedAgent({coord.url!r}, agent_id="script-1").start()
            deadline = time.monotonic() + 10
            while not app.connected and time.monotonic() < deadline:
                time.sleep(0.02)
            print("connected" if app.connected else "not connected", flush=True)
            # no stop(): the atexit hook closes the agent, the daemon thread does not block exit
        """
        started = time.perf_counter()
        done = await trio.to_thread.run_sync(_python, script)
        took = time.perf_counter() - started
        print(f"the script exited in {took:.2f} s")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "connected"
        assert "Traceback" not in done.stderr
        with trio.fail_after(10):  # the atexit hook closed the socket: the coordinator saw it
            while coord.agents:
                await trio.sleep(0.02)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_refuses_the_parents_agent() -> None:
    script = """
        import os
        from agent import AgentForked, ThreadedAgent
        app = ThreadedAgent("ws://127.0.0.1:1", agent_id="master").start()
        pid = os.fork()
        if pid == 0:
            try:
                app.is_applied("add_email")
            except AgentForked as exc:
                print("child:", exc, flush=True)
                app.stop()  # a no-op in the child, so worker_exit/atexit hooks do not fail
                os._exit(0)
            os._exit(1)
        _, status = os.waitpid(pid, 0)
        print("parent still works:", app.is_applied("add_email") is False, flush=True)
        app.stop()
        raise SystemExit(os.waitstatus_to_exitcode(status))
    """
    done = _python(script)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "post_fork" in done.stdout and "before a fork" in done.stdout
    assert "parent still works: True" in done.stdout


def test_agent_forked_is_a_lockstep_error() -> None:
    from statemachine.exceptions import LockstepError

    assert issubclass(AgentForked, LockstepError)


async def test_stop_does_not_wait_for_a_blocked_hook(dsn: str) -> None:
    make_users(dsn)
    entered, release = threading.Event(), threading.Event()

    def on_announce(info: MigrationInfo) -> None:
        entered.set()
        release.wait(30)  # a hook stuck on the app's side

    async with open_coordinator(dsn, ack_timeout=3) as coord:
        app = ThreadedAgent(coord.url, agent_id="web-1", on_announce=on_announce)
        await trio.to_thread.run_sync(app.start)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                coord.run_migration, Migration("add_email", "ALTER TABLE users ADD COLUMN e TEXT")
            )
            await trio.to_thread.run_sync(entered.wait, 10)
            started = time.perf_counter()
            await trio.to_thread.run_sync(app.stop)
            took = time.perf_counter() - started
            release.set()  # the migration fails (the agent left mid-ANNOUNCE) and returns
    print(f"ThreadedAgent.stop() took {took * 1000:.1f} ms with a hook blocked")
    assert took < 3
