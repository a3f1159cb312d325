"""When the Django app starts an agent: servers yes, management commands only if asked."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("django")

from agent.integrations import django as integration


@pytest.mark.parametrize(
    ("command", "env", "config", "starts"),
    [
        (None, {}, {}, True),  # gunicorn, uwsgi, daphne, uvicorn: no management command
        (None, {}, {"enabled": False}, False),
        (("migrate", []), {}, {}, False),
        (("check", []), {}, {"management_commands": ["rqworker"]}, False),
        (("rqworker", []), {}, {"management_commands": ["rqworker"]}, True),
        (("runserver", []), {}, {}, False),  # the autoreloader's parent serves nothing
        (("runserver", []), {"RUN_MAIN": "true"}, {}, True),  # its serving child
        (("runserver", ["--noreload"]), {}, {}, True),
    ],
)
def test_should_start(
    monkeypatch: pytest.MonkeyPatch,
    command: tuple[str, list[str]] | None,
    env: dict[str, str],
    config: dict[str, Any],
    starts: bool,
) -> None:
    monkeypatch.setattr(integration, "running_command", lambda: command)
    monkeypatch.delenv("RUN_MAIN", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert integration.should_start(config) is starts


def test_no_management_command_runs_under_pytest() -> None:
    assert integration.running_command() is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("ws://coordinator:8765", "settings.LOCKSTEP must be a dict"),
        ({"urls": "ws://x:1", "using": "add_email"}, "LOCKSTEP['using'] must be a list"),
        ({"dsn": "postgresql://"}, "settings.LOCKSTEP has no 'urls'"),
        ({"urls": "ws://x:1", "tokn": "t"}, "unknown agent option(s) tokn"),
    ],
)
def test_bad_settings_are_improperly_configured_naming_them(
    monkeypatch: pytest.MonkeyPatch, value: object, message: str
) -> None:
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

    if not settings.configured:
        settings.configure()
    monkeypatch.setattr(settings, "LOCKSTEP", value, raising=False)
    monkeypatch.setattr(integration, "_process_agent", None)
    with pytest.raises(ImproperlyConfigured) as raised:
        integration.process_agent()
    assert message in str(raised.value)
