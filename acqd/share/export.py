"""Self-contained export of a finalized session for sharing (DANDI): one NWB file, every link resolved.

This module owns ``acqd export`` (docs/export.md): turning a sealed session, whose master NWB links its
stream files, into a file an archive accepts, named and laid out as ``dandi organize
--update-external-file-paths --media-files-mode copy`` would lay it out:

    <out>/sub-<subject>/sub-<subject>_ses-<session>[_<modalities>].nwb
    <out>/sub-<subject>/sub-<subject>_ses-<session>[_<modalities>]/<ImageSeries object_id>_external_file_<n>.<ext>

- Every series' ``data`` and ``timestamps`` are read through the master's links (and virtual datasets, for
  streams split into parts) and written gzip-compressed (every HDF5 reader has gzip; the stream files may use
  hdf5plugin filters) by pynwb's export with ``link_data=False``.
- pynwb's export drops the untyped ``sync`` group of each series; it is re-created with h5py from the master's
  resolved ``/sync`` (raw edges and host-time pairs), so the export keeps everything the master holds.
- Video files are copied and ``ImageSeries.external_file`` rewritten to the names dandi-cli gives them.
- The result is validated (pynwb, nwbinspector with the DANDI config, no external link, no virtual dataset)
  before it appears under its final name. Nothing in the session folder is ever opened for writing: the master
  is opened ``'r'``, and the export is staged in ``<out>/.acqd-export-<session>.partial/`` and renamed.

The naming rules are dandi-cli's (``dandi/organize.py``: ``_sanitize_value``, ``_assign_dandi_names``,
``_populate_modalities``, ``_create_external_file_names``; ``dandi/pynwb_utils.py``:
``get_neurodata_types_to_modalities_map``), reimplemented here so acqd does not depend on dandi-cli. One
deliberate difference: ``dandi organize`` writes ``_ses-`` only when the files it organizes hold more than one
session; a rig exports many sessions of a subject over time, so the session is always in the name (it is what
organize gives once the dandiset has a second session, and names never change as sessions accumulate).
"""

from __future__ import annotations

import fcntl
import inspect
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401 - registers the filters stream files may be compressed with, for reading
import numpy as np
import pynwb
from hdmf.backends.hdf5 import H5DataIO
from hdmf.backends.warnings import BrokenLinkWarning
from hdmf.data_utils import GenericDataChunkIterator
from pynwb import NWBHDF5IO, TimeSeries

from acqd.finalize import nwb
from acqd.errors import ExportError
from acqd.finalize import verify_manifest
from acqd.finalize.layout import MANIFEST
from acqd.h5lock import wait_unlocked, written
from acqd.session import FINALIZED, fsync_dir, read_session

__all__ = ["ExportError", "ExportReport", "dandi_path", "export_session", "external_file_name", "modalities",
           "sanitize", "self_contained_problems"]

Progress = Callable[[str, float], None]

# Progress: stage -> (fraction at its start, fraction at its end). Copying the data dominates.
STAGES = {"check": (0.0, 0.05), "copy": (0.05, 0.8), "sync": (0.8, 0.82), "video": (0.82, 0.87),
          "validate": (0.87, 0.99), "rename": (0.99, 1.0)}
GZIP_LEVEL = 4  # hdmf's and most NWB converters' default: ~2x slower than level 1 for a few % smaller files
CHUNK_BYTES = 8 << 20  # full-width row chunks of ~8 MiB: few HDF5 chunk lookups, cheap ranged reads from S3
BUFFER_CHUNKS = 8  # chunks read and compressed per step (bounds memory at ~64 MiB)
STAGING_PREFIX = ".acqd-export-"
MASTER_ATTR = "acqd_master_sha256"
"""Root attribute of an export: the sha256 of the master it was made from (stale once an amend changes it)."""
SERIES_GROUPS = ("acquisition", "stimulus/presentation")  # where the master's series (and their sync links) are
VIDEO_MODULES = ("acquisition", "processing")  # dandi-cli consts.VIDEO_FILE_MODULES: where ImageSeries are renamed
TRIVIAL_MODALITIES = {"base", "device", "file", "misc"}  # dandi organize leaves these out of file names


@dataclass
class ExportReport:
    """The result of ``export_session``."""

    session_id: str
    out: str
    """The folder exported into (a dandiset folder, or any folder)."""
    nwb: str
    """The NWB file, relative to ``out``: ``sub-<subject>/sub-<subject>_ses-<session>[_<modalities>].nwb``."""
    videos: list[str]
    """Video files copied, relative to ``out`` (ImageSeries.external_file is relative to the NWB file's folder)."""
    series: dict[str, dict]
    """Per series under /acquisition and /stimulus/presentation: ``rows``, ``sync`` (raw sync copied),
    ``external_file`` (new names)."""
    check: dict
    """``nwb.MasterCheck.to_dict()`` of the export: read-back errors, schema errors, nwbinspector messages."""
    bytes: int = 0
    """Size of the NWB file and the videos."""
    seconds: float = 0.0
    master_sha256: str = ""
    """The master the export was made from (its manifest digest), also in the export's ``acqd_master_sha256``
    root attribute: an amend after the export changes the master, and the export is then stale."""
    replaced: bool = False
    """A stale export of the same session (made from an earlier master) was rebuilt in its place."""

    def to_dict(self) -> dict:
        return asdict(self)


# -- naming (pure) -----------------------------------------------------------------------------------------


def sanitize(value: str, field: str) -> str:
    """dandi organize's ``_sanitize_value``: characters that break BIDS-like ``_key-value`` names become '-'."""
    value = re.sub(r"[_*\\/<>:|\"'?%@;]", "-", value)
    return value if field == "extension" else value.replace(".", "-")


def dandi_path(subject_id: str, session_id: str, modalities: list[str] | tuple[str, ...] = (),
               bids: dict[str, str] | None = None) -> str:
    """``sub-<subject>/sub-<subject>_ses-<session>[_<mod>+<mod>].nwb`` with dandi organize's sanitising; a session
    recorded with BIDS entities: ``sub-<sub>/sub-<sub>[_ses-<ses>][_task-..][_acq-..][_run-..][_<mod>].nwb``."""
    if not subject_id:
        raise ExportError("the session has no subject_id: DANDI (dandi organize) requires one")
    subject = sanitize(subject_id, "subject_id")
    name = f"sub-{subject}"
    if bids:  # labels are alphanumeric (checked at RECORD): nothing to sanitise
        name += "".join(f"_{k}-{bids[k]}" for k in ("ses", "task", "acq", "run") if bids.get(k))
    elif session_id:
        name += f"_ses-{sanitize(session_id, 'session_id')}"
    mods = sorted(set(modalities))
    if mods:
        name += "_" + sanitize("+".join(mods), "modalities")
    return f"sub-{subject}/{name}.nwb"


def external_file_name(nwb_relpath: str, object_id: str, n: int, original: str) -> str:
    """dandi organize's new name of an ImageSeries' n-th external file, relative to the NWB file's folder."""
    stem = Path(nwb_relpath).stem
    return f"{stem}/{object_id}_external_file_{n}{Path(original).suffix}"


@cache
def _modality_map() -> dict[str, str]:
    """Neurodata type -> modality: the pynwb module defining the type (dandi-cli's own rule, same pynwb)."""
    out: dict[str, str] = {}
    for module in vars(pynwb).values():
        if not (inspect.ismodule(module) and module.__name__.startswith("pynwb.")):
            continue
        for obj in vars(module).values():
            if inspect.isclass(obj) and issubclass(obj, pynwb.core.NWBMixin):
                parts = obj.__module__.split(".")
                if len(parts) == 2:
                    out.setdefault(obj.__name__, parts[1])
    return out


def modalities(path: Path) -> list[str]:
    """The modalities dandi organize reads from an NWB file: the typed groups' pynwb modules, trivial ones left out."""
    types: set[str] = set()

    def visit(_: str, obj: h5py.HLObject) -> None:
        if isinstance(obj, h5py.Group) and "neurodata_type" in obj.attrs:
            types.add(_text(obj.attrs["neurodata_type"]))

    with h5py.File(path, "r") as f:
        f.visititems(visit)  # hard links only: the master's external links lead to untyped stream groups
    mapping = _modality_map()
    return sorted({mapping[t] for t in types if t in mapping} - TRIVIAL_MODALITIES)


def _text(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


# -- export ------------------------------------------------------------------------------------------------


def export_session(folder: Path, out: Path, progress: Progress | None = None, *, gzip_level: int = GZIP_LEVEL
                   ) -> ExportReport:
    """Export the finalized session in ``folder`` into ``out`` as one self-contained NWB file (module docstring).

    Raises ``ExportError`` if the session is not finalized or does not match its manifest, if the export's file
    or video folder already exists in ``out``, or if the export fails validation; ``out`` then holds nothing new.
    """
    started = time.monotonic()
    report_progress = _progress(progress)
    folder, out = Path(folder).resolve(), Path(out).resolve()
    report_progress("check", 0.0)
    master, sid = _check_session(folder, out)
    master_sha256 = master_digest(folder, master.name)
    expected = {name: int(rows) for name, (rows, _) in nwb.series_lengths(master).items()}
    report_progress("check", _at("check", 0.5))
    bids = read_session(folder).get("metadata", {}).get("bids")
    _refuse_existing(out, _name_of(master, bids), master_sha256)  # fail fast: the name is known from the master
    out.mkdir(parents=True, exist_ok=True)
    with _staging(out, sid) as staging:
        exported = staging / "export.nwb"
        _export_nwb(master, exported, gzip_level, report_progress)
        rel = _name_of(exported, bids)
        replace = _refuse_existing(out, rel, master_sha256)
        target = staging / rel
        target.parent.mkdir(parents=True)
        os.rename(exported, target)
        report_progress("sync", STAGES["sync"][0])
        synced = _copy_sync(master, target)
        with written(target, "r+") as f:
            f.attrs[MASTER_ATTR] = master_sha256
        report_progress("video", STAGES["video"][0])
        renamed = _rename_external_files(target, rel)
        videos = _copy_videos(master.parent, staging / Path(rel).parent, renamed, report_progress)
        report_progress("validate", STAGES["validate"][0])
        check = nwb.check_master(target, expected)
        problems = check.blocking + self_contained_problems(target) + _sync_problems(master, target, synced)
        if problems:
            raise ExportError(f"the export of {sid} failed validation:\n  " + "\n  ".join(problems))
        report_progress("rename", STAGES["rename"][0])
        _publish(staging, out, rel, videos, replace)
    nwb_dir = (out / rel).parent
    report = ExportReport(
        session_id=sid, out=str(out), nwb=rel, videos=[_join(Path(rel).parent, v) for v in videos],
        series={name: {"rows": rows, "sync": any(p.rsplit("/", 1)[1] == name for p in synced),
                       "external_file": [n for _, n in renamed.get(name, [])]}
                for name, rows in expected.items()},
        check=check.to_dict(), bytes=(out / rel).stat().st_size + sum((nwb_dir / v).stat().st_size for v in videos),
        seconds=round(time.monotonic() - started, 3), master_sha256=master_sha256, replaced=replace)
    report_progress("rename", 1.0)
    return report


def _progress(progress: Progress | None) -> Progress:
    return progress if progress is not None else (lambda stage, fraction: None)


def _at(stage: str, done: float) -> float:
    a, b = STAGES[stage]
    return a + (b - a) * min(max(done, 0.0), 1.0)


def _check_session(folder: Path, out: Path) -> tuple[Path, str]:
    """The master of a finalized, intact session; refuses an output folder inside the (sealed) session."""
    session = read_session(folder)
    sid = session.get("session_id") or folder.name
    if session.get("state") != FINALIZED:
        raise ExportError(f"{folder}: session {sid!r} is {session.get('state')!r}, not finalized: "
                          f"run `acqd finalize {folder}` first")
    if out == folder or folder in out.parents:
        raise ExportError(f"{out}: the export must be written outside the (sealed) session folder {folder}")
    problems = verify_manifest(folder)
    if problems:
        raise ExportError(f"{folder} does not match its manifest, refusing to share it: " + "; ".join(problems))
    master = folder / session.get("finalize", {}).get("master", f"{sid}.nwb")
    if not master.is_file():
        raise ExportError(f"{master}: the master NWB file is missing")
    return master, sid


@contextmanager
def _staging(out: Path, sid: str) -> Iterator[Path]:
    """``<out>/.acqd-export-<sid>.partial/``, locked (flock) for one export at a time, emptied, removed after."""
    staging = out / f"{STAGING_PREFIX}{sid}.partial"
    staging.mkdir(exist_ok=True)
    fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExportError(f"another export of {sid} into {out} is running") from None
        try:
            for child in staging.iterdir():  # left by a killed run
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        os.close(fd)


def _name_of(path: Path, bids: dict[str, str] | None = None) -> str:
    """The dandi path of an NWB file, from its subject, session (or BIDS entities) and neurodata types."""
    with h5py.File(path, "r") as f:
        subject = _text(f["general/subject/subject_id"][()]) if "general/subject/subject_id" in f else ""
        session = _text(f["general/session_id"][()]) if "general/session_id" in f else ""
    return dandi_path(subject, session, modalities(path), bids)


def _refuse_existing(out: Path, rel: str, master_sha256: str) -> bool:
    """Refuse an export that exists already, unless it is stale (made from an earlier master: an amend changed
    the metadata since); returns whether one is there to be replaced."""
    nwb_file = out / rel
    if nwb_file.is_file() and not nwb_file.is_symlink():
        made_from = export_master(nwb_file)
        if made_from is not None and made_from != master_sha256:
            return True
        if made_from == master_sha256:
            raise ExportError(f"{nwb_file} already exists and is current (made from this master): nothing to do")
    for p in (nwb_file, nwb_file.with_suffix("")):
        if p.exists() or p.is_symlink():
            raise ExportError(f"{p} already exists: remove it (or export into another folder) to export again")
    return False


def master_digest(folder: Path, master: str) -> str:
    """The sha256 of a finalized session's master, as its (verified) manifest lists it."""
    for line in (Path(folder) / MANIFEST).read_text().splitlines():
        digest, _, name = line.partition("  ")
        if name == master:
            return digest
    raise ExportError(f"{folder.name}: {MANIFEST} does not list {master}")


def export_master(path: Path) -> str | None:
    """The master an export was made from (``acqd_master_sha256``), None for one made by an older acqd."""
    try:
        with h5py.File(path, "r") as f:
            value = f.attrs.get(MASTER_ATTR)
    except OSError:
        return None
    return _text(value) if value is not None else None


class _Rows(GenericDataChunkIterator):
    """Reads a dataset (through links and virtual datasets) in blocks of whole rows, for hdmf to compress."""

    def __init__(self, data: h5py.Dataset, on_read: Callable[[int], None]):  # 'data': hdmf's set_data_io passes it
        self._dset, self._on_read = data, on_read
        row_bytes = max(1, data.dtype.itemsize * int(np.prod(data.shape[1:], dtype=np.int64)))
        rows = max(1, min(data.shape[0], CHUNK_BYTES // row_bytes))
        buffer = min(data.shape[0], rows * BUFFER_CHUNKS)  # hdmf: a multiple of the chunk, or everything
        super().__init__(chunk_shape=(rows, *data.shape[1:]), buffer_shape=(buffer, *data.shape[1:]))

    def _get_data(self, selection: tuple[slice, ...]) -> np.ndarray:
        block = self._dset[selection]
        self._on_read(block.nbytes)
        return block

    def _get_maxshape(self) -> tuple[int, ...]:
        return self._dset.shape

    def _get_dtype(self) -> np.dtype:
        return self._dset.dtype


def _export_nwb(master: Path, dest: Path, gzip_level: int, progress: Progress) -> None:
    """pynwb export of the master with every series' data and timestamps rewritten gzip-compressed."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", BrokenLinkWarning)  # a broken link would export as empty data
        with NWBHDF5IO(str(master), "r") as src:  # 'r': append mode would open the sealed link targets read-write
            nwbfile = src.read()
            datasets = [(ts, key) for ts in nwbfile.objects.values() if isinstance(ts, TimeSeries)
                        for key in ("data", "timestamps") if isinstance(ts.fields.get(key), h5py.Dataset)]
            total = sum(ts.fields[key].nbytes for ts, key in datasets) or 1
            done = [0]

            def on_read(n: int) -> None:
                done[0] += n
                progress("copy", _at("copy", done[0] / total))

            for ts, key in datasets:
                dset = ts.fields[key]
                if dset.size == 0 or dset.ndim == 0:
                    # An empty dataset has no data to compress, but copied as is it would keep the stream
                    # file's filter pipeline (an hdf5plugin filter, say): write a plain empty array instead.
                    ts.fields[key] = np.empty(dset.shape, dtype=dset.dtype) if dset.ndim else dset[()]
                else:
                    ts.set_data_io(key, H5DataIO, {"compression": "gzip", "compression_opts": gzip_level,
                                                   "shuffle": True},
                                   data_chunk_iterator_class=_Rows, data_chunk_iterator_kwargs={"on_read": on_read})
            progress("copy", STAGES["copy"][0])
            with NWBHDF5IO(str(dest), "w") as dst:
                dst.export(src_io=src, nwbfile=nwbfile, write_args={"link_data": False})
    wait_unlocked(dest)


def _copy_sync(master: Path, dest: Path) -> list[str]:
    """Copy each series' raw ``sync`` group, resolved through the master's links, into the export (h5py)."""
    copied = []
    with h5py.File(master, "r") as src, written(dest, "r+") as dst:
        for group in (g for g in SERIES_GROUPS if g in src):
            for name, series in src[group].items():
                if not isinstance(series, h5py.Group) or series.get("sync", getlink=True) is None:
                    continue
                try:
                    sync = series["sync"]
                except KeyError:
                    raise ExportError(f"{master.name}: {group}/{name}/sync is a broken link") from None
                _copy_group(sync, dst[group][name].create_group("sync"))
                copied.append(f"{group}/{name}")
    return copied


def _copy_group(src: h5py.Group, dst: h5py.Group) -> None:
    """Copy a group's attributes and contents as real datasets (a virtual dataset's rows, not its mapping)."""
    for k, v in src.attrs.items():
        dst.attrs[k] = v
    for key, item in src.items():
        if isinstance(item, h5py.Group):
            _copy_group(item, dst.create_group(key))
            continue
        data = item[()]
        opts = {"compression": "gzip", "shuffle": True, "chunks": True} if item.size else {}
        copy = dst.create_dataset(key, data=data, dtype=item.dtype, **opts)
        for k, v in item.attrs.items():
            copy.attrs[k] = v


def _rename_external_files(path: Path, rel: str) -> dict[str, list[tuple[str, str]]]:
    """Rewrite every ImageSeries' external_file to dandi's names; returns {series: [(old, new), ...]}."""
    renamed: dict[str, list[tuple[str, str]]] = {}
    with written(path, "r+") as f:
        for module in VIDEO_MODULES:
            if module not in f:
                continue
            for name, series in f[module].items():
                if not isinstance(series, h5py.Group) or "external_file" not in series:
                    continue
                ds = series["external_file"]
                old = [_text(v) for v in ds[()]]
                if any(os.path.isabs(o) or "://" in o for o in old):
                    raise ExportError(f"{module}/{name}: external_file must be relative to the master: {old}")
                object_id = _text(series.attrs["object_id"])
                new = [external_file_name(rel, object_id, n, o) for n, o in enumerate(old)]
                ds[...] = np.array(new, dtype=h5py.string_dtype())
                renamed[name] = list(zip(old, new))
    return renamed


def _copy_videos(master_dir: Path, nwb_dir: Path, renamed: dict[str, list[tuple[str, str]]], progress: Progress
                 ) -> list[str]:
    """Copy each video file to its new name (relative to the NWB file's folder); returns the new names."""
    pairs = [pair for pairs in renamed.values() for pair in pairs]
    total = sum((master_dir / old).stat().st_size for old, _ in pairs) or 1
    done = 0
    for old, new in pairs:
        src, dst = master_dir / old, nwb_dir / new
        if not src.is_file():
            raise ExportError(f"{src}: video file named by the master is missing")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)  # not copy2: the session's 0444 mode is not the export's business
        done += src.stat().st_size
        progress("video", _at("video", done / total))
    return [new for _, new in pairs]


def self_contained_problems(path: Path) -> list[str]:
    """External links and virtual datasets in an HDF5 file (DANDI accepts neither); empty when self-contained."""
    problems: list[str] = []

    def visit(name: str, link: h5py.SoftLink | h5py.ExternalLink | h5py.HardLink) -> None:
        if isinstance(link, h5py.ExternalLink):
            problems.append(f"/{name}: external link to {link.filename}:{link.path}")
        elif isinstance(link, h5py.HardLink):
            obj = f.get(name)
            if isinstance(obj, h5py.Dataset) and obj.is_virtual:
                problems.append(f"/{name}: virtual dataset")

    with h5py.File(path, "r") as f:
        f.visititems_links(visit)  # links, not objects: visititems would silently skip external links
    return problems


def _sync_problems(master: Path, export: Path, synced: list[str]) -> list[str]:
    """Each copied sync table has the rows the master's (resolved) one has."""
    problems = []
    with h5py.File(master, "r") as m, h5py.File(export, "r") as e:
        for path in synced:
            src, dst = m[f"{path}/sync"], e[f"{path}/sync"]
            for key, item in src.items():
                if isinstance(item, h5py.Dataset) and (key not in dst or dst[key].shape != item.shape):
                    problems.append(f"{path}/sync/{key}: not copied whole")
    return problems


def _publish(staging: Path, out: Path, rel: str, videos: list[str], replace: bool = False) -> None:
    """Move the validated export into place: videos first, the NWB file last (its appearance is the commit). With
    ``replace``, the stale export there is first moved into the staging folder (which the caller removes)."""
    nwb_file = staging / rel
    for p in [nwb_file, *(nwb_file.parent / v for v in videos)]:
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    target = out / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    if replace:
        stale = staging / "stale"
        stale.mkdir()
        os.rename(target, stale / target.name)
        if target.with_suffix("").is_dir() and not target.with_suffix("").is_symlink():
            os.rename(target.with_suffix(""), stale / target.with_suffix("").name)
        fsync_dir(target.parent)
    video_dir = nwb_file.with_suffix("")
    if videos:
        fsync_dir(video_dir)
        os.rename(video_dir, target.with_suffix(""))  # fails if a non-empty folder of that name appeared meanwhile
    try:
        os.link(nwb_file, target)  # unlike rename, never replaces a file that appeared meanwhile
    except FileExistsError:
        if videos:
            os.rename(target.with_suffix(""), video_dir)  # back into staging, which the caller removes
        raise ExportError(f"{target} already exists: remove it (or export into another folder) to export "
                          f"again") from None
    fsync_dir(target.parent)


def _join(folder: Path, rel: str) -> str:
    return (folder / rel).as_posix()
