"""The per-stream HDF5 file: its layout, how it is created, appended, flushed and read back.

This module is the only place that turns stream config into HDF5 calls (``dataset_options``, ``part_image``,
``open_stream_file``). Layout (docs/file-format.md)::

    /            attrs: format, session and stream metadata (JSON), written at creation
    /data        (rows, *shape) declared dtype, chunked, resizable on axis 0, NWB attrs
    /index       one row per accepted message: seq, epoch, first_sample, n_samples, file_row, host times,
                 crc32 of the message's samples as stored (verified by finalize before it seals)
    /gaps        one row per discontinuity (ingest.Gap), exact seq and sample ranges, and why (ingest.Loss)
    /rejects     one row per rejected message (ingest.Reject), with the rule's detail
    /suspect     a row if a write or fsync failed (EIO): the part is suspect and the stream went on in the next
    /sync/edges  raw edge sample indices in the device counter, per line (labels in attrs)
    /sync/clock  periodic (device sample, host monotonic ns, host wall-clock ns) pairs
    /sync/offsets  device clock -> host clock offsets the driver measured (LSL time_correction)
    /timestamps  per-row device timestamps (ns), for streams whose driver sends them
    /video       for cameras encoded to video: each finished file, its first frame and frame count

Every dataset exists before SWMR starts (attributes cannot be added later). ``flush`` writes the
data first and the index rows that describe it second, so an index row always points at data that
reached the file: after any crash, the index — not the dataset extent — says what was committed.
Sync edges and clock offsets arrive with most messages; they are queued and appended at the flush, with
the data they belong to, one HDF5 append per flush instead of one per message.
Rows are handed to HDF5 whole chunks at a time (a chunk holds at most CHUNK_MAX_S of data), so the
last partial chunk is committed at the first flush after it fills, or at close.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import resource
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np

from acqd.config import EdgeLine, StreamConfig
from acqd.errors import DiskFullError, WriterError
from acqd.record.checksum import crc32
from acqd.record.ingest import Gap, GapRecord, Loss, Reject
from acqd.record.partread import UnreadablePart, open_for_read  # noqa: F401 - re-exported: readers import them here
from acqd.record.video import VIDEO_DIR, VideoSink
from acqd.session import fsync_dir
from acqd.wire.protocol import OFFSET_DTYPE

FORMAT = "acqd-stream"
FORMAT_VERSION = 3  # 2: /index has crc32; 3: /gaps has reason

INDEX_DTYPE = np.dtype([("seq", "<u8"), ("epoch", "<u4"), ("n_samples", "<u4"), ("first_sample", "<u8"),
                        ("file_row", "<u8"), ("host_wall_ns", "<i8"), ("host_mono_ns", "<i8"),
                        ("device_time_ns", "<i8"), ("crc32", "<u4"), ("committed_wall_ns", "<i8")])
PENDING_DTYPE = np.dtype([(name, INDEX_DTYPE[name]) for name in INDEX_DTYPE.names[:-1]])
"""An index row before its flush (``StreamFile.pending_index``): all but ``committed_wall_ns``."""
GAP_DTYPE = np.dtype([("kind", "u1"), ("seq_from", "<u8"), ("seq_to", "<u8"), ("sample_from", "<u8"),
                      ("sample_to", "<u8"), ("file_row", "<u8"), ("host_wall_ns", "<i8"), ("reason", "u1")])
"""``reason`` (ingest.Loss) was added in format 3; ``gap_reasons`` reads older files as ``unknown``."""
REJECT_DTYPE = np.dtype([("reason", "u1"), ("seq", "<u8"), ("nbytes", "<u8"), ("host_wall_ns", "<i8"),
                         ("detail", "S160")])
"""``detail`` (which rule, with the values; UTF-8, truncated) was added after the first files: readers go by name."""
SUSPECT_DTYPE = np.dtype([("host_wall_ns", "<i8"), ("reason", "S240")])
UNKNOWN_SEQ = 2**64 - 1  # the seq of a rejected message whose header could not be read
EDGE_DTYPE = np.dtype([("sample", "<u8"), ("line", "<u2"), ("rising", "u1")])
CLOCK_DTYPE = np.dtype([("device_sample", "<u8"), ("host_mono_ns", "<i8"), ("host_wall_ns", "<i8")])
VIDEO_DTYPE = np.dtype([("file", "S64"), ("first_row", "<u8"), ("n_frames", "<u8")])
TIMESTAMP_DTYPE = np.dtype("<i8")
NO_TIMESTAMP = np.iinfo(np.int64).min  # /timestamps of a row whose message carried none

TABLES = {"index": INDEX_DTYPE, "gaps": GAP_DTYPE, "rejects": REJECT_DTYPE,
          "sync/edges": EDGE_DTYPE, "sync/clock": CLOCK_DTYPE, "timestamps": TIMESTAMP_DTYPE,
          "sync/offsets": OFFSET_DTYPE, "suspect": SUSPECT_DTYPE}

HEADER_RESERVE_BYTES = 1 << 20  # room a new part needs before it is created (its header is ~8 KiB, its first chunk more)
CHUNK_TARGET_BYTES = 2 << 20
CHUNK_MAX_S = 0.1  # a chunk is also the most a writer holds back before handing rows to HDF5
DROP_MIN_BYTES = 64 << 10
"""Chunks smaller than this stay in the page cache after their fsync: a slow stream's 1.6 KB chunks hold no whole
page to drop, and looking each up (``get_chunk_info_by_coord``) cost a group writer of 96 slow streams more than
their pages weigh (1.5 MB/s of clean, reclaimable cache between them)."""

# What a reader needs installed to decompress each filter (also written into the file).
FILTER_NOTES = {
    "none": "uncompressed",
    "gzip": "gzip (deflate) level 1 with shuffle: readable by every HDF5 and NWB reader",
    "lz4": "LZ4 (HDF5 filter 32004): readers need hdf5plugin (pip install hdf5plugin; import hdf5plugin)",
    "blosc-lz4": "Blosc LZ4 + bitshuffle (HDF5 filter 32001): readers need hdf5plugin "
                 "(pip install hdf5plugin; import hdf5plugin)",
    "zstd": "Zstandard (HDF5 filter 32015): readers need hdf5plugin (pip install hdf5plugin; import hdf5plugin)",
}


def part_filename(stream: str, part: int) -> str:
    """``<stream>.h5`` for the first file of a stream, ``<stream>.partNNN.h5`` for later ones."""
    return f"{stream}.h5" if part == 0 else f"{stream}.part{part:03d}.h5"


CACHE_MIN_BYTES = 256 << 10
"""The smallest chunk cache of a stream file (each of its datasets has one): room for the tables' chunks."""
CACHE_SLOTS = 1009
"""Hash slots of each dataset's chunk cache: a prime well above the chunks a cache holds (4 of a probe's, ~160 of a
slow stream's). 100,003 slots took 0.8 MB per dataset, several per stream file: with 32 slow streams in one group
writer 146 MB of PSS instead of 76 (issue 27, measured)."""


def chunk_rows(cfg: StreamConfig) -> int:
    """Rows per HDF5 chunk: the configured value, else ~2 MiB of full-width rows, at most CHUNK_MAX_S of data."""
    return cfg.chunk_rows or max(1, min(CHUNK_TARGET_BYTES // cfg.sample_bytes, int(cfg.rate * CHUNK_MAX_S)))


def dataset_options(cfg: StreamConfig) -> dict:
    """Keyword arguments for ``create_dataset('data', ...)``: chunking and the compression filter."""
    opts: dict = {"chunks": (chunk_rows(cfg), *cfg.shape), "maxshape": (None, *cfg.shape)}
    match cfg.compression:
        case "gzip":
            opts.update(compression="gzip", compression_opts=1, shuffle=True)
        case "lz4":
            opts.update(hdf5plugin.LZ4())
        case "blosc-lz4":
            opts.update(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.BITSHUFFLE))
        case "zstd":
            opts.update(hdf5plugin.Zstd(clevel=1))
    return opts


def reserve_header(folder: Path) -> None:
    """Refuse (``DiskFullError``) to create a part where its header might not fit: less than HEADER_RESERVE_BYTES
    free, or a smaller file-size limit. A part created on a full disk stayed 0 bytes, and finalize then failed on
    it (issue 22 defect 6); the writer now stops with the reason instead, the previous part closed cleanly."""
    free = shutil.disk_usage(folder).free
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if free < HEADER_RESERVE_BYTES or limit != resource.RLIM_INFINITY and limit < HEADER_RESERVE_BYTES:
        raise DiskFullError(f"{folder}: disk full or file size limit reached: {free} bytes free, file size limit "
                            f"{'none' if limit == resource.RLIM_INFINITY else limit}; a new part needs "
                            f"{HEADER_RESERVE_BYTES} for its header")


def part_image(cfg: StreamConfig, lines: list[EdgeLine]) -> bytes:
    """A new, empty part of this stream as a file's bytes: every dataset and all metadata but the session, the part's
    number and its creation time (``StreamFile.create`` writes those). Built in memory once per writer process: HDF5
    takes 2.7-4.6 ms to lay out a part and writing this image 0.45 ms (measured), and a group writer's hundred
    streams all start new parts at the same moment, every stream's messages waiting meanwhile (built at each
    RECORD, the images of 96 streams held their first messages ~0.5 s longer)."""
    f = h5py.File(f"acqd-part-{cfg.name}-{os.urandom(4).hex()}", "w", driver="core", backing_store=False,
                  libver="latest")
    try:
        f.attrs.update({
            "format": FORMAT, "format_version": FORMAT_VERSION, "stream": cfg.name, "part": 0, "created": "",
            "stream_config": cfg.model_dump_json(),
            "compression": FILTER_NOTES[cfg.compression],
        })
        data = f.create_dataset("data", shape=(0, *cfg.shape), dtype=cfg.np_dtype, **dataset_options(cfg))
        # NWB reads these on linked data; they cannot be added once SWMR is on.
        data.attrs.update({"unit": cfg.units, "conversion": cfg.conversion, "offset": cfg.offset,
                           "resolution": -1.0, "rate": float(cfg.rate),
                           "description": f"{cfg.description or cfg.name}; {FILTER_NOTES[cfg.compression]}"})
        if cfg.channel_names:
            data.attrs["channel_names"] = json.dumps(list(cfg.channel_names))
        tables = TABLES | ({"video": VIDEO_DTYPE} if cfg.video is not None else {})
        for name, dtype in tables.items():
            f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(4096,))
        f["gaps"].attrs["kinds"] = json.dumps({g.name: g.value for g in Gap})
        f["gaps"].attrs["reasons"] = json.dumps({r.name: r.value for r in Loss})
        f["rejects"].attrs["reasons"] = json.dumps({r.name: r.value for r in Reject})
        f["sync/edges"].attrs["lines"] = json.dumps([ln.model_dump() for ln in lines])
        f["sync"].attrs["description"] = "raw, uncorrected: edge sample indices and host-time pairs"
        if cfg.video is not None:
            data.attrs["external_video"] = f"../{VIDEO_DIR}/ (see /video)"
        f.flush()
        return f.id.get_file_image()
    finally:
        f.close()


def open_stream_file(path: Path, cfg: StreamConfig, image: bytes) -> h5py.File:
    """Create a new stream file from ``image`` (``part_image``) exclusively (never truncates, never follows a planted
    symlink), once there is room for its header (``reserve_header``), and open it for writing.

    The chunk cache holds several chunks so that appends that fill a chunk piecewise stay fast; not much more for a
    slow stream's small chunks (HDF5 keeps written chunks cached until the cache is full: a 4 MiB floor cost 0.4 MB
    of PSS per slow stream, measured with 32 in one group writer, issue 27).
    """
    reserve_header(Path(path).parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(image)
        cache = max(CACHE_MIN_BYTES, 4 * chunk_rows(cfg) * cfg.sample_bytes)
        return h5py.File(path, "r+", libver="latest", rdcc_nbytes=cache, rdcc_nslots=CACHE_SLOTS)
    except BaseException:
        os.unlink(path)  # ours: created a moment ago (O_EXCL), named nowhere yet
        raise


def _close_and_drop(f: h5py.File, path: Path) -> None:
    """After a failed creation: close the file and remove it. It is ours to remove: ``open_stream_file`` created it
    (O_EXCL) a moment ago, and nothing names it yet (the writer reports a part once created)."""
    with contextlib.suppress(Exception):  # a close after a failed write may fail too
        f.close()
    with contextlib.suppress(OSError):
        os.unlink(path)


@dataclass
class StreamFile:
    """An open stream file being recorded. Not thread-safe; one per writer process."""

    path: Path
    f: h5py.File
    video: VideoSink | None = None
    """Frames go to external video files instead of ``/data`` (which then stays empty)."""
    chunk: np.ndarray | None = None
    """One HDF5 chunk being filled: rows received but not yet written (None for video, no /data)."""
    direct: bool = False
    """Unfiltered data: full chunks go straight to the file, bypassing HDF5's chunk cache and its copy."""
    rows: int = 0
    """Rows received: the file row of the next append."""
    written: int = 0
    """Rows handed to HDF5 (or encoded to video); the index lists only these."""
    pending_index: list[tuple] = field(default_factory=list)
    last_index: tuple | None = None
    """The last index row written: the last message this file proves it holds."""
    changed: bool = True
    """Something was appended since the last flush (a flush of an unchanged file is skipped; so is its fsync)."""
    unsynced: bool = True
    """Something was flushed since the last fsync."""
    queued: dict[str, list] = field(default_factory=dict)
    """Small-table rows held until the next flush (``queue``): one HDF5 resize and write per table per flush
    instead of one per message, which cost more than the message itself on a slow stream."""
    hdf5_failed: bool = False
    """One of HDF5's own writes or flushes failed: its state for this file is then broken for good (a flush again
    breaks it further, and a close fails), so the file can only be released (``release``)."""
    fsync: Callable[[int], None] = field(default=lambda fd: os.fsync(fd))
    """How the file descriptor is fsynced (a seam for the ACQD_FAULT hook; see acqd.record.faults)."""
    dropped: int = 0
    """Rows of /data whose chunks were dropped from the page cache after their fsync (``new_chunks``)."""
    syncing: Future | None = None
    """An fsync started by ``sync_later`` (or by ``create`` on a pool) and not yet taken by ``synced``: its outcome,
    an OSError or None."""
    _open: dict[str, h5py.Dataset] = field(default_factory=dict)
    """Datasets stay open: ``f[name]`` opens a new handle each time, and closing the last handle of a
    chunked dataset writes out its partial chunks and drops its chunk cache (a write and a read per call)."""

    def dset(self, name: str) -> h5py.Dataset:
        d = self._open.get(name)
        if d is None:
            d = self._open[name] = self.f[name]
        return d

    @classmethod
    def create(cls, path: Path, cfg: StreamConfig, *, session: dict, lines: list[EdgeLine], part: int = 0,
               encode_delay_s: float = 0.0, durable: bool = False, pool: Executor | None = None,
               image: bytes | None = None) -> StreamFile:
        """Create the file with every dataset and all metadata (from ``image``, ``part_image`` of the same stream
        and lines, if given), then switch to SWMR. ``encode_delay_s``: the ``slow_encode`` test hook
        (acqd.record.faults), passed to a camera's encoder. ``durable``: fsync the new file and its folder (the
        writer's policy when it fsyncs at all): the daemon lists a part in session.json as soon as the writer
        reports it, and a power cut before the part's first periodic fsync left session.json naming a file that
        never reached the disk, which finalize refused (row 5, on powerfs). Before returning, or with ``pool``,
        there: the returned file's ``syncing`` is that fsync, which the writer waits for before it reports the part
        (``Writer.after``)."""
        f = open_stream_file(path, cfg, image if image is not None else part_image(cfg, lines))
        try:
            f.attrs["part"] = part
            f.attrs["created"] = datetime.now(timezone.utc).isoformat()
            f.attrs["session"] = json.dumps(session)
            f.swmr_mode = True
            syncing = None
            if durable:
                f.flush()
                fd = os.dup(f.id.get_vfd_handle())
                if pool is None:
                    raise_if(created(fd, path.parent))
                else:
                    syncing = pool.submit(created, fd, path.parent)
        except BaseException:
            _close_and_drop(f, path)
            raise
        if cfg.video is not None:
            new = cls(path, f, VideoSink(path.parent.parent / VIDEO_DIR, cfg.name, part, cfg.video, cfg.rate,
                                         encode_delay_s))
        else:
            # A compressed chunk written half full is compressed again, and stored anew, when it fills: the
            # file grows by the old copy each time. Whole chunks keep files small, and batching the writes
            # saves HDF5's fixed cost per call (~0.1 ms) on every message.
            chunk = np.empty((chunk_rows(cfg), *cfg.shape), dtype=cfg.np_dtype)
            new = cls(path, f, chunk=chunk, direct=cfg.compression == "none")
        new.syncing = syncing
        return new

    def has_room(self, n: int) -> bool:
        """Whether ``n`` more rows can be taken now: False only while a camera's encoder is too far behind."""
        return self.video is None or self.video.has_room(n)

    def append(self, data: np.ndarray, index_row: tuple) -> int:
        """Append samples; returns the file row of the first. The index row is written at a later flush."""
        first = self.rows
        self.rows += len(data)
        self.changed = True
        self.pending_index.append(index_row[:4] + (first,) + index_row[4:] + (rows_crc32(data),))
        with io_errors(self.path, self):
            if self.video is not None:
                self.video.append(data)
                return first
            self._put(data, first)
        return first

    def append_batch(self, data: np.ndarray, index: np.ndarray) -> None:
        """Append the rows of several messages at once (a group writer's batch, acqd.record.batch): ``data`` their
        rows back to back, ``index`` one PENDING_DTYPE row per message whose ``file_row`` and ``crc32`` are filled
        here. The same file as one ``append`` per message, with one write of the chunks the rows fill."""
        first = self.rows
        n = index["n_samples"].astype(np.int64)
        index["file_row"] = first + np.cumsum(n) - n
        ends = np.cumsum(n) * (data.itemsize * math.prod(data.shape[1:]))
        raw = data.reshape(-1).view(np.uint8)
        index["crc32"] = [crc32(raw[a:b]) for a, b in zip(np.concatenate(([0], ends[:-1])).tolist(),
                                                               ends.tolist())]
        self.rows += len(data)
        self.changed = True
        self.pending_index.extend(index.tolist())
        with io_errors(self.path, self):
            self._put(data, first)

    def _put(self, data: np.ndarray, first: int) -> None:
        """Copy ``data`` (file rows from ``first``) into the chunk buffer, writing each chunk as it fills; the whole
        chunks that follow a filled buffer go to the file with it in one resize and write (``_write``)."""
        size, done = len(self.chunk), 0
        while done < len(data):
            at = (first + done) - self.written
            n = min(size - at, len(data) - done)
            self.chunk[at:at + n] = data[done:done + n]
            done += n
            if at + n == size:
                whole = (len(data) - done) // size * size
                self._write(size, data[done:done + whole])
                done += whole

    def _write(self, n: int, more: np.ndarray | None = None) -> None:
        """Write the first ``n`` rows of the chunk buffer as the next chunk (``n`` < its size only at close), and
        ``more`` whole chunks after it (rows straight from a batch, never copied into the buffer)."""
        self.changed = True
        dset = self.dset("data")
        extra = 0 if more is None else len(more)
        dset.id.set_extent((self.written + n + extra, *self.chunk.shape[1:]))
        if self.direct and n == len(self.chunk):
            # Rows are always written a whole chunk at a time from a chunk boundary, so the buffer is
            # exactly one stored chunk: one pwrite, no copy into (and eviction from) the chunk cache.
            tail = (0,) * (self.chunk.ndim - 1)
            dset.id.write_direct_chunk((self.written,) + tail, self.chunk)
            for at in range(0, extra, n):
                dset.id.write_direct_chunk((self.written + n + at,) + tail, np.ascontiguousarray(more[at:at + n]))
        elif extra:
            dset[self.written:] = np.concatenate((self.chunk[:n], more))
        else:
            dset[self.written:] = self.chunk[:n]
        self.written += n + extra

    def add(self, table: str, rows: np.ndarray | list[tuple]) -> None:
        """Append rows to one of the small tables (gaps, rejects, sync/edges, sync/clock)."""
        dset = self.dset(table)
        rows = np.asarray(rows, dtype=dset.dtype) if not isinstance(rows, np.ndarray) else rows.astype(dset.dtype)
        if len(rows):
            self.changed = True
            with io_errors(self.path, self):
                extend(dset, rows)

    def queue(self, table: str, rows: np.ndarray | list[tuple]) -> None:
        """Append rows to a small table at the next flush, in the order queued (before that flush writes anything
        durable, so a kill -9 loses no more than it would of the data they describe)."""
        if len(rows):
            self.changed = True
            dtype = TABLES[table]
            self.queued.setdefault(table, []).append(
                rows.astype(dtype) if isinstance(rows, np.ndarray) else np.asarray(rows, dtype=dtype))

    def write_queued(self) -> None:
        """Write what ``queue`` held: one append per table."""
        queued, self.queued = self.queued, {}
        for table, parts in queued.items():
            self.add(table, parts[0] if len(parts) == 1 else np.concatenate(parts))

    def _video_files(self, finished: list[tuple[str, int, int]]) -> None:
        self.add("video", [(name.encode(), first, n) for name, first, n in finished])

    def add_timestamps(self, timestamps: np.ndarray, n: int) -> None:
        """Per-row device timestamps of the rows just appended; rows of earlier messages that carried none get
        NO_TIMESTAMP, so that ``/timestamps[i]`` is always the time of ``/data[i]``."""
        missing = self.rows - n - self.dset("timestamps").shape[0]
        if missing > 0:
            self.add("timestamps", np.full(missing, NO_TIMESTAMP, TIMESTAMP_DTYPE))
        self.add("timestamps", timestamps)

    def add_gap(self, gap: GapRecord, host_wall_ns: int) -> None:
        self.add("gaps", [(gap.kind, gap.seq_from, gap.seq_to, gap.sample_from, gap.sample_to, self.rows,
                           host_wall_ns, gap.reason)])

    def flush(self, fsync: bool) -> None:
        """Data first, then the index rows describing it; fsync makes it survive a power cut."""
        if not self.changed and (not fsync or not self.unsynced):
            return  # an idle stream: nothing to write, nothing to sync
        self.unsynced = self.unsynced or self.changed
        self.write_queued()
        with io_errors(self.path, self):
            if self.video is not None:  # the index lists only frames in finished (closed) video files
                self._video_files(self.video.take_finished())
                self.written = self.video.committed
            self.f.flush()
            done = [row for row in self.pending_index if row[4] + row[2] <= self.written]
            if done:
                committed = time.time_ns()  # when these chunks became readable after a crash
                self.add("index", [row + (committed,) for row in done])
                self.pending_index = self.pending_index[len(done):]
                self.last_index = done[-1]
                self.f.flush()
            self.changed = self.video is not None  # a video encoder finishes files on its own: look each time
        if fsync:
            self.sync()

    def sync(self) -> None:
        """fsync what ``flush`` wrote since the last fsync, if anything."""
        self.synced(wait=True)
        if not self.unsynced:
            return
        with io_errors(self.path):  # a failed fsync is the kernel's: HDF5 itself wrote everything
            raise_if(durable(self.fsync, self.f.id.get_vfd_handle(), self.new_chunks()))
            self.unsynced = False

    def new_chunks(self) -> list[tuple[int, int]]:
        """(offset, length) in the file of each whole chunk of /data written since the last call: what the fsync that
        follows makes clean, for ``durable`` to drop from the page cache. Only those: dropping the whole file also
        dropped the pages HDF5 writes again at every flush (the superblock, object headers, chunk indexes, the
        tables' last chunks), and each small write into a dropped page first read it back from the disk, in the
        writer's thread (a group writer of 96 slow streams read 2.6 MB/s to write 1.5 MB/s of data, measured)."""
        if self.chunk is None or self.chunk.nbytes < DROP_MIN_BYTES:
            return []
        rows, dset, tail = len(self.chunk), self.dset("data"), (0,) * (self.chunk.ndim - 1)
        end = self.written // rows * rows
        chunks = [dset.id.get_chunk_info_by_coord((row, *tail)) for row in range(self.dropped, end, rows)]
        self.dropped = max(self.dropped, end)
        return [(c.byte_offset, c.size) for c in chunks if c.byte_offset is not None]

    def sync_later(self, pool: Executor) -> None:
        """Start the fsync of what ``flush`` wrote since the last one on ``pool``, if none is running; ``synced``
        takes its outcome. A group writer's thread waits for no disk: while a hundred small files were fsynced,
        every stream of the group waited in its queue (p99 publish -> flushed). The fsync runs on a duplicate of
        the descriptor, which stays valid if the part is closed meanwhile (a close waits for it: ``synced``)."""
        if not self.unsynced or self.syncing is not None:
            return
        clean = self.new_chunks()  # before the dup: an HDF5 error here must not leak the descriptor
        fd = os.dup(self.f.id.get_vfd_handle())
        self.unsynced = False  # what is flushed from now on is the next fsync's
        self.syncing = pool.submit(durable, self.fsync, fd, clean, close=True)

    def synced(self, wait: bool = False) -> None:
        """The outcome of the fsync ``sync_later`` started, once it is done (``wait``: until it is): a failure raises
        here, on the writer's own thread, as a failed fsync of ``sync`` does."""
        if self.syncing is None or not (wait or self.syncing.done()):
            return
        error, self.syncing = self.syncing.result(), None
        with io_errors(self.path):
            raise_if(error)

    def close(self, fsync: bool = True, progress: Callable[[int, int], None] | None = None,
              pool: Executor | None = None) -> Future | None:
        """Close the file; a camera's encoder first finishes its backlog, calling ``progress`` while it does.

        ``fsync`` with ``pool``: the fsync runs there once HDF5 has closed the file (after any still running), and
        its outcome (an OSError or None) is the returned future's. A group writer's parts all roll over at once:
        96 closes fsyncing one after the other held every stream's messages for a second (p99 publish -> flushed).
        """
        if not self.f.id.valid:
            return None
        fd = None
        try:
            if self.video is not None:
                with io_errors(self.path, self):
                    self.video.close(progress)
                self._video_files(self.video.take_finished())
                self.written = self.video.committed
            if self.chunk is not None and self.rows > self.written:  # the last, partial chunk
                with io_errors(self.path, self):
                    self._write(self.rows - self.written)
            self.flush(fsync and pool is None)
            if fsync and pool is not None:
                clean = self.new_chunks()
                fd = os.dup(self.f.id.get_vfd_handle())  # valid after the close, for the fsync of what it wrote
        finally:
            self._open.clear()
            try:
                self.f.close()
            except BaseException:
                if fd is not None:
                    os.close(fd)
                raise
        if fd is None:
            return None
        earlier, self.syncing = self.syncing, None
        return pool.submit(durable_after, earlier, self.fsync, fd, clean)

    def abandon(self, reason: str) -> None:
        """After a failed write or fsync: note why in ``/suspect`` if the file still takes it, and close it.

        Never fsync again (after a failed fsync the kernel may have dropped the dirty pages and a retry
        reports success for data that is gone). The index still says what was committed before the failure.
        """
        if self.hdf5_failed:  # a failed HDF5 write: another flush would leave the file impossible to close
            return self.release()
        try:  # the failure was outside HDF5 (an fsync): HDF5 can still write the note
            self.add("suspect", [(time.time_ns(), reason.encode()[:SUSPECT_DTYPE["reason"].itemsize])])
            self.f.flush()
        except Exception:  # noqa: BLE001 - the file is already known bad; the note is best effort
            self.release()
        else:  # the disk took the note: the file can close as usual
            self._open.clear()
            try:
                self.f.close()
            except Exception:  # noqa: BLE001 - it failed after all
                self.release()

    def release(self) -> None:
        """Close the file after a write HDF5 could not make, whatever the disk does now.

        HDF5 cannot close a file whose metadata it cannot write: the close fails, the file stays open inside the
        library, and the next file created in SWMR mode (the next part), or HDF5's exit handlers, then crashed the
        writer with a segfault, which the supervisor counted as a crash and restarted (issue 22 defect 14,
        measured). So before closing, the descriptor HDF5 holds is pointed at an anonymous in-memory file: what
        HDF5 could not write goes there and is dropped, the close succeeds, and the part on disk keeps what its
        last good flush wrote (its index says what that is; it reads like a killed writer's part, through SWMR).
        """
        if self.f.id.valid:
            with contextlib.suppress(Exception):
                fd = self.f.id.get_vfd_handle()
                sink = os.memfd_create("acqd-abandoned-part")
                try:
                    os.dup2(sink, fd)  # HDF5 still owns fd (the file is open): nothing else uses that number
                finally:
                    os.close(sink)
        self._open.clear()  # after the swap: closing a dataset writes out its chunk cache
        with contextlib.suppress(Exception):
            self.f.close()

    @property
    def size_bytes(self) -> int:
        """Bytes on disk now (data still in the chunk cache is not counted yet)."""
        return os.fstat(self.f.id.get_vfd_handle()).st_size


def extend(table: h5py.Dataset, rows: np.ndarray) -> None:
    """Append ``rows`` (of the table's dtype) to a 1-D table with h5py's low-level calls: the high-level resize and
    slice assignment spent more in Python (selections, shape queries) than HDF5 did writing, at every flush of
    every stream (issue 27: a group writer flushes a hundred files)."""
    did, k = table.id, len(rows)
    n = did.shape[0]
    did.set_extent((n + k,))
    space = did.get_space()
    space.select_hyperslab((n,), (k,))
    did.write(h5py.h5s.create_simple((k,)), space, np.ascontiguousarray(rows), mtype=_memory_type(rows.dtype))


@functools.lru_cache(maxsize=64)
def _memory_type(dtype: np.dtype) -> h5py.h5t.TypeID:
    """The HDF5 type of ``dtype``, made once: h5py builds it anew for every write otherwise, which for a table's
    compound rows cost more than the write (122 -> 51 µs per append of 5 index rows, measured)."""
    return h5py.h5t.py_create(dtype)


def durable(fsync: Callable[[int], None], fd: int, clean: list[tuple[int, int]],
            close: bool = False) -> OSError | None:
    """fsync ``fd``, then drop the ``clean`` (offset, length) ranges from the page cache; the fsync's failure, if any
    (returned: it may run on a pool thread, and is raised on the writer's own). ``close``: ``fd`` is a duplicate,
    closed after."""
    try:
        fsync(fd)
        # What is on disk need not stay in the page cache: a rig writing 130 MB/s would fill all of
        # memory in minutes, evicting everyone else's, and the writers cost 1.5x more CPU while it
        # fills (measured, docs/performance.md). Only clean pages are dropped; nothing is lost, and a
        # filesystem that refuses the hint leaves the part as good as it was (never suspect for it).
        with contextlib.suppress(OSError):
            for offset, length in clean:
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError as e:
        return e
    finally:
        if close:
            os.close(fd)
    return None


def durable_after(earlier: Future | None, fsync: Callable[[int], None], fd: int,
                  clean: list[tuple[int, int]]) -> OSError | None:
    """``durable`` once the fsync ``earlier`` (if any) is done; not at all if it failed (after a failed fsync the
    kernel may have dropped the dirty pages: a retry would report success for data that is gone)."""
    error = earlier.result() if earlier is not None else None
    if error is not None:
        os.close(fd)
        return error
    return durable(fsync, fd, clean, close=True)


def created(fd: int, folder: Path) -> OSError | None:
    """fsync a new file (``fd``, a duplicate, closed after) and then its folder's entry for it."""
    try:
        os.fsync(fd)
        fsync_dir(folder)
    except OSError as e:
        return e
    finally:
        os.close(fd)
    return None


def raise_if(error: OSError | None) -> None:
    if error is not None:
        raise error


class io_errors:
    """Turn HDF5 I/O failures into WriterError, and a full disk or file-size limit into DiskFullError; a failure
    inside HDF5's own calls on ``owner`` marks it ``hdf5_failed`` (see ``StreamFile.abandon``)."""

    def __init__(self, path: Path, owner: StreamFile | None = None):
        self.path, self.owner = path, owner

    def __enter__(self) -> None:
        return None

    def __exit__(self, etype, exc, tb) -> bool:
        if exc is None or not isinstance(exc, (OSError, RuntimeError)):
            return False
        if self.owner is not None:
            self.owner.hdf5_failed = True
        text = str(exc)
        if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EFBIG) or any(
            s in text for s in ("No space left", "File too large", "errno = 28", "errno = 27")
        ):
            raise DiskFullError(f"{self.path}: disk full or file size limit reached ({text})") from exc
        raise WriterError(f"{self.path}: write failed: {text}") from exc


def rows_crc32(rows: np.ndarray) -> int:
    """The /index checksum of a message: crc32 of its samples' bytes as stored (C order, the declared dtype)."""
    return crc32(np.ascontiguousarray(rows).data)


def last_committed(path: Path, stream: str, session_id: str | None) -> tuple[int, int, int] | None:
    """(epoch, seq, next sample) after the last committed message of ``stream``'s part file ``path`` of session
    ``session_id``, or None if it committed none; ValueError if the file is not such a part."""
    with open_for_read(path) as f:
        if f.attrs.get("format") != FORMAT or f.attrs.get("stream") != stream or (
                json.loads(f.attrs["session"]).get("session_id") != session_id):
            raise ValueError(f"{path} is not a part of stream {stream!r} of session {session_id!r}")
        index = f["index"]
        if index.shape[0] == 0:
            return None
        last = index[-1]
        return int(last["epoch"]), int(last["seq"]), int(last["first_sample"]) + int(last["n_samples"])


def gap_reasons(gaps: np.ndarray) -> list[str]:
    """The reason of each /gaps row, by name (``unknown`` for files written before the column existed)."""
    if gaps.dtype.names is None or "reason" not in gaps.dtype.names:
        return ["unknown"] * len(gaps)
    names = {r.value: r.name.lower() for r in Loss}
    return [names.get(int(v), "unknown") for v in gaps["reason"]]


def committed_rows(f: h5py.File) -> int:
    """Rows of /data that the chunk index proves were written (the extent may claim more after a crash)."""
    index = f["index"]
    if index.shape[0] == 0:
        return 0
    last = index[-1]
    return int(last["file_row"]) + int(last["n_samples"])


def summarize(path: Path) -> dict:
    """What a stream file holds: committed samples, bytes, gaps, rejects, sync edges."""
    with open_for_read(path) as f:
        rows = committed_rows(f)
        return {"file": path.name, "stream": f.attrs["stream"], "part": int(f.attrs["part"]), "samples": rows,
                "mb": round(path.stat().st_size / 1e6, 2), "messages": int(f["index"].shape[0]),
                "gaps": int(f["gaps"].shape[0]), "rejected": int(f["rejects"].shape[0]),
                "suspect": [r.decode(errors="replace") for r in f["suspect"]["reason"]] if "suspect" in f else [],
                "edges": int(f["sync/edges"].shape[0])}
