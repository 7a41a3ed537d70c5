"""The control commands: one typed handler each, shared by the HTTP API and the CLI.

Each command has a pydantic request model and a handler run on the supervisor thread. The HTTP API
serves every command at ``POST /api/commands/<name>``, plus the Open Ephys compatible routes
(``/api/status``, ``/api/recording``) mapped onto the same handlers; the CLI client sends the same
requests. Docs: docs/control-api.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from acqd.session import list_sessions
from acqd.service.supervisor import RECORD, Supervisor


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Empty(Request):
    """No arguments."""


class RecordRequest(Request):
    """Start recording. Metadata is merged over the config's defaults; subject fields are required."""

    session: str | None = None
    """Session folder name; default: prepend_text + (base_text or a timestamp) + append_text."""
    metadata: dict | None = None
    """SessionMetadata fields (session_description, experimenter, subject: {subject_id, species, sex, age})."""


class StopRequest(Request):
    """Step down: RECORD -> ACQUIRE (the session is closed), ACQUIRE -> IDLE; ``idle`` goes all the way."""

    idle: bool = False


class ModeRequest(Request):
    """Open Ephys ``PUT /api/status``."""

    mode: Literal["IDLE", "ACQUIRE", "RECORD", "idle", "acquire", "record"]


class RecordingRequest(Request):
    """Open Ephys ``PUT /api/recording``: how the next session folder is named."""

    parent_directory: str | None = None
    prepend_text: str | None = None
    base_text: str | None = None
    append_text: str | None = None


class FinalizeRequest(Request):
    """Finalize a closed session in the background (docs/finalize.md); follow it with ``finalize_status``."""

    session: str
    """Session id under the data root."""


class ExportRequest(Request):
    """Export a finalized session as one self-contained NWB for DANDI (docs/export.md)."""

    session: str
    out: str
    """Folder the ``sub-<subject>/...`` layout is written under (outside the session)."""


class JobStatusRequest(Request):
    """Progress and result of the runs (finalize or export) started since the daemon started (one session, or all)."""

    session: str | None = None


def _stop(sup: Supervisor, req: StopRequest) -> dict:
    if req.idle:
        return sup.stop()
    return sup.stop_recording() if sup.mode == RECORD else sup.stop()


def _recording(sup: Supervisor, req: RecordingRequest) -> dict:
    changes = req.model_dump(exclude_none=True)
    parent = changes.pop("parent_directory", None)
    if parent is not None and Path(parent).resolve() != sup.data_root:
        sup.set_data_root(Path(parent))
    sup.recording.update(changes)
    return recording_info(sup)


def recording_info(sup: Supervisor) -> dict:
    """The Open Ephys shape of GET /api/recording."""
    status = sup.status()
    return {"parent_directory": str(sup.data_root), **sup.recording, "default_record_engine": "acqd-hdf5",
            "current_session": status["session"], "last_session": status["last_session"]}


@dataclass(frozen=True, slots=True)
class Command:
    """One control command."""

    request: type[Request]
    handler: Callable[[Supervisor, Request], dict]
    help: str


COMMANDS: dict[str, Command] = {
    "status": Command(Empty, lambda sup, req: sup.status(), "mode, session and per-stream health"),
    "acquire": Command(Empty, lambda sup, req: sup.acquire(), "start receiving (IDLE -> ACQUIRE)"),
    "record": Command(RecordRequest, lambda sup, req: sup.record(req.metadata, req.session),
                      "start recording a new session (-> RECORD)"),
    "stop": Command(StopRequest, _stop, "stop recording (RECORD -> ACQUIRE) or acquiring (-> IDLE)"),
    "set_mode": Command(ModeRequest, lambda sup, req: sup.set_mode(req.mode), "Open Ephys style mode change"),
    "recording": Command(RecordingRequest, _recording, "get or set where and how sessions are named"),
    "sessions": Command(Empty, lambda sup, req: {"sessions": list_sessions(sup.data_root)},
                        "sessions under the data root"),
    "preflight": Command(Empty, lambda sup, req: {"problems": sup.preflight()},
                         "why RECORD would be refused right now"),
    "finalize": Command(FinalizeRequest, lambda sup, req: sup.start_job("finalize", req.session),
                        "finalize a closed session in the background"),
    "finalize_status": Command(JobStatusRequest, lambda sup, req: sup.job_status("finalize", req.session),
                               "progress and result of finalize runs"),
    "export": Command(ExportRequest, lambda sup, req: sup.start_job("export", req.session, "--out", req.out),
                      "export a finalized session for sharing, in the background"),
    "export_status": Command(JobStatusRequest, lambda sup, req: sup.job_status("export", req.session),
                             "progress and result of export runs"),
}


def run_command(sup: Supervisor, name: str, body: dict | None) -> dict:
    """Validate ``body`` for command ``name`` and run it on the supervisor thread."""
    cmd = COMMANDS[name]
    req = cmd.request.model_validate(body or {})
    return sup.call(cmd.handler, sup, req)
