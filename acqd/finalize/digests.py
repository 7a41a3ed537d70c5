"""Digests of closed parts, taken while the session records: ``<session>/digests.jsonl`` and the hasher process.

Finalize must hash every recorded byte for the manifest; a part that is closed never changes again, so it can be
hashed while the recording goes on, and finalize only has the last parts, the master and the QC left to hash.
This module owns that early work:

- ``digests.jsonl``: one JSON object per line and per file: ``path`` (relative to the session folder), ``size``,
  ``mtime_ns``, ``ctime_ns``, ``inode``, ``sha256``, and ``chunks`` (the part's chunk checksums checked against
  its ``/index``, as ``acqd.finalize.integrity`` does at finalize). Each line is appended and fsynced whole; a line
  that does not parse (a torn last line after a kill) is ignored, and a new writer ends it with a newline first.
- ``trusted``: the entries finalize may use: the file's size, mtime, ctime and inode now are those recorded
  (stat taken before the file was read, and checked again after). Writing a file changes its ctime, which no
  user call can set back (``os.utime`` restores mtime only), so a file changed after it was hashed is hashed again.
- the hasher (``python -m acqd.finalize.digests SESSION_FOLDER DAEMON_PID``), one per recorded session, started by
  the daemon: it reads jobs (``{"path": ..., "stream": ...}``, one JSON line each) from stdin, at the lowest CPU and
  idle I/O priority (it only gets the disk when nothing else asks for it), and reports ``{"done": path, "bytes":
  n}`` on stdout; stdin's end means no more parts. It dies with the daemon (``PR_SET_PDEATHSIG``, as a writer).
- the lock: finalize holds an exclusive ``flock`` on ``digests.jsonl`` from before it reads it to the end of its
  run; the hasher takes it to append a line (and re-reads the session's state under it), and tests it between
  blocks, so it stops as soon as finalize starts and never writes a line finalize has not read.

Fault hook for tests (never set in use): ``ACQD_HASHER_FAULT=torn:N`` makes the hasher write half of its N-th line,
fsync it, write its pid to the file named by ``ACQD_HASHER_MARKER`` and wait to be killed.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

DIGESTS = "digests.jsonl"
FAULT_ENV = "ACQD_HASHER_FAULT"
MARKER_ENV = "ACQD_HASHER_MARKER"
LOCK_WAIT_S = 30.0
"""How long finalize waits for the hasher to finish appending a line (milliseconds, normally) before refusing."""
_STATES_TO_HASH = ("recording", "closed", "interrupted")
_IOPRIO_SET = {"x86_64": 251, "aarch64": 30, "i686": 289, "armv7l": 314}  # syscall numbers (asm/unistd.h)
_IOPRIO_IDLE = 3 << 13  # IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT
Stamp = tuple[int, int, int, int]
"""(size, mtime_ns, ctime_ns, inode) of a file."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One line of ``digests.jsonl``."""

    path: str
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    sha256: str
    chunks: dict | None = None
    """``acqd.finalize.integrity.Integrity.to_dict()`` of this part alone; None if it was not checked."""

    @property
    def stamp(self) -> Stamp:
        return self.size, self.mtime_ns, self.ctime_ns, self.inode


def stamp(path: Path) -> Stamp:
    """What must not change for a digest to stay valid (never follows a link)."""
    st = os.stat(path, follow_symlinks=False)
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def read_entries(folder: Path) -> dict[str, Entry]:
    """Every complete entry of ``folder``'s digests.jsonl (the latest per path); torn or foreign lines ignored."""
    try:
        text = (Path(folder) / DIGESTS).read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return {}
    out = {}
    for line in text.split("\n"):
        try:
            e = Entry(**json.loads(line))
        except (ValueError, TypeError):
            continue
        if len(e.sha256) == 64 and all(isinstance(v, int) for v in e.stamp):
            out[e.path] = e
    return out


def trusted(folder: Path, paths: list[Path]) -> tuple[dict[Path, Entry], list[str]]:
    """The entries of ``paths`` that still describe the file (same size, mtime, ctime and inode), and a line for
    each file whose entry does not (it is hashed again)."""
    from acqd.finalize.layout import rel

    entries, ok, changed = read_entries(folder), {}, []
    for p in paths:
        e = entries.get(rel(p, folder))
        if e is None:
            continue
        now = stamp(p)
        if now == e.stamp:
            ok[p] = e
        else:
            what = [n for n, a, b in zip(("size", "mtime", "ctime", "inode"), e.stamp, now) if a != b]
            changed.append(f"{e.path}: changed after it was hashed during recording ({', '.join(what)} differ); "
                           "hashed again")
    return ok, changed


# -- the lock between the hasher and finalize ---------------------------------------------------------------------


def lock_for_finalize(folder: Path) -> tuple[int, bool]:
    """Finalize's exclusive lock on digests.jsonl (created empty if absent, so a hasher that starts late sees it);
    returns the descriptor to close at the end of the run and whether the file was created. Raises TimeoutError if
    it cannot be had."""
    path = Path(folder) / DIGESTS
    created = not path.exists()
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd, created
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise TimeoutError(f"{DIGESTS} stayed locked for {LOCK_WAIT_S:.0f} s") from None
            time.sleep(0.01)


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
    from acqd.finalize.integrity import verify_part
    from acqd.finalize.seal import _sha256 as sha256_file  # the one sha256 reader of finalize

    path = Path(folder) / rel_path
    before = stamp(path)
    sha = sha256_file(path, stop)
    chunks = verify_part(stream, path, rel_path).to_dict() if stream is not None and path.suffix == ".h5" else None
    _drop_from_cache(path)
    if stamp(path) != before:
        return None
    size, mtime_ns, ctime_ns, inode = before
    return Entry(rel_path, size, mtime_ns, ctime_ns, inode, sha, chunks)


def _drop_from_cache(path: Path) -> None:
    """Read once, not needed again: leave memory to others, as the writers do (acqd.record.streamfile.flush)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def append_entry(fd: int, folder: Path, entry: Entry, fault: int | None = None) -> bool:
    """Append ``entry`` under the lock, unless finalize has begun (then False: the hasher stops)."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        if _session_state(folder) not in _STATES_TO_HASH:
            return False
        line = json.dumps(asdict(entry), sort_keys=True).encode() + b"\n"
        if fault is not None:  # test hook: a torn line, then wait to be killed
            os.write(fd, line[:len(line) // 2])
            os.fsync(fd)
            Path(os.environ[MARKER_ENV]).write_text(str(os.getpid()))
            while True:
                time.sleep(1)
        os.write(fd, line)
        os.fsync(fd)
        return True
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _session_state(folder: Path) -> str | None:
    try:
        return json.loads((Path(folder) / "session.json").read_text()).get("state")
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


def lower_priority() -> str | None:
    """nice 19 and the idle I/O class (ioprio_set, or the ionice binary): None, or why the I/O class is not set."""
    os.nice(19)
    nr = _IOPRIO_SET.get(platform.machine())
    if nr is not None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall(nr, 1, 0, _IOPRIO_IDLE) == 0:  # IOPRIO_WHO_PROCESS, this process
            return None
    if shutil.which("ionice"):
        done = subprocess.run(["ionice", "-c3", "-p", str(os.getpid())], capture_output=True, timeout=10)
        if done.returncode == 0:
            return None
    return "idle I/O priority not available (no ioprio_set, no ionice)"


def run(folder: Path, jobs, out) -> int:
    """Hash each job read from ``jobs`` (JSON lines) into digests.jsonl until the end of ``jobs`` or finalize."""
    fault = os.environ.get(FAULT_ENV, "")
    torn_at = int(fault.split(":")[1]) if fault.startswith("torn:") else None
    fd = _open_for_append(folder)
    stop = _FinalizeStarted(fd)
    n = 0
    for line in jobs:
        job = json.loads(line)
        if stop.is_set() or _session_state(folder) not in _STATES_TO_HASH:
            return 0
        try:
            entry = digest_part(folder, job["path"], job.get("stream"), stop)
        except InterruptedError:  # finalize began while the file was read
            return 0
        except OSError as e:  # gone or unreadable: finalize will say so; the hasher goes on
            print(json.dumps({"done": job["path"], "bytes": 0, "error": str(e)}), file=out, flush=True)
            continue
        n += 1
        if entry is not None and not append_entry(fd, folder, entry, fault=n if n == torn_at else None):
            return 0
        print(json.dumps({"done": job["path"], "bytes": entry.size if entry else 0}), file=out, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    from acqd.record.launch import die_with_parent

    folder, parent = (sys.argv[1:] if argv is None else argv)[:2]
    die_with_parent()
    if os.getppid() != int(parent):
        return 5  # the daemon is already gone (as acqd.record.launch.EXIT_ORPHANED)
    problem = lower_priority()
    if problem:
        print(f"acqd hasher: {problem}", file=sys.stderr, flush=True)
    try:
        return run(Path(folder), sys.stdin, sys.stdout)
    except BrokenPipeError:  # the daemon went away
        return 0


if __name__ == "__main__":
    sys.exit(main())
