"""What the lint checks share: a hit, the per-section context, and naming helpers.

`Context` answers, per table, the questions phase awareness needs: does running code see it
(`visible`: it exists and was not created earlier in this section), does anyone wait for its
locks (`busy`: visible and, when the catalog says so, not empty), and what the catalog knows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pglast import ast

from statemachine.sql._nodes import quote, to_sql
from statemachine.sql.catalog import Catalog, TableInfo
from statemachine.sql.rules import Section


@dataclasses.dataclass
class Hit:
    rule: str
    message: str
    params: dict[str, str] = dataclasses.field(default_factory=dict)
    example: str | None = None


@dataclasses.dataclass
class Context:
    """What the checks know while walking one section in order."""

    section: Section
    catalog: Catalog | None = None
    existing: frozenset[str] | None = None
    #: Tables created earlier in this section: nobody else sees them before commit.
    created: set[str] = dataclasses.field(default_factory=set)
    #: Tables an earlier statement of this section locked against writes (DDL), and by which.
    locked: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Views this section creates anywhere (a rename may leave one with the old name).
    views: set[str] = dataclasses.field(default_factory=set)
    #: (table, column) pairs with a CHECK (column IS NOT NULL) added by this migration.
    not_null_checks: set[tuple[str, str]] = dataclasses.field(default_factory=set)
    #: (table, column) pairs added by this migration.
    added: set[tuple[str, str]] = dataclasses.field(default_factory=set)

    def info(self, table: str) -> TableInfo | None:
        return self.catalog.table(table) if self.catalog is not None else None

    def visible(self, table: str | None) -> bool:
        """True if running code may use `table` (unknown tables are assumed to be used)."""
        if table is None:
            return True
        if table in self.created:
            return False
        if self.catalog is not None:
            return self.info(table) is not None
        if self.existing is not None:
            short = {t.rsplit(".", 1)[-1] for t in self.existing}
            return table in self.existing or table.rsplit(".", 1)[-1] in short
        return True

    def busy(self, table: str | None) -> bool:
        """True if a lock or scan on `table` can make anyone wait: visible and not empty."""
        if not self.visible(table):
            return False
        info = self.info(table) if table else None
        return not (info is not None and info.empty)


def short(table: str) -> str:
    """``schema.table`` -> ``table``."""
    return table.rsplit(".", 1)[-1]


def ident(*parts: str) -> str:
    """A new identifier built from names (``users_email_fkey``), quoted if needed."""
    return quote("_".join(p for p in parts if p)[:63])


def names(items: tuple[Any, ...] | None) -> str:
    return ", ".join(quote(str(n.sval)) for n in items or () if isinstance(n, ast.String))


def column_type_text(column: ast.ColumnDef) -> str:
    return to_sql(column.typeName) if column.typeName is not None else "<type>"
