"""Reading a closed part once for both of the hasher's checks: its sha256 and its chunk checksums.

The hasher (``acqd.finalize.hasher``) must take the sha256 of every byte of a part and check every ``/index`` row's
``crc32`` against the rows the part stores (``acqd.finalize.integrity``). Done separately, the part is read twice
(once to hash it, once more through HDF5, which copies the rows again), and the writers have already dropped its
data from the page cache (``acqd.record.streamfile.durable``), so the first read is a cold one through the page cache:
page allocation, a copy, and the pages to drop again afterwards. This module reads the file once, sequentially,
with ``O_DIRECT`` where the file system allows it (the disk writes straight into one reused buffer, no page cache),
hashes each block, and feeds the same bytes to the crc32 of the index rows they hold, using the byte address of
each HDF5 chunk of ``/data`` (docs/performance.md, "The hasher against sha256sum").

That works only on the common layout: unfiltered ``/data`` chunked by whole rows, every chunk stored, in row order
at increasing file offsets, and index rows that tile the rows they describe. ``plan`` returns None for any other
part (compressed, a camera encoded to video, a part without checksums, one its writer never closed, a missing
chunk, ...), and the caller checks it through HDF5 as before (``integrity.verify_part``), which gives the same
verdicts.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from acqd.finalize.integrity import CorruptChunk, Integrity
from acqd.record.checksum import crc32
from acqd.record.streamfile import open_for_read
from acqd.record.superblock import left_open, read_head

BLOCK_BYTES = 16 << 20
"""Bytes read per call: large enough that the per-call cost vanishes, a multiple of any block size O_DIRECT needs."""


@dataclass(frozen=True)
class Plan:
    """Where each ``/index`` row's bytes sit in a part file, for checking them while the file is hashed."""

    stream: str
    name: str
    """The part, relative to the session folder."""
    seg_start: np.ndarray
    """File offsets of the byte ranges to checksum, ascending; a range is a part of one index row within one chunk."""
    seg_end: np.ndarray
    seg_row: np.ndarray
    """The index row each range belongs to."""
    rows: np.ndarray
    """(first file row, end file row) of each index row."""
    seq: np.ndarray
    crc32: np.ndarray
    bytes_checked: int


def plan(stream: str, path: Path, name: str) -> Plan | None:
    """The byte ranges of ``path``'s index rows, or None if the part is not of the layout this module reads (the
    caller then checks it through HDF5)."""
    if left_open(read_head(path)[1]):
        return None  # nobody vouches for it: integrity.verify_part probes it in a child first
    with open_for_read(path) as f:
        index = f["index"][:]
        if "crc32" not in (index.dtype.names or ()) or "video" in f or len(index) == 0:
            return None
        data = f["data"]
        if data.chunks is None or tuple(data.chunks[1:]) != tuple(data.shape[1:]) or \
                data.id.get_create_plist().get_nfilters() != 0:
            return None
        chunk_rows = data.chunks[0]
        row_bytes = data.dtype.itemsize * int(np.prod(data.shape[1:], dtype=np.int64))
        stored: dict[int, tuple[int, int]] = {}
        data.id.chunk_iter(lambda info: stored.__setitem__(info.chunk_offset[0] // chunk_rows,
                                                           (info.byte_offset, info.size)))
        n_rows = data.shape[0]
    first = index["file_row"].astype(np.int64)
    end = first + index["n_samples"].astype(np.int64)
    if row_bytes == 0 or first[0] < 0 or end[-1] <= first[0] or end[-1] > n_rows or np.any(first[1:] != end[:-1]) or np.any(end < first):
        return None  # index rows that do not tile stored rows: the HDF5 check says which
    chunks = range(int(first[0] // chunk_rows), int((end[-1] - 1) // chunk_rows) + 1)
    if any(c not in stored or stored[c][1] != chunk_rows * row_bytes for c in chunks):
        return None  # a chunk never written (it reads as the fill value) or not stored whole
    offsets = np.array([stored[c][0] for c in chunks], dtype=np.int64)
    if np.any(offsets[1:] < offsets[:-1] + chunk_rows * row_bytes):
        return None  # chunks out of row order in the file: one sequential pass cannot feed each crc in order
    starts, ends, owners = _segments(first, end, chunk_rows, row_bytes, offsets, chunks.start)
    return Plan(stream, name, starts, ends, owners, np.stack([first, end], axis=1), index["seq"].astype(np.int64),
                index["crc32"].astype(np.int64), int(end[-1] - first[0]) * row_bytes)


def _segments(first: np.ndarray, end: np.ndarray, chunk_rows: int, row_bytes: int, offsets: np.ndarray,
              chunk0: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split each index row [first, end) at chunk boundaries; the file byte range of each piece and its row."""
    bounds = np.arange(chunk0 + 1, chunk0 + len(offsets)) * chunk_rows  # rows where a new chunk begins
    cuts = np.unique(np.concatenate([first, bounds[(bounds > first[0]) & (bounds < end[-1])]]))
    cuts = cuts[cuts < end[-1]]  # empty index rows at the end hold no bytes
    piece_end = np.append(cuts[1:], end[-1])
    owner = np.searchsorted(first, cuts, side="right") - 1
    chunk = cuts // chunk_rows - chunk0
    start = offsets[chunk] + (cuts % chunk_rows) * row_bytes
    return start, start + (piece_end - cuts) * row_bytes, owner


@functools.cache
def _buffer() -> mmap.mmap:
    """One page-aligned buffer for the process (O_DIRECT needs an aligned one)."""
    return mmap.mmap(-1, BLOCK_BYTES)


def open_direct(path: Path) -> int:
    """A read-only descriptor of ``path`` (never through a link), with O_DIRECT unless its file system refuses it."""
    flags = os.O_RDONLY | os.O_NOFOLLOW
    try:
        return os.open(path, flags | getattr(os, "O_DIRECT", 0))
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return os.open(path, flags)


def read_once(path: Path, p: Plan | None, stop) -> tuple[str, list[int] | None]:
    """The sha256 of ``path`` and, with a plan, each index row's crc32 of the bytes stored now (None if the file
    ended before every range was read: it shrank while read). ``stop.is_set()`` between blocks raises
    InterruptedError (finalize began)."""
    sha = hashlib.sha256()
    crcs = [0] * len(p.rows) if p is not None else []
    starts, ends, owners = (p.seg_start.tolist(), p.seg_end.tolist(), p.seg_row.tolist()) if p else ([], [], [])
    buf = _buffer()
    view = memoryview(buf)
    fd = open_direct(path)
    try:
        pos, j = 0, 0
        while n := os.preadv(fd, [buf], pos):
            if stop is not None and stop.is_set():
                raise InterruptedError(f"hashing {path} was abandoned")
            block = view[:n]
            sha.update(block)
            stop_at = pos + n
            while j < len(starts) and starts[j] < stop_at:
                a, b = max(starts[j], pos), min(ends[j], stop_at)
                crcs[owners[j]] = crc32(block[a - pos:b - pos], crcs[owners[j]])
                if ends[j] > stop_at:
                    break  # the range goes on in the next block
                j += 1
            pos = stop_at
            if n < BLOCK_BYTES:
                break  # the end of the file (reading on from an odd offset is refused with O_DIRECT)
        if pos != os.fstat(fd).st_size:  # a short read before the end (a network or FUSE file system may give one):
            raise OSError(errno.EIO, f"{path}: read {pos} of {os.fstat(fd).st_size} bytes")  # never a prefix's sha
    finally:
        view.release()
        os.close(fd)
    return sha.hexdigest(), (crcs if j == len(starts) else None) if p is not None else None


def verdicts(p: Plan, crcs: list[int]) -> Integrity:
    """The chunk checks of the part (``integrity.Integrity``, as ``verify_part`` gives them) from the crcs read."""
    out = Integrity(chunks_checked=len(p.rows), bytes_checked=p.bytes_checked)
    bad = np.flatnonzero(np.asarray(crcs, dtype=np.int64) != p.crc32)
    out.corrupt = [CorruptChunk(p.stream, p.name, (int(p.rows[k, 0]), int(p.rows[k, 1])), int(p.seq[k]),
                                "checksum mismatch") for k in bad]
    return out
