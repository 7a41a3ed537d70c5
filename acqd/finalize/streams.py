"""What each stream of a session committed, read from its part files, and the file the master links for it.

This module owns the finalizer's view of a stream on disk: which part files it has (``stream_parts``), what
they committed (their chunk index, not their dataset extent), the ``Stream`` / ``Part`` model over all parts
(global file rows, counter segments, sync edges, video files), the recovery of parts a killed writer left
open (a clean copy under ``recovered/``), the NWB attributes a linked ``/data`` must carry, and the file the
master links: the only part, or a virtual dataset over all parts under ``vds/``. Source files are only
ever read, except to add missing NWB attributes to a cleanly closed one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np

from acqd.config import FrameSync, StreamConfig
from acqd.errors import FinalizeError
from acqd.finalize.layout import RECOVERED_DIR, VDS_DIR, partial_then_rename
from acqd.h5lock import written
from acqd.session import STREAMS_DIR
from acqd.record.salvage import write_clean_copy
from acqd.record.streamfile import committed_rows, open_for_read, part_filename
from acqd.record.video import VIDEO_DIR

NWB_DATA_ATTRS = ("unit", "conversion", "offset", "resolution")


# -- which files -----------------------------------------------------------------------------------------------


def stream_parts(folder: Path, session: dict) -> dict[str, list[Path]]:
    """Part files per stream: those session.json lists, plus any on disk it missed (a daemon killed mid-update)."""
    out: dict[str, list[Path]] = {}
    for s in session["config"]["streams"]:
        name = s["name"]
        listed = {_listed_part(folder, name, p["path"])
                  for p in session.get("streams", {}).get(name, {}).get("parts", [])}
        on_disk = {p for p in (folder / STREAMS_DIR).glob(f"{name}*.h5") if _part_number(name, p.name) is not None}
        out[name] = sorted(listed | on_disk, key=lambda p: _part_number(name, p.name) or 0)
        for p in out[name]:
            if not p.is_file():
                raise FinalizeError(f"{folder.name}: {p.relative_to(folder)} is listed in session.json but missing")
    return out


def _listed_part(folder: Path, stream: str, path: str) -> Path:
    """A part path from session.json, which must name one of the stream's part files in ``streams/``."""
    p = folder / path
    if p.parent != folder / STREAMS_DIR or _part_number(stream, p.name) is None:
        raise FinalizeError(f"{folder.name}: session.json lists {path!r} as a part of {stream!r}; parts are "
                            f"{STREAMS_DIR}/{part_filename(stream, 0)}, {STREAMS_DIR}/{part_filename(stream, 1)}, ...")
    return p


def _part_number(stream: str, filename: str) -> int | None:
    if filename == part_filename(stream, 0):
        return 0
    prefix = f"{stream}.part"
    digits = filename.removeprefix(prefix).removesuffix(".h5")
    return int(digits) if filename.startswith(prefix) and digits.isdigit() else None


# -- the model ---------------------------------------------------------------------------------------------------


@dataclass
class Part:
    """One part file of a stream: what it committed and the file that holds exactly that."""

    path: Path
    rows: int
    """Committed rows (from the chunk index)."""
    link: Path
    """The file whose /data holds exactly the committed rows: the part itself, or its recovered copy."""
    recovered: bool
    video: list[tuple[str, int, int]] = field(default_factory=list)
    """Cameras encoded to video: each finished file (name in video/), its first row and frame count."""


@dataclass
class Stream:
    """What one stream committed, across its parts; file rows are global (part 1 continues part 0)."""

    cfg: StreamConfig
    parts: list[Part]
    index: np.ndarray
    """The chunk index of every part; ``file_row`` made global."""
    part_start_chunks: list[int]
    """Index row at which each part starts."""
    edges: dict[str, np.ndarray]
    """Rising-edge device samples per line label ('sync', 'strobe:<camera>'), committed chunks only."""
    recorded_gaps: np.ndarray
    """The gap tables of every part; ``file_row`` made global."""
    rows: int
    home: str = ""
    """Where the stream's session folder is, relative to the master's: '' (its own), 'nodes/<node>/' (another PC's
    part of a multi-PC session)."""

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def rate(self) -> float:
        return float(self.cfg.rate)

    @cached_property
    def file_row(self) -> np.ndarray:
        return self.index["file_row"].astype(np.int64)

    @cached_property
    def first_sample(self) -> np.ndarray:
        return self.index["first_sample"].astype(np.int64)

    @cached_property
    def chunk_end(self) -> np.ndarray:
        """Device sample just past each chunk."""
        return self.first_sample + self.index["n_samples"].astype(np.int64)

    @cached_property
    def breaks(self) -> np.ndarray:
        """Index rows (>= 1) whose first sample does not continue the previous chunk: a gap or a counter reset."""
        return np.flatnonzero(self.first_sample[1:] != self.chunk_end[:-1]) + 1

    @cached_property
    def segment(self) -> np.ndarray:
        """Counter segment of each index row (the counter went backwards before it: device restarted)."""
        return np.concatenate([[0], np.cumsum(self.first_sample[1:] < self.chunk_end[:-1])]).astype(np.int64)

    @property
    def n_segments(self) -> int:
        return int(self.segment[-1]) + 1 if len(self.index) else 1

    def row_samples(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(device sample, counter segment) of file rows [a, b)."""
        return self.samples_of(np.arange(a, b, dtype=np.int64))

    def samples_of(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(device sample, counter segment) of the given (global) file rows."""
        i = np.searchsorted(self.file_row, rows, side="right") - 1
        return self.first_sample[i] + (rows - self.file_row[i]), self.segment[i]

    def video_frames(self) -> tuple[list[str], list[int], np.ndarray, list[str]]:
        """Cameras encoded to video: (files relative to the session folder, starting frame of each in the series,
        the global file row of each frame of the series, problems).

        A frame is in the series if a finished video file holds it and the chunk index committed it: a writer
        killed mid-file loses that file's frames, and one killed before its last index flush leaves frames in a
        file that have no time (they are left out: the series ends, or the next file starts, before them).
        """
        files, starts, rows, problems = [], [], [], []
        offset = 0
        for p in self.parts:
            held = 0
            for name, first, n in p.video:
                take = max(0, min(n, p.rows - first))
                if take < n:
                    problems.append(f"{name}: {n - take} frame(s) have no committed index row and are left out")
                if take:
                    files.append(f"{self.home}{VIDEO_DIR}/{name}")
                    starts.append(sum(len(r) for r in rows))
                    rows.append(np.arange(offset + first, offset + first + take, dtype=np.int64))
                held = max(held, first + take)
            if held < p.rows:
                problems.append(f"{p.path.name}: {p.rows - held} committed frame(s) are in no finished video file")
            offset += p.rows
        return files, starts, np.concatenate(rows) if rows else np.empty(0, np.int64), problems


# -- reading -------------------------------------------------------------------------------------------------------


def read_stream(folder: Path, cfg: StreamConfig, paths: list[Path]) -> Stream | None:
    """Read a stream's parts (recovering those a killed writer left open); None if nothing was committed."""
    parts, indexes, gaps, starts = [], [], [], []
    edges: dict[str, list[np.ndarray]] = {}
    offset = 0
    for path in paths:
        crashed = not _opens_cleanly(path)
        with open_for_read(path) as f:
            rows = committed_rows(f)
            # Video-encoded cameras keep /data empty by design; their frames are in video/.
            recover = crashed or (cfg.video is None and f["data"].shape[0] != rows)
            missing_attrs = [a for a in NWB_DATA_ATTRS if a not in f["data"].attrs]
            video = [(bytes(v["file"]).decode(), int(v["first_row"]), int(v["n_frames"]))
                     for v in (f["video"][:] if "video" in f else [])]
            index = f["index"][:]
            part_gaps = f["gaps"][:]
            lines = _line_labels(cfg, f)
            raw_edges = f["sync/edges"][:]
        link = path
        if recover:
            link = _recover(folder, path, cfg, rows)
        elif missing_attrs:
            _add_nwb_attrs(path, cfg)
        # Edges stored after their chunk's data: after a crash some may belong to chunks never committed.
        inside = _inside_chunks(raw_edges["sample"].astype(np.int64), index)
        for line, label in lines.items():
            sel = inside & (raw_edges["line"] == line) & (raw_edges["rising"] == 1)
            edges.setdefault(label, []).append(raw_edges["sample"][sel].astype(np.int64))
        index = index.copy()
        index["file_row"] += offset
        part_gaps = part_gaps.copy()
        part_gaps["file_row"] += offset
        starts.append(sum(len(x) for x in indexes))
        indexes.append(index)
        gaps.append(part_gaps)
        parts.append(Part(path, rows, link, recover, video))
        offset += rows
    index = np.concatenate(indexes)
    if len(index) == 0:
        return None
    return Stream(cfg, parts, index, starts, {k: np.concatenate(v) for k, v in edges.items()},
                  np.concatenate(gaps), offset)


def _opens_cleanly(path: Path) -> bool:
    """True if the file opens without SWMR: closed by its writer. False if its SWMR-write flag is still set."""
    try:
        with h5py.File(path, "r"):
            return True
    except OSError as e:
        if "already open for write" in str(e):
            return False
        raise FinalizeError(f"{path.name}: cannot be read: {e}") from None


def _line_labels(cfg: StreamConfig, f: h5py.File) -> dict[int, str]:
    """Edge-table line number -> label. Frame-sync streams get their edges from the driver, on line 0."""
    if isinstance(cfg.sync, FrameSync):
        return {0: "sync"}
    return {i: ln["label"] for i, ln in enumerate(json.loads(f["sync/edges"].attrs.get("lines", "[]")))}


def _inside_chunks(samples: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Which device samples fall inside one of the committed chunks."""
    if len(index) == 0:
        return np.zeros(len(samples), dtype=bool)
    order = np.argsort(index["first_sample"], kind="stable")
    first = index["first_sample"][order].astype(np.int64)
    end = first + index["n_samples"][order].astype(np.int64)
    i = np.searchsorted(first, samples, side="right") - 1
    return (i >= 0) & (samples < end[np.maximum(i, 0)])


def _recover(folder: Path, path: Path, cfg: StreamConfig, rows: int) -> Path:
    """Copy a part's committed rows and tables into a clean file under recovered/ (the original stays untouched).

    A part whose writer was killed keeps its SWMR-write flag, so no reader can follow a link into it, and its
    extent may claim rows never committed. Recovery always works on a copy (design.md §4).
    """
    dest = folder / RECOVERED_DIR / path.name
    with partial_then_rename(dest) as tmp, open_for_read(path) as src:
        write_clean_copy(src, tmp, cfg, rows, {"recovered_from": os.path.relpath(path, dest.parent),
                                               "recovered_rows": rows})
    return dest


def _add_nwb_attrs(path: Path, cfg: StreamConfig) -> None:
    """Write the NWB attributes a linked dataset must carry (older files lack them); only on a clean file."""
    with written(path, "r+") as f:
        f["data"].attrs.update({"unit": cfg.units, "conversion": cfg.conversion, "offset": cfg.offset,
                                "resolution": -1.0})


# -- what the master links ----------------------------------------------------------------------------------------


def linked_file(folder: Path, s: Stream) -> Path:
    """The file the master links for stream ``s``: its only part, or a VDS over all parts in vds/."""
    if len(s.parts) == 1:
        return s.parts[0].link
    return _write_vds(folder, s, with_data=s.cfg.video is None)


def _write_vds(folder: Path, s: Stream, with_data: bool) -> Path:
    """A virtual dataset over the parts' committed rows (and their /sync tables), with relative source paths.

    HDF5 resolves a relative source path against the VDS file's folder, so the session folder can move. Cameras
    encoded to video have no /data to join (0 rows), only their sync tables.
    """
    dest = folder / VDS_DIR / f"{s.name}.h5"
    shape = tuple(s.cfg.shape)
    with partial_then_rename(dest) as tmp, written(tmp, "x", libver="latest") as out:
        layout = _Layout(shape=(s.rows if with_data else 0, *shape), dtype=s.cfg.np_dtype)
        row = 0
        for p in s.parts:
            if p.rows and with_data:
                src = h5py.VirtualSource(os.path.relpath(p.link, dest.parent), "data", shape=(p.rows, *shape))
                layout[row:row + p.rows] = src
            row += p.rows
        data = out.create_virtual_dataset("data", layout, fillvalue=0)
        with h5py.File(s.parts[0].link, "r") as first:
            data.attrs.update(dict(first["data"].attrs))
            lines = first["sync/edges"].attrs.get("lines", "[]")
            offsets = "sync/offsets" in first  # files written before drivers could send clock offsets lack it
        data.attrs["parts"] = json.dumps([os.path.relpath(p.link, folder) for p in s.parts])
        for table in ("sync/edges", "sync/clock", *(("sync/offsets",) if offsets else ())):
            _virtual_table(out, table, [p.link for p in s.parts], dest.parent)
        out["sync/edges"].attrs["lines"] = lines
        out["sync"].attrs["description"] = "raw, uncorrected sync record of every part, in part order"
    return dest


class _Layout(h5py.VirtualLayout):
    """A VirtualLayout whose dataset carries no creation times: HDF5 stamps them into virtual datasets by
    default (h5py turns them off for ordinary ones), and then one session finalized twice differs in bytes."""

    def _get_dcpl(self, dst_filename):  # h5py's hook that builds the creation property list
        dcpl = super()._get_dcpl(dst_filename)
        dcpl.set_obj_track_times(False)
        return dcpl


def _virtual_table(out: h5py.File, name: str, files: list[Path], base: Path) -> None:
    """One table (``sync/edges``, ``sync/clock``, ``sync/offsets``) of every part, joined in part order."""
    sizes, dtype = [], None
    for path in files:
        with h5py.File(path, "r") as f:
            sizes.append(f[name].shape[0])
            dtype = f[name].dtype
    layout = _Layout(shape=(sum(sizes),), dtype=dtype)
    row = 0
    for path, n in zip(files, sizes):
        if n:
            layout[row:row + n] = h5py.VirtualSource(os.path.relpath(path, base), name, shape=(n,))
        row += n
    out.create_virtual_dataset(name, layout)
