"""The Open Ephys GUI's HTTP remote-control routes, mapped onto acqd (docs/control-api.md has the table).

Scripts written with ``open-ephys-python-tools`` (``OpenEphysHTTPServer``) work unchanged for what makes sense
for acqd: status and mode changes, recording folder naming, messages (annotations), the processor list (acqd's
streams), their parameters (read-only), CPU usage and the configuration. Calls that have no meaning for acqd
(signal-chain editing, audio devices, load/save/undo, latency) answer 409 with the reason, as JSON, which is
what that client returns to its caller. ``quit`` stops the daemon only when ``control.enable_quit`` is set.

Those scripts never read replies, so the rules of acqd.service.http.compat apply: RECORD records unless recording
is impossible (a taken session name becomes the next free ``<name>_<n>``, said in the reply, the log and the
console, as the GUI records into an existing folder as its next recording); ``message`` is kept whatever the
mode (the GUI takes it in any mode); every refusal carries ``mode`` (the GUI's reply is always the status, and
the client reads ``["mode"]`` of it) and a refused change is an incident.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Body
from fastapi.responses import JSONResponse

from acqd.config import RigConfig
from acqd.metadata import to_acqd
from acqd.service.annotations import annotate
from acqd.service.commands import (COMMANDS, AnnotateRequest, AnnotationResponse, ModeRequest, RecordingRequest,
                                   RecordingResponse, RecordRequest, StatusResponse, recording_info)
from acqd.service.http.compat import Incidents, unique_session
from acqd.service.http.commands import answer, error, respond
from acqd.service.supervisor import RECORD, Supervisor
from acqd.session import session_name

PROCESSOR_ID_BASE = 100
"""Open Ephys processor ids are 3 digits: stream i of the config is processor 100 + i."""
NOT_FOR_ACQD = {
    "/api/load": "acqd has no signal chain to load: streams come from the rig YAML (acqd serve --config)",
    "/api/save": "acqd has no signal chain to save: the rig YAML is the configuration (GET /api/config)",
    "/api/undo": "acqd has no editing history",
    "/api/redo": "acqd has no editing history",
    "/api/audio": "acqd has no audio device",
    "/api/audio/device": "acqd has no audio device",
    "/api/audio/devices": "acqd has no audio device",
    "/api/processors/clear": "acqd's streams are fixed by the rig YAML",
    "/api/processors/add": "acqd's streams are fixed by the rig YAML",
    "/api/processors/delete": "acqd's streams are fixed by the rig YAML",
    "/api/latency": "acqd does not measure per-stream latency; GET /api/streams has each stream's silent time",
}


def processors(cfg: RigConfig) -> list[dict]:
    """acqd's streams as Open Ephys processors, each with its one data stream."""
    out = []
    for i, s in enumerate(cfg.streams):
        out.append({"id": PROCESSOR_ID_BASE + i, "name": s.name, "type": s.kind, "predecessor": None,
                    "streams": [{"name": s.name, "sample_rate": s.rate, "channel_count": s.shape[0],
                                 "source_id": PROCESSOR_ID_BASE + i}]})
    return out


def parameters(cfg: RigConfig, processor_id: int) -> dict | None:
    i = processor_id - PROCESSOR_ID_BASE
    if not 0 <= i < len(cfg.streams):
        return None
    s = cfg.streams[i]
    values = s.model_dump(mode="json", exclude={"name", "description"})
    return {"id": processor_id, "name": s.name,
            "parameters": [{"name": k, "type": type(v).__name__, "value": v} for k, v in values.items()]}


def cpu_usage(pids: list[int], interval_s: float = 0.2) -> float:
    """Fraction of one core used by ``pids`` over ``interval_s`` (Linux /proc; vanished pids count 0)."""
    def ticks() -> int:
        total = 0
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime
            except (OSError, IndexError, ValueError):
                pass
        return total

    t0, c0 = time.monotonic(), ticks()
    time.sleep(interval_s)
    return (ticks() - c0) / os.sysconf("SC_CLK_TCK") / (time.monotonic() - t0)


def _refusal(sup: Supervisor, reason: str) -> Callable[[], Any]:
    async def refuse() -> Any:
        return error(409, reason, mode=sup.mode)
    return refuse


def record_unique(sup: Supervisor) -> dict:
    """On the supervisor thread: Open Ephys RECORD. The session is named as the GUI names its folder
    (prepend + base or a timestamp + append); a name already taken gets the next free ``<name>_<n>``."""
    if sup.mode == RECORD:
        return COMMANDS["set_mode"].handler(sup, ModeRequest(mode="RECORD"))  # keeps the session (idempotent)
    wanted = to_acqd(sup.cfg.metadata, "config metadata").get("session_id") or session_name(**sup.recording)
    name = unique_session(sup.data_root, wanted)
    status = COMMANDS["record"].handler(sup, RecordRequest(session=name, metadata=sup.next_metadata or None))
    if name == wanted:
        return status
    return {**status, "renamed_from": wanted,
            "note": f"session {wanted!r} exists in {sup.data_root}: recording as {name!r}"}


def visible(sup: Supervisor, incidents: Incidents, what: str, reply: Any) -> Any:
    """A reply as the Open Ephys client needs it: a refusal carries ``mode`` and is an incident; a session
    recorded under another name than asked is an incident too (the console and the log say so)."""
    if isinstance(reply, JSONResponse) and reply.status_code >= 400:
        body = json.loads(reply.body)
        incidents.report("openephys_refused", f"{what} refused: {body['error']}")
        return JSONResponse({**body, "mode": sup.mode}, status_code=reply.status_code)
    if isinstance(reply, dict) and reply.get("renamed_from"):
        incidents.report("session_renamed", reply["note"], summarise=False)
    return reply


def openephys_router(sup: Supervisor, cfg: RigConfig, request_stop: Callable[[], None]) -> APIRouter:
    router = APIRouter(tags=["open ephys"])
    incidents = Incidents(sup, "Open Ephys")
    public = cfg.model_dump(mode="json")
    public["daemon"]["control"]["token"] = "***" if public["daemon"]["control"]["token"] else None

    @router.put("/api/status", response_model=StatusResponse, summary="change mode (IDLE, ACQUIRE, RECORD)")
    def put_status(req: ModeRequest) -> Any:
        if req.mode.upper() == RECORD:  # a rig's leader starts its followers too (acqd.service.rig)
            def local() -> Any:
                return sup.call(record_unique, sup)
            return visible(sup, incidents, "RECORD", respond(
                lambda: local() if sup.rig is None else sup.rig.run("record", {}, local), "record"))
        return visible(sup, incidents, req.mode.upper(), answer(sup, "set_mode", req))

    @router.get("/api/recording", response_model=RecordingResponse, summary="where and how sessions are named")
    def get_recording() -> Any:
        return recording_info(sup)

    @router.put("/api/recording", response_model=RecordingResponse, summary="set parent_directory, texts")
    def put_recording(req: RecordingRequest) -> Any:
        return visible(sup, incidents, "PUT /api/recording", answer(sup, "recording", req))

    @router.put("/api/recording/{node_id}", response_model=RecordingResponse,
                summary="Open Ephys set_record_path: acqd has one data root for every stream")
    def put_record_node(node_id: int, req: RecordingRequest) -> Any:
        return visible(sup, incidents, f"PUT /api/recording/{node_id}", answer(sup, "recording", req))

    @router.get("/api/sessions", summary="sessions under the data root")
    def sessions() -> Any:
        return answer(sup, "sessions", None)

    @router.put("/api/message", response_model=AnnotationResponse,
                summary="an annotation, fsynced before the reply (in IDLE or ACQUIRE: in the data root's file)")
    def message(req: AnnotateRequest) -> Any:
        note = respond(lambda: annotate(sup, req.text, "openephys", in_idle=True), "annotate")
        return visible(sup, incidents, "message", note)

    @router.get("/api/processors", summary="acqd's streams as processors")
    async def get_processors() -> dict:
        return {"processors": processors(cfg)}

    @router.get("/api/processors/list", summary="the processor types acqd has: its stream kinds")
    async def processor_list() -> dict:
        return {"processors": [{"name": k} for k in sorted({s.kind for s in cfg.streams})]}

    @router.get("/api/processors/{processor_id}/parameters", summary="a stream's configuration, read-only")
    @router.get("/api/processors/{processor_id}/streams/{stream_index}/parameters", include_in_schema=False)
    async def get_parameters(processor_id: int, stream_index: int = 0) -> Any:
        found = parameters(cfg, processor_id)
        return found if found and stream_index == 0 else error(404, f"no processor {processor_id} stream "
                                                                    f"{stream_index}")

    @router.put("/api/processors/{processor_id}/parameters/{name}", include_in_schema=False)
    @router.put("/api/processors/{processor_id}/streams/{stream_index}/parameters/{name}", include_in_schema=False)
    @router.put("/api/processors/{processor_id}/config", include_in_schema=False)
    async def set_parameter(processor_id: int, body: Any = Body(None)) -> Any:
        return error(409, "acqd's stream settings are read-only while it runs: edit the rig YAML and restart",
                     mode=sup.mode)

    @router.get("/api/cpu", summary="CPU used by the daemon and its writers (fraction of one core)")
    def cpu() -> dict:
        pids = [os.getpid(), *(s["pid"] for s in sup.snapshot.status["streams"].values() if s["pid"])]
        return {"usage": round(cpu_usage(pids), 4), "cores": os.cpu_count()}

    @router.get("/api/config", summary="the rig configuration the daemon runs (token hidden)")
    async def config() -> dict:
        return {"config": public}

    for path, reason in NOT_FOR_ACQD.items():
        router.add_api_route(path, _refusal(sup, reason), methods=["GET", "PUT"], include_in_schema=False)

    @router.put("/api/quit", summary="stop the daemon (only with control.enable_quit)")
    async def quit_() -> Any:
        if not cfg.daemon.control.enable_quit:
            return error(409, "quit is disabled: set control.enable_quit, or stop the service (systemctl stop acqd)",
                         mode=sup.mode)
        request_stop()
        return {"message": "stopping: the session is closed and every file closes cleanly"}
    return router
