"""One configuration mechanism for every command: options, ``LOCKSTEP_*`` and lockstep.toml.

Every option of every subcommand can come from, in this order of precedence:

1. the command line (``--lock-timeout 2``);
2. the environment: ``LOCKSTEP_<DEST>``, the option's ``dest`` in upper case
   (``LOCKSTEP_LOCK_TIMEOUT=2``; flags take ``1/true/yes/on`` or ``0/false/no/off``);
3. ``lockstep.toml`` in the current directory (or the file ``$LOCKSTEP_CONFIG`` names): a
   key in the command's table wins over a top-level key (``dsn = "..."`` for all commands,
   ``[apply] wait_agents = 3`` for one);
4. the option's default.

Values from 2 and 3 go through the option's own ``type=`` (so they are validated exactly like
the command line, and a bad one is a usage error naming where it came from). Positional
arguments and ``--help``/``--version`` are not configurable.

Secrets (tokens) are never needed on the command line, where ``ps`` shows them: use
``LOCKSTEP_TOKEN`` or a ``--token-file`` (`read_secret`).

How a command uses it: nothing to do. `main.build_parser` calls `install` on every
subparser after the commands registered their options, so a new command (``serve``,
``submit``, ...) that adds ``--foo`` to its parser gets ``LOCKSTEP_FOO`` and ``foo =`` in
lockstep.toml for free. Only document the option in its ``help=``.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from coordinator.cli.reading import UnreadableFile, read_regular_file
from statemachine.exceptions import LockstepError

ENV_PREFIX = "LOCKSTEP_"
CONFIG_FILE = "lockstep.toml"
CONFIG_ENV = "LOCKSTEP_CONFIG"
#: Options that are not settings: never read from the environment or the file.
_NOT_CONFIGURABLE = {"help", "version", "func", "command", "path", "paths"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
MAX_SECRET_BYTES = 4096


class ConfigError(LockstepError):
    """Raised by `install` when lockstep.toml cannot be read or a configured value is invalid
    for its option; the CLI reports it as a usage error (exit 2)."""


def load_file(environ: Mapping[str, str]) -> dict[str, Any]:
    """The parsed lockstep.toml (``$LOCKSTEP_CONFIG`` or ./lockstep.toml), or {} if absent."""
    named = environ.get(CONFIG_ENV)
    path = Path(named) if named else Path(CONFIG_FILE)
    if not named and not path.is_file():
        return {}
    try:
        return tomllib.loads(read_regular_file(path, 1024 * 1024).decode("utf-8"))
    except (UnreadableFile, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc


def _convert(action: argparse.Action, raw: object, where: str) -> object:
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise ConfigError(f"{where}: expected true or false, got {raw!r}")
    if isinstance(raw, bool | dict | list):
        raise ConfigError(f"{where}: expected a single value, got {raw!r}")
    convert = action.type if callable(action.type) else str
    try:
        value = convert(str(raw))
    except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: invalid value {raw!r}: {exc}") from exc
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where}: {raw!r} is not one of {sorted(action.choices)}")
    return value


def install(
    parser: argparse.ArgumentParser,
    command: str,
    *,
    environ: Mapping[str, str] | None = None,
    file: Mapping[str, Any] | None = None,
) -> None:
    """Set `parser`'s defaults from the environment and lockstep.toml (see the module doc)."""
    env = os.environ if environ is None else environ
    document = load_file(env) if file is None else file
    table = document.get(command, {})
    if not isinstance(table, dict):
        table = {}
    defaults: dict[str, object] = {}
    for action in parser._actions:
        dest = action.dest
        if not action.option_strings or dest in _NOT_CONFIGURABLE:
            continue
        key = ENV_PREFIX + dest.upper()
        if key in env:
            defaults[dest] = _convert(action, env[key], f"${key}")
        elif dest in table:
            defaults[dest] = _convert(action, table[dest], f"{CONFIG_FILE} [{command}] {dest}")
        elif dest in document and not isinstance(document[dest], dict):
            defaults[dest] = _convert(action, document[dest], f"{CONFIG_FILE} {dest}")
    parser.set_defaults(**defaults)


def read_secret(path: Path) -> str:
    """The secret in `path` (a regular file, at most 4 KiB, surrounding whitespace dropped)."""
    try:
        data = read_regular_file(path, MAX_SECRET_BYTES)
    except UnreadableFile as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    secret = data.decode("utf-8", "replace").strip()
    if not secret:
        raise ConfigError(f"{path} is empty")
    return secret


__all__ = ["ConfigError", "install", "load_file", "read_secret"]
