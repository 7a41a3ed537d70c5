"""The HTTP control API (FastAPI on uvicorn): the app factory that joins every router.

One router per concern: ``commands`` (every command of acqd.service.commands at ``POST /api/commands/<name>``,
and the answers every route gives), ``openephys`` (the Open Ephys GUI's remote-control routes), ``events``
(``GET /api/events``, Server-Sent Events), ``metrics`` (``GET /metrics``, Prometheus) and ``console`` (the web
page at ``/`` and its ``/api/console/`` routes). ``guard`` checks Host, Origin, token, body size, media type and
nesting before any route runs. Read routes answer from the supervisor's published snapshot and never wait for
a command. Errors are ``{"error": "..."}``: 400 malformed, 401 token, 404 no route, 409 refused in the current
state, 413/415 body, 421 Host, 422 invalid request, 500 a bug (logged), 503 too many connections.
docs/control-api.md is the reference; ``/openapi.json`` and ``/docs`` describe every route.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from acqd.config import ControlConfig, RigConfig
from acqd.service.commands import StatusResponse
from acqd.service.http.commands import HEALTH_PATH, commands_router, error, snapshot_response
from acqd.service.http.console import mount_console, public_paths
from acqd.service.http.events import events_router
from acqd.service.http.guard import Guard
from acqd.service.http.metrics import metrics_router
from acqd.service.http.openephys import openephys_router
from acqd.service.http.rig import rig_router
from acqd.service.supervisor import Supervisor


def create_app(sup: Supervisor, ctl: ControlConfig, cfg: RigConfig, request_stop: Callable[[], None]) -> FastAPI:
    app = FastAPI(title="acqd control API", version="1", description=(__doc__ or "").split("\n\n")[0],
                  openapi_url="/openapi.json", docs_url=None, redoc_url=None)  # /docs: mount_console
    app.state.closing = threading.Event()

    @app.get("/api/status", response_model=StatusResponse, tags=["open ephys"],
             summary="Open Ephys status: the status snapshot (mode, session, streams, disk, verdict)")
    async def status() -> Any:
        return snapshot_response(sup)

    app.include_router(commands_router(sup))
    app.include_router(openephys_router(sup, cfg, request_stop))
    app.include_router(events_router(sup, app.state.closing))
    app.include_router(metrics_router(sup))
    app.include_router(rig_router(sup))  # GET /api/rig: this node, for a rig's leader (acqd.service.rig)
    mount_console(app, sup, app.state.closing)  # the web page at / (acqd.service.http.console)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        malformed = any(e["type"] == "json_invalid" for e in exc.errors())
        return error(400 if malformed else 422, problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error(404, f"no route {request.method} {request.url.path}")
        if exc.status_code == 405:
            return error(405, f"{request.method} is not allowed on {request.url.path}")
        return error(exc.status_code, str(exc.detail))

    if ctl.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(ctl.cors_origins), allow_methods=["GET", "PUT", "POST"],
                           allow_headers=["Authorization", "Content-Type", "Last-Event-ID"])
    app.add_middleware(Guard, allowed_hosts=ctl.allowed_hosts, cors_origins=ctl.cors_origins, token=ctl.token,
                       open_paths=(HEALTH_PATH, *public_paths()))
    return app
