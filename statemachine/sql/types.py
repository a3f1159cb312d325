"""Which ``ALTER COLUMN ... TYPE`` changes PostgreSQL makes without rewriting the table.

Why: a rewrite holds ACCESS EXCLUSIVE for as long as copying the table takes, while the few
binary-compatible changes below only touch the catalog (a test on a real server checks both
kinds with relfilenode). Anything not listed is assumed to rewrite.
"""

from __future__ import annotations

import re

_SHAPE = re.compile(r"^\s*(?P<name>[a-z ]+?)\s*(?:\((?P<args>[^)]*)\))?\s*$")
_ALIASES = {
    "character varying": "varchar",
    "varchar": "varchar",
    "text": "text",
    "numeric": "numeric",
    "decimal": "numeric",
    "bit varying": "varbit",
    "varbit": "varbit",
    "pg_catalog.varchar": "varchar",
    "pg_catalog.numeric": "numeric",
}


def _parse(type_text: str) -> tuple[str, tuple[int, ...]] | None:
    match = _SHAPE.match(type_text.lower().replace('"', ""))
    if match is None:
        return None
    name = _ALIASES.get(match["name"].strip())
    if name is None:
        return None
    try:
        args = tuple(int(a) for a in (match["args"] or "").split(",") if a.strip())
    except ValueError:
        return None
    return name, args


def no_rewrite_type_change(current: str, new: str) -> bool:
    """True when changing a column of type `current` (as ``format_type`` prints it) to `new`
    (as written) rewrites nothing: a longer or removed length limit, varchar <-> text, a
    numeric with more precision and the same scale."""
    if current.strip().lower() == new.strip().lower():
        return True
    old_t, new_t = _parse(current), _parse(new)
    if old_t is None or new_t is None:
        return False
    (old_name, old_args), (new_name, new_args) = old_t, new_t
    if old_name in ("varchar", "text") and new_name in ("varchar", "text"):
        if new_name == "text" or not new_args:
            return True
        return old_name == "varchar" and bool(old_args) and new_args[0] >= old_args[0]
    if old_name == new_name == "varbit":
        return not new_args or (bool(old_args) and new_args[0] >= old_args[0])
    if old_name == new_name == "numeric":
        if not new_args:
            return True
        if not old_args or (len(new_args) != len(old_args) and len(old_args) != 1):
            return False
        old_scale = old_args[1] if len(old_args) > 1 else 0
        new_scale = new_args[1] if len(new_args) > 1 else 0
        return new_scale == old_scale and new_args[0] >= old_args[0]
    return False
