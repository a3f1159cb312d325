"""A FastAPI app embedding the asyncio agent through `lockstep_lifespan`, for the load test
(run by a real uvicorn; see tests/support/load.py for what ``GET /users`` does).

`LOCKSTEP_TEST_URL` and `LOCKSTEP_TEST_APP_DSN` configure it. The app's own lifespan (a small
pool of connections) composes with the agent's: it runs inside, the agent already started.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from agent.integrations.starlette import lockstep_lifespan
from tests.support.load import MIGRATION_NAME, NEW_QUERY, OLD_QUERY, WORK_BEFORE_QUERY

DSN = os.environ["LOCKSTEP_TEST_APP_DSN"]
CONNECTIONS = 4


@asynccontextmanager
async def pool(app: FastAPI) -> AsyncIterator[None]:
    app.state.pool = asyncio.Queue()
    for _ in range(CONNECTIONS):
        app.state.pool.put_nowait(await psycopg.AsyncConnection.connect(DSN, autocommit=True))
    yield
    while not app.state.pool.empty():
        await app.state.pool.get_nowait().close()


app = FastAPI(
    lifespan=lockstep_lifespan(
        os.environ["LOCKSTEP_TEST_URL"], agent_id="fastapi-{pid}", dsn=DSN, lifespan=pool
    )
)


@app.get("/users")
async def users(request: Request) -> JSONResponse:
    lockstep, connections = request.app.state.lockstep, request.app.state.pool
    with lockstep.using(MIGRATION_NAME) as new:
        await asyncio.sleep(WORK_BEFORE_QUERY)
        conn: psycopg.AsyncConnection[Any] = await connections.get()
        try:
            rows = await (await conn.execute(NEW_QUERY if new else OLD_QUERY)).fetchall()
        except psycopg.Error as exc:
            return JSONResponse({"error": str(exc), "new": new}, status_code=500)
        finally:
            connections.put_nowait(conn)
    return JSONResponse({"new": new, "rows": len(rows)})


@app.get("/ready")
async def ready(request: Request) -> JSONResponse:
    lockstep = request.app.state.lockstep
    return JSONResponse({"connected": lockstep.connected, "synced": lockstep.synced})
