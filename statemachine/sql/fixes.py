"""The safe version of a hazardous statement, as a complete lockstep migration file.

Why whole files: a recipe in prose is easy to get subtly wrong (a VALIDATE in the wrong place,
a view the linter then rejects), while a file can be linted and run. Every example built here is
linted with no finding and applied to a real server by the tests; ``<...>`` marks a choice only
the author can make (a default value, a type lint could not see).
"""

from __future__ import annotations

import shlex

from statemachine.sql._nodes import quote
from statemachine.sql.rules import Section

_MARKERS: dict[Section, str] = {
    "sql": "-- lockstep:sql",
    "contract_sql": "-- lockstep:contract",
    "rollback_sql": "-- lockstep:rollback",
}
_NO_ROLLBACK = "-- lockstep:rollback\n-- (write here what undoes the sql section, if anything)\n"


def _file(*parts: str) -> str:
    return "\n".join(p.rstrip("\n") for p in parts if p) + "\n"


def _statements(*statements: str) -> str:
    return "\n".join(s.strip().rstrip(";") + ";" for s in statements)


def move_to_contract(statement: str) -> str:
    """The same statement, run after every agent switched."""
    return _file("-- lockstep:contract", _statements(statement))


def replace_statement(fixed: str, section: Section = "sql") -> str:
    """The statement rewritten in place (``CONCURRENTLY``...), in the hazard's own section."""
    body = _file(_MARKERS[section], _statements(fixed))
    return _file(body, _NO_ROLLBACK) if section == "sql" else body


def add_column_with_default(table: str, column: str, type_: str) -> str:
    return _file(
        "-- lockstep:sql",
        _statements(f"ALTER TABLE {table} ADD COLUMN {column} {type_} NOT NULL DEFAULT <value>"),
    )


def backfill_line(table: str, sets: str, where: str | None) -> str:
    line = f"table={shlex.quote(table)} set={shlex.quote(sets)}"
    return line + (f" where={shlex.quote(where)}" if where else "")


def ddl_then_backfill(ddl: str, line: str) -> str:
    """Keep the DDL; the data change becomes a backfill, in batches after EXECUTE committed."""
    return _file("-- lockstep:sql", _statements(ddl), "-- lockstep:backfill", line)


def add_column_then_default(table: str, column: str, type_: str, default: str) -> str:
    return _file(
        "-- lockstep:sql",
        _statements(
            f"ALTER TABLE {table} ADD COLUMN {column} {type_}",
            f"ALTER TABLE {table} ALTER COLUMN {column} SET DEFAULT {default}",
        ),
        "-- lockstep:backfill",
        backfill_line(table, f"{column} = {default}", f"{column} IS NULL"),
    )


def add_column_with_sequence(table: str, column: str, type_: str, sequence: str) -> str:
    default = f"nextval('{sequence}')"
    return _file(
        "-- lockstep:sql",
        _statements(
            f"CREATE SEQUENCE {sequence} AS {type_}",
            f"ALTER TABLE {table} ADD COLUMN {column} {type_}",
            f"ALTER TABLE {table} ALTER COLUMN {column} SET DEFAULT {default}",
            f"ALTER SEQUENCE {sequence} OWNED BY {table}.{column}",
        ),
        "-- lockstep:backfill",
        backfill_line(table, f"{column} = {default}", f"{column} IS NULL"),
        "-- lockstep:rollback",
        _statements(
            f"ALTER TABLE {table} DROP COLUMN IF EXISTS {column}",
            f"DROP SEQUENCE IF EXISTS {sequence}",
        ),
    )


def validate_later(
    table: str, constraint: str, definition: str, *, add_column: str | None = None
) -> str:
    """ADD ... NOT VALID, then VALIDATE: lockstep runs the VALIDATE alone after the ADD
    committed, so the ADD's lock is never held during the scan. For an inline ``REFERENCES``
    on a new column, the column is added plain first."""
    head = [add_column] if add_column is not None else []
    return _file(
        "-- lockstep:sql",
        _statements(
            *head,
            f"ALTER TABLE {table} ADD CONSTRAINT {constraint} {definition} NOT VALID",
            f"ALTER TABLE {table} VALIDATE CONSTRAINT {constraint}",
        ),
    )


def unique_using_index(table: str, constraint: str, ctype: str, index: str, columns: str) -> str:
    return _file(
        "-- lockstep:sql",
        _statements(
            f"CREATE UNIQUE INDEX CONCURRENTLY {index} ON {table} ({columns})",
            f"ALTER TABLE {table} ADD CONSTRAINT {constraint} {ctype} USING INDEX {index}",
        ),
    )


def not_null_via_check(table: str, column: str, check: str) -> str:
    """A validated CHECK proves NOT NULL, so SET NOT NULL in contract skips its scan."""
    return _file(
        "-- lockstep:sql",
        _statements(
            f"ALTER TABLE {table} ADD CONSTRAINT {check} CHECK ({column} IS NOT NULL) NOT VALID",
            f"ALTER TABLE {table} VALIDATE CONSTRAINT {check}",
        ),
        "-- lockstep:contract",
        _statements(
            f"ALTER TABLE {table} ALTER COLUMN {column} SET NOT NULL",
            f"ALTER TABLE {table} DROP CONSTRAINT {check}",
        ),
    )


def _sync_trigger(table: str, short: str, old: str, new: str, to_new: str, to_old: str) -> str:
    function = quote(f"{short}_sync_{new.strip(chr(34))}"[:63])
    return f"""CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF NEW.{old} IS DISTINCT FROM OLD.{old} THEN
            NEW.{new} := {to_new};
        ELSIF NEW.{new} IS DISTINCT FROM OLD.{new} THEN
            NEW.{old} := {to_old};
        END IF;
    END IF;
    NEW.{new} := coalesce(NEW.{new}, {to_new});
    NEW.{old} := coalesce(NEW.{old}, {to_old});
    RETURN NEW;
END
$$;
CREATE TRIGGER {function} BEFORE INSERT OR UPDATE ON {table}
    FOR EACH ROW EXECUTE FUNCTION {function}();"""


def _expand_contract(
    table: str, short: str, old: str, new: str, type_: str, to_new: str, to_old: str
) -> str:
    trigger = _sync_trigger(table, short, old, new, to_new, to_old)
    function = trigger.split()[2].removesuffix("()")
    return _file(
        "-- lockstep:sql",
        _statements(f"ALTER TABLE {table} ADD COLUMN {new} {type_}"),
        trigger,
        "-- lockstep:backfill",
        backfill_line(table, f"{new} = {to_new.replace('NEW.', '')}", f"{new} IS NULL"),
        "-- lockstep:contract",
        _statements(
            f"DROP TRIGGER {function} ON {table}",
            f"DROP FUNCTION {function}()",
            f"ALTER TABLE {table} DROP COLUMN {old}",
        ),
    )


def rename_column(table: str, short: str, old: str, new: str, type_: str) -> str:
    return _expand_contract(table, short, old, new, type_, f"NEW.{old}", f"NEW.{new}")


def change_type(table: str, column: str, new: str, new_type: str, short: str) -> str:
    return _expand_contract(
        table, short, column, new, new_type, f"NEW.{column}::{new_type}", f"NEW.{new}::<old type>"
    )


def rename_table(table: str, new: str, new_qualified: str, old_short: str) -> str:
    """Rename and leave an updatable view with the old name, in one transaction."""
    return _file(
        "-- lockstep:sql",
        _statements(
            f"ALTER TABLE {table} RENAME TO {new}",
            f"CREATE VIEW {table} AS SELECT * FROM {new_qualified}",
        ),
        "-- lockstep:contract",
        _statements(f"DROP VIEW {table}"),
        "-- lockstep:rollback",
        _statements(
            f"DROP VIEW IF EXISTS {table}",
            f"ALTER TABLE IF EXISTS {new_qualified} RENAME TO {old_short}",
        ),
    )


def add_enum_value(type_: str, new: str) -> str:
    return _file(
        "-- lockstep:sql",
        _statements(f"ALTER TYPE {type_} ADD VALUE IF NOT EXISTS {new}"),
        "-- lockstep:rollback",
        "-- (PostgreSQL cannot drop an enum label; an unused extra label is harmless)",
    )


def domain_validate_later(domain: str, constraint: str, added: str) -> str:
    return _file(
        "-- lockstep:sql",
        _statements(added, f"ALTER DOMAIN {domain} VALIDATE CONSTRAINT {constraint}"),
        _NO_ROLLBACK,
    )
