"""Django: an app that starts the agent in servers only, and the per-request query choice.

Add ``"agent.integrations.django.LockstepConfig"`` to ``INSTALLED_APPS`` and configure::

    LOCKSTEP = {"urls": ["ws://coord:8765"], "dsn": DATABASE_URL}

`LockstepConfig.ready` starts a `ThreadedAgent` in server processes (gunicorn, uwsgi, daphne
and uvicorn workers, ``runserver``'s serving child) and in no management command, unless the
command is listed (``"management_commands": ["rqworker"]``): ``migrate``, ``shell`` or
``check`` must run with the coordinator down and must not join the fleet. The id names the
process (``"agent_id": "web-{hostname}-{pid}"``, the default being ``django-...``), and the
agent is per process (`ProcessAgent`): after a fork the child starts its own.

Per request: ``lockstep_using("add_email")`` (a context manager or a view decorator) or the
`LockstepMiddleware` (``"using": ["add_email"]`` wraps every request) count the request as
in flight on the query set it chose; ``choose("add_email", OldModel, NewModel)`` returns the
model (queryset, SQL...) of that set. Other keys of ``LOCKSTEP`` are `ThreadedAgent`'s
options; ``"enabled": False`` (for test settings) never starts an agent.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from types import FrameType
from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management import ManagementUtility

from agent.errors import AgentConfigError
from agent.integrations import common
from agent.integrations.common import OutsideUsing, ProcessAgent, choose, is_new
from agent.threaded import ThreadedAgent

#: The keys of ``settings.LOCKSTEP`` that are this helper's, not the agent's.
OWN_KEYS = ("management_commands", "using", "enabled")

_process_agent: ProcessAgent | None = None


def _config() -> dict[str, Any]:
    value = getattr(settings, "LOCKSTEP", None)
    if not isinstance(value, dict):
        raise ImproperlyConfigured(
            'settings.LOCKSTEP must be a dict such as {"urls": ["ws://coordinator:8765"], '
            f'"dsn": ...}}, not {type(value).__name__}'
        )
    for key in ("management_commands", "using"):
        names = value.get(key, [])
        if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
            raise ImproperlyConfigured(f"settings.LOCKSTEP[{key!r}] must be a list of names")
    return value


def process_agent() -> ProcessAgent:
    """The `ProcessAgent` built from ``settings.LOCKSTEP`` (once per process)."""
    global _process_agent
    if _process_agent is None:
        try:
            _process_agent = ProcessAgent.from_settings(
                _config(),
                where="settings.LOCKSTEP",
                default_agent_id="django-{hostname}-{pid}",
                extra=OWN_KEYS,
            )
        except AgentConfigError as exc:
            raise ImproperlyConfigured(str(exc)) from None
    return _process_agent


def agent() -> ThreadedAgent:
    """This process's agent, started now if `ready()` did not (a management command)."""
    return process_agent().get()


def running_command() -> tuple[str, list[str]] | None:
    """The management command this process runs and its arguments, or None for a server.

    Found on the call stack (`ManagementUtility.execute` sets Django up before running the
    command), so it holds for ``manage.py``, ``django-admin`` and ``python -m django`` alike.
    """
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code is ManagementUtility.execute.__code__:
            argv = list(frame.f_locals["self"].argv)
            return (argv[1] if len(argv) > 1 else "help"), argv[2:]
        frame = frame.f_back
    return None


def should_start(config: dict[str, Any]) -> bool:
    """Whether `ready()` starts the agent in this process (see the module docstring)."""
    if not config.get("enabled", True):
        return False
    command = running_command()
    if command is None:
        return True
    name, args = command
    if name == "runserver":  # with the autoreloader, only its serving child (RUN_MAIN) serves
        return os.environ.get("RUN_MAIN") == "true" or "--noreload" in args
    return name in config.get("management_commands", [])


class LockstepConfig(AppConfig):
    """The agent's Django app: ``"agent.integrations.django.LockstepConfig"`` in INSTALLED_APPS."""

    name = "agent.integrations.django"
    label = "lockstep"
    verbose_name = "lockstep agent"

    def ready(self) -> None:
        holder = process_agent()  # bad settings fail here, in every process
        if should_start(_config()):
            holder.get()


def lockstep_using(name: str) -> AbstractContextManager[bool]:
    """``agent.using(name)`` for this request, as a context manager or a view decorator;
    `choose(name, ...)` inside it picks that query set."""
    return common.using(agent, name)


class LockstepMiddleware:
    """Wraps each request in `lockstep_using` for each name of ``settings.LOCKSTEP["using"]``.

    A streaming response's body is sent after the middleware returns, outside the scope:
    wrap such views in `lockstep_using` around the whole iteration instead.
    """

    sync_capable = True
    async_capable = False

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response
        self.names = tuple(_config().get("using", []))
        if not self.names:
            raise ImproperlyConfigured(
                'LockstepMiddleware needs settings.LOCKSTEP["using"]: the migrations whose '
                "query set each request picks"
            )

    def __call__(self, request: Any) -> Any:
        with ExitStack() as scopes:
            for name in self.names:
                scopes.enter_context(lockstep_using(name))
            return self.get_response(request)


__all__ = [
    "LockstepConfig",
    "LockstepMiddleware",
    "OutsideUsing",
    "agent",
    "choose",
    "is_new",
    "lockstep_using",
    "process_agent",
    "running_command",
    "should_start",
]
