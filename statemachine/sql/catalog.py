"""What lint may know about the live database: a plain snapshot, filled by whoever has one.

Why a snapshot and not a connection: `statemachine` stays pure, so the same rules run in CI
without a database and, given a `Catalog` (``coordinator.pg.catalog.read_catalog`` builds one
from ``pg_class``, ``pg_attribute`` and ``pg_proc``), know more: a table that does not exist
yet or has no rows cannot block anyone, ``varchar(255) -> varchar(320)`` rewrites nothing, a
user function declared STABLE is a safe default, and a nullable column may lose its default.
Without a catalog every unknown is assumed to be the dangerous case.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

Volatility = Literal["immutable", "stable", "volatile"]


@dataclasses.dataclass(frozen=True)
class ColumnInfo:
    """A column as ``format_type`` prints its type (``character varying(255)``) and nullability."""

    type: str
    not_null: bool


@dataclasses.dataclass(frozen=True)
class TableInfo:
    """`empty` is true only when the table has no pages at all (not an estimate)."""

    empty: bool
    columns: Mapping[str, ColumnInfo] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Catalog:
    """Tables by ``schema.name``, functions by ``name`` and ``schema.name`` (the most volatile
    overload wins), and the search path used to resolve unqualified table names."""

    tables: Mapping[str, TableInfo] = dataclasses.field(default_factory=dict)
    functions: Mapping[str, Volatility] = dataclasses.field(default_factory=dict)
    search_path: tuple[str, ...] = ("public",)

    def table(self, name: str) -> TableInfo | None:
        """The table `name` (``schema.name`` or unqualified), None when it does not exist."""
        if "." in name:
            return self.tables.get(name)
        for schema in self.search_path:
            found = self.tables.get(f"{schema}.{name}")
            if found is not None:
                return found
        return None

    def volatility(self, name: str) -> Volatility | None:
        return self.functions.get(name)
