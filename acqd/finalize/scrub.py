"""The scrub: after the seal, every sealed byte is read once more, and only then is a session ``verified``.

Finalize is fast because it trusts what the hasher read while the session recorded (``acqd.finalize.digests``):
a part whose size, mtime, ctime and inode are unchanged is not read again. Bytes that rot on the disk after the
hasher read them (or a digest line that is stale or forged with a valid check) change none of those, so a
finalized session is only *sealed*; this module owns the step that makes it *verified*:

- ``scrub_session``: every file of ``manifest.sha256`` is read from the disk (its cached pages are dropped first,
  so the page cache cannot hide a change underneath) and hashed against the manifest, and every stream part's
  chunks are checked against the ``crc32`` its writer computed, from the same read (``acqd.finalize.onepass``,
  ``O_DIRECT`` where the file system allows it, as the hasher reads; a part of another layout through HDF5,
  ``integrity.verify_part``, which reads the pages the hash just brought in: the disk is read once). A mismatch is
  an incident naming the file, and for a chunk the part's rows and seq; chunks finalize already sealed as corrupt
  (``--accept-corrupt``) are counted, not raised.
- ``scrub.json`` beside ``session.json`` (``layout.SCRUB_FILE``; not sealed, not in the manifest): ``state``
  (``running``, ``verified`` or ``failed``), the sha256 of the manifest it checked, when, what it read, and its
  ``incidents``. ``verification`` and ``is_verified`` read it back for status, the console, ``acqd verify`` and
  shipping: a session is verified only while the manifest is the one the scrub checked (an amend that rewrites it
  makes the session unverified until the next scrub).
- ``python -m acqd.finalize.scrub SESSION_FOLDER DAEMON_PID``: the daemon's background scrub after a finalize
  (``acqd.service.scrubs``), at the hasher's priorities (nice 19, idle I/O class) and dying with the daemon; it
  prints each incident and then the record as JSON lines. ``acqd verify`` runs ``scrub_session`` in the foreground.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from acqd.errors import FinalizeError, SessionError
from acqd.finalize.background import drop_from_cache, lower_priority
from acqd.finalize import onepass
from acqd.finalize.integrity import Integrity, verify_part
from acqd.finalize.layout import MANIFEST, SCRUB_FILE, rel
from acqd.finalize.seal import listed_problems, manifest_bytes, parse_manifest, unlisted_problems
from acqd.finalize.streams import stream_parts
from acqd.record.launch import EXIT_ORPHANED, die_with_parent
from acqd.session import FINALIZED, now_iso, read_session, write_json_atomic

RUNNING, VERIFIED, FAILED = "running", "verified", "failed"
INCIDENT = "scrub_mismatch"

Report = Callable[[dict], None]
"""Called with each incident as it is found."""


def scrub_session(folder: Path, on_incident: Report | None = None) -> dict:
    """Read every file of a finalized session's manifest from the disk, check its sha256 and its chunks; record and
    return the result (``scrub.json``; ``not_recorded`` says why if it could not be written). Raises
    ``FinalizeError`` if the session is not finalized."""
    folder = Path(folder).resolve()
    session = read_session(folder)
    if session.get("state") != FINALIZED:
        raise FinalizeError(f"{folder.name}: state {session.get('state')!r}; only a finalized session is scrubbed")
    manifest = _manifest_bytes(folder)
    listed = parse_manifest(manifest)
    record = {"state": RUNNING, "manifest_sha256": hashlib.sha256(manifest).hexdigest(), "started": now_iso(),
              "finished": None, "pid": os.getpid(), "files": 0, "bytes": 0, "chunks_checked": 0,
              "accepted_corrupt": 0, "incidents": []}
    unrecorded = _write(folder, record)
    try:
        streams = {rel(p, folder): name for name, ps in stream_parts(folder, session).items() for p in ps}
    except (FinalizeError, KeyError):  # a part is missing (the manifest's check below names it), or a session.json
        streams = {}                   # without its config (made by hand): every file's sha256 is still checked
    accepted = set(session.get("finalize", {}).get("integrity", {}).get("corrupt", []))

    def incident(detail: str, file: str | None = None, **more: object) -> None:
        found = {"time": now_iso(), "kind": INCIDENT, "file": file or detail.split(": ", 1)[0], "detail": detail,
                 **more}
        record["incidents"].append(found)
        if on_incident is not None:
            on_incident(found)

    problems, present = listed_problems(folder, listed)
    for line in problems:
        incident(line)
    for name, path in present.items():
        try:
            drop_from_cache(path)  # read the disk, not what the page cache remembers of it
            layout = _layout(streams.get(name), path, name)
            actual, crcs = onepass.read_once(path, layout, None)  # sha256 and chunk crc32s from one read
        except OSError as e:
            incident(f"{name}: unreadable ({e.strerror or e})")
            continue
        record["files"] += 1
        record["bytes"] += path.stat().st_size
        if actual != listed[name]:
            incident(f"{name}: contents changed", sha256=actual, manifest_sha256=listed[name])
        if name in streams:
            _scrub_chunks(streams[name], path, name, accepted, record, incident,
                          onepass.verdicts(layout, crcs) if layout is not None and crcs is not None else None)
        drop_from_cache(path)
    for line in unlisted_problems(folder, listed):
        incident(line)
    if hashlib.sha256(_manifest_bytes(folder)).hexdigest() != record["manifest_sha256"]:
        incident(f"{MANIFEST}: rewritten while the scrub ran (an amend?); scrub again")
    record.update(state=FAILED if record["incidents"] else VERIFIED, finished=now_iso(), pid=None)
    return {**record, "not_recorded": unrecorded or _write(folder, record)}


def _write(folder: Path, record: dict) -> str | None:
    """Write ``scrub.json``; None, or why it could not be written (a user who may not write the folder: the
    result is still returned and printed, but the session is not marked)."""
    try:
        write_json_atomic(folder / SCRUB_FILE, record)
    except OSError as e:
        return f"{SCRUB_FILE} not written: {e.strerror or e}"
    return None


def _layout(stream: str | None, path: Path, name: str) -> onepass.Plan | None:
    """Where a part's index rows sit, to check them in the read that hashes it (``acqd.finalize.onepass``, as the
    hasher does); None for any other file, or a part to check through HDF5 (which names what it cannot read)."""
    if stream is None or path.suffix != ".h5":
        return None
    try:
        return onepass.plan(stream, path, name)
    except (OSError, ValueError, KeyError):
        return None


def _scrub_chunks(stream: str, path: Path, name: str, accepted: set[str], record: dict,
                  incident: Callable[..., None], checked: Integrity | None) -> None:
    """A part's chunks against their crc32 (``checked``: already, from the hash's read); chunks finalize sealed as
    corrupt on purpose are counted apart."""
    try:
        checked = verify_part(stream, path, name) if checked is None else checked
    except (OSError, ValueError, KeyError) as e:
        incident(f"{name}: chunks unreadable ({e})")
        return
    record["chunks_checked"] += checked.chunks_checked
    for c in checked.corrupt:
        if str(c) in accepted:
            record["accepted_corrupt"] += 1
        else:
            incident(str(c), name, chunk={"stream": c.stream, "rows": list(c.rows), "seq": c.seq, "problem": c.problem})


def _manifest_bytes(folder: Path) -> bytes:
    try:
        return manifest_bytes(folder)
    except OSError as e:
        raise FinalizeError(f"{folder.name}: {MANIFEST}: {e.strerror}") from None


# -- reading the result back ---------------------------------------------------------------------------------------


def verification(folder: Path) -> dict:
    """The session's verification for status and the console: ``state`` is ``verified``, ``failed``,
    ``running``, ``interrupted`` (its process is gone), ``pending`` (finalized, not scrubbed yet), ``stale`` (the
    manifest changed since the scrub) or ``not finalized``; with the scrub's ``finished`` time and its incidents' details."""
    folder = Path(folder)
    try:
        finalized = read_session(folder).get("state") == FINALIZED
    except SessionError:  # unreadable: not verified
        finalized = False
    if not finalized:
        return {"state": "not finalized", "finished": None, "incidents": []}
    try:
        record = json.loads((folder / SCRUB_FILE).read_text())
        state = record["state"]
    except (OSError, ValueError, KeyError, TypeError):
        return {"state": "pending", "finished": None, "incidents": []}
    try:
        current = hashlib.sha256(_manifest_bytes(folder)).hexdigest()
    except FinalizeError:
        current = None
    if state in (VERIFIED, FAILED) and current != record.get("manifest_sha256"):
        state = "stale"
    elif state == RUNNING and not _alive(record.get("pid")):
        state = "interrupted"  # the daemon (or acqd verify) was stopped mid-scrub
    return {"state": state, "finished": record.get("finished"),
            "incidents": [i.get("detail", "") for i in record.get("incidents", [])]}


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def is_verified(folder: Path) -> bool:
    """True only if the scrub read every sealed byte of the session's current manifest and found no mismatch
    (the test a shipping step makes before it lets a copy stand for the original)."""
    return verification(folder)["state"] == VERIFIED


# -- the background process ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    folder, parent = (sys.argv[1:] if argv is None else argv)[:2]
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C on the daemon's terminal is the daemon's to handle
    if os.getppid() != int(parent):
        return EXIT_ORPHANED
    problem = lower_priority()
    if problem:
        print(f"acqd scrub: {problem}", file=sys.stderr, flush=True)
    try:
        record = scrub_session(Path(folder), lambda i: print(json.dumps({"incident": i}), flush=True))
    except FinalizeError as e:
        print(json.dumps({"error": str(e)}), flush=True)
        return 2
    print(json.dumps({"scrub": {k: v for k, v in record.items() if k != "incidents"}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
