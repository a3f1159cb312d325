"""What the framework helpers share: one agent per process, its settings, the request's choice.

App servers fork (gunicorn, uwsgi) and a `ThreadedAgent` refuses to be used in a process it
was not started in (`AgentForked`: its thread did not survive the fork, and two processes
must never answer under one agent id). The helpers therefore hold a `ProcessAgent`, which
starts a fresh `ThreadedAgent` the first time it is used in each process, under an id that
names that process (``{hostname}`` and ``{pid}`` in the `agent_id` template).

`using(get_agent, name)` is `agent.using(name)` that also remembers, for the current request
(a context variable: per thread and per asyncio task), which query set it chose, so that code
deep inside the request can ask `choose(name, old, new)` without the agent at hand.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import os
import socket
import threading
import types
import weakref
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from agent.errors import AgentConfigError, AgentError
from agent.threaded import ThreadedAgent

T = TypeVar("T")

#: What a settings mapping may hold for the agent itself: ThreadedAgent's keyword arguments.
AGENT_OPTIONS = frozenset(
    name
    for name, parameter in inspect.signature(ThreadedAgent.__init__).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name != "agent_id"
)

#: Every ProcessAgent of this process: the gunicorn hooks start and stop them around forks.
_HOLDERS: weakref.WeakSet[ProcessAgent] = weakref.WeakSet()

#: The query sets the current request chose, by migration name (see `using`).
_CHOSEN: contextvars.ContextVar[Mapping[str, bool]] = contextvars.ContextVar("lockstep_chosen")
_NONE_CHOSEN: Mapping[str, bool] = types.MappingProxyType({})


class OutsideUsing(AgentError):
    """Raised by `choose` when the current request is not inside ``using(name)`` for that
    migration: a choice made outside it is not counted as in flight, so the switch would not
    wait for it and CONTRACT could drop a column under it."""


def agent_id_for_this_process(template: str) -> str:
    """`template` with ``{hostname}`` and ``{pid}`` filled in for the calling process."""
    try:
        return template.format(hostname=socket.gethostname(), pid=os.getpid())
    except (KeyError, IndexError, ValueError) as exc:
        raise AgentConfigError(
            f"agent_id {template!r}: only {{hostname}} and {{pid}} may be filled in ({exc})"
        ) from None


class ProcessAgent:
    """A `ThreadedAgent` per process, started on first use (or by `get()`), never shared
    across a fork: in a forked child `get()` starts a new one, under that child's id."""

    def __init__(self, urls: str | Sequence[str], *, agent_id: str, **options: Any) -> None:
        unknown = sorted(set(options) - AGENT_OPTIONS)
        if unknown:
            raise AgentConfigError(
                f"unknown agent option(s) {', '.join(unknown)}; "
                f"known: agent_id, urls, {', '.join(sorted(AGENT_OPTIONS))}"
            )
        if not urls:
            raise AgentConfigError("no coordinator URL given (urls)")
        agent_id_for_this_process(agent_id)  # a bad template fails now, not at first request
        self.urls = urls
        self.agent_id_template = agent_id
        self.options = options
        self._lock = threading.Lock()
        self._agent: ThreadedAgent | None = None
        self._pid: int | None = None
        _HOLDERS.add(self)

    @classmethod
    def from_settings(
        cls,
        settings: object,
        *,
        where: str,
        default_agent_id: str,
        extra: Collection[str] = (),
    ) -> ProcessAgent:
        """Build from a settings mapping (``{"urls": ..., "dsn": ..., ...}``); `extra` keys are
        the framework helper's own and are left out. `where` names the setting in errors."""
        if not isinstance(settings, Mapping):
            raise AgentConfigError(f"{where} must be a dict, not {type(settings).__name__}")
        if "urls" not in settings:
            raise AgentConfigError(f"{where} has no 'urls' (the coordinator URL or URLs)")
        options = {k: v for k, v in settings.items() if k not in extra}
        urls = options.pop("urls")
        agent_id = options.pop("agent_id", default_agent_id)
        try:
            return cls(urls, agent_id=agent_id, **options)
        except AgentConfigError as exc:
            raise AgentConfigError(f"{where}: {exc}") from None

    @property
    def started(self) -> bool:
        """Whether this process has started its agent."""
        return self._agent is not None and self._pid == os.getpid()

    def get(self) -> ThreadedAgent:
        """This process's agent, started now if it was not yet (returns within the agent's
        `join_grace` even with no coordinator up)."""
        agent = self._agent
        if agent is not None and self._pid == os.getpid():
            return agent
        with self._lock:
            if self._agent is None or self._pid != os.getpid():
                self._agent = ThreadedAgent(
                    self.urls,
                    agent_id=agent_id_for_this_process(self.agent_id_template),
                    **self.options,
                ).start()
                self._pid = os.getpid()
            return self._agent

    def stop(self) -> None:
        """Stop this process's agent, if it started one (the next `get()` starts another)."""
        with self._lock:
            agent, self._agent = self._agent, None
        if agent is not None and self._pid == os.getpid():
            agent.stop()

    def _after_fork_in_child(self) -> None:
        # Another thread may have held the lock at the fork: it never releases it here.
        self._lock = threading.Lock()


def holders() -> list[ProcessAgent]:
    """Every `ProcessAgent` made in this process (or inherited over a fork)."""
    return list(_HOLDERS)


def _reset_locks_in_child() -> None:
    for holder in list(_HOLDERS):
        holder._after_fork_in_child()


os.register_at_fork(after_in_child=_reset_locks_in_child)


@contextlib.contextmanager
def using(get_agent: Callable[[], ThreadedAgent], name: str) -> Iterator[bool]:
    """``agent.using(name)`` on ``get_agent()``, remembered for `choose` in this request.

    A context manager, and a decorator too (each call enters afresh). `get_agent` is called
    only on entering, so a view decorated at import time finds the agent of its process.
    """
    with get_agent().using(name) as new:
        token = _CHOSEN.set({**_CHOSEN.get(_NONE_CHOSEN), name: new})
        try:
            yield new
        finally:
            _CHOSEN.reset(token)


def is_new(name: str) -> bool:
    """Whether the current request chose the new query set of migration `name`.

    Raises `OutsideUsing` outside ``using(name)``.
    """
    chosen = _CHOSEN.get(_NONE_CHOSEN)
    if name not in chosen:
        raise OutsideUsing(
            f"no query set chosen for migration {name!r} in this request: wrap the request "
            f"in using({name!r}) (or list it in the middleware's 'using' setting) first"
        )
    return chosen[name]


def choose(name: str, old: T, new: T) -> T:
    """`new` if the current request uses migration `name`'s new schema, else `old`: two
    models, two querysets, two SQL strings. Raises `OutsideUsing` outside ``using(name)``."""
    return new if is_new(name) else old


__all__ = [
    "AGENT_OPTIONS",
    "OutsideUsing",
    "ProcessAgent",
    "agent_id_for_this_process",
    "choose",
    "holders",
    "is_new",
    "using",
]
