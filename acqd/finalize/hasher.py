"""The hasher process: hashes the parts a session's writers closed, while the session records.

``python -m acqd.finalize.hasher SESSION_FOLDER DAEMON_PID``, one per recorded session, started by the daemon
(``acqd.service.hashing``). It reads jobs (``{"path": ..., "stream": ...}``, one JSON line each) from stdin, and for
each file takes its sha256 and checks its chunk checksums from one read of it (``acqd.finalize.onepass``; through HDF5,
``acqd.finalize.integrity.verify_part``, for parts of another layout), then appends
an entry to ``digests.jsonl`` (``acqd.finalize.digests``) and reports ``{"done": path, "bytes": n}`` on stdout;
the end of stdin means no more parts. It runs at the lowest CPU priority and in the idle I/O class (it gets the
disk when nothing else asks for it), drops what it read from the page cache, dies with the daemon
(``PR_SET_PDEATHSIG``, as a writer does), and stops as soon as finalize holds ``digests.jsonl``'s lock.

Fault hook for tests (never set in use): ``ACQD_HASHER_FAULT=torn:N`` makes it write half of its N-th line, fsync
it, write its pid to the file named by ``ACQD_HASHER_MARKER`` and wait to be killed.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
import time
from pathlib import Path

from acqd.finalize import onepass
from acqd.finalize.background import drop_from_cache, lower_priority
from acqd.finalize.digests import Entry, entry_line, stamp
from acqd.finalize.layout import DIGESTS
from acqd.finalize.integrity import verify_part
from acqd.record.launch import EXIT_ORPHANED, die_with_parent
from acqd.record.streamfile import open_for_read
from acqd.record.video import VIDEO_DIR
from acqd.session import SESSION_FILE

FAULT_ENV = "ACQD_HASHER_FAULT"
MARKER_ENV = "ACQD_HASHER_MARKER"
_STATES_TO_HASH = ("recording", "closed", "interrupted")


class _FinalizeStarted:
    """``is_set()`` is True once finalize holds the lock (tested at most every 0.2 s): the hasher stops."""

    def __init__(self, fd: int):
        self.fd, self.seen, self.tested = fd, False, 0.0

    def is_set(self) -> bool:
        if not self.seen and time.monotonic() - self.tested > 0.2:
            self.tested = time.monotonic()
            try:
                fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            except BlockingIOError:
                self.seen = True
        return self.seen


# -- the hasher process ----------------------------------------------------------------------------------------


def digest_part(folder: Path, rel_path: str, stream: str | None, stop: _FinalizeStarted) -> Entry | None:
    """Hash one file and check its chunks; None if it changed while it was read (it is left to finalize)."""
    path = Path(folder) / rel_path
    before = stamp(path)
    checked = stream is not None and path.suffix == ".h5"
    layout = onepass.plan(stream, path, rel_path) if checked else None
    sha, crcs = onepass.read_once(path, layout, stop)  # sha256 and chunk crc32s from one read (acqd.finalize.onepass)
    if layout is not None and crcs is not None:
        chunks = onepass.verdicts(layout, crcs).to_dict()
    else:  # another layout (or the file shrank under the read: then the stamp below differs): through HDF5
        chunks = verify_part(stream, path, rel_path).to_dict() if checked and stamp(path) == before else None
    drop_from_cache(path)
    if stamp(path) != before:
        return None
    size, mtime_ns, ctime_ns, inode = before
    return Entry(rel_path, size, mtime_ns, ctime_ns, inode, sha, chunks)


def append_entry(fd: int, folder: Path, entry: Entry, fault: int | None = None) -> bool:
    """Append ``entry`` under the lock, unless finalize has begun (then False: the hasher stops). The fsync comes
    after the lock is released: at the idle I/O priority it may wait behind other writes, and finalize must not wait
    with it (finalize fsyncs the file itself once it holds the lock, ``digests.lock_for_finalize``)."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        if _session_state(folder) not in _STATES_TO_HASH:
            return False
        line = entry_line(entry)
        if fault is not None:  # test hook: a torn line, then wait to be killed
            os.write(fd, line[:len(line) // 2])
            os.fsync(fd)
            Path(os.environ[MARKER_ENV]).write_text(str(os.getpid()))
            while True:
                time.sleep(1)
        os.write(fd, line)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.fsync(fd)
    return True


def _session_state(folder: Path) -> str | None:
    try:
        return json.loads((Path(folder) / SESSION_FILE).read_text()).get("state")
    except (OSError, ValueError):
        return None


def _open_for_append(folder: Path) -> int:
    """digests.jsonl for appending; a torn last line (a killed hasher) is ended first, so the next line parses."""
    fd = os.open(Path(folder) / DIGESTS, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            os.write(fd, b"\n")
            os.fsync(fd)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
    return fd


def run(folder: Path, jobs, out) -> int:
    """Hash each job read from ``jobs`` (JSON lines) into digests.jsonl until the end of ``jobs`` or finalize; a
    camera part encoded to video brings its finished video files along."""
    fault = os.environ.get(FAULT_ENV, "")
    torn_at = int(fault.split(":")[1]) if fault.startswith("torn:") else None
    fd = _open_for_append(folder)
    stop = _FinalizeStarted(fd)
    n = 0
    for line in jobs:
        job = json.loads(line)
        todo = [(job["path"], job.get("stream"))]
        while todo:
            path, stream = todo.pop(0)
            if stop.is_set() or _session_state(folder) not in _STATES_TO_HASH:
                return 0
            try:
                entry = digest_part(folder, path, stream, stop)
                todo += [(v, None) for v in _video_files(folder / path)] if stream is not None else []
            except InterruptedError:  # finalize began while the file was read
                return 0
            except OSError as e:  # gone or unreadable: finalize will say so; the hasher goes on
                print(json.dumps({"done": path, "bytes": 0, "error": str(e)}), file=out, flush=True)
                continue
            n += 1
            if entry is not None and not append_entry(fd, folder, entry, fault=n if n == torn_at else None):
                return 0
            print(json.dumps({"done": path, "bytes": entry.size if entry else 0}), file=out, flush=True)
    return 0


def _video_files(part: Path) -> list[str]:
    """The finished video files a camera part lists, relative to the session folder (none for other parts)."""
    if part.suffix != ".h5":
        return []
    with open_for_read(part) as f:
        return [f"{VIDEO_DIR}/{name.decode()}" for name in f["video"]["file"][:]] if "video" in f else []


def main(argv: list[str] | None = None) -> int:
    folder, parent = (sys.argv[1:] if argv is None else argv)[:2]
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C on the daemon's terminal is the daemon's to handle
    if os.getppid() != int(parent):
        return EXIT_ORPHANED  # the daemon is already gone
    problem = lower_priority()
    if problem:
        print(f"acqd hasher: {problem}", file=sys.stderr, flush=True)
    try:
        return run(Path(folder), sys.stdin, sys.stdout)
    except BrokenPipeError:  # the daemon went away
        return 0


if __name__ == "__main__":
    sys.exit(main())
