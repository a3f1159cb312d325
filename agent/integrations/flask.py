"""Flask: an extension whose agent starts lazily in each process, so forks are safe.

``lockstep = Lockstep(app)`` (or ``Lockstep()`` then ``init_app(app)``) reads
``app.config["LOCKSTEP"] = {"urls": [...], "dsn": ...}`` (any `ThreadedAgent` option, and
``agent_id``, default ``flask-{hostname}-{pid}``). Nothing starts at import: the agent
starts on the first ``lockstep.using(...)`` in each process, or in gunicorn's ``post_fork``
with the hooks of `agent.integrations.gunicorn`, so an app preloaded in gunicorn's master
gets one agent per worker, under the worker's own id.

``with lockstep.using("add_email") as new:`` (or ``@lockstep.using("add_email")`` on a view)
counts the request as in flight on the query set it chose; ``lockstep.choose(name, old,
new)`` returns that set's model, query or SQL anywhere inside it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from flask import Flask, current_app, has_app_context

from agent.errors import AgentConfigError, AgentError
from agent.integrations import common
from agent.integrations.common import OutsideUsing, ProcessAgent
from agent.threaded import ThreadedAgent

EXTENSION = "lockstep"


class Lockstep:
    """The Flask extension; `options` override ``app.config["LOCKSTEP"]``."""

    choose = staticmethod(common.choose)
    is_new = staticmethod(common.is_new)

    def __init__(self, app: Flask | None = None, **options: Any) -> None:
        self._options = options
        self._last: ProcessAgent | None = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Read the app's settings (bad ones raise `AgentConfigError` here, naming them)."""
        settings = app.config.get("LOCKSTEP", {})
        holder = ProcessAgent.from_settings(
            {**settings, **self._options} if isinstance(settings, dict) else settings,
            where='app.config["LOCKSTEP"]',
            default_agent_id="flask-{hostname}-{pid}",
        )
        app.extensions[EXTENSION] = holder
        self._last = holder

    def _holder(self) -> ProcessAgent:
        if has_app_context() and EXTENSION in current_app.extensions:
            holder: ProcessAgent = current_app.extensions[EXTENSION]
            return holder
        if self._last is None:
            raise AgentError("Lockstep.init_app(app) was not called")
        return self._last

    @property
    def agent(self) -> ThreadedAgent:
        """This process's agent (of the current app), started now if it was not yet."""
        return self._holder().get()

    def using(self, name: str) -> AbstractContextManager[bool]:
        """``agent.using(name)`` for this request, as a context manager or a view decorator."""
        return common.using(lambda: self.agent, name)


__all__ = ["AgentConfigError", "Lockstep", "OutsideUsing"]
