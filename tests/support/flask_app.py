"""A Flask app using the `Lockstep` extension, for the load test (served by gunicorn with
``--preload`` and the hooks of `agent.integrations.gunicorn`; see tests/support/load.py for
what ``GET /users`` does). `LOCKSTEP_TEST_URL` and `LOCKSTEP_TEST_APP_DSN` configure it.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import psycopg
from flask import Flask, jsonify
from flask.typing import ResponseReturnValue

from agent.integrations.flask import Lockstep
from tests.support.load import MIGRATION_NAME, NEW_QUERY, OLD_QUERY, WORK_BEFORE_QUERY

DSN = os.environ["LOCKSTEP_TEST_APP_DSN"]

app = Flask(__name__)
app.config["LOCKSTEP"] = {"urls": os.environ["LOCKSTEP_TEST_URL"], "dsn": DSN}
lockstep = Lockstep(app)

_local = threading.local()


def _connection() -> psycopg.Connection[Any]:
    """One connection per request thread (gthread workers run several)."""
    if getattr(_local, "conn", None) is None:
        _local.conn = psycopg.connect(DSN, autocommit=True)
    conn: psycopg.Connection[Any] = _local.conn
    return conn


@app.get("/users")
@lockstep.using(MIGRATION_NAME)
def users() -> ResponseReturnValue:
    query = lockstep.choose(MIGRATION_NAME, OLD_QUERY, NEW_QUERY)
    new = query == NEW_QUERY
    time.sleep(WORK_BEFORE_QUERY)
    try:
        rows = _connection().execute(query).fetchall()
    except psycopg.Error as exc:
        return jsonify(error=str(exc), new=new), 500
    return jsonify(new=new, rows=len(rows))


@app.get("/ready")
def ready() -> ResponseReturnValue:
    return jsonify(connected=lockstep.agent.connected)
