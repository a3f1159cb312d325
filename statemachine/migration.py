"""The migration spec users write: what SQL runs in which phase."""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from statemachine.exceptions import LockstepError

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


class InvalidMigration(LockstepError, ValueError):
    """Raised when a `Migration` or `Backfill` is built with values that cannot work."""


#: How a backfill sizes its batches: to a target time per batch, or always `batch_size`.
PACINGS = ("adaptive", "fixed")


@dataclasses.dataclass(frozen=True)
class Backfill:
    """Rows to rewrite in short batches after EXECUTE commits and before APPLY.

    Example: copy `name` into a new column `full_name` while old code keeps writing `name`:
    ``Backfill(table="users", set="full_name = name", where="full_name IS NULL")``.
    Each batch updates the rows of the next range of `key` in its own transaction, so no lock
    is held for long (keyset pagination, so `key` must be unique and NOT NULL). The position
    reached is durable: a coordinator that takes over continues after the last committed
    batch instead of starting again.

    Batch size (`statemachine.backfill_pacing`): with ``pacing="adaptive"`` (the default)
    `batch_size` is the first batch's size, and each next one is sized so that a batch takes
    about `target_seconds`, between `min_batch` and `max_batch` rows, smaller while the batch
    blocks application sessions or replication lags more than `max_lag` seconds. With
    ``pacing="fixed"`` every batch has `batch_size` rows. `delay` seconds are slept between
    batches in both modes.
    """

    table: str
    set: str
    key: str = "id"
    where: str | None = None
    batch_size: int = 1000
    delay: float = 0.0
    pacing: str = "adaptive"
    target_seconds: float = 0.05
    #: None: the smaller of 100 and `batch_size`.
    min_batch: int | None = None
    #: None: the larger of 50,000 and `batch_size`.
    max_batch: int | None = None
    max_lag: float = 1.0

    def __post_init__(self) -> None:
        if not self.table.strip():
            raise InvalidMigration("backfill needs a table")
        if not self.set.strip():
            raise InvalidMigration("backfill needs a SET expression")
        if self.batch_size < 1:
            raise InvalidMigration(f"backfill batch_size must be >= 1, got {self.batch_size}")
        if self.delay < 0:
            raise InvalidMigration(f"backfill delay must be >= 0, got {self.delay}")
        if self.pacing not in PACINGS:
            raise InvalidMigration(
                f"backfill pacing must be one of {', '.join(PACINGS)}, got {self.pacing!r}"
            )
        if not self.target_seconds > 0:
            raise InvalidMigration(
                f"backfill target_seconds must be > 0, got {self.target_seconds}"
            )
        if self.min_batch is not None and not 1 <= self.min_batch <= self.batch_size:
            raise InvalidMigration(
                f"backfill min_batch must be between 1 and batch_size ({self.batch_size}), "
                f"got {self.min_batch}"
            )
        if self.max_batch is not None and self.max_batch < self.batch_size:
            raise InvalidMigration(
                f"backfill max_batch must be >= batch_size ({self.batch_size}), "
                f"got {self.max_batch}"
            )
        if not self.max_lag > 0:
            raise InvalidMigration(f"backfill max_lag must be > 0 seconds, got {self.max_lag}")

    @property
    def smallest_batch(self) -> int:
        """`min_batch`, or its default."""
        return self.min_batch if self.min_batch is not None else min(100, self.batch_size)

    @property
    def largest_batch(self) -> int:
        """`max_batch`, or its default."""
        return self.max_batch if self.max_batch is not None else max(50_000, self.batch_size)


def _statements(field: str, value: Iterable[str] | str | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    out = []
    for i, stmt in enumerate(value):
        if not isinstance(stmt, str):
            raise InvalidMigration(f"{field}[{i}] must be a string, got {type(stmt).__name__}")
        if not stmt.strip():
            raise InvalidMigration(f"{field}[{i}] is empty")
        out.append(stmt.strip())
    return tuple(out)


@dataclasses.dataclass(frozen=True, init=False)
class Migration:
    """One schema change, expanded in EXECUTE and optionally contracted after APPLY.

    - `sql` runs in EXECUTE, while old application code is still live: it must be additive.
    - `contract_sql` runs in CONTRACT, after every agent switched: it may be destructive.
    - `rollback_sql` undoes `sql` if the migration fails after EXECUTE committed. ``None``
      means "derive it when the statements allow" (see `statemachine.sql`); ``[]`` means
      "nothing to undo".
    - `ack_timeout` overrides the coordinator's ack timeout for this migration only.
    """

    name: str
    sql: tuple[str, ...]
    contract_sql: tuple[str, ...]
    rollback_sql: tuple[str, ...] | None
    backfills: tuple[Backfill, ...]
    ack_timeout: float | None
    id: str

    def __init__(
        self,
        name: str,
        sql: Sequence[str] | str,
        *,
        rollback_sql: Sequence[str] | str | None = None,
        contract_sql: Sequence[str] | str = (),
        backfills: Sequence[Backfill] = (),
        ack_timeout: float | None = None,
        id: str | None = None,
    ) -> None:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise InvalidMigration(
                f"migration name {name!r} must be 1-128 characters of letters, digits, "
                "'_', '.', '-', starting with a letter or digit"
            )
        stmts = _statements("sql", sql)
        # A contract-only migration is legitimate: it drops what an earlier one stopped using.
        if not stmts and not backfills and not _statements("contract_sql", contract_sql):
            raise InvalidMigration(f"migration {name!r} has no sql")
        if ack_timeout is not None and not ack_timeout > 0:
            raise InvalidMigration(f"ack_timeout must be > 0, got {ack_timeout}")
        for b in backfills:
            if not isinstance(b, Backfill):
                raise InvalidMigration(f"backfills must be Backfill instances, got {b!r}")
        set_ = object.__setattr__
        set_(self, "name", name)
        set_(self, "sql", stmts)
        set_(self, "contract_sql", _statements("contract_sql", contract_sql))
        set_(
            self,
            "rollback_sql",
            None if rollback_sql is None else _statements("rollback_sql", rollback_sql),
        )
        set_(self, "backfills", tuple(backfills))
        set_(self, "ack_timeout", ack_timeout)
        set_(self, "id", id if id is not None else str(uuid.uuid4()))

    def to_json(self) -> dict[str, Any]:
        """The spec as a JSON-able dict: the durable state keeps it so a successor
        coordinator can finish the migration without the file it came from."""
        return {
            "name": self.name,
            "id": self.id,
            "sql": list(self.sql),
            "contract_sql": list(self.contract_sql),
            "rollback_sql": None if self.rollback_sql is None else list(self.rollback_sql),
            "backfills": [dataclasses.asdict(b) for b in self.backfills],
            "ack_timeout": self.ack_timeout,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Migration:
        """The inverse of `to_json`; `InvalidMigration` if the document does not make one."""
        try:
            return cls(
                data["name"],
                data["sql"],
                rollback_sql=data.get("rollback_sql"),
                contract_sql=data.get("contract_sql", ()),
                backfills=[Backfill(**b) for b in data.get("backfills", ())],
                ack_timeout=data.get("ack_timeout"),
                id=data["id"],
            )
        except (KeyError, TypeError) as exc:
            raise InvalidMigration(f"not a stored migration spec: {exc}") from exc

    def with_rollback(self, rollback_sql: Sequence[str]) -> Migration:
        """A copy with `rollback_sql` filled in (used once a rollback was derived)."""
        return Migration(
            self.name,
            self.sql,
            rollback_sql=rollback_sql,
            contract_sql=self.contract_sql,
            backfills=self.backfills,
            ack_timeout=self.ack_timeout,
            id=self.id,
        )
