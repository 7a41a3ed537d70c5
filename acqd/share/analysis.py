"""Analysis NWB files beside sealed sessions: link the raw data, add processed results and scratch, never copy.

This module owns the analyst's side of a finalized session (docs/analysis.md). A finalized session is sealed
(read-only, immutable, covered by ``manifest.sha256``), so processed results go into a separate NWB file that
*links* the session's raw data instead of copying it: pynwb's "copy and link" workflow (``NWBFile.copy()``
written with the master's ``BuildManager``, so every container of the master is written as an HDF5 external
link, relative to the analysis file's folder), made safe for sealed sessions:

- ``new_analysis(session_dir, path)`` opens the master read-only (``'r'``: append mode would open the sealed
  link targets read-write and pynwb would then read them as empty), yields the linked copy to which the caller
  adds processing modules and scratch data, then writes it under a temporary name beside ``path``, checks that
  every link resolves and that the raw series are links (never copies), and only then gives it its name. The
  analysis file must live outside the session folder: any file added there fails the manifest check (and a
  re-run of ``acqd finalize``), which is how a sealed session proves it is untouched.
- ``open_analysis(path)`` reads an analysis file back read-only, after checking every external link it reaches
  (through the master down to the stream files and the sources of virtual datasets) resolves; hdmf's
  ``BrokenLinkWarning`` (a missing target otherwise reads as empty data) is an error.
- ``external_links(path)`` lists those links, resolved or not.

Links are relative, so the analysis file keeps working when it is moved together with the session (e.g. a
data root holding both ``<session>/`` and ``analysis/<session>/``), from any working directory.
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401 - stream files may be compressed with its filters
from hdmf.backends.warnings import BrokenLinkWarning
from pynwb import NWBHDF5IO, NWBFile

from acqd.errors import AnalysisError
from acqd.h5lock import wait_unlocked
from acqd.session import FINALIZED, read_session

__all__ = ["AnalysisError", "Link", "external_links", "new_analysis", "open_analysis"]


@dataclass(frozen=True, slots=True)
class Link:
    """One HDF5 external link (or virtual dataset source) reachable from an analysis file."""

    where: str
    """Path of the link, as reached from the analysis file (through the links before it)."""
    holder: str
    """The file that holds the link (its relative ``file`` is resolved against this file's folder)."""
    file: str
    """The target file as stored in the link: relative for everything acqd writes."""
    target: str
    """The object inside the target file."""
    resolved: bool
    """Whether the target opens; an unresolved link would read as empty data (or fill values)."""


@contextmanager
def new_analysis(session_dir: Path, path: Path, *, identifier: str | None = None) -> Iterator[NWBFile]:
    """Create the analysis file ``path`` linking the raw data of the finalized session in ``session_dir``.

    Yields an ``NWBFile`` holding every container of the session's master as a link (``acquisition``,
    ``events``, ``intervals``, ``processing['sync']``, devices, electrodes, subject): add processing modules
    (``create_processing_module``) and scratch data (``add_scratch``), read the raw data through it (read-only).
    On leaving the block the file is written, checked and named ``path``; if the block raises, nothing is written.
    ``identifier`` defaults to a new uuid4 (each NWB file needs its own; the master's stays the master's).
    """
    session_dir = Path(session_dir).resolve()
    path = Path(os.path.abspath(path))
    master = _finalized_master(session_dir)
    if session_dir == path or session_dir in path.parents:
        raise AnalysisError(
            f"{path}: an analysis file cannot live inside the sealed session {session_dir}: any added file fails "
            f"its manifest check. Put it beside the session, e.g. {session_dir.parent / 'analysis' / session_dir.name}")
    if path.suffix != ".nwb":
        raise AnalysisError(f"{path}: an NWB file's name must end in .nwb")
    if path.exists() or path.is_symlink():
        raise AnalysisError(f"{path} already exists: analysis files are never overwritten")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial.nwb")  # same folder: the relative links stay valid on rename
    partial.unlink(missing_ok=True)  # left by a killed run
    with warnings.catch_warnings():
        warnings.simplefilter("error", BrokenLinkWarning)
        raw_io = NWBHDF5IO(str(master), "r")
        try:
            raw = raw_io.read()
        except BaseException:
            raw_io.close()
            raise
    try:
        analysis = raw.copy()  # pynwb's shallow copy: the master's containers, written below as links to them
        # NWBFile.copy keeps the master's identifier and creation date; this is another file, made now.
        analysis.fields["identifier"] = identifier or str(uuid.uuid4())
        analysis.fields["file_create_date"] = [datetime.now(timezone.utc)]
        yield analysis
        try:
            with NWBHDF5IO(str(partial), "x", manager=raw_io.manager) as io:  # the master's manager: links
                io.write(analysis)
            wait_unlocked(partial)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    finally:
        raw_io.close()
    try:
        _check_new(partial, master)
        os.link(partial, path)  # never replaces a file that appeared meanwhile
    except FileExistsError:
        raise AnalysisError(f"{path} already exists: analysis files are never overwritten") from None
    finally:
        partial.unlink(missing_ok=True)


def _finalized_master(session_dir: Path) -> Path:
    session = read_session(session_dir)
    sid = session.get("session_id") or session_dir.name
    if session.get("state") != FINALIZED:
        raise AnalysisError(f"{session_dir}: session {sid!r} is {session.get('state')!r}, not finalized: "
                            f"run `acqd finalize {session_dir}` first")
    master = session_dir / session.get("finalize", {}).get("master", f"{sid}.nwb")
    if not master.is_file():
        raise AnalysisError(f"{master}: the master NWB file is missing")
    return master


def _check_new(path: Path, master: Path) -> None:
    """Every link resolves, and every raw series is a relative link to the master (never a copy)."""
    broken = [f"{link.where} -> {link.file}:{link.target}" for link in external_links(path) if not link.resolved]
    if broken:
        raise AnalysisError(f"{path.name}: links that do not resolve: {broken}")
    with h5py.File(path, "r") as f, h5py.File(master, "r") as m:
        for name in m["acquisition"]:
            link = f["acquisition"].get(name, getlink=True)
            if not isinstance(link, h5py.ExternalLink) or os.path.isabs(link.filename):
                raise AnalysisError(f"{path.name}: acquisition/{name} is not a relative link to the master: "
                                    f"{link!r}")


@contextmanager
def open_analysis(path: Path) -> Iterator[NWBFile]:
    """Read an analysis file (or any NWB file with external links) read-only, every link resolved.

    Raises ``AnalysisError`` naming each link that does not resolve (a moved session, a missing stream file or
    virtual dataset source): read as is, those would silently be empty data.
    """
    path = Path(path)
    broken = [f"{link.where} -> {link.file}:{link.target} (in {link.holder})"
              for link in external_links(path) if not link.resolved]
    if broken:
        raise AnalysisError(f"{path}: {len(broken)} link(s) do not resolve, the data they lead to would read as "
                            f"empty: " + "; ".join(broken))
    with warnings.catch_warnings():
        warnings.simplefilter("error", BrokenLinkWarning)
        io = NWBHDF5IO(str(path), "r")  # 'r': append mode would open the sealed targets read-write
        try:
            nwbfile = io.read()
        except BaseException:
            io.close()
            raise
    try:
        yield nwbfile
    finally:
        io.close()


def external_links(path: Path) -> list[Link]:
    """Every external link reachable from ``path`` — through linked groups into the files they point to — and
    every source of a virtual dataset reached, each with whether it resolves."""
    out: list[Link] = []
    with h5py.File(path, "r") as f:  # link targets open with the parent's (read-only) access
        _walk(f, "", out, set())
    return out


def _walk(group: h5py.Group, prefix: str, out: list[Link], seen: set[tuple[str, str]]) -> None:
    links: list[tuple[str, h5py.HardLink | h5py.SoftLink | h5py.ExternalLink]] = []
    group.visititems_links(lambda name, link: links.append((name, link)))  # visititems would skip external links
    holder = os.path.normpath(group.file.filename)
    for name, link in links:
        where = f"{prefix}/{name}"
        if isinstance(link, h5py.SoftLink):
            continue  # inside the same file: the object it names is visited where it lives
        try:
            obj = group[name]
        except (KeyError, OSError):
            obj = None
        if isinstance(link, h5py.ExternalLink):
            out.append(Link(where, holder, link.filename, link.path, obj is not None))
            key = (os.path.abspath(obj.file.filename), obj.name) if obj is not None else None
            if isinstance(obj, h5py.Group) and key not in seen:
                seen.add(key)
                _walk(obj, where, out, seen)
        if isinstance(obj, h5py.Dataset) and obj.is_virtual:
            out += _virtual_sources(obj, where)


def _virtual_sources(dset: h5py.Dataset, where: str) -> list[Link]:
    """A virtual dataset whose source file is missing reads as fill values, silently: check each source exists.

    Relative source paths resolve against the folder of the file holding the virtual dataset."""
    base = os.path.dirname(os.path.abspath(dset.file.filename))
    out = []
    for src in dset.virtual_sources():
        file = src.file_name
        exists = file == "." or os.path.isfile(os.path.join(base, file))
        out.append(Link(where, os.path.normpath(dset.file.filename), file, src.dset_name, exists))
    return out
