"""The record of the sessions this daemon writes: ``session.json`` of the open session, and of closed ones.

This module owns the open session's record (``SessionRecord``: its folder, the parts each stream wrote, its
incidents, written at once for what makes it incomplete, within ``PART_SAVE_S`` for parts listed or closed (a
hundred slow streams rolling over together cost a few writes, not two hundred, each rewriting the whole record) and
at most once a second for routine incidents, so a flood of gaps costs one write a second), the rows of a part that a
hung writer closed after its session was closed, and, at startup, marking the sessions a dead daemon left
``recording`` as ``interrupted`` with their files checked.
A failed write (a full disk) is logged and retried by the caller, never fatal.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from acqd.config import RigConfig
from acqd.errors import SessionError
from acqd.images import check_stimulus_images, register_stimulus_images
from acqd.metadata import SessionMetadata, to_acqd, with_rig_defaults
from acqd.record.partread import probe_parts
from acqd.service.sessionlog import SessionLog
from acqd.session import (CLOSED, INTERRUPTED, RECORDING, SESSION_FILE, STREAMS_DIR, create_session_dir,
                          list_sessions, now_iso, read_session, write_json_atomic)

MAX_INCIDENTS = 1000
PART_SAVE_S = 0.25
"""A part listed or closed reaches session.json within this time (``flush``, the supervisor's rounds). Nothing is
lost meanwhile: finalize and the recovery of an interrupted session also take the part files found on disk."""
log = logging.getLogger("acqd")


@dataclass
class SessionRecord:
    """The session being recorded: its folder and its ``session.json`` as a dict (``data``)."""

    folder: Path
    data: dict
    log: SessionLog | None = None
    """The session's own log (``log.jsonl``): opened with the folder, fsynced with each save, closed with it."""
    saved_at: float = 0.0
    unsaved: bool = False
    due: float = float("inf")
    """When (monotonic s) the parts listed or closed since the last write must be written (``flush``)."""
    _listed: set[tuple[str, str]] = field(default_factory=set)
    """(stream, path as its writer names it) found listed (``listed``)."""

    @classmethod
    def create(cls, data_root: Path, session_id: str, cfg: RigConfig, metadata: dict,
               session_log: SessionLog | None = None, leader: dict | None = None) -> SessionRecord:
        """Make the session folder (refused cleanly first if a stimulus image set is missing) and its record.

        ``node`` names this PC in a rig of several; ``leader`` ({node, session}) is set when a leader started it."""
        check_stimulus_images(cfg)  # before the folder exists: a missing image set refuses RECORD cleanly
        folder = create_session_dir(data_root, session_id)
        register_stimulus_images(folder, cfg)  # once per session, so finalize never needs the rig's folders
        if session_log is not None:
            session_log.open(folder)
        record = cls(folder, {
            "session_id": session_id, "node": cfg.node, **({"leader": leader} if leader else {}),
            "state": RECORDING, "created": now_iso(), "stopped": None,
            "incomplete": False, "metadata": metadata, "reference": cfg.reference,
            "config": cfg.model_dump(mode="json"), "incidents": [],
            "streams": {s.name: {"parts": []} for s in cfg.streams},
        }, session_log)
        record.save()
        return record

    @cached_property
    def streams_dir(self) -> Path:
        return self.folder / STREAMS_DIR

    def summary(self) -> dict:
        """The session in the status."""
        s = self.data
        return {"session_id": s["session_id"], "path": str(self.folder), "state": s["state"],
                "incomplete": s["incomplete"], "incidents": len(s["incidents"])}

    def record_command(self, part: int) -> dict:
        """The ``record`` command that makes a writer record into this session (as ``part``)."""
        s = self.data
        return {"cmd": "record", "folder": str(self.streams_dir), "part": part,
                "session": {"session_id": s["session_id"], "created": s["created"], "metadata": s["metadata"],
                            "reference": s["reference"]}}

    def parts(self, stream: str) -> list[dict]:
        return self.data["streams"][stream]["parts"]

    def holds(self, path: str) -> bool:
        """Whether a writer's file is one of this session's (asked at every stats message of every stream: the
        writers name their files as ``record_command`` told them, so a string comparison answers first)."""
        return os.path.dirname(path) == str(self.streams_dir) or Path(path).parent == self.streams_dir

    def listed(self, stream: str, path: str) -> bool:
        """Whether ``path`` is listed as a part of ``stream`` (asked at every stats message; a listed part stays
        listed, so each is looked up once)."""
        if (stream, path) in self._listed:
            return True
        found = any(p["path"] == rel(path, self.folder) for p in self.parts(stream))
        if found:
            self._listed.add((stream, path))
        return found

    def add_part(self, stream: str, part: int, path: str) -> None:
        self.parts(stream).append({"part": part, "path": rel(path, self.folder), "rows": None})
        self._soon()

    def close_part(self, stream: str, msg: dict) -> None:
        """A writer closed a part of ``stream`` (its ``closed`` message): its rows, counts and whether it is suspect."""
        path = rel(msg["path"], self.folder)
        for p in self.parts(stream):
            if p["path"] == path:
                p["rows"], p["counts"] = msg["rows"], msg["counts"]
                p.update({"suspect": msg["suspect"]} if msg.get("suspect") else {})
        self._soon()

    def _soon(self) -> None:
        self.due = min(self.due, time.monotonic() + PART_SAVE_S)

    def flush(self) -> None:
        """Write what waits and is due: parts (``PART_SAVE_S``), routine incidents (a second); or a failed write."""
        now = time.monotonic()
        if now >= self.due or self.unsaved and now - self.saved_at >= 1.0:
            self.save()

    def add_incident(self, stream: str | None, kind: str, detail: str, incomplete: bool) -> None:
        incidents = self.data["incidents"]
        if len(incidents) < MAX_INCIDENTS:
            incidents.append({"time": now_iso(), "stream": stream, "kind": kind, "detail": detail})
        else:
            self.data["incidents_omitted"] = self.data.get("incidents_omitted", 0) + 1
        if incomplete:
            self.data["incomplete"] = True
        self.save(now=incomplete)

    def save(self, now: bool = True) -> None:
        """Write session.json. ``now=False`` (routine incidents) writes at most once a second."""
        if not now and time.monotonic() - self.saved_at < 1.0:
            self.unsaved = True
            return
        self.unsaved = not write_session(self.folder, self.data)
        self.due = float("inf")  # (a failed write is retried as ``unsaved``)
        if self.log is not None:
            self.log.sync()
        self.saved_at = time.monotonic()

    def close(self, state: str, stopped: dict[str, str]) -> bool:
        """Close the record; ``stopped`` maps each stream that failed to its reason. False if the write failed."""
        for name, reason in stopped.items():
            self.data["incomplete"] = True
            self.data["streams"][name]["stopped_reason"] = reason
        self.data["state"], self.data["stopped"] = state, now_iso()
        self.unsaved, self.due = False, float("inf")
        if self.log is not None:
            log.info("session %s %s", self.data["session_id"], state)
            self.log.close()  # the next lines belong to no session
        return write_session(self.folder, self.data)


def session_metadata(cfg: RigConfig, metadata: dict | None) -> dict:
    """A record request's metadata over the config's rig-level defaults (which may use neuroconv's layout; each
    block the request gives replaces the config's), checked: SessionError if incomplete or invalid."""
    meta = with_rig_defaults(to_acqd(cfg.metadata), metadata or {})
    try:
        return SessionMetadata.model_validate(meta).model_dump(mode="json")
    except ValueError as e:
        raise SessionError(f"session metadata incomplete or invalid (DANDI needs subject_id, species, sex, "
                           f"age at recording start): {e}") from None


def write_session(folder: Path, session: dict) -> bool:
    """Write session.json; a failure (full disk) is logged, never fatal: the caller retries."""
    try:
        write_json_atomic(folder / SESSION_FILE, session)
        return True
    except OSError as e:
        log.error("cannot write %s (%s); retrying", folder / SESSION_FILE, e)
        return False


def record_late_close(stream: str, msg: dict) -> None:
    """Put the rows of a part closed after its session was closed into that session's session.json."""
    folder = Path(msg["path"]).parent.parent
    try:
        s = read_session(folder)
    except SessionError:
        return
    path = rel(msg["path"], folder)
    parts = [p for p in s.get("streams", {}).get(stream, {}).get("parts", []) if p["path"] == path]
    if s.get("state") != CLOSED or not parts:
        return
    for p in parts:
        p["rows"], p["counts"] = msg["rows"], msg["counts"]
    s["incidents"].append({"time": now_iso(), "stream": stream, "kind": "late_close",
                           "detail": f"{path} was closed by its writer after the session closed ({msg['rows']} rows)"})
    write_session(folder, s)


def recover_interrupted(data_root: Path) -> list[dict]:
    """At startup: sessions left 'recording' by a dead daemon become 'interrupted', files checked."""
    found = []
    for info in list_sessions(data_root):
        if info["state"] != RECORDING:
            continue
        folder = Path(info["path"])
        s = read_session(folder)
        # Each part read in a child with a deadline: a truncated part never keeps the daemon from starting.
        files = {p.name: h.as_dict() for p, h in probe_parts(sorted((folder / STREAMS_DIR).glob("*.h5"))).items()}
        s["state"], s["incomplete"] = INTERRUPTED, True
        s.setdefault("incidents", []).append({"time": now_iso(), "stream": None, "kind": "daemon_interrupted",
                                              "detail": "the daemon stopped while recording; files checked",
                                              "files": files})
        write_json_atomic(folder / SESSION_FILE, s)
        found.append({"session_id": s["session_id"], "path": str(folder), "files": files})
        log.warning("found interrupted session %s at %s", s["session_id"], folder)
    return found


def rel(path: str, folder: Path | None) -> str:
    return os.path.relpath(path, folder) if folder else path
