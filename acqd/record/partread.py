"""Opening a part file that nobody vouches for: never in SWMR mode when truncated, and within a deadline.

A crash, a full disk or a bad copy can leave a part shorter than its superblock says, empty, or headerless.
``open_for_read`` refuses those before HDF5 sees them (``acqd.record.superblock``: HDF5's SWMR-read mode skips
its own truncation check, and its metadata reads then retry for ever). HDF5 has no timeout of its own, so
``probe_parts`` goes further for the callers that must never wait on a bad file (the daemon's restart, finalize,
the hasher): a child process (``python -m acqd.record.partread``, which imports only h5py) opens each part
and reads every table and the chunk index of ``/data``; a part it does not finish within the deadline is killed
with its child and reported with the reason, and the next child goes on with the other parts. A part that
probes clean is then read in-process as before.
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py

from acqd.record.superblock import file_size, part_problem

PROBE_TIMEOUT_S = 30.0
"""Per part: reading a healthy part's metadata takes milliseconds, even for a 1 GiB part of thousands of chunks."""
_TABLES = ("index", "gaps", "rejects", "suspect", "sync/edges", "sync/clock", "sync/offsets", "timestamps", "video")


class UnreadablePart(OSError):
    """A part file that must not be opened: empty, headerless, or shorter than its superblock says."""


def open_for_read(path: Path) -> h5py.File:
    """Open a stream file read-only, whether it was closed cleanly or is still/was being written (SWMR).

    A file shorter than its superblock's end of file (or empty, or headerless) raises ``UnreadablePart`` before
    HDF5 sees it. A file that is not truncated is opened plainly, or in SWMR mode only if its writer never closed
    it (the SWMR-write flag is still set).
    """
    problem = part_problem(path)
    if problem is not None:
        raise UnreadablePart(errno.EIO, f"{Path(path).name}: {problem}")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        if "already open for write" not in str(e):  # only a writer's SWMR flag is a reason to retry in SWMR mode
            raise
        return h5py.File(path, "r", swmr=True)


@dataclass(frozen=True)
class PartHealth:
    """What a probe found in one part file."""

    path: Path
    bytes: int
    """Its size on disk (what a lost part is reported with)."""
    rows: int | None
    """Rows of ``/data`` its index proves committed; None if it cannot be read."""
    problem: str | None = None
    """Why it cannot be read (empty, headerless, truncated, an HDF5 error, or no answer within the deadline)."""

    @property
    def empty(self) -> bool:
        """0 bytes, or no HDF5 header: nothing was ever committed to it (a part created on a full disk)."""
        return self.bytes == 0 or "headerless" in (self.problem or "")

    def as_dict(self) -> dict:
        out = {"readable": self.problem is None, "bytes": self.bytes}
        return out | ({"rows": self.rows} if self.problem is None else {"error": self.problem})


def _read_everything(path: Path) -> int:
    """Committed rows, after reading every table and walking the chunk index of ``/data`` (in the child)."""
    with open_for_read(path) as f:
        dict(f.attrs)
        for name in _TABLES:
            if name in f:
                f[name][:]
        data = f["data"]
        if data.chunks is not None:
            data.id.chunk_iter(lambda info: None)
        index = f["index"]
        if index.shape[0] == 0:
            return 0
        last = index[-1]
        return int(last["file_row"]) + int(last["n_samples"])


def probe_parts(paths: list[Path], timeout_s: float = PROBE_TIMEOUT_S) -> dict[Path, PartHealth]:
    """Each part's health, each read in a child process given ``timeout_s``; never raises for a bad part."""
    out: dict[Path, PartHealth] = {}
    todo = []
    for p in paths:
        try:
            problem = part_problem(p)
        except OSError as e:
            problem = f"cannot be opened: {e.strerror or e}"
        if problem is None:
            todo.append(p)
        else:
            out[p] = PartHealth(p, file_size(p), None, problem)
    while todo:
        for found in _probe_in_child(todo, timeout_s):
            out[found.path] = found
        todo = [p for p in todo if p not in out]
    return {p: out[p] for p in paths}


def _probe_in_child(paths: list[Path], timeout_s: float) -> list[PartHealth]:
    """Probe ``paths`` in order in one child; stops at the first part that takes longer than ``timeout_s`` (that
    part is reported as not answering, the child is killed), so the caller starts another for the rest."""
    proc = subprocess.Popen([sys.executable, "-m", __name__, *map(str, paths)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    found: list[PartHealth] = []
    buf = b""
    try:
        deadline = time.monotonic() + timeout_s + 5.0  # the first part also pays for the child's start
        while len(found) < len(paths):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
                p = paths[len(found)]
                found.append(PartHealth(p, file_size(p), None, f"no answer within {timeout_s:g} s (HDF5 hung "
                                                               "reading it)"))
                break
            chunk = os.read(proc.stdout.fileno(), 1 << 16)
            if not chunk:  # the child died (HDF5 crashed on the part it was reading)
                p = paths[len(found)]
                found.append(PartHealth(p, file_size(p), None, f"reading it crashed the reader (exit "
                                                               f"{proc.wait(timeout=10)})"))
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                r = json.loads(line)
                found.append(PartHealth(Path(r["path"]), r["bytes"], r["rows"], r["problem"]))
                deadline = time.monotonic() + timeout_s
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stdout.close()
    return found


def main(argv: list[str] | None = None) -> int:
    for arg in sys.argv[1:] if argv is None else argv:
        path = Path(arg)
        try:
            rows, problem = _read_everything(path), None
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            rows, problem = None, f"cannot be read: {e}"
        print(json.dumps({"path": arg, "bytes": file_size(path), "rows": rows, "problem": problem}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
