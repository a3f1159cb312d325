"""Settings of the test project: the lockstep app and middleware are the only glue."""

from __future__ import annotations

import os

import psycopg

_dsn = psycopg.conninfo.conninfo_to_dict(os.environ.get("LOCKSTEP_TEST_APP_DSN", ""))

SECRET_KEY = "only-for-tests"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "tests.support.django_app.urls"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _dsn.get("dbname", ""),
        "USER": _dsn.get("user", ""),
        "PASSWORD": _dsn.get("password", ""),
        "HOST": _dsn.get("host", ""),
        "PORT": _dsn.get("port", ""),
        "CONN_MAX_AGE": 60,
    }
}
INSTALLED_APPS = ["agent.integrations.django.LockstepConfig", "tests.support.django_app"]
MIDDLEWARE = ["agent.integrations.django.LockstepMiddleware"]
LOCKSTEP = {
    "urls": os.environ.get("LOCKSTEP_TEST_URL", "ws://127.0.0.1:1"),
    "dsn": os.environ.get("LOCKSTEP_TEST_APP_DSN") or None,
    "using": ["add_email"],
    "management_commands": os.environ.get("LOCKSTEP_TEST_COMMANDS", "").split(),
    "join_grace": float(os.environ.get("LOCKSTEP_TEST_JOIN_GRACE", "5")),
}
