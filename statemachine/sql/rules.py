"""The lint rule registry: stable ids, names, severities and the safe recipe for each.

Kept apart from the checks so docs and ``lockstep lint --rules`` can list the rules without
running anything, and so ids never drift: a rule id, once published, keeps its meaning.
Recipes are templates; a finding fills ``{table}``, ``{column}``... with the statement's names,
and the registry shows them as ``<table>``, ``<column>``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Literal

Severity = Literal["error", "warning"]
Section = Literal["sql", "contract_sql", "rollback_sql"]

ALL_SECTIONS: tuple[Section, ...] = ("sql", "contract_sql", "rollback_sql")
EXPAND_ONLY: tuple[Section, ...] = ("sql",)
AFTER_SWITCH: tuple[Section, ...] = ("contract_sql", "rollback_sql")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One lint rule. `sections` are the migration sections it applies to."""

    id: str
    name: str
    severity: Severity
    summary: str
    recipe: str
    sections: tuple[Section, ...] = ALL_SECTIONS

    def render_recipe(self, params: Mapping[str, str] | None = None) -> str:
        """The recipe with the statement's names filled in (``<name>`` where unknown)."""
        return self.recipe.format_map(_Placeholders(params or {}))


class _Placeholders(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return f"<{key}>"


_RULES = (
    Rule(
        "LS000",
        "syntax-error",
        "error",
        "The statement is not valid PostgreSQL.",
        "Fix the SQL: lockstep parses it with PostgreSQL's own parser, the same the server uses.",
    ),
    Rule(
        "LS101",
        "drop-column",
        "error",
        "DROP COLUMN in sql breaks old code that still reads or writes the column.",
        "Keep {column} while old code runs: stop using it in the new code (switched in APPLY) "
        "and drop it in contract_sql: ALTER TABLE {table} DROP COLUMN {column}. If it is NOT "
        "NULL without a default, the new code (which no longer writes it) needs it nullable: "
        "in sql, ALTER TABLE {table} ALTER COLUMN {column} DROP NOT NULL.",
        EXPAND_ONLY,
    ),
    Rule(
        "LS102",
        "drop-table",
        "error",
        "DROP TABLE/VIEW/SEQUENCE in sql breaks old code that still uses it.",
        "Stop using {table} in the new code and drop it in contract_sql, after every agent "
        "switched: DROP {object} {table}.",
        EXPAND_ONLY,
    ),
    Rule(
        "LS103",
        "rename-column",
        "error",
        "RENAME COLUMN in sql breaks old code that uses the old name.",
        "Expand and contract instead of renaming. sql: ALTER TABLE {table} ADD COLUMN {new} "
        "<type of {column}>; a trigger function plus BEFORE INSERT OR UPDATE trigger on {table} "
        "that sets NEW.{new} := NEW.{column} when {new} is NULL (and NEW.{column} := NEW.{new} "
        "when {column} is NULL) so old and new code see the same data; backfill: "
        'table={table} set="{new} = {column}" where="{new} IS DISTINCT FROM {column}". '
        "APPLY: new code switches to {new}. contract_sql: DROP TRIGGER <trigger> ON {table}; "
        "DROP FUNCTION <trigger function>(); ALTER TABLE {table} DROP COLUMN {column}.",
        EXPAND_ONLY,
    ),
    Rule(
        "LS104",
        "rename-table",
        "error",
        "RENAME TABLE in sql breaks old code that uses the old name.",
        "Rename and leave a view with the old name in the same transaction (a simple view is "
        "updatable, so old code keeps reading and writing). sql: ALTER TABLE {table} RENAME TO "
        "{new}; CREATE VIEW {table} AS SELECT * FROM {new_qualified}. APPLY: new code uses "
        "{new}. contract_sql: DROP VIEW {table}.",
        EXPAND_ONLY,
    ),
    Rule(
        "LS105",
        "alter-column-type",
        "error",
        "ALTER COLUMN TYPE in sql can break old code and rewrites the table under an "
        "ACCESS EXCLUSIVE lock.",
        "Add a column with the new type instead. sql: ALTER TABLE {table} ADD COLUMN "
        "{column}_new <new type>; a sync trigger copying {column} into {column}_new on INSERT/"
        'UPDATE; backfill: table={table} set="{column}_new = {column}::<new type>" '
        'where="{column}_new IS NULL". APPLY: new code uses {column}_new. contract_sql: drop '
        "the trigger and the old column {column} (then optionally rename in a later "
        "migration the same way). Only a few changes are metadata-only (varchar(n) -> text "
        "or a longer varchar).",
        EXPAND_ONLY,
    ),
    Rule(
        "LS106",
        "add-column-not-null-without-default",
        "error",
        "ADD COLUMN ... NOT NULL without DEFAULT fails on a non-empty table and breaks old "
        "code's INSERTs that do not name the column.",
        "Give it a constant default (PostgreSQL 11+ adds it without rewriting the table): "
        "ALTER TABLE {table} ADD COLUMN {column} <type> NOT NULL DEFAULT <value>. Or add it "
        "nullable now, backfill it, and enforce NOT NULL in a later migration (see LS107).",
        EXPAND_ONLY,
    ),
    Rule(
        "LS107",
        "set-not-null",
        "error",
        "SET NOT NULL in sql breaks old code that writes NULL, and scans the whole table under "
        "an ACCESS EXCLUSIVE lock.",
        'In this migration: backfill the NULLs (table={table} set="{column} = <value>" '
        'where="{column} IS NULL") and make the new code always write {column}. In a later '
        "migration, once no running code writes NULL: sql: ALTER TABLE {table} ADD CONSTRAINT "
        "{check} CHECK ({column} IS NOT NULL) NOT VALID; ALTER TABLE {table} VALIDATE "
        "CONSTRAINT {check}. contract_sql: ALTER TABLE {table} ALTER COLUMN {column} SET NOT "
        "NULL; ALTER TABLE {table} DROP CONSTRAINT {check} (PostgreSQL 12+ uses the valid "
        "CHECK and skips the scan).",
        EXPAND_ONLY,
    ),
    Rule(
        "LS108",
        "truncate",
        "error",
        "TRUNCATE in sql deletes every row old code relies on and takes an ACCESS EXCLUSIVE lock.",
        "Do not truncate while old code runs. Delete the data in contract_sql after the switch "
        "(TRUNCATE {table}), or drop a table that is no longer used (see LS102).",
        EXPAND_ONLY,
    ),
    Rule(
        "LS109",
        "transaction-control",
        "error",
        "BEGIN/COMMIT/ROLLBACK/SAVEPOINT in a migration breaks lockstep's own transactions.",
        "Remove the {kind} statement: lockstep runs each phase in one transaction and runs "
        "non-transactional statements (CREATE INDEX CONCURRENTLY...) in autocommit itself.",
    ),
    Rule(
        "LS201",
        "create-index-non-concurrently",
        "warning",
        "CREATE INDEX without CONCURRENTLY blocks all writes to the table for the whole build.",
        "CREATE INDEX CONCURRENTLY {index} ON {table} (...): lockstep runs it outside the "
        "transaction automatically. If it fails it leaves an INVALID index: the rollback "
        "DROP INDEX CONCURRENTLY IF EXISTS {index} removes it.",
    ),
    Rule(
        "LS202",
        "add-foreign-key-validated",
        "warning",
        "Adding a FOREIGN KEY without NOT VALID scans the table while blocking writes to both "
        "tables.",
        "Add it unvalidated, then validate (VALIDATE takes only a SHARE UPDATE EXCLUSIVE lock): "
        "ALTER TABLE {table} ADD CONSTRAINT {constraint} FOREIGN KEY (...) REFERENCES ... "
        "NOT VALID; ALTER TABLE {table} VALIDATE CONSTRAINT {constraint}. For a new column, "
        "add the column without REFERENCES first.",
    ),
    Rule(
        "LS203",
        "add-check-validated",
        "warning",
        "Adding a CHECK constraint without NOT VALID scans the table under an ACCESS EXCLUSIVE "
        "lock.",
        "ALTER TABLE {table} ADD CONSTRAINT {constraint} CHECK (...) NOT VALID; ALTER TABLE "
        "{table} VALIDATE CONSTRAINT {constraint}. Note that NOT VALID still checks new rows, "
        "so old code must already satisfy it.",
    ),
    Rule(
        "LS204",
        "add-column-table-rewrite",
        "warning",
        "ADD COLUMN with a volatile default, serial, identity or stored generated column "
        "rewrites the whole table under an ACCESS EXCLUSIVE lock.",
        "Add the column without that default: ALTER TABLE {table} ADD COLUMN {column} <type>; "
        "then ALTER TABLE {table} ALTER COLUMN {column} SET DEFAULT {default} (for new rows "
        'only, no rewrite); then a backfill: table={table} set="{column} = {default}" '
        'where="{column} IS NULL". For serial/identity: create the sequence separately and '
        "use it as the default the same way.",
    ),
    Rule(
        "LS205",
        "vacuum-full",
        "warning",
        "VACUUM FULL rewrites the table under an ACCESS EXCLUSIVE lock.",
        "Use plain VACUUM {table} (no blocking lock), or pg_repack outside the migration.",
    ),
    Rule(
        "LS206",
        "cluster",
        "warning",
        "CLUSTER rewrites the table under an ACCESS EXCLUSIVE lock.",
        "Leave it out of the migration; use pg_repack --order-by outside lockstep if the "
        "physical order really matters.",
    ),
    Rule(
        "LS207",
        "add-unique-without-index",
        "warning",
        "Adding a PRIMARY KEY/UNIQUE constraint builds its index while blocking writes.",
        "Build the index first, then attach it: CREATE UNIQUE INDEX CONCURRENTLY {index} ON "
        "{table} (...); ALTER TABLE {table} ADD CONSTRAINT {constraint} {ctype} USING INDEX "
        "{index}.",
    ),
    Rule(
        "LS208",
        "lock-table",
        "warning",
        "An explicit LOCK TABLE blocks every query on the table until the transaction ends.",
        "Remove it: each DDL statement takes the lock it needs, and lockstep bounds that wait "
        "with lock_timeout and retries; an explicit lock on {table} is held for the whole phase.",
    ),
    Rule(
        "LS209",
        "reindex-non-concurrently",
        "warning",
        "REINDEX without CONCURRENTLY blocks writes (and reads using the index) while it runs.",
        "REINDEX {what} CONCURRENTLY {table} (PostgreSQL 12+); lockstep runs it in autocommit.",
    ),
    Rule(
        "LS210",
        "alter-column-type-rewrite",
        "warning",
        "ALTER COLUMN TYPE usually rewrites the table under an ACCESS EXCLUSIVE lock.",
        "Prefer the add-column + backfill recipe of LS105 for {table}.{column}; keep the type "
        "change only if it is metadata-only (varchar(n) -> text, a longer varchar).",
        AFTER_SWITCH,
    ),
    Rule(
        "LS301",
        "rollback-not-derivable",
        "warning",
        "rollback_sql is not given and cannot be derived: if the migration fails after EXECUTE "
        "committed, the schema is left expanded.",
        "Write rollback_sql (a '-- lockstep:rollback' section in a migration file) that undoes "
        "this statement, or make it derivable: name indexes and constraints, avoid IF NOT "
        "EXISTS and OR REPLACE. An empty rollback section declares there is nothing to undo.",
        EXPAND_ONLY,
    ),
)

#: Every rule by id, in id order.
RULES: Mapping[str, Rule] = MappingProxyType({rule.id: rule for rule in _RULES})
