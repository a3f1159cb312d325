"""gunicorn.conf.py of the load tests: one agent per worker (the documented one-line glue)."""

from agent.integrations.gunicorn import post_fork, when_ready, worker_exit

__all__ = ["post_fork", "when_ready", "worker_exit"]
