"""Migration files: one ``.sql`` file per migration, sections marked by comment lines.

Why plain SQL with comment markers: the file stays valid SQL that editors, psql and other tools
understand, and a plain ``.sql`` file with no markers is already a migration (all of it is
`sql`). This module only parses text; reading files happens in the coordinator.

Format (markers stand alone on their line; ``--lockstep:`` without the space also works)::

    -- lockstep:name add_full_name          (optional; default: the file name without .sql)
    -- lockstep:ack-timeout 30              (optional; seconds)
    -- lockstep:sql                         (optional: text before any marker is sql)
    ALTER TABLE users ADD COLUMN full_name text;
    -- lockstep:backfill
    table=users set="full_name = name" key=id batch_size=500 where="full_name IS NULL" delay=0.01
    -- lockstep:contract
    ALTER TABLE users DROP COLUMN name;
    -- lockstep:rollback
    ALTER TABLE users DROP COLUMN IF EXISTS full_name;

Allowing one finding: ``-- lockstep:allow LS105 <reason>`` on its own line stays with the next
statement of its section (as a comment in that statement's text, so lint sees it wherever the
migration goes); ``-- lockstep:allow-file LS301 <reason>`` allows a rule for the whole file
(`MigrationSource.allow`). The reason is mandatory. Markers are lower case: a line such as
``-- LOCKSTEP:CONTRACT`` is refused with a hint rather than silently taken as a comment, and a
UTF-8 byte order mark at the start of the text is ignored.

A backfill line is shell-quoted ``key=value`` pairs (keys: table, set, key, where, batch_size,
delay, pacing, target_seconds, min_batch, max_batch, max_lag: the fields of `Backfill`; table
and set are required); blank lines and ``--`` comments are skipped. A missing
rollback section means "derive it"; an empty one means "nothing to undo". Markers are matched
line by line, so a marker-like line inside a dollar-quoted body would also be taken as a marker.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from statemachine.exceptions import LockstepError
from statemachine.migration import Backfill, InvalidMigration, Migration
from statemachine.sql.split import SqlSyntaxError, split_statements

_MARKER = re.compile(r"^\s*--\s*lockstep:(?P<word>\S*)(?:[ \t]+(?P<arg>.*?))?\s*$")
#: Anything that looks like a marker but is not one exactly (``-- LOCKSTEP:CONTRACT``).
_LOOKS_LIKE_MARKER = re.compile(r"^\s*--\s*lockstep\s*:\s*(?P<word>\S*)", re.IGNORECASE)
_SECTIONS = {"sql": "sql", "contract": "contract_sql", "rollback": "rollback_sql", "backfill": ""}
_DIRECTIVES = ("name", "ack-timeout")
_ALLOWS = ("allow", "allow-file")
_BACKFILL_KEYS = (
    "table",
    "set",
    "key",
    "where",
    "batch_size",
    "delay",
    "pacing",
    "target_seconds",
    "min_batch",
    "max_batch",
    "max_lag",
)
#: The numeric keys of a backfill line, and how each is read.
_BACKFILL_NUMBERS = {
    "min_batch": (int, "an integer"),
    "max_batch": (int, "an integer"),
    "target_seconds": (float, "seconds"),
    "max_lag": (float, "seconds"),
}
_NATURAL = re.compile(r"(\d+)")


class MigrationFileError(LockstepError, ValueError):
    """Raised when parsing a migration file that cannot be used; `line` is the 1-based line in
    the file."""

    def __init__(self, message: str, line: int) -> None:
        super().__init__(f"line {line}: {message}")
        self.message = message
        self.line = line


@dataclasses.dataclass(frozen=True)
class MigrationSource:
    """A parsed file: the `Migration` and, per SQL section, the file line of each statement.

    `lines` has the keys ``"sql"``, ``"contract_sql"``, ``"rollback_sql"`` so lint findings can
    point at file lines (`lint_migration(..., lines=source.lines)`).
    """

    migration: Migration
    lines: Mapping[str, tuple[int, ...]]
    #: Rules allowed for the whole file (``-- lockstep:allow-file``): rule id -> reason.
    allow: Mapping[str, str] = dataclasses.field(default_factory=lambda: MappingProxyType({}))


def migration_name_from_filename(filename: str) -> str:
    """``"migrations/0003_add_email.sql"`` -> ``"0003_add_email"``."""
    base = re.split(r"[\\/]", filename)[-1]
    return base[: -len(".sql")] if base.lower().endswith(".sql") else base


def _natural_key(name: str) -> tuple[tuple[tuple[int, int, str], ...], str]:
    parts = _NATURAL.split(name)
    key = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts if p)
    return key, name


def sort_migration_filenames(names: Iterable[str]) -> list[str]:
    """Natural order: numeric runs compare as numbers, so ``2_x`` comes before ``10_x``."""
    return sorted(names, key=_natural_key)


@dataclasses.dataclass
class _Section:
    name: str  # "sql", "contract_sql", "rollback_sql" or "" for backfill
    marker_line: int  # 0 for the implicit sql section before any marker
    body: list[tuple[int, str]] = dataclasses.field(default_factory=list)


def _has_content(body: list[tuple[int, str]]) -> bool:
    return any(text.strip() and not text.strip().startswith("--") for _, text in body)


def _statements(section: _Section, total_lines: int) -> list[tuple[int, str]]:
    """Split a section; the text keeps other lines blank so parser lines are file lines."""
    rows = [""] * total_lines
    for number, text in section.body:
        rows[number - 1] = text
    try:
        return [(s.line, s.text.strip()) for s in split_statements("\n".join(rows))]
    except SqlSyntaxError as exc:
        message = exc.message
        if not message.startswith("syntax error"):
            message = f"syntax error: {message}"
        raise MigrationFileError(message, exc.line) from None


def _parse_backfill(number: int, text: str) -> Backfill:
    try:
        tokens = shlex.split(text)
    except ValueError as exc:
        raise MigrationFileError(f"bad backfill line: {exc}", number) from None
    values: dict[str, str] = {}
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep:
            raise MigrationFileError(f"bad backfill line: {token!r} is not key=value", number)
        if key not in _BACKFILL_KEYS:
            raise MigrationFileError(
                f"bad backfill line: unknown key {key!r} (known: {', '.join(_BACKFILL_KEYS)})",
                number,
            )
        if key in values:
            raise MigrationFileError(f"bad backfill line: {key} given twice", number)
        values[key] = value
    for required in ("table", "set"):
        if required not in values:
            raise MigrationFileError(f"bad backfill line: missing {required}=", number)
    try:
        batch_size = int(values.get("batch_size", "1000"))
    except ValueError:
        raise MigrationFileError(
            f"bad backfill line: batch_size must be an integer, got {values['batch_size']!r}",
            number,
        ) from None
    try:
        delay = float(values.get("delay", "0"))
    except ValueError:
        raise MigrationFileError(
            f"bad backfill line: delay must be seconds, got {values['delay']!r}", number
        ) from None
    numbers: dict[str, int | float] = {}
    for name, (kind, what) in _BACKFILL_NUMBERS.items():
        if name in values:
            try:
                numbers[name] = kind(values[name])
            except ValueError:
                raise MigrationFileError(
                    f"bad backfill line: {name} must be {what}, got {values[name]!r}", number
                ) from None
    try:
        return Backfill(
            table=values["table"],
            set=values["set"],
            key=values.get("key", "id"),
            where=values.get("where") or None,
            batch_size=batch_size,
            delay=delay,
            pacing=values.get("pacing", "adaptive"),
            **numbers,  # type: ignore[arg-type]
        )
    except InvalidMigration as exc:
        raise MigrationFileError(f"bad backfill line: {exc}", number) from None


def _parse_allow(word: str, arg: str, number: int) -> tuple[str, str]:
    from statemachine.sql.rules import RULES

    rule, _, reason = arg.partition(" ")
    if not rule:
        raise MigrationFileError(f"'-- lockstep:{word}' needs a rule id and a reason", number)
    if rule not in RULES:
        raise MigrationFileError(
            f"'-- lockstep:{word} {rule}': no such rule (see 'lockstep lint --rules')", number
        )
    if not reason.strip():
        raise MigrationFileError(
            f"'-- lockstep:{word} {rule}' needs a reason: say why it is safe here", number
        )
    return rule, reason.strip()


def _check_marker_spelling(line: str, number: int) -> None:
    loose = _LOOKS_LIKE_MARKER.match(line)
    if loose is None or _MARKER.match(line) is not None:
        return
    word = loose["word"].lower()
    raise MigrationFileError(
        f"{line.strip()!r} is not a lockstep marker: markers are lower case with no space "
        f"before the colon, e.g. '-- lockstep:{word or 'contract'}'",
        number,
    )


def _attach_allows(
    statements: list[tuple[int, str]], allows: list[tuple[int, str]]
) -> list[tuple[int, str]]:
    """Put each allow comment in front of the next statement, which then starts on its line."""
    out: list[tuple[int, str]] = []
    pending = sorted(allows)
    for line, text in statements:
        mine = [(n, c) for n, c in pending if n < line]
        pending = [(n, c) for n, c in pending if n >= line]
        if mine:
            gap = {n: c for n, c in mine}
            first = mine[0][0]
            head = "\n".join(gap.get(n, "") for n in range(first, line))
            out.append((first, f"{head}\n{text}"))
        else:
            out.append((line, text))
    return out


def parse_migration_source(text: str, *, default_name: str) -> MigrationSource:
    """Parse a migration file's text; raises `MigrationFileError` naming the line."""
    lines = text.removeprefix("\ufeff").splitlines()
    current = _Section("sql", 0)
    sections: list[_Section] = [current]
    seen: dict[str, int] = {}
    directives: dict[str, tuple[int, str]] = {}
    file_allows: dict[str, str] = {}
    allow_lines: dict[str, list[tuple[int, str]]] = {}
    for number, line in enumerate(lines, start=1):
        _check_marker_spelling(line, number)
        match = _MARKER.match(line)
        if match is None:
            current.body.append((number, line))
            continue
        word, arg = match["word"], (match["arg"] or "").strip()
        if word in _ALLOWS:
            rule, reason = _parse_allow(word, arg, number)
            if word == "allow-file":
                file_allows[rule] = reason
            else:
                allow_lines.setdefault(current.name, []).append((number, line.strip()))
            continue
        if word in _DIRECTIVES:
            if word in directives:
                raise MigrationFileError(
                    f"duplicate '-- lockstep:{word}' (first on line {directives[word][0]})", number
                )
            if not arg:
                raise MigrationFileError(f"'-- lockstep:{word}' needs a value", number)
            directives[word] = (number, arg)
            continue
        if word not in _SECTIONS:
            known = ", ".join([*_SECTIONS, *_DIRECTIVES, *_ALLOWS])
            raise MigrationFileError(f"unknown marker 'lockstep:{word}' (known: {known})", number)
        if arg:
            raise MigrationFileError(f"'-- lockstep:{word}' takes no value, got {arg!r}", number)
        if word in seen:
            raise MigrationFileError(
                f"duplicate section '-- lockstep:{word}' (first on line {seen[word]})", number
            )
        if word == "sql" and _has_content(sections[0].body):
            raise MigrationFileError(
                "duplicate section '-- lockstep:sql': the statements before the first marker "
                "already form the sql section",
                number,
            )
        seen[word] = number
        current = _Section(_SECTIONS[word], number)
        sections.append(current)

    by_name: dict[str, list[tuple[int, str]]] = {}
    backfills: list[Backfill] = []
    for section in sections:
        if section.name == "":
            for number, line in section.body:
                stripped = line.strip()
                if stripped and not stripped.startswith("--"):
                    backfills.append(_parse_backfill(number, stripped))
            continue
        by_name.setdefault(section.name, []).extend(_statements(section, len(lines)))
    for name_, allows in allow_lines.items():
        if name_ == "":
            raise MigrationFileError(
                "'-- lockstep:allow' belongs before a SQL statement, not in backfill", allows[0][0]
            )
        attached = _attach_allows(by_name.get(name_, []), allows)
        if sum(c.count("lockstep:allow") for _, c in attached) < len(allows):
            raise MigrationFileError(
                "'-- lockstep:allow' must come before the statement it allows", allows[-1][0]
            )
        by_name[name_] = attached

    sql = by_name.get("sql", [])
    if not sql and not backfills and not by_name.get("contract_sql"):
        where = seen.get("sql", 1)
        raise MigrationFileError("the migration has no statements in sql or contract", where)

    name = default_name
    name_line = 1
    if "name" in directives:
        name_line, name = directives["name"]
    ack_timeout: float | None = None
    if "ack-timeout" in directives:
        line_no, raw = directives["ack-timeout"]
        try:
            ack_timeout = float(raw)
        except ValueError:
            raise MigrationFileError(f"ack-timeout must be seconds, got {raw!r}", line_no) from None
        if not ack_timeout > 0:
            raise MigrationFileError(f"ack-timeout must be > 0, got {raw!r}", line_no)

    rollback = by_name.get("rollback_sql") if "rollback" in seen else None
    contract = by_name.get("contract_sql", [])
    try:
        migration = Migration(
            name,
            [t for _, t in sql],
            rollback_sql=None if rollback is None else [t for _, t in rollback],
            contract_sql=[t for _, t in contract],
            backfills=backfills,
            ack_timeout=ack_timeout,
        )
    except InvalidMigration as exc:
        raise MigrationFileError(str(exc), name_line) from None
    statement_lines = {
        "sql": tuple(n for n, _ in sql),
        "contract_sql": tuple(n for n, _ in contract),
        "rollback_sql": tuple(n for n, _ in rollback or ()),
    }
    return MigrationSource(
        migration, MappingProxyType(statement_lines), MappingProxyType(file_allows)
    )


def parse_migration_text(text: str, *, default_name: str) -> Migration:
    """The `Migration` a file's text describes (see the module docstring for the format)."""
    return parse_migration_source(text, default_name=default_name).migration
