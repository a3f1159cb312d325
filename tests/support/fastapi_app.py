"""A FastAPI app embedding the asyncio agent, for the load test (run by a real uvicorn).

`LOCKSTEP_TEST_URL`, `LOCKSTEP_TEST_APP_DSN` and `LOCKSTEP_TEST_AGENT_ID` configure it.
`GET /users` picks its query by migration ``add_email`` inside ``agent.using``: the old query
reads ``old_name`` (which the migration's CONTRACT drops), the new one reads ``email`` (which
its EXECUTE adds). A query that fails is a 500: the load test counts them.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from agent.aio import open_asyncio_agent

MIGRATION = "add_email"
OLD_QUERY = "SELECT id, old_name FROM users ORDER BY id"
NEW_QUERY = "SELECT id, email FROM users ORDER BY id"
CONNECTIONS = 4
#: Work a request does between choosing its query set and querying (auth, validation...):
#: the window in which a schema change would break a request that chose the old set.
WORK_BEFORE_QUERY = 0.15


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    dsn = os.environ["LOCKSTEP_TEST_APP_DSN"]
    pool: asyncio.Queue[psycopg.AsyncConnection[Any]] = asyncio.Queue()
    for _ in range(CONNECTIONS):
        pool.put_nowait(await psycopg.AsyncConnection.connect(dsn, autocommit=True))
    async with open_asyncio_agent(
        os.environ["LOCKSTEP_TEST_URL"],
        agent_id=os.environ.get("LOCKSTEP_TEST_AGENT_ID", f"fastapi-{os.getpid()}"),
        dsn=dsn,
    ) as agent:
        app.state.agent, app.state.pool = agent, pool
        yield
    while not pool.empty():
        await pool.get_nowait().close()


app = FastAPI(lifespan=lifespan)


@app.get("/users")
async def users() -> JSONResponse:
    agent, pool = app.state.agent, app.state.pool
    with agent.using(MIGRATION) as new:
        await asyncio.sleep(WORK_BEFORE_QUERY)
        conn = await pool.get()
        try:
            rows = await (await conn.execute(NEW_QUERY if new else OLD_QUERY)).fetchall()
        except psycopg.Error as exc:
            return JSONResponse({"error": str(exc), "new": new}, status_code=500)
        finally:
            pool.put_nowait(conn)
    return JSONResponse({"new": new, "rows": len(rows)})


@app.get("/ready")
async def ready() -> JSONResponse:
    agent = app.state.agent
    return JSONResponse({"connected": agent.connected, "synced": agent.synced})
