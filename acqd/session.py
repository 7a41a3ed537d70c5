"""Session folders on disk: naming, exclusive creation, the atomic ``session.json`` snapshot.

``<data_root>/<session_id>/session.json`` is the one record of a session's config, metadata,
state, files and incidents. It is always replaced atomically (write, fsync, rename, fsync the
folder), so a crash leaves either the old or the new snapshot, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from acqd.config import check_name
from acqd.errors import SessionError

SESSION_FILE = "session.json"
STREAMS_DIR = "streams"
ANNOTATIONS_FILE = "annotations.jsonl"
"""Operator notes (``acqd annotate``, Open Ephys ``/api/message``): one JSON object per line, fsynced each."""
LOG_FILE = "log.jsonl"
"""What the daemon logged while the session recorded (acqd.service.sessionlog): one JSON object per line."""

# Session states as written to session.json.
RECORDING = "recording"  # writers are appending; seen at startup it means the daemon died
CLOSED = "closed"  # recording stopped and every file closed; ready to finalize
INTERRUPTED = "interrupted"  # the daemon died while recording; files are readable, see incidents
FINALIZING = "finalizing"
FINALIZED = "finalized"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def session_name(prepend_text: str = "", base_text: str = "", append_text: str = "") -> str:
    """Open Ephys style naming: prepend + (base or a timestamp) + append, validated."""
    base = base_text or datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    try:
        return check_name(f"{prepend_text}{base}{append_text}", "session name")
    except ValueError as e:
        raise SessionError(str(e)) from None


def ensure_data_root(data_root: Path) -> Path:
    """Create the data root if needed and prove it can be written; refuse with the path and the reason if not."""
    root = Path(data_root).resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".acqd-write-test.", dir=root)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise SessionError(f"data root {root} cannot be written: {e.strerror or e}") from None
    return root


def create_session_dir(data_root: Path, session_id: str) -> Path:
    """Create ``<data_root>/<session_id>/streams`` exclusively; refuse names that escape or collide."""
    try:
        check_name(session_id, "session name")
    except ValueError as e:
        raise SessionError(str(e)) from None
    root = ensure_data_root(data_root)
    folder = root / session_id
    if folder.resolve().parent != root:
        raise SessionError(f"session {session_id!r} would be outside {root}")
    try:
        folder.mkdir()  # exclusive: an existing session (or a planted symlink) is never reused
        (folder / STREAMS_DIR).mkdir()
    except FileExistsError:
        raise SessionError(f"session {session_id!r} already exists in {root}") from None
    except OSError as e:
        raise SessionError(f"cannot create session {session_id!r} in {root}: {e.strerror or e}") from None
    return folder


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers and crashes see old or new, never a mix.

    Written to a temporary file beside it, fsynced, renamed over ``path``, then the folder fsynced so that the
    rename itself survives a power cut.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: dict) -> None:
    """Replace ``path`` with ``obj`` as JSON so that readers and crashes see old or new, never a mix."""
    write_bytes_atomic(path, json_bytes(obj))


def json_bytes(obj: dict) -> bytes:
    """``obj`` as ``write_json_atomic`` writes it (finalize hashes these bytes before it writes them)."""
    return (json.dumps(obj, indent=2, default=str) + "\n").encode()


def fsync_dir(folder: Path) -> None:
    """Make the renames and creations in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_session(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / SESSION_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SessionError(f"{folder}: no readable {SESSION_FILE}: {e}") from None


def list_sessions(data_root: Path) -> list[dict]:
    """Every session under the data root, oldest first, as (id, state, path, incomplete)."""
    out = []
    root = Path(data_root)
    if not root.is_dir():
        return out
    for p in sorted(root.iterdir()):
        if (p / SESSION_FILE).is_file():
            try:
                s = read_session(p)
            except SessionError:
                continue
            out.append({"session_id": s.get("session_id", p.name), "state": s.get("state"), "path": str(p),
                        "incomplete": bool(s.get("incomplete")), "created": s.get("created")})
    return out


def append_annotation(folder: Path, record: dict) -> None:
    """Append one annotation line to ``folder/annotations.jsonl`` and make it durable before returning.

    O_APPEND writes of one line are not interleaved between writers; the fsync of the file (and of the folder when
    the file is new) means an annotation acknowledged to the caller survives a crash or a power cut.
    """
    path = Path(folder) / ANNOTATIONS_FILE
    new = not path.exists()
    line = (json.dumps(record, default=str, ensure_ascii=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    if new:
        fsync_dir(path.parent)


def read_annotations(folder: Path) -> list[dict]:
    """The annotations of a session, in order; a torn last line (crash while writing) is skipped."""
    path = Path(folder) / ANNOTATIONS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def summarise_log(folder: Path, first: int = 5) -> dict:
    """``log.jsonl`` in a few numbers for the QC report: lines by level, commands by who sent them, incidents by
    kind, and the first warnings (an unreadable line is counted, never fatal: the log informs, it proves nothing)."""
    path = Path(folder) / LOG_FILE
    out: dict = {"file": LOG_FILE, "lines": 0, "unreadable": 0, "levels": {}, "commands": {}, "incidents": {},
                 "first_warnings": []}
    if not path.is_file():
        return {**out, "file": None}
    with open(path, "rb") as f:
        for raw in f:
            out["lines"] += 1
            try:
                line = json.loads(raw)
                level = str(line["level"])
            except (ValueError, KeyError, TypeError):
                out["unreadable"] += 1
                continue
            out["levels"][level] = out["levels"].get(level, 0) + 1
            if line.get("command"):
                key = f"{line['command']} by {line.get('by', '?')}"
                out["commands"][key] = out["commands"].get(key, 0) + 1
            if line.get("incident"):
                out["incidents"][line["incident"]] = out["incidents"].get(line["incident"], 0) + 1
            if level in ("warning", "error", "critical") and len(out["first_warnings"]) < first:
                out["first_warnings"].append(f"{line.get('time', '')} {line.get('message', '')}")
    return out

