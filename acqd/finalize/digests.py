"""Digests of closed parts, taken while the session records: ``<session>/digests.jsonl``, and what finalize trusts.

Finalize must hash every recorded byte for the manifest; a part that is closed never changes again, so it can be
hashed while the recording goes on, and finalize only has the last parts, the master and the QC left to hash.
This module owns the record of that early work (the process that does it is ``acqd.finalize.hasher``):

- ``digests.jsonl``: one JSON object per line and per file: ``path`` (relative to the session folder), ``size``,
  ``mtime_ns``, ``ctime_ns``, ``inode``, ``sha256``, and ``chunks`` (the part's chunk checksums checked against
  its ``/index``, as ``acqd.finalize.integrity`` does at finalize), and ``check``: the sha256 of the line's other
  fields (``entry_line``). Each line is appended and fsynced whole; a line that does not parse or whose ``check``
  does not match (torn by a kill, edited, written by hand, or by an acqd older than the field) is ignored and its
  file hashed again by finalize, and a new writer ends a torn last line with a newline first. The check catches
  accidents and hand edits, not a forger who recomputes it: such a line, or one that is stale (the bytes changed
  under an unchanged stamp: bit rot), is what the scrub after the seal finds (``acqd.finalize.scrub``).
- ``trusted``: the entries finalize may use: the file's size, mtime, ctime and inode now are those recorded
  (stat taken before the file was read, and checked again after). Writing a file changes its ctime, which no
  user call can set back (``os.utime`` restores mtime only), so a file changed after it was hashed is hashed again.
- the lock: finalize holds an exclusive ``flock`` on ``digests.jsonl`` from before it reads it to the end of its
  run; the hasher (``acqd.finalize.hasher``, the process that writes the file) takes it to append a line (and
  re-reads the session's state under it), and tests it between blocks, so it stops as soon as finalize starts and
  never writes a line finalize has not read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from acqd.finalize.layout import DIGESTS, rel

LOCK_WAIT_S = 30.0
"""How long finalize waits for the hasher to finish appending a line (milliseconds, normally) before refusing."""
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


def _canonical(fields: dict) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def entry_line(entry: Entry) -> bytes:
    """The line of ``entry`` in digests.jsonl: its fields and ``check``, the sha256 of them (canonical JSON)."""
    fields = asdict(entry)
    return json.dumps({**fields, "check": hashlib.sha256(_canonical(fields)).hexdigest()}, sort_keys=True
                      ).encode() + b"\n"


def _parse(line: str) -> Entry | None:
    """The entry of one line, or None if it does not parse or fails its check."""
    try:
        fields = json.loads(line)
        check = fields.pop("check")
        if check != hashlib.sha256(_canonical(fields)).hexdigest():
            return None
        e = Entry(**fields)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    return e if isinstance(e.sha256, str) and len(e.sha256) == 64 and all(type(v) is int for v in e.stamp) else None


def read_lines(folder: Path) -> tuple[dict[str, Entry], int]:
    """Every entry of ``folder``'s digests.jsonl that passes its check (the latest per path), and how many non-empty
    lines were ignored (torn, edited, forged without the check, or older than it)."""
    try:
        text = (Path(folder) / DIGESTS).read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return {}, 0
    out, ignored = {}, 0
    for line in filter(None, text.split("\n")):
        e = _parse(line)
        if e is None:
            ignored += 1
        else:
            out[e.path] = e
    return out, ignored


def read_entries(folder: Path) -> dict[str, Entry]:
    """Every entry of ``folder``'s digests.jsonl that passes its check (the latest per path)."""
    return read_lines(folder)[0]


def trusted(folder: Path, paths: list[Path]) -> tuple[dict[Path, Entry], list[str]]:
    """The entries of ``paths`` that still describe the file (same size, mtime, ctime and inode), and a line for
    each file whose entry does not (it is hashed again) and for the lines ignored (their files are hashed again)."""
    entries, ignored = read_lines(folder)
    ok, changed = {}, []
    if ignored:
        changed.append(f"{DIGESTS}: {ignored} line(s) ignored (torn, edited, or without a valid check); "
                       "the files they describe are hashed again")
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


# -- finalize's side of the lock --------------------------------------------------------------------------------


def lock_for_finalize(folder: Path) -> tuple[int, bool]:
    """Finalize's exclusive lock on digests.jsonl (created empty if absent, so a hasher that starts late sees it),
    the file then fsynced (the hasher's last line may not be yet, and the manifest will hold its digest); returns
    the descriptor to close at the end of the run and whether the file was created. Raises TimeoutError if it
    cannot be had."""
    path = Path(folder) / DIGESTS
    created = not path.exists()
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    deadline = time.monotonic() + LOCK_WAIT_S
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{DIGESTS} stayed locked for {LOCK_WAIT_S:.0f} s") from None
                time.sleep(0.01)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd, created
