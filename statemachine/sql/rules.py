"""The lint rule registry: stable ids, names, severities and the safe recipe for each.

Kept apart from the checks so docs and ``lockstep lint --rules`` can list the rules without
running anything, and so ids never drift: a rule id, once published, keeps its meaning.
Recipes are templates; a finding fills ``{table}``, ``{column}``... with the statement's names
(quoted as PostgreSQL needs), and the registry shows them as ``<table>``, ``<column>``. A finding
also carries, where one exists, a complete migration file doing the same thing safely
(`Finding.example`, built by `statemachine.sql.fixes`); ``<...>`` in it marks a choice only
the author can make (a default value, a type). Every example is linted and run on a real
server by the tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Literal

Severity = Literal["error", "warning"]
Section = Literal["sql", "contract_sql", "rollback_sql"]
#: "default" rules guard against outages and broken code; "strict" adds style rules that are
#: matters of taste (json vs jsonb...), so the default profile never raises a false alarm.
Profile = Literal["default", "strict"]
PROFILES: tuple[Profile, ...] = ("default", "strict")

ALL_SECTIONS: tuple[Section, ...] = ("sql", "contract_sql", "rollback_sql")
EXPAND_ONLY: tuple[Section, ...] = ("sql",)
AFTER_SWITCH: tuple[Section, ...] = ("contract_sql", "rollback_sql")
#: Where old code (sql) or new code (contract) is live: renames break either.
LIVE_CODE: tuple[Section, ...] = ("sql", "contract_sql")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One lint rule. `sections` are the migration sections it applies to."""

    id: str
    name: str
    severity: Severity
    summary: str
    recipe: str
    sections: tuple[Section, ...] = ALL_SECTIONS
    profile: Profile = "default"

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
        "LS001",
        "bad-allow-marker",
        "error",
        "A lockstep:allow marker names no known rule or gives no reason.",
        "Write '-- lockstep:allow <rule id> <why it is safe here>', e.g. "
        "'-- lockstep:allow LS105 the table is empty'.",
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
        "RENAME COLUMN breaks the code that is live: old code in sql, new code in contract.",
        "Expand and contract instead of renaming. sql: ALTER TABLE {table} ADD COLUMN {new} "
        "{type}; a trigger function and a BEFORE INSERT OR UPDATE trigger on {table} that copy "
        "whichever of {column} and {new} a query wrote into the other; backfill: "
        'table={table} set="{new} = {column}" where="{new} IS NULL". APPLY: new code switches '
        "to {new}. contract_sql: drop the trigger, its function and the column {column}.",
        LIVE_CODE,
    ),
    Rule(
        "LS104",
        "rename-table",
        "error",
        "RENAME of a table or view breaks the code that is live: old code in sql, new code in "
        "contract.",
        "Rename and leave a view with the old name in the same transaction (a simple view is "
        "updatable, so old code keeps reading and writing). sql: ALTER TABLE {table} RENAME TO "
        "{new}; CREATE VIEW {table} AS SELECT * FROM {new_qualified}. APPLY: new code uses "
        "{new}. contract_sql: DROP VIEW {table}.",
        LIVE_CODE,
    ),
    Rule(
        "LS105",
        "alter-column-type",
        "error",
        "ALTER COLUMN TYPE in sql can break old code and rewrites the table under an "
        "ACCESS EXCLUSIVE lock.",
        "Add a column with the new type instead. sql: ALTER TABLE {table} ADD COLUMN "
        "{new} {new_type}; a sync trigger converting between {column} and {new}; backfill: "
        'table={table} set="{new} = {column}::{new_type}" where="{new} IS NULL". APPLY: new '
        "code uses {new}. contract_sql: drop the trigger and the old column {column}. Only a "
        "few changes are metadata-only (varchar(n) -> text or a longer varchar; lint --dsn "
        "knows the current type and stays quiet for them).",
        EXPAND_ONLY,
    ),
    Rule(
        "LS106",
        "add-column-not-null-without-default",
        "error",
        "ADD COLUMN ... NOT NULL without DEFAULT fails on a table that has rows, in any "
        "section, and in sql breaks old code's INSERTs that do not name the column.",
        "Give it a constant default (PostgreSQL 11+ adds it without rewriting the table): "
        "ALTER TABLE {table} ADD COLUMN {column} {type} NOT NULL DEFAULT <value>. Or add it "
        "nullable now, backfill it, and enforce NOT NULL in a later migration (see LS107).",
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
        "CONSTRAINT {check} (lockstep runs the VALIDATE alone, after the ADD committed). "
        "contract_sql: ALTER TABLE {table} ALTER COLUMN {column} SET NOT NULL; ALTER TABLE "
        "{table} DROP CONSTRAINT {check} (PostgreSQL 12+ uses the valid CHECK and skips the "
        "scan).",
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
        "LS110",
        "drop-schema",
        "error",
        "DROP SCHEMA in sql breaks old code that uses anything in it.",
        "Stop using {name} in the new code and drop it in contract_sql: {statement}.",
        EXPAND_ONLY,
    ),
    Rule(
        "LS111",
        "drop-type",
        "error",
        "DROP TYPE/DOMAIN in sql breaks old code that casts to it or writes columns of it.",
        "Drop {name} in contract_sql, after every agent switched: {statement}.",
        EXPAND_ONLY,
    ),
    Rule(
        "LS112",
        "drop-function",
        "error",
        "DROP FUNCTION/PROCEDURE in sql breaks old code (and triggers) that still call it.",
        "Drop {name} in contract_sql, after every agent switched: {statement}.",
        EXPAND_ONLY,
    ),
    Rule(
        "LS113",
        "drop-database",
        "error",
        "DROP DATABASE has no place in a migration: it destroys everything, in any section.",
        "Remove the statement; drop databases by hand, outside lockstep.",
    ),
    Rule(
        "LS114",
        "rename-schema",
        "error",
        "ALTER SCHEMA ... RENAME breaks every query that names the schema, old code in sql and "
        "new code in contract.",
        "Do not rename schemas under live code. Create {new}, move objects with expand and "
        "contract (a view in the old schema for each moved table), switch the code in APPLY, "
        "and drop the old schema in contract_sql.",
        LIVE_CODE,
    ),
    Rule(
        "LS115",
        "rename-enum-value",
        "error",
        "ALTER TYPE ... RENAME VALUE breaks code that writes or compares the old label: old "
        "code in sql, new code in contract.",
        "Add the new label instead (sql: ALTER TYPE {type} ADD VALUE {new}; lockstep runs it "
        "in autocommit), let the new code write {new} and read both, backfill the old label to "
        "the new one, and stop using {old}. PostgreSQL cannot remove an enum label.",
        LIVE_CODE,
    ),
    Rule(
        "LS116",
        "drop-default-not-null",
        "error",
        "DROP DEFAULT on a NOT NULL column in sql makes old code's INSERTs that omit the "
        "column fail.",
        "Make the new code always write {column}, then drop the default in contract_sql: "
        "ALTER TABLE {table} ALTER COLUMN {column} DROP DEFAULT. (Without --dsn lint cannot "
        "see whether {column} is NOT NULL, and assumes it is.)",
        EXPAND_ONLY,
    ),
    Rule(
        "LS201",
        "create-index-non-concurrently",
        "warning",
        "CREATE INDEX without CONCURRENTLY blocks all writes to the table for the whole build.",
        "{fixed}: lockstep runs it outside the transaction automatically. If it fails it "
        "leaves an INVALID index: the rollback DROP INDEX CONCURRENTLY IF EXISTS {index} "
        "removes it.",
    ),
    Rule(
        "LS202",
        "add-foreign-key-validated",
        "warning",
        "Adding a FOREIGN KEY without NOT VALID scans the table while blocking writes to both "
        "tables.",
        "Add it unvalidated, then validate (VALIDATE takes only a SHARE UPDATE EXCLUSIVE lock, "
        "and lockstep runs it alone after the ADD committed): ALTER TABLE {table} ADD "
        "CONSTRAINT {constraint} FOREIGN KEY ({columns}) REFERENCES {references} NOT VALID; "
        "ALTER TABLE {table} VALIDATE CONSTRAINT {constraint}. For a new column, add the column "
        "without REFERENCES first.",
    ),
    Rule(
        "LS203",
        "add-check-validated",
        "warning",
        "Adding a CHECK constraint without NOT VALID scans the table under an ACCESS EXCLUSIVE "
        "lock.",
        "ALTER TABLE {table} ADD CONSTRAINT {constraint} CHECK ({expression}) NOT VALID; ALTER "
        "TABLE {table} VALIDATE CONSTRAINT {constraint} (run alone by lockstep, after the ADD "
        "committed). NOT VALID still checks new rows, so old code must already satisfy it.",
    ),
    Rule(
        "LS204",
        "add-column-table-rewrite",
        "warning",
        "ADD COLUMN with a volatile default (any function PostgreSQL does not know to be "
        "STABLE or IMMUTABLE), serial, identity or stored generated column rewrites the whole "
        "table under an ACCESS EXCLUSIVE lock.",
        "Add the column without that default: ALTER TABLE {table} ADD COLUMN {column} {type}; "
        "then ALTER TABLE {table} ALTER COLUMN {column} SET DEFAULT {default} (for new rows "
        'only, no rewrite); then a backfill: table={table} set="{column} = {default}" '
        'where="{column} IS NULL".',
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
        "Adding a PRIMARY KEY/UNIQUE constraint builds its index under an ACCESS EXCLUSIVE lock.",
        "Build the index first, then attach it: CREATE UNIQUE INDEX CONCURRENTLY {index} ON "
        "{table} ({columns}); ALTER TABLE {table} ADD CONSTRAINT {constraint} {ctype} USING "
        "INDEX {index}. (A PRIMARY KEY also needs its columns NOT NULL first, see LS107.)",
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
        "{fixed} (PostgreSQL 12+); lockstep runs it in autocommit.",
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
        "LS211",
        "drop-index-non-concurrently",
        "warning",
        "DROP INDEX without CONCURRENTLY takes an ACCESS EXCLUSIVE lock on the index's table.",
        "{fixed}: lockstep runs it in autocommit.",
    ),
    Rule(
        "LS212",
        "detach-partition-non-concurrently",
        "warning",
        "DETACH PARTITION without CONCURRENTLY takes an ACCESS EXCLUSIVE lock on the "
        "partitioned table.",
        "{fixed} (PostgreSQL 14+): lockstep runs it in autocommit.",
    ),
    Rule(
        "LS213",
        "alter-domain-add-constraint",
        "warning",
        "ALTER DOMAIN ... ADD CONSTRAINT checks every column of that domain while blocking "
        "writes to their tables.",
        "ALTER DOMAIN {domain} ADD CONSTRAINT {constraint} ... NOT VALID; ALTER DOMAIN "
        "{domain} VALIDATE CONSTRAINT {constraint} (lockstep runs it alone).",
    ),
    Rule(
        "LS214",
        "dml-after-ddl",
        "warning",
        "A data change of a whole table right after DDL on it locks its rows in one long "
        "statement, and in one transaction would hold the DDL's lock for all of it.",
        "Move it to a backfill line, which updates in short batches after EXECUTE committed: "
        "{backfill}",
    ),
    Rule(
        "LS215",
        "refresh-materialized-view-non-concurrently",
        "warning",
        "REFRESH MATERIALIZED VIEW without CONCURRENTLY blocks every read of the view while it "
        "recomputes.",
        "{fixed} (it needs a unique index on the view).",
    ),
    Rule(
        "LS216",
        "add-exclusion-constraint",
        "warning",
        "Adding an EXCLUDE constraint builds its index and checks every row under an ACCESS "
        "EXCLUSIVE lock, and PostgreSQL cannot attach one to an existing index.",
        "There is no lock-free way to add it to a table that has rows: create it together with "
        "a new table, or add it while {table} is small, or enforce the rule in a trigger.",
    ),
    Rule(
        "LS217",
        "set-not-null-scan",
        "warning",
        "SET NOT NULL scans the whole table under an ACCESS EXCLUSIVE lock, unless a validated "
        "CHECK ({column} IS NOT NULL) proves it first.",
        "In sql: ALTER TABLE {table} ADD CONSTRAINT {check} CHECK ({column} IS NOT NULL) NOT "
        "VALID; ALTER TABLE {table} VALIDATE CONSTRAINT {check}. Then here: ALTER TABLE {table} "
        "ALTER COLUMN {column} SET NOT NULL; ALTER TABLE {table} DROP CONSTRAINT {check}. "
        "(Not checked in rollback_sql: restoring a NOT NULL there is the exceptional path.)",
        ("contract_sql",),
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
    Rule(
        "LS401",
        "prefer-jsonb",
        "warning",
        "json keeps the text as written and has no equality operator; jsonb is what you want.",
        "Use jsonb for {column}.",
        profile="strict",
    ),
    Rule(
        "LS402",
        "prefer-text",
        "warning",
        "varchar(n) makes a later longer limit a migration; text with a CHECK is easier to change.",
        "Use text for {column} (add CHECK (char_length({column}) <= n) NOT VALID if needed).",
        profile="strict",
    ),
    Rule(
        "LS403",
        "prefer-timestamptz",
        "warning",
        "timestamp without time zone stores wall-clock times that mean different instants "
        "depending on the session's TimeZone.",
        "Use timestamptz for {column}.",
        profile="strict",
    ),
    Rule(
        "LS404",
        "prefer-identity",
        "warning",
        "serial types create a loosely owned sequence; identity columns are the SQL standard.",
        "Use {column} bigint GENERATED BY DEFAULT AS IDENTITY.",
        profile="strict",
    ),
    Rule(
        "LS405",
        "ban-char",
        "warning",
        "char(n) pads with spaces and is never faster than text.",
        "Use text (or varchar) for {column}.",
        profile="strict",
    ),
    Rule(
        "LS406",
        "prefer-bigint-key",
        "warning",
        "An int or smallint primary key runs out; changing it later rewrites the table.",
        "Use bigint for {column}.",
        profile="strict",
    ),
)

#: Every rule by id, in id order.
RULES: Mapping[str, Rule] = MappingProxyType({rule.id: rule for rule in _RULES})
