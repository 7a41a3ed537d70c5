"""What finalize checks before it trusts a session folder: what the folder holds, and every chunk's checksum.

This module owns two refusals (docs/finalize.md, "What finalize refuses"):

- ``scan_folder`` / ``folder_problems``: the folder holds only regular files acqd writes, under the names it
  gives them (``layout.known_file``). A symbolic link anywhere, a device, FIFO or socket, or an unknown file or
  folder is a problem named by its path: finalize refuses the session, and no file outside it is ever read,
  chmod'ed, hashed or linked (the scan never follows a link).
- ``verify_chunks``: every ``/index`` row's ``crc32`` (``acqd.record.streamfile.rows_crc32``, computed by the
  writer from the message it received) against the rows the part stores now. A mismatch, or rows that cannot be
  read back, is a corrupt chunk, reported by stream, part, file rows and seq. Parts written before the column
  existed are reported as not checksummed. Cameras encoded to video keep no samples in ``/data``: their frames
  are in the video files, which only the manifest covers.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from acqd.finalize.layout import NODES_DIR, known_dir, known_file, rel
from acqd.record.partread import UnreadablePart, probe_parts
from acqd.record.streamfile import open_for_read, rows_crc32
from acqd.record.superblock import left_open, read_head

_READ_BLOCK_BYTES = 64 << 20  # rows are read back this many bytes at a time (one HDF5 read per block)


# -- the folder --------------------------------------------------------------------------------------------------


def scan_folder(folder: Path) -> tuple[list[Path], list[str], list[str]]:
    """Every regular file under ``folder`` (sorted), every folder below it (relative paths), and a problem for
    each entry that is neither: symbolic links (never followed, whatever they point at), devices, FIFOs, sockets.
    An entry gone between the listing and its ``lstat`` is skipped: the temporary file of an atomic write (the
    daemon's scrub writes ``scrub.json`` while a second finalize may scan) is renamed away at any moment."""
    files, dirs, problems = [], [], []
    for dirpath, dirnames, filenames in os.walk(folder):  # os.walk lists a linked folder but never enters it
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(mode):
                problems.append(f"{rel(path, folder)}: a symbolic link (to {os.readlink(path)}); "
                                "finalize never follows links")
            elif stat.S_ISREG(mode):
                files.append(path)
            elif stat.S_ISDIR(mode):
                dirs.append(rel(path, folder))
            else:
                problems.append(f"{rel(path, folder)}: not a regular file")
    return sorted(files), sorted(dirs), problems


def folder_problems(folder: Path, session_id: str, streams: list[str]) -> list[str]:
    """Links, special files, and every file or folder acqd does not write (``layout.known_file``)."""
    files, dirs, problems = scan_folder(folder)
    # Other PCs' parts (nodes/<node>/) are checked against their own manifests by acqd.finalize.nodes.
    files = [p for p in files if not rel(p, folder).startswith(f"{NODES_DIR}/")]
    dirs = [d for d in dirs if d != NODES_DIR and not d.startswith(f"{NODES_DIR}/")]
    problems += [f"{rel(p, folder)}: not a file acqd writes (move it out of the session folder)" for p in files
                 if not known_file(rel(p, folder), session_id, streams)]
    problems += [f"{d}/: not a folder acqd writes" for d in dirs if not known_dir(d, streams)]
    return sorted(problems)


# -- the chunk checksums -----------------------------------------------------------------------------------------


@dataclass
class CorruptChunk:
    """One ``/index`` row whose stored rows do not match the checksum the writer computed when it received them."""

    stream: str
    part: str
    """The part file, relative to the session folder."""
    rows: tuple[int, int]
    """File rows [first, last + 1) of the part that the index row describes."""
    seq: int
    problem: str
    """'checksum mismatch' or 'unreadable: <error>'."""

    def __str__(self) -> str:
        return f"{self.part} rows [{self.rows[0]}, {self.rows[1]}) (stream {self.stream!r}, seq {self.seq}): " \
               f"{self.problem}"


@dataclass
class Integrity:
    """The chunk-checksum verification of a session: what was checked and what failed."""

    chunks_checked: int = 0
    bytes_checked: int = 0
    corrupt: list[CorruptChunk] = field(default_factory=list)
    not_checksummed: list[str] = field(default_factory=list)
    """Parts written before /index had a crc32 column (acqd-stream format 1)."""
    video: list[str] = field(default_factory=list)
    """Parts of cameras encoded to video: their frames are in the video files, not checked here."""
    accepted: bool = False
    """Corrupt chunks were sealed anyway (``accept_corrupt``); they are listed above."""
    lost: list[dict] = field(default_factory=list)
    """Parts that cannot be read (empty, headerless, truncated, or no answer within the deadline), with their size
    and why (``acqd.finalize.LostPart``): left out of the checks and of the master."""

    def to_dict(self) -> dict:
        return asdict(self)


def verify_chunks(folder: Path, parts: dict[str, list[Path]], known: dict[Path, dict] | None = None) -> Integrity:
    """Check every committed chunk of every part (``parts``: stream -> part files) against its ``crc32``; a part in
    ``known`` (its ``Integrity.to_dict()`` from the check made while recording, still valid) is not read again."""
    out = Integrity()
    for stream, paths in parts.items():
        for path in paths:
            if known and path in known:
                _merge(out, known[path])
            else:
                _verify_part(stream, path, rel(path, folder), out)
    return out


def verify_part(stream: str, path: Path, name: str) -> Integrity:
    """The chunk checks of one part (``name``: its path relative to the session folder). A part its writer never
    closed (read in SWMR mode, where HDF5 retries failed reads for ever) is first read in a child with a deadline
    (the hasher calls this on parts nobody has vouched for yet): one that cannot be read raises ``UnreadablePart`` at
    once instead of hanging the caller. A closed part is opened plainly, and HDF5 then fails fast by itself."""
    if left_open(read_head(path)[1]):
        health = probe_parts([path])[path]
        if health.problem is not None:
            raise UnreadablePart(errno.EIO, f"{name}: {health.problem}")
    out = Integrity()
    _verify_part(stream, path, name, out)
    return out


def _merge(out: Integrity, part: dict) -> None:
    out.chunks_checked += part["chunks_checked"]
    out.bytes_checked += part["bytes_checked"]
    out.corrupt += [CorruptChunk(**{**c, "rows": tuple(c["rows"])}) for c in part["corrupt"]]
    out.not_checksummed += part["not_checksummed"]
    out.video += part["video"]


def _verify_part(stream: str, path: Path, name: str, out: Integrity) -> None:
    with open_for_read(path) as f:
        index = f["index"][:]
        if "crc32" not in (index.dtype.names or ()):
            out.not_checksummed.append(name)
            return
        if "video" in f:
            out.video.append(name)
            return
        data = f["data"]
        row_bytes = max(1, data.dtype.itemsize * int(np.prod(data.shape[1:], dtype=np.int64)))
        first = index["file_row"].astype(np.int64)
        end = first + index["n_samples"].astype(np.int64)
        i = 0
        while i < len(index):  # a block of consecutive index rows, read with one call
            j = i + 1
            while j < len(index) and (end[j] - first[i]) * row_bytes <= _READ_BLOCK_BYTES:
                j += 1
            try:
                block = data[first[i]:end[j - 1]]
            except (OSError, ValueError):  # a corrupt compressed chunk: find the rows one index row at a time
                block = None
            for k in range(i, j):
                a, b = int(first[k]), int(end[k])
                problem = _check_rows(data, block, first[i], a, b, int(index["crc32"][k]))
                if problem:
                    out.corrupt.append(CorruptChunk(stream, name, (a, b), int(index["seq"][k]), problem))
            out.chunks_checked += j - i
            out.bytes_checked += int(end[j - 1] - first[i]) * row_bytes
            i = j


def _check_rows(data, block: np.ndarray | None, block_start: int, a: int, b: int, crc: int) -> str | None:
    """None if rows [a, b) match ``crc``, else what is wrong with them."""
    try:
        rows = block[a - block_start:b - block_start] if block is not None else data[a:b]
    except (OSError, ValueError) as e:
        return f"unreadable: {e}"
    if len(rows) != b - a:
        return f"unreadable: the dataset holds {len(rows)} of the {b - a} rows"
    return None if rows_crc32(rows) == crc else "checksum mismatch"
