"""Finalize a recorded session: align every clock, write the master NWB, validate it, seal the folder.

This module owns the finalize stage end to end, from a quiescent session folder to a sealed one
(docs/finalize.md): which sessions may be finalized, reading what the stream files committed (their
chunk index, not their extent), recovering parts a killed writer left open, mapping every stream onto the
session timebase with ``acqd.clock``, pairing camera frames with their strobes, the timing and gap tables,
the sealing (read-only, immutable, ``manifest.sha256``) and the state changes in ``session.json``. The NWB
file itself is built by ``acqd.nwb`` (the only pynwb importer) from a plan made here, and the QC report
by ``acqd.qc``.

Idempotent and resumable: every output is rebuilt deterministically from the stream files, the master is
written as ``<id>.nwb.partial`` and renamed only once it validates, and ``session.json`` turns 'finalized'
last. A run that fails leaves the session as it found it; a run that is killed leaves it 'finalizing',
and the next run starts over. On a finalized session a run only verifies the manifest.
"""

from __future__ import annotations

import array
import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from datetime import datetime, timedelta, timezone
from pathlib import Path

import h5py
import numpy as np

from acqd import nwb, qc
from acqd.clock import ClockFit, align_stream, fit_clock, fit_host_clock, split_counter_resets
from acqd.config import ChannelSync, FrameSync, StreamConfig, StrobeSync
from acqd.errors import ClockFitError, FinalizeError
from acqd.ingest import Gap
from acqd.session import (CLOSED, FINALIZED, FINALIZING, INTERRUPTED, RECORDING, SESSION_FILE, STREAMS_DIR,
                          read_session, write_json_atomic)
from acqd.streamfile import committed_rows, dataset_options, open_for_read, part_filename
from acqd.video import VIDEO_DIR

__all__ = ["FinalizeReport", "StreamReport", "finalize_session", "verify_manifest", "pair_frames"]

Progress = Callable[[str, float], None]

MANIFEST = "manifest.sha256"
QC_DIR = "qc"
VDS_DIR = "vds"  # virtual datasets joining the parts of a stream written by several writers
RECOVERED_DIR = "recovered"  # clean copies of the committed rows of parts a killed writer left open
PARTIAL = ".partial"
# Tests: pause at a step (read, partial, qc, sealed, manifest) after writing our pid to the marker file.
PAUSE_ENV = "ACQD_FINALIZE_PAUSE_AT"
PAUSE_MARKER_ENV = "ACQD_FINALIZE_PAUSE_MARKER"
REGULAR_TOL_SAMPLES = 0.1  # starting_time + rate only if the map is that close to one straight line
NWB_DATA_ATTRS = ("unit", "conversion", "offset", "resolution")

# Progress: stage -> (fraction at its start, fraction at its end).
STAGES = {"check": (0.0, 0.02), "read": (0.02, 0.1), "align": (0.1, 0.2), "write": (0.2, 0.45),
          "validate": (0.45, 0.7), "qc": (0.7, 0.8), "seal": (0.8, 1.0)}

# chattr +i through the ioctl chattr(1) uses (linux/fs.h): root can still write a 0444 file, not an immutable one.
_FS_IOC_GETFLAGS, _FS_IOC_SETFLAGS, _FS_IMMUTABLE_FL = 0x80086601, 0x40086602, 0x10


# -- the report --------------------------------------------------------------------------------------------


@dataclass
class StreamReport:
    """What finalize did with one stream."""

    name: str
    kind: str
    rows: int
    """Rows committed (the chunk index), summed over parts."""
    series_rows: int
    """Rows of the NWB series: ``rows``, except for a camera encoded to video whose files lack committed frames."""
    parts: list[str]
    """Part files, relative to the session folder."""
    recovered: list[str]
    """Clean copies made of parts a killed writer left open (relative paths)."""
    linked: str
    """The file the master's series links to (a part, a recovered copy, or a VDS over the parts)."""
    timing: str
    """'rate' (starting_time + rate) or 'timestamps'."""
    first_time_s: float
    """Session time of the stream's first row."""
    clock: dict
    """``ClockFit.to_dict()``, plus 'extrapolated_rows': rows outside the span the fit's error bound covers."""
    flags: list[str]
    """Anything an analyst must know about this stream's timing (host-time fallback, failed sync fit...)."""
    gaps: list[dict]
    frames: dict | None = None
    """Cameras: frame / strobe reconciliation."""
    video: dict | None = None
    """Cameras encoded to video: the files (relative to the session folder) and each one's starting frame."""


@dataclass
class FinalizeReport:
    """The result of ``finalize_session``."""

    session_id: str
    folder: str
    state: str
    changed: bool
    """False when the session was already finalized (the manifest was verified, nothing written)."""
    message: str
    master: str
    """The master NWB file, relative to the session folder."""
    timebase: dict = field(default_factory=dict)
    streams: dict[str, StreamReport] = field(default_factory=dict)
    check: dict = field(default_factory=dict)
    """``nwb.MasterCheck.to_dict()``: read-back errors, schema errors, nwbinspector messages."""
    sealed: dict = field(default_factory=dict)
    """files, read_only, immutable (chattr +i) and why not, if it failed."""
    manifest: str = MANIFEST
    qc: str = f"{QC_DIR}/qc.json"
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


# -- orchestration -----------------------------------------------------------------------------------------


def finalize_session(folder: Path, progress: Progress | None = None) -> FinalizeReport:
    """Finalize the session in ``folder``: clock fits, master NWB, validation, QC, seal. See the module docstring.

    Raises ``FinalizeError`` (nothing sealed, state unchanged) if the session is not quiescent, a stream cannot
    be placed on the timebase, or the master fails validation (the message lists every blocking finding).
    """
    started = time.monotonic()
    folder = Path(folder).resolve()
    report_progress = _progress(progress)
    with _exclusive(folder):
        session = read_session(folder)
        sid = session.get("session_id") or folder.name
        master = folder / f"{sid}.nwb"
        if session.get("state") == FINALIZED:
            return _already_finalized(folder, session, master, started)
        report_progress("check", 0.0)
        parts = _check_quiescent(folder, session)
        previous = session.get("finalize", {}).get("previous_state") or session["state"]
        _clear_outputs(folder, master)  # a killed earlier run may have left any of them
        write_json_atomic(folder / SESSION_FILE, {**session, "state": FINALIZING,
                                                  "finalize": {"previous_state": previous}})
        try:
            report = _run(folder, session, parts, master, report_progress)
        except BaseException:
            _clear_outputs(folder, master)
            _unseal(sorted(p for ps in parts.values() for p in ps))
            write_json_atomic(folder / SESSION_FILE, session)
            raise
        final = {**session, "state": FINALIZED,
                 "finalize": {"previous_state": previous, "master": report.master, "manifest": MANIFEST,
                              "qc": report.qc}}
        write_json_atomic(folder / SESSION_FILE, final)  # the commit point
        _merge_seal(report.sealed, _seal_paths([folder / SESSION_FILE]))
        report.state = FINALIZED
        report.seconds = round(time.monotonic() - started, 3)
        report_progress("seal", 1.0)
        return report


def _run(folder: Path, session: dict, parts: dict[str, list[Path]], master: Path, progress: Progress
         ) -> FinalizeReport:
    """Everything between the checks and the commit point; raises on any failure (the caller rolls back)."""
    sid = session.get("session_id") or folder.name
    configs = {s["name"]: StreamConfig.model_validate(s) for s in session["config"]["streams"]}
    ref_name = session["reference"]
    if ref_name not in configs:
        raise FinalizeError(f"reference stream {ref_name!r} is not in the session's config")
    missing = [n for n in configs if not parts.get(n)]
    warnings = [f"stream {n!r} has no file (it never recorded)" for n in missing]
    if ref_name in missing:
        raise FinalizeError(f"the reference stream {ref_name!r} recorded nothing: there is no timebase")

    progress("read", 0.0)
    streams: dict[str, _Stream] = {}
    for i, name in enumerate(n for n in configs if n not in missing):
        stream = _read_stream(folder, configs[name], parts[name])
        if stream is not None:
            streams[name] = stream
        elif name == ref_name:
            raise FinalizeError(f"the reference stream {ref_name!r} committed no data: there is no timebase")
        else:
            warnings.append(f"stream {name!r} committed no data; it is left out of the master")
        progress("read", (i + 1) / len(configs))
    _checkpoint("read")

    progress("align", 0.0)
    ref = streams[ref_name]
    if ref.n_segments > 1:
        raise FinalizeError(f"the reference stream {ref_name!r} counter was reset: it cannot define one timebase")
    aligned = _align_all(streams, ref)
    zero_sample = _zero_sample(streams, aligned, ref)
    zero_s = zero_sample / ref.rate
    progress("align", 1.0)

    progress("write", 0.0)
    linked = {name: _linked_file(folder, s) for name, s in streams.items()}
    plan, stream_reports = _plan(folder, session, streams, aligned, ref, zero_sample, linked)
    partial = master.with_name(master.name + PARTIAL)
    nwb.write_master(partial, plan)
    progress("write", 1.0)
    _checkpoint("partial")

    progress("validate", 0.0)
    check = nwb.check_master(partial, {n: r.series_rows for n, r in stream_reports.items()})
    if not check.ok:
        raise FinalizeError(f"{partial.name} failed validation, nothing was sealed:\n  " + "\n  ".join(check.blocking))
    os.replace(partial, master)
    _fsync_dir(folder)
    progress("validate", 1.0)

    timebase = {"reference": ref_name, "reference_rate": ref.rate, "zero_sample": zero_sample,
                "zero_reference_s": zero_s, "session_start_time": plan.session_start_time.isoformat(),
                "definition": "session time = reference seconds (reference sample / nominal reference rate) "
                              "- zero_reference_s; zero = the earliest first recorded sample of any stream"}
    report = FinalizeReport(session_id=sid, folder=str(folder), state=FINALIZING, changed=True,
                            message=f"finalized {sid}", master=master.name, timebase=timebase,
                            streams=stream_reports, check=check.to_dict(), warnings=warnings)
    progress("qc", 0.0)
    qc.write_report(folder / QC_DIR, _qc_summary(report),
                    [_qc_plot(streams[n], aligned[n], ref, zero_s, stream_reports[n]) for n in streams])
    progress("qc", 1.0)
    _checkpoint("qc")

    progress("seal", 0.0)
    outputs = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (SESSION_FILE, MANIFEST)
                     and not p.name.startswith(f".{SESSION_FILE}."))
    report.sealed = _seal_paths(outputs)
    _checkpoint("sealed")
    manifest = _manifest_text(folder, outputs, progress)
    _write_atomic(folder / MANIFEST, manifest.encode())
    _merge_seal(report.sealed, _seal_paths([folder / MANIFEST]))
    _checkpoint("manifest")
    return report


def _already_finalized(folder: Path, session: dict, master: Path, started: float) -> FinalizeReport:
    """Verify the manifest; the report's details come from the QC summary the finalizing run wrote."""
    problems = verify_manifest(folder)
    if problems:
        raise FinalizeError(f"{folder.name} is finalized but does not match its manifest:\n  " + "\n  ".join(problems))
    summary = json.loads((folder / QC_DIR / "qc.json").read_text())
    return FinalizeReport(session_id=session.get("session_id", folder.name), folder=str(folder), state=FINALIZED,
                          changed=False, message="already finalized, nothing changed (manifest verified)",
                          master=master.name, timebase=summary["timebase"], check=summary["validation"],
                          streams={n: StreamReport(**r) for n, r in summary["streams"].items()},
                          sealed={"files": len((folder / MANIFEST).read_text().splitlines()) + 2,
                                  "read_only": True, "immutable": is_immutable(folder / MANIFEST)},
                          warnings=summary["warnings"], seconds=round(time.monotonic() - started, 3))


def _progress(progress: Progress | None) -> Progress:
    """Map a stage's own fraction onto the whole run."""
    def report(stage: str, fraction: float) -> None:
        if progress is not None:
            lo, hi = STAGES[stage]
            progress(stage, lo + (hi - lo) * min(max(fraction, 0.0), 1.0))
    return report


def _checkpoint(step: str) -> None:
    """Test hook: with ``ACQD_FINALIZE_PAUSE_AT=step``, touch the marker file and wait to be killed."""
    if os.environ.get(PAUSE_ENV) == step:
        marker = os.environ.get(PAUSE_MARKER_ENV)
        if marker:
            Path(marker).write_text(str(os.getpid()))
        while True:
            time.sleep(1)


@contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """One finalizer per session (CLI and API may both be asked): an flock on the folder itself, no lock file."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise FinalizeError(f"{folder}: not a session folder ({e.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FinalizeError(f"{folder.name} is being finalized by another process") from None
        yield
    finally:
        os.close(fd)


# -- which sessions may be finalized ------------------------------------------------------------------------


def _check_quiescent(folder: Path, session: dict) -> dict[str, list[Path]]:
    """Refuse a session any writer may still touch; returns each stream's part files, in part order."""
    state = session.get("state")
    if state == RECORDING:
        raise FinalizeError(f"{folder.name} is still recording (state 'recording'): stop the recording first; if "
                            "the daemon died, start it once so that it marks the session interrupted")
    if state not in (CLOSED, INTERRUPTED, FINALIZING):
        raise FinalizeError(f"{folder.name}: state {state!r} cannot be finalized (closed or interrupted only)")
    parts = _stream_parts(folder, session)
    held = _held_open([p for ps in parts.values() for p in ps] + sorted((folder / VIDEO_DIR).glob("*")))
    if held:
        raise FinalizeError(f"{folder.name}: files are still open in another process (a writer?): "
                            + ", ".join(f"{p.name} by pid {pid}" for p, pid in held))
    return parts


def _stream_parts(folder: Path, session: dict) -> dict[str, list[Path]]:
    """Part files per stream: those session.json lists, plus any on disk it missed (a daemon killed mid-update)."""
    out: dict[str, list[Path]] = {}
    for s in session["config"]["streams"]:
        name = s["name"]
        listed = {folder / p["path"] for p in session.get("streams", {}).get(name, {}).get("parts", [])}
        on_disk = {p for p in (folder / STREAMS_DIR).glob(f"{name}*.h5")
                   if p.name == part_filename(name, 0) or _part_number(name, p.name) is not None}
        out[name] = sorted(listed | on_disk, key=lambda p: _part_number(name, p.name) or 0)
        for p in out[name]:
            if not p.is_file():
                raise FinalizeError(f"{folder.name}: {p.relative_to(folder)} is listed in session.json but missing")
    return out


def _part_number(stream: str, filename: str) -> int | None:
    if filename == part_filename(stream, 0):
        return 0
    prefix = f"{stream}.part"
    digits = filename.removeprefix(prefix).removesuffix(".h5")
    return int(digits) if filename.startswith(prefix) and digits.isdigit() else None


def _held_open(paths: list[Path]) -> list[tuple[Path, int]]:
    """(file, pid) for every process that has one of ``paths`` open (Linux /proc; empty where unavailable)."""
    wanted = {os.path.realpath(p): p for p in paths}
    held = []
    for pid in (d for d in os.listdir("/proc") if d.isdigit()) if os.path.isdir("/proc") else []:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target in wanted:
                held.append((wanted[target], int(pid)))
    return sorted(set(held))


# -- reading the streams -------------------------------------------------------------------------------------


@dataclass
class _Part:
    path: Path
    rows: int
    """Committed rows (from the chunk index)."""
    link: Path
    """The file whose /data holds exactly the committed rows: the part itself, or its recovered copy."""
    recovered: bool
    video: list[tuple[str, int, int]] = field(default_factory=list)
    """Cameras encoded to video: each finished file (name in video/), its first row and frame count."""


@dataclass
class _Stream:
    """What one stream committed, across its parts; file rows are global (part 1 continues part 0)."""

    cfg: StreamConfig
    parts: list[_Part]
    index: np.ndarray
    """The chunk index of every part; ``file_row`` made global."""
    part_start_chunks: list[int]
    """Index row at which each part starts."""
    edges: dict[str, np.ndarray]
    """Rising-edge device samples per line label ('sync', 'strobe:<camera>'), committed chunks only."""
    recorded_gaps: np.ndarray
    """The gap tables of every part; ``file_row`` made global."""
    rows: int

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def rate(self) -> float:
        return float(self.cfg.rate)

    @cached_property
    def chunk_end(self) -> np.ndarray:
        """Device sample just past each chunk."""
        return self.index["first_sample"].astype(np.int64) + self.index["n_samples"].astype(np.int64)

    @cached_property
    def breaks(self) -> np.ndarray:
        """Index rows (>= 1) whose first sample does not continue the previous chunk: a gap or a counter reset."""
        first = self.index["first_sample"].astype(np.int64)
        return np.flatnonzero(first[1:] != self.chunk_end[:-1]) + 1

    @cached_property
    def segment(self) -> np.ndarray:
        """Counter segment of each index row (the counter went backwards before it: device restarted)."""
        first = self.index["first_sample"].astype(np.int64)
        return np.concatenate([[0], np.cumsum(first[1:] < self.chunk_end[:-1])]).astype(np.int64)

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
                    files.append(f"{VIDEO_DIR}/{name}")
                    starts.append(sum(len(r) for r in rows))
                    rows.append(np.arange(offset + first, offset + first + take, dtype=np.int64))
                held = max(held, first + take)
            if held < p.rows:
                problems.append(f"{p.path.name}: {p.rows - held} committed frame(s) are in no finished video file")
            offset += p.rows
        return files, starts, np.concatenate(rows) if rows else np.empty(0, np.int64), problems

    @cached_property
    def file_row(self) -> np.ndarray:
        return self.index["file_row"].astype(np.int64)

    @cached_property
    def first_sample(self) -> np.ndarray:
        return self.index["first_sample"].astype(np.int64)


def _read_stream(folder: Path, cfg: StreamConfig, paths: list[Path]) -> _Stream | None:
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
        parts.append(_Part(path, rows, link, recover, video))
        offset += rows
    index = np.concatenate(indexes)
    if len(index) == 0:
        return None
    return _Stream(cfg, parts, index, starts, {k: np.concatenate(v) for k, v in edges.items()},
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
    labels = {i: ln["label"] for i, ln in enumerate(json.loads(f["sync/edges"].attrs.get("lines", "[]")))}
    if isinstance(cfg.sync, FrameSync):
        labels = {0: "sync"}
    return labels


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
    tmp = dest.with_name(dest.name + PARTIAL)
    dest.parent.mkdir(exist_ok=True)
    tmp.unlink(missing_ok=True)
    with open_for_read(path) as src, h5py.File(tmp, "x", libver="latest") as out:
        out.attrs.update(dict(src.attrs))
        out.attrs["recovered_from"] = os.path.relpath(path, dest.parent)
        out.attrs["recovered_rows"] = rows
        data = src["data"]
        n = 0 if cfg.video is not None else rows  # video-encoded: frames are in video/, /data stays empty
        dst = out.create_dataset("data", shape=(n, *data.shape[1:]), dtype=data.dtype, **dataset_options(cfg))
        dst.attrs.update(dict(data.attrs))
        step = max(1, (64 << 20) // max(1, cfg.sample_bytes))
        for a in range(0, n, step):
            dst[a:min(n, a + step)] = data[a:min(n, a + step)]
        for name in ("index", "gaps", "rejects", "sync/edges", "sync/clock", "video"):
            if name not in src:
                continue
            table = out.create_dataset(name, data=src[name][:], maxshape=(None,), chunks=(4096,))
            table.attrs.update(dict(src[name].attrs))
        out["sync"].attrs.update(dict(src["sync"].attrs))
    os.replace(tmp, dest)
    return dest


def _add_nwb_attrs(path: Path, cfg: StreamConfig) -> None:
    """Write the NWB attributes a linked dataset must carry (older files lack them); only on a clean file."""
    with h5py.File(path, "r+") as f:
        f["data"].attrs.update({"unit": cfg.units, "conversion": cfg.conversion, "offset": cfg.offset,
                                "resolution": -1.0})


def _linked_file(folder: Path, s: _Stream) -> Path:
    """The file the master links for stream ``s``: its only part, or a VDS over all parts in vds/."""
    if len(s.parts) == 1:
        return s.parts[0].link
    return _write_vds(folder, s, with_data=s.cfg.video is None)


def _write_vds(folder: Path, s: _Stream, with_data: bool) -> Path:
    """A virtual dataset over the parts' committed rows (and their /sync tables), with relative source paths.

    HDF5 resolves a relative source path against the VDS file's folder, so the session folder can move. Cameras
    encoded to video have no /data to join (0 rows), only their sync tables.
    """
    dest = folder / VDS_DIR / f"{s.name}.h5"
    tmp = dest.with_name(dest.name + PARTIAL)
    dest.parent.mkdir(exist_ok=True)
    tmp.unlink(missing_ok=True)
    shape = tuple(s.cfg.shape)
    with h5py.File(tmp, "x", libver="latest") as out:
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
        data.attrs["parts"] = json.dumps([os.path.relpath(p.link, folder) for p in s.parts])
        for table in ("sync/edges", "sync/clock"):
            _virtual_table(out, table, [p.link for p in s.parts], dest.parent)
        out["sync/edges"].attrs["lines"] = lines
        out["sync"].attrs["description"] = "raw, uncorrected sync record of every part, in part order"
    os.replace(tmp, dest)
    return dest


class _Layout(h5py.VirtualLayout):
    """A VirtualLayout whose dataset carries no creation times: HDF5 stamps them into virtual datasets by
    default (h5py turns them off for ordinary ones), and then one session finalized twice differs in bytes."""

    def _get_dcpl(self, dst_filename):  # h5py's hook that builds the creation property list
        dcpl = super()._get_dcpl(dst_filename)
        dcpl.set_obj_track_times(False)
        return dcpl


def _virtual_table(out: h5py.File, name: str, files: list[Path], base: Path) -> None:
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


# -- clocks --------------------------------------------------------------------------------------------------


@dataclass
class _Alignment:
    fit: ClockFit
    flags: list[str]
    frames: dict | None = None
    pairs: tuple[np.ndarray, np.ndarray] | None = None
    """(device positions, reference seconds) the fit rests on, for the QC residual plot."""


def _align_all(streams: dict[str, _Stream], ref: _Stream) -> dict[str, _Alignment]:
    """Fit every stream to the reference; strobe-timed streams last, since they go through another's fit."""
    out = {ref.name: _Alignment(_identity(ref), [])}
    order = sorted((n for n in streams if n != ref.name), key=lambda n: isinstance(streams[n].cfg.sync, StrobeSync))
    for name in order:
        s = streams[name]
        sync = s.cfg.sync
        if isinstance(sync, StrobeSync) and sync.stream in out:
            out[name] = _align_strobe(s, streams[sync.stream], out[sync.stream].fit, ref)
        elif isinstance(sync, (ChannelSync, FrameSync)):
            out[name] = _align_sync(s, ref)
        else:
            why = ("no sync source" if sync is None else f"its strobe stream {sync.stream!r} did not record")
            out[name] = _Alignment(_host_fit(s, ref), [f"{why}: timed by host receive times (~1 ms accuracy)"])
    return out


def _identity(ref: _Stream) -> ClockFit:
    """The reference's own map: reference seconds = sample / nominal rate, exactly."""
    a = float(ref.index["first_sample"][0])
    knots = np.array([a, a + max(1, ref.rows)])
    return ClockFit(knots=(knots,), seconds=(knots / ref.rate,), model="affine", source="reference",
                    dev_rate=ref.rate, n_pairs=0, unmatched_dev=0, unmatched_ref=0, drift_ppm=0.0,
                    residual_rms_s=0.0, residual_max_s=0.0, error_bound_s=0.0)


def _align_sync(s: _Stream, ref: _Stream) -> _Alignment:
    dev, refe = s.edges.get("sync", np.empty(0, np.int64)), ref.edges.get("sync", np.empty(0, np.int64))
    try:
        fit = align_stream(dev, s.rate, refe, ref.rate)
        if fit.segments != s.n_segments:
            raise ClockFitError(f"sync edges show {fit.segments} counter segments, the chunk index {s.n_segments}")
    except ClockFitError as e:
        return _Alignment(_host_fit(s, ref), [f"sync fit failed ({e}): timed by host receive times (~1 ms accuracy)"])
    return _Alignment(fit, [], pairs=_nearest_pairs(dev, fit, refe / ref.rate - 0.5 / ref.rate))


def _nearest_pairs(dev_edges: np.ndarray, fit: ClockFit, ref_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each device edge with the reference edge nearest its fitted time, if within 5 error bounds (QC only)."""
    if len(dev_edges) == 0 or len(ref_s) < 2:
        return np.empty(0), np.empty(0)
    pos = dev_edges.astype(np.float64) - 0.5
    pred = _to_reference(fit, pos, _edge_segments(dev_edges))
    j = _nearest(ref_s, pred)
    keep = np.abs(ref_s[j] - pred) <= 5 * max(fit.error_bound_s, 1e-6)
    return pos[keep], ref_s[j][keep]


def _host_fit(s: _Stream, ref: _Stream) -> ClockFit:
    """Device sample -> reference seconds through host receive times (acqd.clock.fit_host_clock)."""
    base = int(min(s.index["host_mono_ns"].min(), ref.index["host_mono_ns"].min()))
    try:
        return fit_host_clock(s.chunk_end, (s.index["host_mono_ns"] - base) / 1e9, ref.chunk_end,
                              (ref.index["host_mono_ns"] - base) / 1e9, s.rate, ref.rate)
    except ClockFitError as e:
        raise FinalizeError(f"stream {s.name!r} cannot be placed on the timebase: {e}") from None


def _align_strobe(s: _Stream, target: _Stream, target_fit: ClockFit, ref: _Stream) -> _Alignment:
    """A camera: frame k strobed line 'strobe:<camera>' of ``target``; its edges, through the target's fit, time
    the frames. Frames pair with strobes by the host-time estimate (good to well under half a frame period),
    then a clock is fitted to the pairs like any other stream's."""
    host = _host_fit(s, ref)
    strobes = target.edges.get(f"strobe:{s.name}", np.empty(0, np.int64))
    strobe_s = _to_reference(target_fit, strobes.astype(np.float64) - 0.5, _edge_segments(strobes))
    frames, _ = s.row_samples(0, s.rows)
    period = 1.0 / s.rate
    try:
        if s.n_segments > 1:
            raise ClockFitError("the camera's frame counter was reset")
        fi, sj, offset = pair_frames(frames, host.to_reference(frames.astype(np.float64)), strobe_s, period)
        fit = fit_clock(frames[fi].astype(np.float64), strobe_s[sj], s.rate)
    except ClockFitError as e:
        return _Alignment(host, [f"strobe fit failed ({e}): timed by host receive times (~1 ms accuracy)"])
    t = fit.to_reference(frames.astype(np.float64))
    lo, hi = target_fit.to_reference(np.array([target.index["first_sample"][0],
                                               target.chunk_end[-1]], dtype=np.float64))
    covered = (t >= lo) & (t <= hi)
    in_span = (strobe_s >= t[0] - period / 2) & (strobe_s <= t[-1] + period / 2)
    span = int(frames[-1] - frames[0] + 1)
    frames_report = {
        "recorded": int(s.rows), "counter_span": span, "dropped": span - int(s.rows),
        "strobes_in_span": int(in_span.sum()), "paired": int(len(fi)),
        "frames_without_strobe": max(0, int(covered.sum()) - int(len(fi))),
        "frames_outside_strobe_recording": int((~covered).sum()),
        "strobes_without_frame": max(0, int(in_span.sum()) - int(len(fi))),
        "extra_strobes": max(0, int(in_span.sum()) - int(len(fi)) - (span - int(s.rows))),
        "host_offset_s": float(offset),
    }
    flags = []
    if abs(offset) > period / 4:
        flags.append(f"host-time estimate was {offset * 1e3:.1f} ms off the strobes (over a quarter frame): "
                     "check the frame/strobe assignment")
    bound = max(fit.error_bound_s, 0.5 / target.rate + target_fit.error_bound_s)
    fit = replace(fit, source="strobe", unmatched_dev=frames_report["frames_without_strobe"],
                  unmatched_ref=frames_report["strobes_without_frame"], error_bound_s=bound)
    return _Alignment(fit, flags, frames_report, (frames[fi].astype(np.float64), strobe_s[sj]))


def pair_frames(frames: np.ndarray, prior_s: np.ndarray, strobe_s: np.ndarray, period: float
                ) -> tuple[np.ndarray, np.ndarray, float]:
    """Pair recorded frames with strobe edges: (frame indices, strobe indices, prior's offset in seconds).

    ``prior_s`` estimates each frame's time (host receive times: ms accurate, offset unknown within a frame).
    The offset between prior and strobes is the circular mean of each frame's distance to its nearest strobe
    (circular over one frame period, so it is found even if the prior is almost half a period off); the shifted
    prior then pairs each frame with the one strobe within a quarter period. A strobe claimed twice is dropped.
    """
    if len(strobe_s) < 2 or len(frames) == 0:
        raise ClockFitError(f"{len(strobe_s)} strobe edges for {len(frames)} frames")
    near = _nearest(strobe_s, prior_s)
    phase = np.exp(2j * np.pi * (strobe_s[near] - prior_s) / period)
    offset = float(np.angle(phase.mean()) * period / (2 * np.pi))
    pred = prior_s + offset
    j = _nearest(strobe_s, pred)
    ok = np.abs(strobe_s[j] - pred) < period / 4
    fi, sj = np.flatnonzero(ok), j[ok]
    _, inverse, counts = np.unique(sj, return_inverse=True, return_counts=True)
    keep = counts[inverse] == 1
    return fi[keep], sj[keep], offset


def _nearest(sorted_values: np.ndarray, x: np.ndarray) -> np.ndarray:
    j = np.clip(np.searchsorted(sorted_values, x), 1, len(sorted_values) - 1)
    return np.where(np.abs(sorted_values[j - 1] - x) <= np.abs(sorted_values[j] - x), j - 1, j)


def _edge_segments(edges: np.ndarray) -> np.ndarray:
    """Counter segment of each edge: edges are stored in time order, so the counter going back starts a segment."""
    seg = np.zeros(len(edges), dtype=np.int64)
    for k, sl in enumerate(split_counter_resets(edges)):
        seg[sl] = k
    return seg


def _to_reference(fit: ClockFit, positions: np.ndarray, segment: np.ndarray) -> np.ndarray:
    out = np.empty(len(positions), dtype=np.float64)
    for k in np.unique(segment):
        if k >= fit.segments:
            raise FinalizeError(f"edges in counter segment {k}, but the clock fit has {fit.segments}")
        m = segment == k
        out[m] = fit.to_reference(positions[m], int(k))
    return out


def _zero_sample(streams: dict[str, _Stream], aligned: dict[str, _Alignment], ref: _Stream) -> int:
    """Session time zero, in whole reference samples: the earliest first recorded sample of any stream, so that
    no time is negative."""
    first = [aligned[n].fit.to_reference(np.array([float(s.index["first_sample"][0])]), 0)[0]
             for n, s in streams.items()]
    return int(np.floor(min(first) * ref.rate + 1e-9))


# -- timing, gaps, events ------------------------------------------------------------------------------------


def _row_times(s: _Stream, fit: ClockFit, zero_s: float, rows: np.ndarray | None = None
               ) -> Callable[[int, int], np.ndarray]:
    """Session seconds of series rows [a, b): file rows, or ``rows[a:b]`` when the series holds only those."""
    def times(a: int, b: int) -> np.ndarray:
        samples, seg = s.row_samples(a, b) if rows is None else s.samples_of(rows[a:b])
        return _to_reference(fit, samples.astype(np.float64), seg) - zero_s
    return times


def _timing(s: _Stream, fit: ClockFit, zero_s: float) -> nwb.Timing:
    """starting_time + rate when every row continues the previous one and the map is one straight line over the
    stream within ``REGULAR_TOL_SAMPLES``; otherwise a timestamp per row."""
    times = _row_times(s, fit, zero_s)
    if len(s.breaks) == 0 and fit.segments == 1 and s.rows >= 2:
        x0 = float(s.index["first_sample"][0])
        x1 = x0 + s.rows - 1
        y0, y1 = fit.to_reference(np.array([x0, x1]), 0)
        knots = fit.knots[0][(fit.knots[0] > x0) & (fit.knots[0] < x1)]
        line = y0 + (knots - x0) * (y1 - y0) / (x1 - x0)
        if np.all(np.abs(fit.to_reference(knots, 0) - line) * s.rate <= REGULAR_TOL_SAMPLES):
            if fit.source == "reference":  # exact: whole samples from zero, the nominal rate
                return nwb.Timing(rows=s.rows, starting_time=(x0 - round(zero_s * s.rate)) / s.rate, rate=s.rate)
            return nwb.Timing(rows=s.rows, starting_time=float(y0 - zero_s), rate=float((x1 - x0) / (y1 - y0)))
    return nwb.Timing(rows=s.rows, timestamps=times)


def _gaps(s: _Stream, fit: ClockFit, zero_s: float) -> list[dict]:
    """Every discontinuity the chunk index proves, with what the writer recorded about it."""
    kinds = {g.value: g.name.lower() for g in Gap}
    recorded = {int(g["file_row"]): g for g in s.recorded_gaps}
    part_starts = set(s.part_start_chunks[1:])
    seg = s.segment
    out = []
    for i in s.breaks.tolist():
        row = int(s.index["file_row"][i])
        g = recorded.get(row)
        kind = kinds.get(int(g["kind"]), "unknown") if g is not None else (
            "writer_restart" if i in part_starts else "unrecorded")
        prev_end, first = int(s.chunk_end[i - 1]), int(s.index["first_sample"][i])
        start = fit.to_reference(np.array([float(prev_end)]), int(seg[i - 1]))[0] - zero_s
        stop = fit.to_reference(np.array([float(first)]), int(seg[i]))[0] - zero_s
        out.append({"stream": s.name, "kind": kind, "row": row, "start_time": float(start),
                    "stop_time": float(max(stop, start)), "sample_from": prev_end, "sample_to": first,
                    "samples_lost": first - prev_end if seg[i] == seg[i - 1] else -1,
                    "seq_from": int(g["seq_from"]) if g is not None else -1,
                    "seq_to": int(g["seq_to"]) if g is not None else -1})
    return out


def _events(s: _Stream, fit: ClockFit, zero_s: float) -> list[nwb.EventsPlan]:
    """One EventsTable per digital line the stream recorded. A latched sample k means the edge came in (k-1, k]."""
    out = []
    for label, samples in sorted(s.edges.items()):
        if len(samples) == 0:
            continue
        t = _to_reference(fit, samples.astype(np.float64) - 0.5, _edge_segments(samples)) - zero_s
        what = "shared sync pulses" if label == "sync" else f"frame strobes of {label.split(':', 1)[1]}"
        out.append(nwb.EventsPlan(
            name=f"{s.name}_{label.replace(':', '_')}", resolution=1.0 / s.rate, timestamps=t, samples=samples,
            description=f"rising edges of the {label!r} line ({what}) latched by {s.name}; time = the stream's clock "
                        f"fit at sample - 0.5",
            source_description=f"acqd: digital line {label!r} of stream {s.name}"))
    return out


# -- the plan for the NWB file -------------------------------------------------------------------------------


def _plan(folder: Path, session: dict, streams: dict[str, _Stream], aligned: dict[str, _Alignment], ref: _Stream,
          zero_sample: int, linked: dict[str, Path]) -> tuple[nwb.MasterPlan, dict[str, StreamReport]]:
    zero_s = zero_sample / ref.rate
    meta = session.get("metadata", {})
    series, events, gaps, reports = [], [], [], {}
    for name, s in streams.items():
        a = aligned[name]
        timing, flags, video = _timing(s, a.fit, zero_s), list(a.flags), None
        if s.cfg.video is not None:
            files, starts, rows, problems = s.video_frames()
            missing = [f for f in files if not (folder / f).is_file()]
            if missing or not files:
                raise FinalizeError(f"stream {name!r}: video files missing: {missing or 'no finished file'}")
            video, flags = {"files": files, "starting_frames": starts}, flags + problems
            if len(rows) != s.rows:  # some committed frames are in no file: the series holds the others
                timing = nwb.Timing(rows=len(rows), timestamps=_row_times(s, a.fit, zero_s, rows))
        stream_gaps = _gaps(s, a.fit, zero_s)
        gaps += stream_gaps
        events += _events(s, a.fit, zero_s)
        first_s = float(_row_times(s, a.fit, zero_s)(0, 1)[0])
        reports[name] = StreamReport(
            name=name, kind=s.cfg.kind, rows=s.rows, parts=[_rel(p.path, folder) for p in s.parts],
            recovered=[_rel(p.link, folder) for p in s.parts if p.recovered], linked=_rel(linked[name], folder),
            series_rows=timing.rows, timing="rate" if timing.regular else "timestamps", first_time_s=first_s,
            clock={**a.fit.to_dict(), "extrapolated_rows": _extrapolated_rows(s, a.fit)}, flags=flags,
            gaps=stream_gaps, frames=a.frames, video=video)
        series.append(_series_plan(s, a.fit, flags, timing, linked[name], stream_gaps, video))
    start_time = _wall_time(ref, zero_sample)
    plan = nwb.MasterPlan(
        identifier=session["session_id"], session_id=session["session_id"],
        session_description=meta.get("session_description") or session["session_id"],
        session_start_time=start_time, file_create_date=_parse_time(session.get("stopped") or session["created"]),
        subject=meta.get("subject", {}), experimenter=tuple(meta.get("experimenter") or ()),
        institution=meta.get("institution"), lab=meta.get("lab"),
        experiment_description=meta.get("experiment_description"), keywords=tuple(meta.get("keywords") or ()),
        notes=_notes(ref, zero_sample, session), series=series, events=events,
        gaps=_gap_table(gaps) if gaps else None,
        sync_tables=_sync_tables(streams, aligned, reports, ref, zero_sample, start_time))
    return plan, reports


def _series_plan(s: _Stream, fit: ClockFit, flags: list[str], timing: nwb.Timing, linked: Path, gaps: list[dict],
                 video: dict | None) -> nwb.SeriesPlan:
    cfg = s.cfg
    channels = tuple(cfg.channel_names or (f"ch{i:03d}" for i in range(cfg.shape[0])))
    digital = sorted({cfg.sync.channel} if isinstance(cfg.sync, ChannelSync) else set())
    comments = (f"time: {fit.source} clock ({fit.model}), error bound {fit.error_bound_s * 1e3:.3g} ms, "
                f"{fit.n_pairs} pairs, drift {fit.drift_ppm:+.2f} ppm; "
                + (f"{len(gaps)} gap(s), see /intervals/gaps" if gaps else "no gaps")
                + "".join(f"; {flag}" for flag in flags))
    described = cfg.description or cfg.name
    if len(cfg.shape) == 1:
        described += f"; columns: {', '.join(channels)}"
    if digital:
        described += f"; column(s) {digital} are digital words (bits), not {cfg.units}"
    kind = cfg.kind if not (cfg.kind == "ephys" and cfg.units != "volts") else "analog"
    if video is not None:
        described += f"; frames in external {cfg.video.codec} video files"
    return nwb.SeriesPlan(name=cfg.name, kind=kind, data_file=None if video else linked, sync_file=linked,
                          unit=cfg.units, conversion=float(cfg.conversion), offset=float(cfg.offset),
                          description=described, comments=comments, timing=timing,
                          channel_names=channels if len(cfg.shape) == 1 else (), sync_channels=tuple(digital),
                          device_description=cfg.description,
                          external_files=tuple(video["files"]) if video else (),
                          starting_frames=tuple(video["starting_frames"]) if video else ())


def _extrapolated_rows(s: _Stream, fit: ClockFit) -> int:
    """Rows before the first or after the last knot of their segment: the error bound does not cover them."""
    if fit.source == "reference":
        return 0
    samples, seg = s.row_samples(0, s.rows) if s.rows <= 5_000_000 else _ends(s)
    lo = np.array([k[0] for k in fit.knots])[seg]
    hi = np.array([k[-1] for k in fit.knots])[seg]
    return int(np.sum((samples < lo) | (samples > hi)))


def _ends(s: _Stream) -> tuple[np.ndarray, np.ndarray]:
    """Chunk boundaries only, for very long streams (the count is then approximate to a chunk)."""
    return s.index["first_sample"].astype(np.int64), s.segment


def _gap_table(gaps: list[dict]) -> nwb.TablePlan:
    desc = {"start_time": "session time where the missing samples would have started",
            "stop_time": "session time of the first sample after the gap",
            "stream": "stream with the gap", "kind": "seq (messages lost), samples (device skipped), restart "
            "(publisher restarted), counter_reset, writer_restart (a new part file), unrecorded",
            "row": "file row of the first sample after the gap in the stream's data",
            "sample_from": "device sample where the gap starts", "sample_to": "device sample after the gap",
            "samples_lost": "samples missing (-1: unknown, the counter was reset)",
            "seq_from": "first missing message seq (-1: not recorded)", "seq_to": "seq after the gap (-1: not recorded)"}
    gaps = sorted(gaps, key=lambda g: (g["start_time"], g["stream"]))
    return nwb.TablePlan("gaps", "every discontinuity in a stream's data, proven by its chunk index: the samples "
                         "between start_time and stop_time were never recorded",
                         {k: (d, [g[k] for g in gaps]) for k, d in desc.items()})


def _sync_tables(streams: dict[str, _Stream], aligned: dict[str, _Alignment], reports: dict[str, StreamReport],
                 ref: _Stream, zero_sample: int, start_time: datetime) -> list[nwb.TablePlan]:
    names = list(streams)
    fits = {n: aligned[n].fit.to_dict() for n in names}
    cols = {"stream": ("stream name", names),
            "source": ("reference | sync (shared TTL edges) | strobe (camera strobes) | host (receive times)",
                       [fits[n]["source"] for n in names]),
            "model": ("affine or piecewise (continuous piecewise-linear)", [fits[n]["model"] for n in names])}
    numeric = {"segments": "counter segments", "counter_resets": "device counter resets", "n_pairs": "pairs fitted",
               "unmatched_dev": "device edges without a reference partner", "unmatched_ref":
               "reference edges without a device partner", "drift_ppm": "rate error vs nominal (positive: fast)",
               "residual_rms_s": "RMS fit residual (s)", "residual_max_s": "largest fit residual (s)",
               "error_bound_s": "bound on the map's error between the first and last pairs (s)"}
    for key, d in numeric.items():
        cols[key] = (d, np.array([fits[n][key] for n in names]))
    cols["extrapolated_rows"] = ("rows outside the fitted span (error bound does not apply)",
                                 np.array([reports[n].clock["extrapolated_rows"] for n in names], dtype=np.int64))
    cols["timing"] = ("rate: starting_time + rate; timestamps: one per row", [reports[n].timing for n in names])
    cols["n_gaps"] = ("gaps in the stream (see /intervals/gaps)", np.array([len(reports[n].gaps) for n in names]))
    cols["flags"] = ("what an analyst must know about this stream's timing", ["; ".join(reports[n].flags)
                                                                               for n in names])
    tables = [nwb.TablePlan("clock_fits", "each stream's map from its sample counter to the reference clock, and "
                            "its quality (acqd.clock; docs/clock-alignment.md)", cols),
              nwb.TablePlan("timebase", "session time = reference sample / reference_rate - zero_sample / "
                            "reference_rate", {
                                "reference": ("the stream whose clock is the timebase", [ref.name]),
                                "reference_rate": ("its nominal rate (Hz)", np.array([ref.rate])),
                                "zero_sample": ("reference sample at session time 0", np.array([zero_sample])),
                                "wall_clock_at_zero": ("host wall clock at session time 0 (ms accuracy)",
                                                       [start_time.isoformat()])})]
    cams = [n for n in names if aligned[n].frames is not None]
    if cams:
        keys = list(aligned[cams[0]].frames)
        tables.append(nwb.TablePlan("frames", "camera frames reconciled with the strobe edges they produced", {
            "stream": ("camera stream", cams),
            **{k: (k.replace("_", " "), np.array([aligned[n].frames[k] for n in cams])) for k in keys}}))
    return tables


def _notes(ref: _Stream, zero_sample: int, session: dict) -> str:
    text = (f"Written by acqd finalize. Timebase: the clock of stream {ref.name!r}; session time 0 is its sample "
            f"{zero_sample}. Data are HDF5 external links into streams/ (read with NWBHDF5IO(path, 'r'), never 'a'); "
            "each series' sync group links the raw sync record. Clock fits: /processing/sync.")
    if session.get("incomplete"):
        text += " The session is marked INCOMPLETE (see session.json incidents)."
    return text


def _wall_time(ref: _Stream, zero_sample: int) -> datetime:
    """Host wall time of a reference sample: the first chunk's receive time, back by the samples since then."""
    end_ns = int(ref.index["host_wall_ns"][0])
    ns = end_ns - round((int(ref.chunk_end[0]) - zero_sample) / ref.rate * 1e9)
    return datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=ns // 1000)


def _parse_time(text: str) -> datetime:
    t = datetime.fromisoformat(text)
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _rel(path: Path, folder: Path) -> str:
    return Path(os.path.relpath(path, folder)).as_posix()


# -- QC -----------------------------------------------------------------------------------------------------


def _qc_summary(report: FinalizeReport) -> dict:
    return {"session_id": report.session_id, "master": report.master, "timebase": report.timebase,
            "streams": {n: asdict(r) for n, r in report.streams.items()}, "validation": report.check,
            "warnings": report.warnings}


def _qc_plot(s: _Stream, a: _Alignment, ref: _Stream, zero_s: float, report: StreamReport) -> qc.StreamPlot:
    fit = a.fit
    pair_t = res = np.empty(0)
    if a.pairs is not None and len(a.pairs[0]):
        pos, ref_s = a.pairs
        segs = np.zeros(len(pos), dtype=np.int64) if fit.segments == 1 else _edge_segments(pos)
        pred = _to_reference(fit, pos, segs)
        pair_t, res = pred - zero_s, ref_s - pred
    step = max(1, len(s.index) // 2000)
    chunk = s.index[::step]
    x = chunk["first_sample"].astype(np.float64)
    seg = s.segment[::step]
    t = _to_reference(fit, x, seg) - zero_s
    nominal = t[0] + (x - x[0]) / s.rate  # where the chunks would be if the device ran at its nominal rate
    host_s = (s.index["host_mono_ns"] - s.index["host_mono_ns"][0]) / 1e9
    return qc.StreamPlot(name=s.name, pair_time_s=pair_t, residual_s=res, time_s=t,
                         offset_vs_nominal_s=np.where(seg == 0, t - nominal, np.nan),
                         gaps=[(g["start_time"], g["stop_time"]) for g in report.gaps],
                         receive_time_s=host_s, receive_samples=s.index["n_samples"].astype(np.int64),
                         nominal_rate=s.rate, title=f"{s.name}: {fit.source} / {fit.model}, drift "
                         f"{fit.drift_ppm:+.2f} ppm, bound {fit.error_bound_s * 1e6:.1f} us")


# -- sealing --------------------------------------------------------------------------------------------------


def _seal_paths(paths: list[Path]) -> dict:
    """chmod 0444, then chattr +i (root ignores 0444, not the immutable flag). Reports, honestly, what held."""
    errors = []
    for p in paths:
        _set_immutable(p, False)  # sealed by an earlier, killed run: chmod would fail on an immutable file
        os.chmod(p, 0o444)
        err = _set_immutable(p, True)
        if err:
            errors.append(f"{p.name}: {err}")
    return {"files": len(paths), "read_only": True, "immutable": not errors,
            "immutable_error": errors[0] if errors else None}


def _merge_seal(into: dict, more: dict) -> None:
    into["files"] += more["files"]
    into["immutable"] = into["immutable"] and more["immutable"]
    into["immutable_error"] = into["immutable_error"] or more["immutable_error"]


def _unseal(paths: list[Path]) -> None:
    for p in paths:
        if p.exists():
            _set_immutable(p, False)
            os.chmod(p, os.stat(p).st_mode | 0o200)


def _set_immutable(path: Path, on: bool) -> str | None:
    """Set or clear the immutable flag (FS_IOC_SETFLAGS, as chattr does); the error text if the filesystem or our
    privileges do not allow it (tmpfs, overlayfs, not root)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as e:
        return e.strerror
    try:
        flags = array.array("i", [0])
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags, True)
        new = flags[0] | _FS_IMMUTABLE_FL if on else flags[0] & ~_FS_IMMUTABLE_FL
        if new != flags[0]:
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, array.array("i", [new]), True)
        return None
    except OSError as e:
        return f"chattr {'+' if on else '-'}i not possible: {errno.errorcode.get(e.errno, e.errno)} ({e.strerror})"
    finally:
        os.close(fd)


def is_immutable(path: Path) -> bool:
    """Whether ``path`` has the immutable flag (False where flags cannot be read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        flags = array.array("i", [0])
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags, True)
        return bool(flags[0] & _FS_IMMUTABLE_FL)
    except OSError:
        return False
    finally:
        os.close(fd)


def unseal_session(folder: Path) -> None:
    """Clear the immutable flag and restore owner write on every file of a session (tests, admins)."""
    _unseal(sorted(p for p in Path(folder).rglob("*") if p.is_file()))


def _clear_outputs(folder: Path, master: Path) -> None:
    """Remove what finalize writes (master, partials, qc, vds, recovered copies, manifest) so a run starts clean."""
    files = [master, master.with_name(master.name + PARTIAL), folder / MANIFEST]
    dirs = [folder / d for d in (QC_DIR, VDS_DIR, RECOVERED_DIR)]
    for d in dirs:
        if d.is_dir():
            files += [p for p in d.rglob("*") if p.is_file()]
    _unseal([f for f in files if f.exists()])
    for f in files:
        f.unlink(missing_ok=True)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    if (folder / SESSION_FILE).exists():
        _unseal([folder / SESSION_FILE])


def _manifest_text(folder: Path, paths: list[Path], progress: Progress) -> str:
    lines, total = [], sum(p.stat().st_size for p in paths) or 1
    done = 0
    for p in paths:
        lines.append(f"{_sha256(p)}  {_rel(p, folder)}\n")
        done += p.stat().st_size
        progress("seal", 0.95 * done / total)
    return "".join(lines)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def verify_manifest(folder: Path) -> list[str]:
    """Problems found checking the session against its manifest (empty: every file there and unchanged)."""
    folder = Path(folder)
    try:
        text = (folder / MANIFEST).read_text()
    except OSError as e:
        return [f"{MANIFEST}: {e.strerror}"]
    listed = {}
    for line in text.splitlines():
        digest, _, rel = line.partition("  ")
        listed[rel] = digest
    problems = []
    for rel, digest in sorted(listed.items()):
        p = folder / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif _sha256(p) != digest:
            problems.append(f"{rel}: contents changed")
    extra = sorted(_rel(p, folder) for p in folder.rglob("*") if p.is_file() and p.name not in (SESSION_FILE, MANIFEST)
                   and _rel(p, folder) not in listed and not p.name.startswith(f".{SESSION_FILE}."))
    problems += [f"{rel}: not in the manifest" for rel in extra]
    return problems


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + PARTIAL)
    tmp.unlink(missing_ok=True)
    with open(tmp, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
