"""The rig console: the web page at ``/`` and the few read paths only it needs (``/api/console/...``).

This module owns the page's static files (``acqd/service/http/web/``: HTML, CSS, one JS module per panel, uPlot
vendored), the API reference page ``/docs`` (Swagger UI vendored too, so that it works offline), and the
console's own routes: the rig's description for the page, live form checks with the same
models the ``record`` command uses, the sessions list with size, duration and QC, a session's QC files, the
current session's incidents and annotations, and the live preview stream. Everything else the page does goes
through the control API itself (commands, ``/api/status``, ``/api/events``, ``/api/message``).

No route here takes the supervisor's thread: they read the config (frozen), the session folders on disk, the
published snapshot, the job records (each written by its own thread before its ``job`` event), and the preview hub (``acqd.service.previews``), which switches the writers' preview on
while at least one page holds ``GET /api/console/preview`` open.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from acqd.config import check_name
from acqd.errors import SessionError
from acqd.finalize.layout import QC_DIR
from acqd.finalize.scrub import verification
from acqd.finalize.seal import read_manifest
from acqd.metadata import MetadataError, SessionMetadata, to_acqd, with_rig_defaults
from acqd.session import LOG_FILE, SESSION_FILE, list_sessions, read_annotations, read_session, session_name
from acqd.service.commands import export_roots
from acqd.service.http.probes import probes_router
from acqd.service.previews import FLUSH_S
from acqd.service.supervisor import Supervisor

WEB_DIR = Path(__file__).with_name("web")
SWAGGER = "/console/vendor/swagger-ui"  # Swagger UI for /docs, from the package: a rig PC may have no internet
QC_FILES = (".png", ".html", ".json", ".svg", ".css", ".js")
"""What ``/api/console/sessions/<id>/qc/<name>`` serves from a session's QC folder."""
KEEPALIVE_S = 5.0
"""An idle preview stream writes a comment this often (a page that went away is noticed at the write)."""


class ValidateRequest(BaseModel):
    """The record form as it stands: checked as ``record`` would check it, without starting anything."""

    model_config = ConfigDict(extra="forbid")
    session: str | None = None
    metadata: dict = Field(default_factory=dict)


class ValidateReply(BaseModel):
    errors: dict[str, str]
    """Field path (``session``, ``subject.age``...) -> what is wrong with it."""
    session: str | None
    """The folder name the session would get."""


class ChannelsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    channels: list[int] = Field(min_length=1, max_length=8)


def metadata_errors(defaults: dict, metadata: dict, session: str = "session") -> dict[str, str]:
    """What ``record`` would refuse in ``metadata`` (merged over the config's defaults, as ``record`` merges it),
    per field path: the models' errors, then finalize's nwbinspector checks (message and check name)."""
    try:
        meta = with_rig_defaults(to_acqd(defaults, "config metadata"), to_acqd(metadata))
    except MetadataError as e:
        return {"metadata": str(e)}
    out: dict[str, str] = {}
    try:  # no subject at all: each of its required fields is reported beside its own input
        SessionMetadata.model_validate({"subject": {}, **meta})
    except ValidationError as e:
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"] if not isinstance(p, int))
            msg = err["msg"].removeprefix("Value error, ")
            out.setdefault(key, "required: the animal of this session" if key.startswith("subject.")
                           and err["type"] == "missing" else msg)
    from acqd.finalize.nwb import metadata_problems  # pynwb: at the first check, not at the daemon's start

    for p in metadata_problems(meta, session):
        out.setdefault(p["field"], f"{p['message']} ({p['check']})")
    return out


def qc_verdict(summary: dict) -> dict:
    """The QC verdict of a finalized session (``text``, ``level`` pass | warn | fail, ``reasons``): the report's
    own (``qc.json`` "verdict", with each stream's reasons) when it has one, else made from its findings."""
    streams = summary.get("streams", {})
    check = summary.get("validation") or {}
    invalid = check.get("read_errors", []) + check.get("validation_errors", [])
    v = summary.get("verdict")
    if isinstance(v, str) and v:
        reasons = [f"{n}: {r}" for n, s in streams.items() for r in (s.get("qc") or {}).get("reasons", [])]
        level = "pass" if v.upper().startswith(("PASS", "OK")) else "fail" if v.upper().startswith("FAIL") else "warn"
        return {"text": v, "level": level, "reasons": reasons + invalid}
    reasons = list(summary.get("warnings", []))
    for name, s in streams.items():
        reasons += [f"{name}: {f}" for f in s.get("flags", [])]
        reasons += [f"{name}: {len(s['gaps'])} gap(s)"] if s.get("gaps") else []
    reasons += invalid
    return {"text": "OK" if not reasons else f"{len(reasons)} finding(s)", "level": "warn" if reasons else "pass",
            "reasons": reasons}


def folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _seconds_between(start: str | None, stop: str | None) -> float | None:
    try:
        t0 = datetime.fromisoformat(start) if start else None
    except ValueError:
        return None
    if t0 is None:
        return None
    try:
        t1 = datetime.fromisoformat(stop).timestamp() if stop else time.time()
    except ValueError:
        return None
    return max(0.0, t1 - t0.timestamp())


def _jobs(sup: Supervisor) -> dict[str, dict[str, dict]]:
    """session id -> kind -> job, read from the job records themselves (never the supervisor's thread).

    Not from the snapshot: it can be a quarter of a second older than a job's last event, and a page that
    reloads the list on that event would draw the finished job as still running (its Export button disabled).
    """
    out: dict[str, dict[str, dict]] = {}
    for job in sup.jobs.listed():
        out.setdefault(job["session"], {})[job["kind"]] = job
    return out


def session_row(info: dict, jobs: dict[str, dict]) -> dict:
    """One line of the sessions list: state (exported once an export has finished), size, duration, jobs."""
    folder = Path(info["path"])
    try:
        s = read_session(folder)
    except SessionError:
        s = {}
    state = info["state"]
    export = jobs.get("export", {})
    if state == "finalized" and export.get("state") == "done":  # stale: amended since (rebuilt by a new export)
        state = "exported" if export.get("master_sha256") == _master_digest(folder, s) else "export stale"
    return {**info, "state": state, "stopped": s.get("stopped"), "size_bytes": folder_bytes(folder),
            "duration_s": _seconds_between(s.get("created"), s.get("stopped")), "jobs": jobs,
            "metadata": s.get("metadata"), "verification": verification(folder)["state"]}


def _master_digest(folder: Path, session: dict) -> str | None:
    """The current master's sha256 of a finalized session (its manifest's line), None if it cannot be read."""
    try:
        return read_manifest(folder).get((session.get("finalize") or {}).get("master") or f"{folder.name}.nwb")
    except OSError:
        return None


def _session_folder(sup: Supervisor, session: str) -> Path:
    try:
        folder = sup.data_root / check_name(session, "session name")
    except ValueError as e:
        raise HTTPException(400, str(e)) from None
    if not (folder / SESSION_FILE).is_file():
        raise HTTPException(404, f"no session {session!r} under {sup.data_root}")
    return folder


def _current_or_last(sup: Supervisor) -> Path | None:
    status = sup.snapshot.status
    for key in ("session", "last_session"):
        if status.get(key):
            return Path(status[key]["path"])
    sessions = list_sessions(sup.data_root)
    return Path(sessions[-1]["path"]) if sessions else None


def console_router(sup: Supervisor, closing: threading.Event) -> APIRouter:
    """The console's routes (behind the API's guard: Host, Origin and token checks apply to them as to any)."""
    router = APIRouter(prefix="/api/console", tags=["console"])
    cfg = sup.cfg

    @router.get("/info")
    def info() -> dict:
        """What the page needs to draw itself: streams, defaults, the last session's metadata, buttons."""
        sessions = list_sessions(sup.data_root)
        last = None
        for s in reversed(sessions):
            try:
                last = read_session(Path(s["path"])).get("metadata")
                break
            except SessionError:
                continue
        streams = [{"name": s.name, "kind": s.kind, "rate": s.rate, "units": s.units, "shape": list(s.shape),
                    "channel_names": list(s.channel_names) if s.channel_names else None, "required": s.required,
                    "description": s.description} for s in cfg.streams]
        return {"streams": streams, "reference": cfg.reference, "metadata_defaults": cfg.metadata,
                "last_metadata": last, "data_root": str(sup.data_root),
                "silent_after_s": cfg.daemon.silent_after_s,
                "annotation_buttons": list(cfg.daemon.annotation_buttons),
                "export_dir": str(export_roots(sup)[0] / "exports")}

    @router.post("/validate")
    def validate(req: ValidateRequest) -> ValidateReply:
        """Check the record form with the models ``record`` uses; nothing is created."""
        name, errors = None, {}
        try:
            name = check_name(req.session, "session name") if req.session else session_name(**sup.recording)
            if (sup.data_root / name).exists():
                errors["session"] = f"session {name!r} already exists"
        except (ValueError, SessionError) as e:
            errors["session"] = str(e)
        errors = {**metadata_errors(cfg.metadata, req.metadata, name or "session"), **errors}
        return ValidateReply(errors=errors, session=name)

    @router.get("/sessions")
    def sessions() -> dict:
        jobs = _jobs(sup)
        rows = [session_row(s, jobs.get(s["session_id"], {})) for s in list_sessions(sup.data_root)]
        return {"data_root": str(sup.data_root), "sessions": rows}

    @router.get("/sessions/{session}/qc")
    def qc(session: str) -> dict:
        """A finalized session's QC: the verdict, the plots, and where the master and the report are."""
        folder = _session_folder(sup, session)
        s = read_session(folder)
        qc_dir = folder / QC_DIR
        summary_path = qc_dir / "qc.json"
        if not summary_path.is_file():
            raise HTTPException(404, f"session {session!r} has no QC report yet (finalize it first)")
        summary = json.loads(summary_path.read_text())
        base = f"/api/console/sessions/{session}/qc"
        master = (s.get("finalize") or {}).get("master") or summary.get("master")
        return {"session": session, "state": s.get("state"), "verdict": qc_verdict(summary),
                "master": str(folder / master) if master else None, "qc_dir": str(qc_dir),
                "index_url": f"{base}/index.html" if (qc_dir / "index.html").is_file() else None,
                "plots": [{"stream": p.stem, "url": f"{base}/{p.name}"} for p in sorted(qc_dir.glob("*.png"))]}

    @router.get("/sessions/{session}/log")
    def session_log(session: str, tail: int = 200) -> dict:
        """The last ``tail`` lines (at most 2000) of what the daemon logged while the session recorded."""
        path = _session_folder(sup, session) / LOG_FILE
        if path.is_symlink() or not path.is_file():
            return {"session": session, "lines": [], "total": 0}
        lines = path.read_bytes().splitlines()
        shown = []
        for raw in lines[-max(1, min(tail, 2000)):]:
            try:
                shown.append(json.loads(raw))
            except ValueError:
                shown.append({"level": "unreadable", "message": raw[:200].decode(errors="replace")})
        return {"session": session, "lines": shown, "total": len(lines)}

    @router.get("/sessions/{session}/qc/{name}", response_class=FileResponse)
    def qc_file(session: str, name: str) -> FileResponse:
        folder = _session_folder(sup, session)
        path = folder / QC_DIR / name
        if "/" in name or name.startswith(".") or path.suffix not in QC_FILES or not path.is_file():
            raise HTTPException(404, f"no QC file {name!r} for session {session!r}")
        return FileResponse(path)

    @router.get("/incidents")
    def incidents() -> dict:
        """The current (else the last) session's incidents, oldest first, as recorded in its session.json."""
        folder = _current_or_last(sup)
        if folder is None:
            return {"session": None, "incidents": []}
        try:
            s = read_session(folder)
        except SessionError:
            return {"session": folder.name, "incidents": []}
        return {"session": s.get("session_id"), "incidents": s.get("incidents", [])}

    @router.get("/annotations")
    def annotations() -> dict:
        """The current (else the last) session's annotations, oldest first."""
        folder = _current_or_last(sup)
        return {"session": folder.name if folder else None, "annotations": read_annotations(folder) if folder else []}

    @router.put("/preview/{stream}")
    def select_channels(stream: str, req: ChannelsRequest) -> dict:
        """Which channels of ``stream`` the preview draws as traces (for every page watching)."""
        if stream not in {s.name for s in cfg.streams}:
            raise HTTPException(404, f"no stream {stream!r}")
        sup.previews.select(stream, req.channels)
        return {"stream": stream, "channels": req.channels}

    @router.get("/preview/state")
    def preview_state() -> dict:
        """Pages watching, writers told to preview, preview messages received so far."""
        return sup.previews.state()

    @router.get("/preview", response_class=StreamingResponse, response_model=None)
    async def preview(request: Request) -> StreamingResponse:
        """Live preview messages (``event: preview``, JSON) from every writer, for as long as this stream is open."""
        return StreamingResponse(_previews(sup, request, closing), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    return router


async def _previews(sup: Supervisor, request: Request, closing: threading.Event) -> AsyncIterator[bytes]:
    key, watcher = sup.previews.watch()
    idle = 0.0
    try:
        yield b"retry: 2000\n\n"
        while not closing.is_set() and not await request.is_disconnected():
            await asyncio.sleep(FLUSH_S)
            queued = watcher.take()
            idle = 0.0 if queued else idle + FLUSH_S
            if queued:  # one write for what queued; each message is already JSON (encoded by its writer)
                yield b"".join(b"event: preview\ndata: " + m + b"\n\n" for m in queued)
            elif idle >= KEEPALIVE_S:
                idle = 0.0
                yield b": keepalive\n\n"  # an idle stream still notices a page that went away
    finally:
        sup.previews.leave(key)


def public_paths() -> tuple[str, ...]:
    """The page and its static files: served without the token, so that the page can ask for it."""
    files = sorted(p.relative_to(WEB_DIR).as_posix() for p in WEB_DIR.rglob("*") if p.is_file())
    return ("/", "/console/", *(f"/console/{f}" for f in files))


def mount_console(app: FastAPI, sup: Supervisor, closing: threading.Event) -> None:
    """Serve the page at ``/`` (its files under ``/console/``) and the console's routes, on ``app``."""
    app.include_router(console_router(sup, closing))
    app.include_router(probes_router(sup))  # the probe view (acqd.service.http.probes)
    app.mount("/console", StaticFiles(directory=WEB_DIR, html=True), name="console")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - Swagger UI",
                                   swagger_js_url=f"{SWAGGER}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{SWAGGER}/swagger-ui.css",
                                   swagger_favicon_url=f"{SWAGGER}/favicon-32x32.png")
