"""The control commands: one typed handler each, shared by the HTTP API and the CLI.

Each command has a pydantic request model, a response model and a handler. The HTTP API serves every command
at ``POST /api/commands/<name>`` with exactly these models (so ``/openapi.json`` is the whole contract), plus
the Open Ephys compatible routes mapped onto the same handlers; the CLI client sends the same requests.
Handlers that change state run on the supervisor thread (``Supervisor.call``); the ones that only read
(``status``) or must not wait behind a mode change (``annotate``) run on the caller's thread.

Every request is validated completely before anything starts: an invalid ``record`` in IDLE starts no writer.
Refusals in the current state raise ``SessionError`` (HTTP 409); invalid requests raise ``ConfigError`` or a
pydantic ``ValidationError`` (HTTP 422). Docs: docs/control-api.md.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from acqd.config import check_name
from acqd.errors import ConfigError, SessionError
from acqd.finalize.amend import amend_session, check_metadata
from acqd.metadata import MetadataError, bids_name, check_layout, merge, to_acqd, with_rig_defaults
from acqd.service import live
from acqd.service.annotations import annotate
from acqd.service.rig import FANNED_OUT, LeaderRef
from acqd.service.shipping import SHIP_COMMANDS
from acqd.service.supervisor import ACQUIRE, RECORD, Supervisor
from acqd.images import attach
from acqd.session import SESSION_FILE, list_sessions, session_name

log = logging.getLogger("acqd")


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Empty(Request):
    """No arguments."""


class RecordRequest(Request):
    """Start recording. Metadata replaces the config's rig-level defaults block by block; the subject (subject_id,
    species, sex, age) comes with every request (the config holds none)."""

    session: str | None = None
    """Session folder name; default: prepend_text + (base_text or a timestamp) + append_text."""
    metadata: dict | None = None
    """SessionMetadata fields (session_description, experimenter, subject: {subject_id, species, sex, age}), or
    neuroconv's layout (NWBFile, Subject, Ecephys); checked with finalize's nwbinspector rules before RECORD."""
    bids: dict[str, str] | None = None
    """BIDS entities {sub, ses, task, acq, run}: the session folder is named sub-<sub>[_ses-<ses>]... and so is
    the export; sub is the subject_id."""
    leader: LeaderRef | None = None
    """Set by a rig's leader starting this follower (docs/multi-pc.md): stored as session.json's ``leader``."""

    @field_validator("session")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return None if v is None else check_name(v, "session name")


class StopRequest(Request):
    """Step down: RECORD -> ACQUIRE (the session is closed), ACQUIRE -> IDLE; ``idle`` goes all the way."""

    idle: bool = False


class ModeRequest(Request):
    """Open Ephys ``PUT /api/status``."""

    mode: Literal["IDLE", "ACQUIRE", "RECORD", "idle", "acquire", "record"]


class RecordingRequest(Request):
    """Open Ephys ``PUT /api/recording``: how the next session folder is named."""

    parent_directory: str | None = None
    """Data root for the next sessions: must be inside daemon.data_root or a folder of control.data_roots."""
    prepend_text: str | None = Field(None, max_length=64)
    base_text: str | None = Field(None, max_length=64)
    append_text: str | None = Field(None, max_length=64)
    start_new_directory: bool | Literal["true", "false"] | None = None
    """Open Ephys: acqd always starts a new folder per recording, so this is accepted and has no effect."""
    metadata: dict | None = None
    """acqd: the next session's metadata (acqd's or neuroconv's layout), for starts that carry none: an Open
    Ephys script's RECORD, LabRecorder's start. ``{}`` clears it. Checked when the session starts."""


class FinalizeRequest(Request):
    """Finalize a closed session in the background (docs/finalize.md); follow it with ``finalize_status``."""

    session: str
    """Session id under the data root."""


class AmendRequest(Request):
    """Change the metadata of a closed, interrupted or finalized session (docs/finalize.md "Amend")."""

    session: str
    """Session id under the data root (not the one recording)."""
    metadata: dict
    """Fields to change, in acqd's or neuroconv's layout; merged over the session's metadata and checked as at
    RECORD."""
    who: str = Field("control API", min_length=1, max_length=200)
    """Who amends (recorded in session.json's amendments)."""


class ExportRequest(Request):
    """Export a finalized session as one self-contained NWB for DANDI (docs/export.md)."""

    session: str
    out: str
    """Folder the ``sub-<subject>/...`` layout is written under: inside control.export_roots."""


class AttachRequest(Request):
    """Attach a photo (rig, subject, craniotomy) to a session before finalize: it lands in the master NWB."""

    session: str
    """Session id under the data root (recording, closed or interrupted; not finalized)."""
    file: str
    """Absolute path of the image on the daemon's machine, inside daemon.data_root or control.data_roots."""
    description: str = Field(min_length=1, max_length=10_000)
    """What the image shows."""
    resolution: float | None = Field(None, gt=0)
    """Pixels per cm, when known."""


class JobStatusRequest(Request):
    """Progress and result of the runs (finalize or export) started since the daemon started (one session, or all)."""

    session: str | None = None


class AnnotateRequest(Request):
    """A timestamped note in the recording (in ACQUIRE: in the data root's annotations.jsonl)."""

    text: str = Field(min_length=1, max_length=10_000)


class Response(BaseModel):
    """Replies carry at least these fields; more may be added (never removed or renamed)."""

    model_config = ConfigDict(extra="allow")


class StreamStatus(Response):
    state: str
    """starting | acquiring | recording | stopping | stopped | failed | stopped_failed (| hung)."""
    reason: str | None = None
    connected: bool
    silent_s: float | None = None
    messages_per_s: float
    mb_per_s: float
    gaps: int
    rejected: int
    rejected_by_reason: dict[str, int] = {}
    restarts: int
    required: bool
    sync: dict | None = None
    """The live sync lock while recording, null otherwise (docs/control-api.md): state, edges, paired, drift_ppm,
    offset_s, since, reason."""


class SessionInfo(Response):
    session_id: str
    path: str
    state: str
    incomplete: bool
    incidents: int
    started: str | None = None
    elapsed_s: float | None = None
    annotations: int = 0


class Verdict(Response):
    ok: bool
    problems: list[str]
    line: str


class StatusResponse(Response):
    """The status snapshot (docs/control-api.md "Status snapshot")."""

    mode: Literal["IDLE", "ACQUIRE", "RECORD"]
    session: SessionInfo | None
    streams: dict[str, StreamStatus]
    disk_free_bytes: int | None
    disk_time_left_s: float | None = None
    verdict: Verdict | None = None


class StreamsResponse(Response):
    streams: dict[str, StreamStatus]


class RecordingResponse(Response):
    parent_directory: str
    prepend_text: str
    base_text: str
    append_text: str


class SessionsResponse(Response):
    sessions: list[dict]


class PreflightResponse(Response):
    problems: list[str]


class JobResponse(Response):
    """One run (with ``session``) or every run of that kind (``jobs``)."""

    session: str | None = None
    kind: str | None = None
    state: str | None = None
    stage: str | None = None
    fraction: float | None = None
    error: str | None = None
    report: dict | None = None
    jobs: dict[str, dict] | None = None


class AmendResponse(Response):
    """The amendment recorded in session.json (``what`` empty: nothing changed)."""

    who: str
    when: str
    what: list[str]
    previous_master_sha256: str | None = None
    master_sha256: str | None = None


class AttachResponse(Response):
    """The attachment's sidecar (attachments/<name>.json)."""

    session: str
    name: str
    """File name under the session's attachments/."""
    description: str
    resolution: float | None
    shape: list[int]
    """Pixels: [height, width] grayscale, [height, width, 3] RGB, [height, width, 4] RGBA."""
    attached_by: str
    attached_at: str


class AnnotationResponse(Response):
    text: str
    taken_at: str
    host_time_ns: int
    reference: str
    reference_sample: int | None
    session: str | None
    mode: str


def status_now(sup: Supervisor) -> dict:
    """The current snapshot (never waits for the supervisor thread)."""
    return sup.snapshot.to_dict()


def _fresh(sup: Supervisor) -> dict:
    """After a mode change (on the supervisor thread): publish and return the new snapshot."""
    return live.publish(sup, force=True).to_dict()


def _acquire(sup: Supervisor, req: Empty) -> dict:
    if sup.mode == RECORD:
        raise SessionError(f"recording session {sup.session['session_id']!r}: acquire does not end a recording; "
                           f"stop it with `acqd stop` (POST /api/commands/stop)")
    sup.acquire()
    return _fresh(sup)


def _record(sup: Supervisor, req: RecordRequest) -> dict:
    if sup.mode == RECORD:  # idempotent: scripts that say RECORD twice keep the session they have
        current = sup.session["session_id"]
        if req.session not in (None, current):
            raise SessionError(f"already recording session {current!r}: stop it first (acqd stop)")
        return {**_fresh(sup), "already_recording": True}
    # Everything is checked before a writer starts, with the rules finalize applies.
    request = to_acqd(req.metadata, "metadata")
    if req.bids:  # before the config's defaults: a default subject_id gives way to the BIDS subject
        request = _with_bids(request, req.bids)
    meta = with_rig_defaults(to_acqd(sup.cfg.metadata, "config metadata"), request)
    check_layout(meta)
    name = req.session or (bids_name(req.bids) if req.bids else None) or meta.get("session_id") \
        or session_name(**sup.recording)
    meta = check_metadata(meta, check_name(name, "session name"))
    if (sup.data_root / name).exists():
        raise SessionError(f"session {name!r} already exists in {sup.data_root}")
    try:
        sup.record(meta, name, req.leader.model_dump() if req.leader else None)
    except Exception:
        _fresh(sup)  # a start undone (a follower refused) may have published RECORD meanwhile: readers see it undone
        raise
    return _fresh(sup)


def _with_bids(meta: dict, bids: dict[str, str]) -> dict:
    """The BIDS entities in the metadata (``bids``); ``sub`` is the subject_id (given, or checked against it)."""
    bids_name(bids)
    subject_id = (meta.get("subject") or {}).get("subject_id")
    if subject_id not in (None, bids.get("sub")):
        raise MetadataError(f"bids.sub {bids.get('sub')!r} differs from subject.subject_id {subject_id!r}")
    return merge(meta, {"bids": dict(bids), "subject": {"subject_id": bids["sub"]}})


def _amend(sup: Supervisor, req: AmendRequest) -> dict:
    if sup.session is not None and sup.session["session_id"] == req.session:
        raise SessionError(f"session {req.session!r} is being recorded: stop the recording first")
    return amend_session(sup.data_root / check_name(req.session, "session name"), to_acqd(req.metadata), req.who)


def _stop(sup: Supervisor, req: StopRequest) -> dict:
    if req.idle or sup.mode != RECORD:
        sup.stop()
    else:
        sup.stop_recording()
    return _fresh(sup)


def _set_mode(sup: Supervisor, req: ModeRequest) -> dict:
    mode = req.mode.upper()
    if mode == RECORD:
        return _record(sup, RecordRequest())
    if mode == ACQUIRE and sup.mode == RECORD:
        sup.stop_recording()  # Open Ephys: ACQUIRE while recording ends the recording, acquisition goes on
    elif mode == ACQUIRE:
        sup.acquire()
    else:
        sup.stop()
    return _fresh(sup)


def confined(path: str, roots: list[Path], what: str, key: str = "data_roots") -> Path:
    """``path`` resolved (symlinks followed), refused unless it lies inside one of ``roots`` (``control.<key>``)."""
    p = Path(path)
    if not p.is_absolute() or "\x00" in path:
        raise ConfigError(f"{what} {path!r} must be an absolute path")
    resolved = p.resolve()
    if not any(resolved.is_relative_to(r.resolve()) for r in roots):
        raise ConfigError(f"{what} {path!r} is outside the allowed folders ({', '.join(map(str, roots))}): "
                          f"list its folder under daemon.control.{key} "
                          f"in the rig config (docs/control-api.md, Safety)")
    return resolved


def data_roots(sup: Supervisor) -> list[Path]:
    return [Path(sup.cfg.daemon.data_root), *sup.cfg.daemon.control.data_roots]


def export_roots(sup: Supervisor) -> list[Path]:
    return list(sup.cfg.daemon.control.export_roots) or [Path(sup.cfg.daemon.data_root).resolve().parent]


def _recording(sup: Supervisor, req: RecordingRequest) -> dict:
    changes = req.model_dump(exclude_none=True, exclude={"start_new_directory"})
    parent = changes.pop("parent_directory", None)
    metadata = changes.pop("metadata", None)
    if metadata is not None:
        try:
            sup.next_metadata = to_acqd(metadata, "next session's metadata")
        except MetadataError as e:
            raise ConfigError(str(e)) from None
    if changes and sup.mode == RECORD:
        raise SessionError("cannot rename the session being recorded: set these before RECORD")
    if changes:
        try:  # the names it would make must be valid
            session_name(**{**sup.recording, **changes})
        except SessionError as e:
            raise ConfigError(str(e)) from None
    if parent is not None:
        root = confined(parent, data_roots(sup), "parent_directory")
        if root != sup.data_root:
            sup.set_data_root(root)
    sup.recording.update(changes)
    return recording_info(sup)


def recording_info(sup: Supervisor) -> dict:
    """The Open Ephys shape of GET /api/recording."""
    status = sup.snapshot.status
    return {"parent_directory": str(sup.data_root), **sup.recording, "metadata": sup.next_metadata,
            "default_record_engine": "acqd-hdf5",
            "record_nodes": [], "current_session": status["session"], "last_session": status["last_session"]}


def _attach(sup: Supervisor, req: AttachRequest) -> dict:
    try:
        folder = sup.data_root / check_name(req.session, "session name")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not (folder / SESSION_FILE).is_file():
        raise SessionError(f"no session {req.session!r} under {sup.data_root}")
    file = confined(req.file, data_roots(sup), "image file")  # the API never reads files outside the data roots
    return {"session": req.session, **attach(folder, file, req.description, req.resolution, who="control API")}


def _export(sup: Supervisor, req: ExportRequest) -> dict:
    out = confined(req.out, export_roots(sup), "export folder", "export_roots")
    return sup.start_job("export", req.session, "--out", str(out))


@dataclass(frozen=True, slots=True)
class Command:
    """One control command: its request and response models, its handler, and where the handler runs."""

    request: type[Request]
    response: type[Response]
    handler: Callable[[Supervisor, Any], dict]
    help: str
    on_supervisor: bool = True
    """False: run on the caller's thread (reads the snapshot, or must not wait behind a command)."""


READS = frozenset({"status", "sessions", "preflight", "finalize_status", "export_status"})
"""Commands that only read: not logged (a status poll every second would drown what matters)."""
CALLER: ContextVar[str] = ContextVar("acqd_caller", default="the daemon itself")
"""Who sent the command being run: set per HTTP request by the guard (acqd.service.http.guard.caller)."""

COMMANDS: dict[str, Command] = {
    "status": Command(Empty, StatusResponse, lambda sup, req: status_now(sup), "mode, session and per-stream health",
                      on_supervisor=False),
    "acquire": Command(Empty, StatusResponse, _acquire, "start receiving (IDLE -> ACQUIRE)"),
    "record": Command(RecordRequest, StatusResponse, _record, "start recording a new session (-> RECORD)"),
    "stop": Command(StopRequest, StatusResponse, _stop, "stop recording (RECORD -> ACQUIRE) or acquiring (-> IDLE)"),
    "set_mode": Command(ModeRequest, StatusResponse, _set_mode, "Open Ephys style mode change"),
    "recording": Command(RecordingRequest, RecordingResponse, _recording, "get or set where and how sessions are named"),
    "sessions": Command(Empty, SessionsResponse, lambda sup, req: {"sessions": list_sessions(sup.data_root)},
                        "sessions under the data root", on_supervisor=False),
    "preflight": Command(Empty, PreflightResponse, lambda sup, req: {"problems": sup.preflight()},
                         "why RECORD would be refused right now"),
    "annotate": Command(AnnotateRequest, AnnotationResponse, lambda sup, req: annotate(sup, req.text),
                        "a timestamped note in the recording (ACQUIRE or RECORD)", on_supervisor=False),
    "finalize": Command(FinalizeRequest, JobResponse, lambda sup, req: sup.start_job("finalize", req.session),
                        "finalize a closed session in the background"),
    "finalize_status": Command(JobStatusRequest, JobResponse, lambda sup, req: sup.job_status("finalize", req.session),
                               "progress and result of finalize runs"),
    "amend": Command(AmendRequest, AmendResponse, _amend, "change the metadata of a recorded session (after "
                     "finalize: rewrites the master NWB only)", on_supervisor=False),
    "export": Command(ExportRequest, JobResponse, _export, "export a finalized session for sharing, in the background"),
    "attach": Command(AttachRequest, AttachResponse, _attach, "attach an image to a session before finalize",
                      on_supervisor=False),
    "export_status": Command(JobStatusRequest, JobResponse, lambda sup, req: sup.job_status("export", req.session),
                             "progress and result of export runs"),
}
COMMANDS.update({name: Command(*spec) for name, spec in SHIP_COMMANDS.items()})  # acqd.service.shipping


def run_command(sup: Supervisor, name: str, body: dict | Request | None) -> dict:
    """Validate ``body`` for command ``name`` and run it (on the supervisor thread unless it only reads).

    Every command that can change something is logged first with who sent it (``CALLER``), so that the daemon's
    log and the session's own log (acqd.service.sessionlog) say who did what, and when."""
    cmd = COMMANDS[name]
    req = body if isinstance(body, cmd.request) else cmd.request.model_validate(body or {})
    if name not in READS:
        args = req.model_dump(exclude_none=True, exclude_defaults=True)
        log.info("command %s by %s%s", name, CALLER.get(), f" {json.dumps(args, default=str)}" if args else "",
                 extra={"fields": {"command": name, "by": CALLER.get()}})
    def local() -> dict:
        return cmd.handler(sup, req) if not cmd.on_supervisor else sup.call(cmd.handler, sup, req)
    if getattr(sup, "rig", None) is not None and name in FANNED_OUT:  # a leader: its followers too (acqd.service.rig)
        return sup.rig.run(name, req.model_dump(mode="json", exclude_defaults=True), local)
    return local()


