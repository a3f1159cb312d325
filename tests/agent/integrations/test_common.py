"""ProcessAgent (one agent per process, a fresh one after a fork) and the per-request choice."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest

from agent import AgentConfigError
from agent.integrations.common import OutsideUsing, ProcessAgent, choose, is_new, using

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
NOWHERE = "ws://127.0.0.1:1"  # refused at once: the agent starts with nothing applied


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"urls": NOWHERE, "dns": "x"}, "unknown agent option(s) dns"),
        ({"dsn": "x"}, "has no 'urls'"),
        ({"urls": []}, "no coordinator URL"),
        ({"urls": NOWHERE, "agent_id": "web-{port}"}, "only {hostname} and {pid}"),
        (["ws://x"], "must be a dict, not list"),
    ],
)
def test_bad_settings_get_a_clear_error_naming_the_setting(settings: object, message: str) -> None:
    with pytest.raises(AgentConfigError) as raised:
        ProcessAgent.from_settings(settings, where="LOCKSTEP", default_agent_id="web-{pid}")
    assert message in str(raised.value) and str(raised.value).startswith("LOCKSTEP")


def test_the_agent_starts_on_first_use_under_an_id_naming_the_process() -> None:
    holder = ProcessAgent(NOWHERE, agent_id="web-{pid}")
    assert not holder.started
    agent = holder.get()
    try:
        assert holder.started and holder.get() is agent
        assert agent.agent_id == f"web-{os.getpid()}"
    finally:
        holder.stop()
    assert not holder.started


def test_choose_outside_using_is_refused() -> None:
    with pytest.raises(OutsideUsing, match="wrap the request in using"):
        choose("add_email", "old", "new")


def test_choose_follows_the_scope_of_each_thread(dsn: str) -> None:
    # With no coordinator the agent is vouched by the durable state (nothing applied here);
    # without a database to read either, it would be fenced and refuse every request.
    holder = ProcessAgent(NOWHERE, agent_id="web-{pid}", dsn=dsn)
    try:
        seen: list[object] = []

        @using(holder.get, "add_email")
        def view() -> str:
            return choose("add_email", "old", "new")

        threads = [threading.Thread(target=lambda: seen.append(view())) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert seen == ["old"] * 4  # nothing applied: the old query set, in every thread
        with using(holder.get, "add_email") as new:
            assert new is False and is_new("add_email") is False
            assert holder.get().agent is not None
            assert holder.get().agent.inflight.count("add_email", False) == 1
        with pytest.raises(OutsideUsing):
            is_new("add_email")  # the scope ended with the block
    finally:
        holder.stop()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_gets_its_own_agent() -> None:
    script = f"""
        import os
        from agent.integrations.common import ProcessAgent
        holder = ProcessAgent({NOWHERE!r}, agent_id="web-{{pid}}")
        parent = holder.get()
        pid = os.fork()
        if pid == 0:
            child = holder.get()  # no AgentForked: a new agent, the child's
            child.is_applied("add_email")  # the forked parent's agent would raise here
            print("child", child is not parent, child.agent_id == f"web-{{os.getpid()}}")
            holder.stop()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print("parent", holder.get() is parent)
        holder.stop()
        raise SystemExit(os.waitstatus_to_exitcode(status))
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "child True True" in done.stdout and "parent True" in done.stdout
