"""The HTTP control API (FastAPI on uvicorn) and its Python client (httpx).

One router per concern: ``commands`` (here: every command of acqd.service.commands at
``POST /api/commands/<name>``, its request and response models as the route's), ``openephys`` (the Open Ephys
GUI's remote-control routes), ``events`` (``GET /api/events``, Server-Sent Events) and ``metrics``
(``GET /metrics``, Prometheus); ``GET /api/lsl`` lists the LSL outlets visible now (docs/lsl.md). ``acqd.service.guard`` checks Host, Origin, token, body size, media type and
nesting before any route runs. Read routes answer from the supervisor's published snapshot and never wait for
a command. Errors are ``{"error": "..."}``: 400 malformed, 401 token, 404 no route, 409 refused in the current
state, 413/415 body, 421 Host, 422 invalid request, 500 a bug (logged), 503 too many connections.
docs/control-api.md is the reference; ``/openapi.json`` and ``/docs`` describe every route.
The console (acqd.service.console) adds the web page at ``/`` and its ``/api/console/`` routes.
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
from fastapi import APIRouter, Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from acqd.config import ControlConfig, RigConfig
from acqd.errors import AcqdError, ConfigError, SessionError
from acqd.service import systemd
from acqd.service.console import mount_console, public_paths
from acqd.service.commands import COMMANDS, Command, StatusResponse, StreamsResponse, run_command
from acqd.service.guard import Guard
from acqd.service.supervisor import Supervisor

log = logging.getLogger("acqd")
LIMIT_CONCURRENCY = 512
"""Connections open at once; beyond it requests get 503 at once instead of queueing without bound. uvicorn
counts open connections, not busy ones, so this is well above a burst of 300 clients. Sync routes (commands)
share anyio's worker pool (40 threads); read routes are async and never take a worker."""
BACKLOG = 1024
HEALTH_PATH = "/healthz"


def error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def answer(sup: Supervisor, name: str, body: Any) -> Any:
    """Run a command and map acqd's errors onto HTTP: invalid 422, refused 409, a bug 500."""
    try:
        return run_command(sup, name, body)
    except (ValidationError, ConfigError, ValueError) as e:  # metadata: each problem's field and check too
        return error(422, str(e), **({"problems": e.problems} if getattr(e, "problems", None) else {}))
    except AcqdError as e:
        return error(409, str(e))
    except TimeoutError:
        return error(503, f"the daemon is busy: {name} did not run within the time limit")
    except Exception as e:  # noqa: BLE001 - a bug must still answer, and be logged
        log.exception("command %s failed", name)
        return error(500, f"internal error: {e!r}")


def snapshot_response(sup: Supervisor) -> Response:
    """The published status as it is (already JSON): no supervisor thread, no re-encoding."""
    return Response(sup.snapshot.body, media_type="application/json")


def _command_route(router: APIRouter, sup: Supervisor, name: str, cmd: Command) -> None:
    required = any(f.is_required() for f in cmd.request.model_fields.values())

    def endpoint(req: Any = None) -> Any:
        return answer(sup, name, req)

    default = Body(...) if required else Body(None)
    endpoint.__signature__ = inspect.Signature([inspect.Parameter(
        "req", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default,
        annotation=cmd.request if required else cmd.request | None)])
    router.add_api_route(f"/api/commands/{name}", endpoint, methods=["POST"], response_model=cmd.response,
                         summary=cmd.help, description=cmd.request.__doc__ or "", name=name,
                         responses={409: {"description": "refused in the current state"},
                                    422: {"description": "invalid request"}})


def commands_router(sup: Supervisor) -> APIRouter:
    router = APIRouter(tags=["commands"])
    for name, cmd in COMMANDS.items():
        _command_route(router, sup, name, cmd)

    @router.post("/api/commands/{name}", include_in_schema=False)
    def unknown(name: str) -> JSONResponse:
        return error(404, f"no command {name!r}", commands=sorted(COMMANDS))

    @router.get("/api/streams", response_model=StreamsResponse, summary="per-stream health (from the snapshot)")
    async def streams() -> Any:
        return {"streams": sup.snapshot.status["streams"]}

    @router.get("/api/lsl", summary="LSL outlets visible now, each with a config snippet (docs/lsl.md)")
    def lsl() -> Any:  # a 1 s network look-up: FastAPI runs a plain def in its thread pool, off the supervisor
        from acqd.wire.lsldiscover import discovery

        return discovery()

    @router.get(HEALTH_PATH, summary="liveness (no token needed): the supervisor published a snapshot recently")
    async def health() -> JSONResponse:
        age = time.monotonic() - sup.snapshot.monotonic
        return JSONResponse({"ok": age < 10, "snapshot_age_s": round(age, 3)}, status_code=200 if age < 10 else 503)

    return router


def create_app(sup: Supervisor, ctl: ControlConfig, cfg: RigConfig, request_stop: Callable[[], None]) -> FastAPI:
    from acqd.service.events import events_router
    from acqd.service.metrics import metrics_router
    from acqd.service.openephys import openephys_router

    app = FastAPI(title="acqd control API", version="1", description=(__doc__ or "").split("\n\n")[0],
                  openapi_url="/openapi.json", docs_url="/docs", redoc_url=None)
    app.state.closing = threading.Event()

    @app.get("/api/status", response_model=StatusResponse, tags=["open ephys"],
             summary="Open Ephys status: the status snapshot (mode, session, streams, disk, verdict)")
    async def status() -> Any:
        return snapshot_response(sup)

    app.include_router(commands_router(sup))
    app.include_router(openephys_router(sup, cfg, request_stop))
    app.include_router(events_router(sup, app.state.closing))
    app.include_router(metrics_router(sup))
    mount_console(app, sup, app.state.closing)  # the web page at / (acqd.service.console)

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


def setup_logging() -> None:
    """stdlib logging with time and level (journald shows both; PYTHONUNBUFFERED is not needed)."""
    logging.basicConfig(level=os.environ.get("ACQD_LOG_LEVEL", "INFO").upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def serve(cfg: RigConfig, ready_file: str | None = None, acquire: bool = False) -> int:
    """Run the daemon until SIGTERM or SIGINT: supervisor on the main thread, uvicorn on another."""
    import uvicorn

    from acqd.service.shipping import start_shipping

    setup_logging()
    sup = Supervisor(cfg)
    ctl = cfg.daemon.control
    stop = threading.Event()

    def request_stop(*_: object) -> None:
        systemd.notify("STOPPING=1")
        stop.set()

    app = create_app(sup, ctl, cfg, request_stop)
    server = uvicorn.Server(uvicorn.Config(
        app, host=ctl.host, port=ctl.port, limit_concurrency=LIMIT_CONCURRENCY, backlog=BACKLOG, lifespan="off",
        log_config=None, access_log=False, timeout_keep_alive=5, timeout_graceful_shutdown=3, server_header=False))
    http = threading.Thread(target=server.run, name="acqd-http", daemon=True)
    http.start()
    deadline = time.monotonic() + 30
    while not server.started and http.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not server.started:
        server.should_exit = True
        sup.shutdown()
        raise SessionError(f"the control API cannot listen on {ctl.host}:{ctl.port} (in use, or not an address "
                           f"of this machine)")
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)
    ready = {"url": url, "pid": os.getpid(), "data_root": str(sup.data_root)}
    if cfg.daemon.labrecorder is not None:  # LabRecorder's remote control socket (docs/lsl.md)
        from acqd.service.labrecorder import start_listener

        _, ready["labrecorder_port"] = start_listener(sup, cfg.daemon.labrecorder.host, cfg.daemon.labrecorder.port)
    if acquire:
        sup.acquire()  # before READY: a unit that starts acquiring is ready once its writers are
    sup.on_tick = systemd.Watchdog(systemd.watchdog_interval_s()).ping
    if ready_file:
        import json

        with open(ready_file + ".tmp", "w") as f:
            json.dump(ready, f)
        os.replace(ready_file + ".tmp", ready_file)
    log.info("serving %s (data root %s)", url, sup.data_root)
    systemd.notify(f"READY=1\nSTATUS=serving {url}")
    sup.shipping = start_shipping(sup)  # the ship queue, when the rig config has ship: destinations
    try:
        sup.serve(stop)
    finally:
        if sup.shipping is not None:
            sup.shipping.stop()
        app.state.closing.set()
        server.should_exit = True
        http.join(10)
    log.info("stopped")
    return 0


class DaemonUnreachable(AcqdError):
    """No daemon answers at the URL (not running, wrong address or port)."""


class ApiError(AcqdError):
    """The daemon refused a request; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Client:
    """A small client for the control API (used by the CLI, the demo and tests)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 150.0):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        try:
            resp = self._http.request(method, path, json=body)
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            raise DaemonUnreachable(f"no acqd daemon at {self.url} ({e}): is it running? (acqd serve)") from None
        except httpx.TransportError as e:
            raise DaemonUnreachable(f"lost the connection to {self.url}: {e!r}") from None
        try:
            data = resp.json()
        except ValueError:
            data = {"error": resp.text}
        if resp.status_code >= 400:
            raise ApiError(resp.status_code, data.get("error", str(data)) if isinstance(data, dict) else str(data))
        return data

    def command(self, name: str, **body: object) -> dict:
        return self.request("POST", f"/api/commands/{name}", body)

    def close(self) -> None:
        self._http.close()
