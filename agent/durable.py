"""Which migrations are applied, read from PostgreSQL while no coordinator can be reached.

An app server must boot even when the coordinator is down (gunicorn workers that fail to boot
are an outage of their own). Until an agent reaches a coordinator it can still pick the right
query set from the durable state every coordinator keeps in the target database,
``lockstep.migrations``: a row ``completed`` is applied, and so is a row still ``running``
whose checkpoint says the expand SQL committed and the run is not rolling back (what a
coordinator's Welcome would say). No ``lockstep`` schema means nothing was ever applied.

The reader takes a DB-API connection so that apps bring their own driver (`connect=`); with
only a `dsn=`, psycopg is imported here, lazily, so apps that pass neither never need it.
The agent never imports the coordinator: this is the agent's own, read-only view.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

from agent.errors import AgentConfigError, AgentError
from agent.session import AgentSession
from statemachine.phases import APPLIED_STATES, MigrationState

log = logging.getLogger("lockstep.agent")

ConnectFn = Callable[[], Any]  # returns a DB-API 2.0 connection

_SCHEMA_SQL = "SELECT to_regclass('lockstep.migrations') IS NOT NULL"
_ROWS_SQL = (
    "SELECT name, status, checkpoint->>'executed', checkpoint->>'state' "
    "FROM lockstep.migrations WHERE status IN ('completed', 'running')"
)


class DurableStateError(AgentError):
    """Raised (and logged by the agents, never raised to the app) when the durable state in
    PostgreSQL cannot be read: the database is down too, or the role may not read it."""


def applied_from_rows(rows: list[tuple[Any, ...]]) -> frozenset[str]:
    """The applied names among (name, status, executed, state) rows of lockstep.migrations."""
    applied: set[str] = set()
    for name, status, executed, state in rows:
        executed_and_applied = str(executed).lower() == "true" and _applied_state(state)
        if status == "completed" or (status == "running" and executed_and_applied):
            applied.add(str(name))
    return frozenset(applied)


def _applied_state(state: object) -> bool:
    """True unless the checkpoint says the run is rolling back (or anything not applied)."""
    if state is None:
        return True  # executed and no state written: trust `executed`
    try:
        return MigrationState(str(state)) in APPLIED_STATES
    except ValueError:
        return True


def read_applied(connection: Any) -> frozenset[str]:
    """The applied migrations according to `connection`'s database (DB-API 2.0)."""
    cursor = connection.cursor()
    try:
        cursor.execute(_SCHEMA_SQL)
        (exists,) = cursor.fetchone()
        if not exists:
            return frozenset()
        cursor.execute(_ROWS_SQL)
        return applied_from_rows([tuple(row) for row in cursor.fetchall()])
    finally:
        cursor.close()


class DurableState:
    """Where to read the durable state from: a DSN (psycopg) or the app's own factory."""

    def __init__(
        self, dsn: str | None = None, connect: ConnectFn | None = None, timeout: float = 5.0
    ) -> None:
        if dsn is not None and connect is not None:
            raise AgentConfigError("give the agent a dsn= or a connect= factory, not both")
        if dsn is None and connect is None:
            raise AgentConfigError("DurableState needs a dsn= or a connect= factory")
        self.dsn = dsn
        self.connect_fn = connect
        self.timeout = timeout

    @classmethod
    def maybe(cls, dsn: str | None, connect: ConnectFn | None) -> DurableState | None:
        if dsn is None and connect is None:
            return None
        return cls(dsn, connect)

    def read(self) -> frozenset[str]:
        """Blocking: run it in a worker thread. `DurableStateError` if it cannot be read."""
        try:
            connection = self._connect()
        except DurableStateError:
            raise
        except Exception as exc:
            raise DurableStateError(f"cannot connect to read the durable state: {exc}") from exc
        try:
            return read_applied(connection)
        except Exception as exc:
            raise DurableStateError(f"cannot read lockstep.migrations: {exc}") from exc
        finally:
            try:
                connection.close()
            except Exception:
                log.debug("closing the durable-state connection failed", exc_info=True)

    def _connect(self) -> Any:
        if self.connect_fn is not None:
            return self.connect_fn()
        try:
            psycopg = importlib.import_module("psycopg")
        except ImportError:
            raise DurableStateError(
                "reading the durable state from a dsn= needs psycopg "
                "(pip install 'psycopg[binary]'), or pass connect= with your own driver"
            ) from None
        return psycopg.connect(self.dsn, connect_timeout=max(1, round(self.timeout)))


def read_for_boot(durable: DurableState | None) -> frozenset[str] | str | None:
    """Blocking, for a worker thread: the applied set, an error text, or None (no source)."""
    if durable is None:
        return None
    try:
        return durable.read()
    except DurableStateError as exc:
        return str(exc)


def boot_without_coordinator(
    session: AgentSession,
    outcome: frozenset[str] | str | None,
    *,
    again: bool = False,
    read_at: float | None = None,
) -> None:
    """No coordinator answered the first round: run on the durable state if it was read,
    or say plainly that nothing vouches for the schema yet. Call on the agent's loop.
    `again`: a later retry of a read that failed at boot (its failures were said then)."""
    if session.synced:
        return
    if isinstance(outcome, frozenset):
        session.adopt_durable(outcome, read_at)
        log.info(
            "agent %s: no coordinator yet; using the durable state in PostgreSQL: %s applied",
            session.agent_id,
            ", ".join(sorted(outcome)) or "nothing",
        )
        return
    why = "no dsn= or connect= was given" if outcome is None else outcome
    if again:
        log.debug("agent %s: durable state still unreadable: %s", session.agent_id, why)
        return
    log.warning(
        "agent %s: no coordinator reachable and no durable state (%s): starting fenced "
        "(agent.using raises AgentFenced) until a coordinator is reached",
        session.agent_id,
        why,
    )


__all__ = [
    "ConnectFn",
    "DurableState",
    "DurableStateError",
    "applied_from_rows",
    "boot_without_coordinator",
    "read_applied",
    "read_for_boot",
]
