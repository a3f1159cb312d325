"""gunicorn hooks that give each worker its own agent; import them into gunicorn.conf.py.

``from agent.integrations.gunicorn import post_fork, when_ready, worker_exit``

- `when_ready` (in the master, before the first fork): stops any agent the master started
  while preloading the app (``--preload`` runs Django's ``ready()`` there): the master serves
  no request, so its agent would only be an idle member of the fleet;
- `post_fork` (in each new worker): starts the agents of the app helpers created before the
  fork, each under the worker's own id, so the worker is in the fleet before its first
  request (without ``--preload`` the helpers are created in the worker and start there);
- `worker_exit`: stops the worker's agents, closing their sockets with "going away" (the
  `atexit` hook of `ThreadedAgent` would too; this does it before gunicorn's own teardown).

gunicorn is not imported: the hooks only see its arbiter and worker objects. To add your own
work to a hook, define it in gunicorn.conf.py and call ours from it.
"""

from __future__ import annotations

from agent.integrations.common import holders


def when_ready(server: object) -> None:
    """gunicorn's ``when_ready``: stop the master's agents (see the module docstring)."""
    for holder in holders():
        holder.stop()


def post_fork(server: object, worker: object) -> None:
    """gunicorn's ``post_fork``: start, in this worker, the agents created before the fork."""
    for holder in holders():
        holder.get()


def worker_exit(server: object, worker: object) -> None:
    """gunicorn's ``worker_exit``: stop this worker's agents."""
    for holder in holders():
        holder.stop()


__all__ = ["post_fork", "when_ready", "worker_exit"]
