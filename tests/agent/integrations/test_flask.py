"""The Flask extension: settings checked at init_app, the agent started on first use."""

from __future__ import annotations

import pytest
import trio

from agent import AgentConfigError
from coordinator import open_coordinator

flask = pytest.importorskip("flask")

from agent.integrations.flask import Lockstep  # noqa: E402


def test_bad_settings_are_refused_at_init_app_naming_the_setting() -> None:
    app = flask.Flask(__name__)
    app.config["LOCKSTEP"] = {"url": "ws://127.0.0.1:1"}
    with pytest.raises(AgentConfigError, match=r'app.config\["LOCKSTEP"\] has no .urls.'):
        Lockstep(app)


async def test_the_agent_starts_at_the_first_request_not_at_import(dsn: str) -> None:
    async with open_coordinator(dsn) as coord:
        app = flask.Flask(__name__)
        app.config["LOCKSTEP"] = {"urls": coord.url, "agent_id": "flask-test"}
        lockstep = Lockstep(app)

        @app.get("/users")
        @lockstep.using("add_email")
        def users() -> dict[str, object]:
            return {"query": lockstep.choose("add_email", "old", "new")}

        await trio.sleep(0.2)
        assert not coord.agents  # Lockstep(app) started nothing
        response = await trio.to_thread.run_sync(lambda: app.test_client().get("/users"))
        assert response.json == {"query": "old"}
        await coord.wait_for_agents(1, timeout=10)
        await trio.to_thread.run_sync(lambda: lockstep.agent.stop())


def test_settings_that_are_not_a_dict_are_refused() -> None:
    app = flask.Flask(__name__)
    app.config["LOCKSTEP"] = "ws://127.0.0.1:1"
    with pytest.raises(AgentConfigError, match="must be a dict, not str"):
        Lockstep(app)
