"""The command routes: every command of ``acqd.service.commands`` at ``POST /api/commands/<name>``, and the
answers every route gives.

Each command's request and response models are its route's (``/openapi.json``); ``answer`` runs a command on the
supervisor and maps acqd's errors onto HTTP (422 invalid, 409 refused in the current state, 503 busy, 500 a bug,
logged), ``error`` is the one error body (``{"error": "..."}``), ``snapshot_response`` serves the published status
as it is. Also here: ``GET /api/streams``, ``GET /api/lsl`` and the liveness probe ``GET /healthz``.
The other routers (``openephys``, the console) answer through these helpers.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Body
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from acqd.errors import AcqdError, ConfigError
from acqd.service.commands import COMMANDS, Command, StreamsResponse, run_command
from acqd.service.supervisor import Supervisor
from acqd.wire.lsldiscover import discovery

log = logging.getLogger("acqd")
HEALTH_PATH = "/healthz"


def error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def answer(sup: Supervisor, name: str, body: Any) -> Any:
    """Run a command and map acqd's errors onto HTTP: invalid 422, refused 409, a bug 500."""
    return respond(lambda: run_command(sup, name, body), name)


def respond(fn: Callable[[], Any], name: str) -> Any:
    """``fn()``, with acqd's errors mapped onto HTTP as ``answer`` does (``name`` names it in errors)."""
    try:
        return fn()
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
        return discovery()

    @router.get(HEALTH_PATH, summary="liveness (no token needed): the supervisor published a snapshot recently")
    async def health() -> JSONResponse:
        age = time.monotonic() - sup.snapshot.monotonic
        return JSONResponse({"ok": age < 10, "snapshot_age_s": round(age, 3)}, status_code=200 if age < 10 else 503)

    return router
