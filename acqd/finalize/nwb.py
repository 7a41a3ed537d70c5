"""The master NWB file: built from a ``MasterPlan`` with pynwb, and checked read-only. The only pynwb importer.

This module owns everything pynwb and hdmf are asked to do, and the two things they cannot do (the plan it is given
is plain data, ``acqd.finalize.masterplan``; importing this module costs pynwb, hdmf, pandas and scipy, so the
daemon imports it only when it checks metadata or amends: ``python -m acqd.cli serve`` does not):

- ``write_master`` builds the NWB file from a plan (plain dataclasses made by ``acqd.finalize``): session and
  subject metadata, one series per stream under ``/acquisition`` whose ``data`` is a relative HDF5 external
  link (``H5DataIO(dataset, link_data=True)``) — stimulus streams under ``/stimulus`` instead (an IndexSeries
  into an Images container of ``/stimulus/templates``, or an OpticalSeries), attached photos as the Images
  ``/acquisition/attached_images`` —, sync edges as ``EventsTable``s under ``/events``, recorded gaps
  as ``TimeIntervals`` ``/intervals/gaps``, and the clock fits under ``/processing/sync``. Object ids are made
  deterministic (hdmf draws ``uuid4``; we replace them with ``uuid5`` of each object's path) so that the same
  session always gives the same bytes. After pynwb has closed the file, each series gets its ``sync`` group —
  a link to the stream's raw ``/sync`` — with h5py, since pynwb has no API for it.
- ``check_master`` reopens the file read-only (``'r'``: append mode would open the sealed link targets
  read-write and read them as empty), turns hdmf's ``BrokenLinkWarning`` into an error, checks every series'
  length against the committed rows, and runs ``pynwb.validate`` and nwbinspector with the DANDI config on that
  one read.
"""

from __future__ import annotations

import os
import traceback
import uuid
import warnings
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

import h5py
import numpy as np
from hdmf.backends.hdf5 import H5DataIO
from hdmf.backends.warnings import BrokenLinkWarning
from hdmf.common import DynamicTable, VectorData
from hdmf.data_utils import GenericDataChunkIterator
from pynwb import NWBHDF5IO, NWBFile, TimeSeries, validate
from pynwb.base import ProcessingModule
from pynwb.ecephys import ElectricalSeries
from pynwb.epoch import TimeIntervals
from pynwb.event import EventsTable, TimestampVectorData
from pynwb.file import Subject
from pynwb.base import ImageReferences, Images
from pynwb.image import GrayscaleImage, ImageSeries, IndexSeries, OpticalSeries, RGBAImage, RGBImage

from acqd.errors import FinalizeError
from acqd.finalize.masterplan import (AnnotationsPlan, ElectrodesPlan, EventsPlan, ImagePlan, MasterCheck, MasterPlan,
                                      SeriesPlan, TablePlan, Timing, nwbfile_fields)
from acqd.h5lock import written

__all__ = ["check_master", "metadata_problems", "series_lengths", "write_master"]

_OBJECT_ID_NAMESPACE = uuid.UUID("6f1c1a52-3b0e-4d7e-9a55-0a6e8c2f5d11")  # acqd's namespace for uuid5 ids
_TIMESTAMP_CHUNK_ROWS = 1 << 17  # 1 MiB of float64 per chunk
_TIMESTAMP_BUFFER_CHUNKS = 16


# -- writing -----------------------------------------------------------------------------------------------


def write_master(path: Path, plan: MasterPlan) -> None:
    """Write the master NWB file at ``path`` (which must not exist), then link each series' ``sync`` group.

    Every stream file a series links to stays open read-only until pynwb has written the file.
    """
    path = Path(path)
    opened: list[h5py.File] = []
    try:
        nwbfile = _build(plan, opened)
        _fix_object_ids(nwbfile, plan.identifier)
        with warnings.catch_warnings():
            # The file is written as <id>.nwb.partial and renamed once it validates.
            warnings.filterwarnings("ignore", message=r"The file path provided: .* does not end in '\.nwb'")
            with NWBHDF5IO(str(path), "x") as io:
                io.write(nwbfile)
    finally:
        for f in opened:
            f.close()
    with written(path, "r+") as f:  # creating a link never opens its target (it waits for pynwb's lock to go first)
        for s in plan.series:
            f[f"{s.group}/{s.name}/sync"] = h5py.ExternalLink(_rel(s.sync_file, path), "/sync")


def _rel(target: Path, master: Path) -> str:
    """``target`` relative to the master's folder: HDF5 resolves relative link paths against it."""
    return os.path.relpath(os.path.abspath(target), os.path.dirname(os.path.abspath(master)))


def _build(plan: MasterPlan, opened: list[h5py.File]) -> NWBFile:
    nwbfile = NWBFile(
        session_description=plan.session_description, identifier=plan.identifier,
        session_start_time=plan.session_start_time, file_create_date=[plan.file_create_date],
        session_id=plan.session_id, experimenter=list(plan.experimenter) or None, institution=plan.institution,
        lab=plan.lab, experiment_description=plan.experiment_description,
        keywords=list(plan.keywords) or None, notes=plan.notes, **plan.general,
    )
    nwbfile.subject = _subject(plan.subject)
    _electrode_columns(nwbfile, [s.electrodes for s in plan.series if s.kind == "ephys" and s.electrodes])
    for s in plan.series:
        if s.external_files:
            nwbfile.add_acquisition(_external_video(nwbfile, s))
            continue
        f = h5py.File(s.data_file, "r")
        opened.append(f)
        if s.stimulus is not None:
            nwbfile.add_stimulus(_stimulus(nwbfile, s, f["data"]))
            continue
        nwbfile.add_acquisition(_series(nwbfile, s, f["data"]))
    if plan.attachments:
        nwbfile.add_acquisition(_images(ATTACHED_IMAGES, "images attached to the session (acqd attach): the rig, "
                                        "the subject, a craniotomy", plan.attachments))
    for e in plan.events:
        nwbfile.add_events_table(_events(e))
    if plan.annotations is not None:
        nwbfile.add_events_table(_annotations(plan.annotations))
    if plan.gaps is not None:
        nwbfile.add_time_intervals(_intervals(plan.gaps))
    module = ProcessingModule(name="sync", description="clock alignment of every stream to the reference clock: "
                                                       "fits, their quality, and the session timebase")
    for t in plan.sync_tables:
        module.add(_table(t))
    nwbfile.add_processing_module(module)
    return nwbfile


def _subject(subject: dict) -> Subject:
    fields = {k: v for k, v in subject.items() if v not in (None, "")}
    if isinstance(fields.get("date_of_birth"), str):
        fields["date_of_birth"] = datetime.fromisoformat(fields["date_of_birth"])
    return Subject(**fields)


# nwbinspector check -> the SessionMetadata field it judges (for messages that name the field, not the NWB path).
_CHECK_FIELDS = {"check_subject_exists": "subject", "check_subject_id_exists": "subject.subject_id",
                 "check_subject_id_no_slashes": "subject.subject_id", "check_subject_sex": "subject.sex",
                 "check_subject_species_exists": "subject.species", "check_subject_species_form": "subject.species",
                 "check_subject_age": "subject.age", "check_subject_proper_age_range": "subject.age",
                 "check_subject_weight": "subject.weight", "check_session_id_no_slashes": "session_id",
                 "check_session_start_time_future_date": "session_start_time"}


def metadata_problems(meta: dict, session_id: str) -> list[dict]:
    """What finalize's inspection would refuse or flag as a violation in this metadata, found before any data:
    the metadata (SessionMetadata as JSON) is built into an in-memory NWBFile and Subject exactly as
    ``write_master`` builds them, and nwbinspector's checks run on it with the DANDI config at CRITICAL and
    BEST_PRACTICE_VIOLATION (suggestions are not refusals). Each problem: field, check, importance, message."""
    from nwbinspector import Importance, inspect_nwbfile_object, load_config  # imported late: it imports a lot

    try:
        nwbfile = NWBFile(session_description=meta.get("session_description") or session_id, identifier=session_id,
                          session_start_time=datetime.now().astimezone(), session_id=session_id,
                          experimenter=list(meta.get("experimenter") or ()) or None,
                          institution=meta.get("institution"), lab=meta.get("lab"),
                          experiment_description=meta.get("experiment_description"),
                          keywords=list(meta.get("keywords") or ()) or None, **nwbfile_fields(meta))
        nwbfile.subject = _subject(meta.get("subject") or {})
    except Exception as e:  # noqa: BLE001 - pynwb refusing a value is a finding about that value
        return [{"field": "metadata", "check": "pynwb", "importance": "CRITICAL", "message": str(e)}]
    out = []
    for m in inspect_nwbfile_object(nwbfile, config=load_config("dandi"),
                                    importance_threshold=Importance.BEST_PRACTICE_VIOLATION):
        if m.object_type in ("NWBFile", "Subject"):
            out.append({"field": _CHECK_FIELDS.get(m.check_function_name, f"{m.object_type}:{m.location}"),
                        "check": m.check_function_name, "importance": m.importance.name, "message": str(m.message)})
    return sorted(out, key=lambda p: (p["field"], p["check"]))


def _series(nwbfile: NWBFile, s: SeriesPlan, dset: h5py.Dataset) -> TimeSeries:
    if s.kind == "ephys" and s.electrodes is not None:
        device = _device(nwbfile, s.electrodes)
    else:
        device = nwbfile.create_device(name=s.name, description=s.device_description or s.description)
    kwargs: dict = {"name": s.name, "data": H5DataIO(dset, link_data=True), "description": s.description,
                    "comments": s.comments, "conversion": s.conversion, "offset": s.offset, **_timing(s.timing)}
    if s.kind == "ephys":
        return ElectricalSeries(electrodes=_electrodes(nwbfile, s, device), **kwargs)
    if s.kind == "video":
        return ImageSeries(unit=s.unit, device=device, **kwargs)
    return TimeSeries(unit=s.unit, **kwargs)


def _external_video(nwbfile: NWBFile, s: SeriesPlan) -> ImageSeries:
    """A camera whose frames are in video files next to the master: ImageSeries with external_file."""
    device = nwbfile.create_device(name=s.name, description=s.device_description or s.description)
    timing = _timing(s.timing)
    if s.timing.regular:
        timing["num_samples"] = s.timing.rows  # data is empty: the frame count must be given
    return ImageSeries(name=s.name, external_file=list(s.external_files), starting_frame=list(s.starting_frames),
                       format="external", unit=s.unit, device=device, description=s.description, comments=s.comments,
                       conversion=s.conversion, offset=s.offset, **timing)


# -- stimuli and still images (pynwb's image tutorial: Images in stimulus_templates, IndexSeries in stimulus) ----

ATTACHED_IMAGES = "attached_images"
_IMAGE_TYPES = {2: GrayscaleImage, 3: RGBImage, 4: RGBAImage}  # by ndim, and the last axis for colour


def _image(i: ImagePlan):
    kind = _IMAGE_TYPES[2 if i.pixels.ndim == 2 else i.pixels.shape[2]]
    return kind(name=i.name, data=i.pixels, description=i.description,
                resolution=None if i.resolution is None else float(i.resolution))


def _images(name: str, description: str, plans: tuple[ImagePlan, ...]) -> Images:
    """An Images container holding each image once, in order (``order_of_images``)."""
    images = [_image(i) for i in plans]
    return Images(name=name, images=images, description=description,
                  order_of_images=ImageReferences(name="order_of_images", data=images))


def _stimulus(nwbfile: NWBFile, s: SeriesPlan, dset: h5py.Dataset) -> TimeSeries:
    """An IndexSeries (indices copied into the master: IndexSeries data is 1-D uint32) or an OpticalSeries (linked)."""
    stim = s.stimulus
    kwargs: dict = {"name": s.name, "description": s.description, "comments": s.comments, **_timing(s.timing)}
    if not stim.images:
        return OpticalSeries(data=H5DataIO(dset, link_data=True), unit=s.unit, conversion=s.conversion,
                             offset=s.offset, field_of_view=list(stim.field_of_view), distance=float(stim.distance),
                             orientation=stim.orientation, **kwargs)
    indices = np.asarray(dset[:]).reshape(len(dset))
    bad = np.flatnonzero((indices < 0) | (indices >= len(stim.images)))
    if len(bad):
        raise FinalizeError(f"stimulus stream {s.name!r}: {len(bad)} index value(s) outside the {len(stim.images)} "
                            f"registered images (first at row {bad[0]}: {indices[bad[0]]})")
    images = _images(f"{s.name}_images", f"the unique images of stimulus stream {s.name}; {s.name}'s data are "
                     "indices into order_of_images", stim.images)
    nwbfile.add_stimulus_template(images)
    return IndexSeries(data=indices.astype(np.uint32), unit="N/A", indexed_images=images, **kwargs)


def _timing(t: Timing) -> dict:
    if t.regular:
        return {"starting_time": float(t.starting_time), "rate": float(t.rate)}
    return {"timestamps": _Timestamps(t)}


class _Timestamps(GenericDataChunkIterator):
    """Timestamps computed block by block while hdmf writes them, so a long stream never sits in memory."""

    def __init__(self, timing: Timing):
        self._timing = timing
        chunk = max(1, min(_TIMESTAMP_CHUNK_ROWS, timing.rows))
        buffer = min(chunk * _TIMESTAMP_BUFFER_CHUNKS, timing.rows)  # hdmf: a multiple of chunk, or everything
        super().__init__(chunk_shape=(chunk,), buffer_shape=(buffer,))

    def _get_data(self, selection: tuple[slice]) -> np.ndarray:
        a, b, _ = selection[0].indices(self._timing.rows)
        return np.asarray(self._timing.timestamps(a, b), dtype=np.float64)

    def _get_maxshape(self) -> tuple[int, ...]:
        return (self._timing.rows,)

    def _get_dtype(self) -> np.dtype:
        return np.dtype(np.float64)


def _device(nwbfile: NWBFile, e: ElectrodesPlan):
    """The probe as a Device with its serial number, linked to a DeviceModel (maker, model) when they are known."""
    model = None
    if e.model or e.manufacturer:
        name = e.model or f"{e.device_name} model"
        model = nwbfile.device_models.get(name) if nwbfile.device_models else None
        if model is None:
            model = nwbfile.create_device_model(name=name, manufacturer=e.manufacturer or "unknown",
                                                model_number=e.model,
                                                description=f"probe model {name} made by {e.manufacturer or 'unknown'}")
    return nwbfile.create_device(name=e.device_name, description=e.device_description, serial_number=e.serial,
                                 model=model)


def _electrodes(nwbfile: NWBFile, s: SeriesPlan, device):
    """Rows of the electrodes table for every column of ``data`` (acqd.finalize.electrodes says which)."""
    e = s.electrodes
    groups = {name: nwbfile.create_electrode_group(name=name, description=d, location=loc, device=device)
              for name, (d, loc) in e.groups.items()}
    start = len(nwbfile.electrodes) if nwbfile.electrodes is not None else 0
    for r in e.rows:
        nwbfile.add_electrode(group=groups[r.group], location=r.location, channel_name=r.channel_name,
                              stream=s.name, is_electrode=r.is_electrode,
                              **({"rel_x": r.rel_x, "rel_y": r.rel_y, "contact_id": r.contact_id, "shank": r.shank,
                                  "reference": r.reference} if "rel_x" in nwbfile.electrodes.colnames else {}),
                              **({"rel_z": r.rel_z} if "rel_z" in nwbfile.electrodes.colnames else {}))
    return nwbfile.create_electrode_table_region(list(range(start, start + len(e.rows))),
                                                 f"every column of {s.name}'s data, in order")


def _electrode_columns(nwbfile: NWBFile, plans: list[ElectrodesPlan]) -> None:
    """The electrodes table's columns, before any row: positions only when some stream has a probe layout."""
    if not plans:
        return
    nwbfile.add_electrode_column(name="channel_name", description="channel name in the stream's config")
    nwbfile.add_electrode_column(name="stream", description="acqd stream whose data holds this channel")
    nwbfile.add_electrode_column(name="is_electrode", description="False for a digital sync word column")
    if any(p.positions for p in plans):
        nwbfile.add_electrode_column(name="rel_x", description="contact x on the probe (um); NaN: no layout")
        nwbfile.add_electrode_column(name="rel_y", description="contact y on the probe (um, along the shank); NaN: "
                                                               "no layout")
        if any(p.three_d for p in plans):
            nwbfile.add_electrode_column(name="rel_z", description="contact z on the probe (um); NaN: no layout")
        nwbfile.add_electrode_column(name="contact_id", description="contact id in the probe layout (probeinterface)")
        nwbfile.add_electrode_column(name="shank", description="shank id in the probe layout")
        nwbfile.add_electrode_column(name="reference", description="reference of the contact (rig config)")


def _events(e: EventsPlan) -> EventsTable:
    timestamp = TimestampVectorData(name="timestamp", description="time of the rising edge on the session timebase",
                                    data=np.asarray(e.timestamps, dtype=np.float64), resolution=e.resolution)
    sample = VectorData(name="sample", description="the edge's sample index in the recording stream's own counter",
                        data=np.asarray(e.samples, dtype=np.int64))
    more = [VectorData(name=n, description=d, data=_column(v)) for n, (d, v) in e.columns.items()]
    return EventsTable(name=e.name, description=e.description, source_description=e.source_description,
                       columns=[timestamp, sample, *more])


def _annotations(a: AnnotationsPlan) -> EventsTable:
    columns = [
        TimestampVectorData(name="timestamp", description="when the note was taken, on the session timebase",
                            data=np.asarray(a.timestamps, dtype=np.float64), resolution=a.resolution),
        VectorData(name="text", description="the note", data=list(a.texts)),
        VectorData(name="reference_sample", description="the reference stream's sample counter when the note was "
                   "taken (-1: no reference data yet; placed by host time)",
                   data=np.asarray(a.reference_samples, dtype=np.int64)),
        VectorData(name="taken_at", description="host wall-clock time of the note (ISO 8601)", data=list(a.host_times)),
    ]
    return EventsTable(name="annotations", description="operator notes taken during the recording (acqd annotate, "
                       "Open Ephys /api/message)", source_description="acqd control API", columns=columns)


def _intervals(t: TablePlan) -> TimeIntervals:
    table = TimeIntervals(name=t.name, description=t.description)
    for name, (description, _) in t.columns.items():
        if name not in ("start_time", "stop_time"):
            table.add_column(name=name, description=description)
    n = len(next(iter(t.columns.values()))[1])
    for i in range(n):
        table.add_row(**{name: _scalar(values[i]) for name, (_, values) in t.columns.items()})
    return table


def _table(t: TablePlan) -> DynamicTable:
    columns = [VectorData(name=name, description=description, data=_column(values))
               for name, (description, values) in t.columns.items()]
    return DynamicTable(name=t.name, description=t.description, columns=columns)


def _column(values: list | np.ndarray) -> list | np.ndarray:
    return values if isinstance(values, np.ndarray) else [_scalar(v) for v in values]


def _scalar(v: object) -> object:
    return v.item() if isinstance(v, np.generic) else v


def _fix_object_ids(nwbfile: NWBFile, identifier: str) -> None:
    """Give every container an object id derived from the file identifier and its path in the file.

    hdmf assigns ``uuid4`` ids when containers are constructed and offers no way to pass one in (``__new__``
    takes ``object_id`` but ``__init__``'s docval then refuses it), so identical sessions would differ in bytes.
    """
    seen: dict[str, int] = {}
    for obj in nwbfile.all_children():
        parts, node = [], obj
        while node is not None:
            parts.append(f"{type(node).__name__}:{node.name}")
            node = node.parent
        key = "/".join(reversed(parts))
        seen[key] = seen.get(key, 0) + 1
        object_id = str(uuid.uuid5(_OBJECT_ID_NAMESPACE, f"{identifier}|{key}|{seen[key]}"))
        obj._AbstractContainer__object_id = object_id  # hdmf's private slot; see the docstring


# -- reading back ------------------------------------------------------------------------------------------


def check_master(path: Path, expected_rows: dict[str, int]) -> MasterCheck:
    """Read the master back read-only and validate it; never raises for a bad file, reports instead.

    One read serves the row counts, the validation and nwbinspector (each used to read the file again). When the
    namespaces cached in the file are those pynwb has loaded (same names and versions: this process wrote it), the
    file is validated against the loaded ones: parsing the cached ones back cost two thirds of the validation. A
    master written by another version (amended after an upgrade) is validated against its own, as before."""
    out = MasterCheck()
    with ExitStack() as opened:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", BrokenLinkWarning)
                io = opened.enter_context(NWBHDF5IO(str(path), "r"))
                nwbfile = io.read()
                lengths = _lengths(nwbfile)
        except Exception as e:  # noqa: BLE001 - any failure to read is a finding, not a crash
            out.read_errors.append(f"reading {path.name} failed: {type(e).__name__}: {e}")
            return out
        for name, rows in expected_rows.items():
            got = lengths.get(name)
            if got is None:
                out.read_errors.append(f"series {name!r} is missing")
            elif got != (rows, rows):
                out.read_errors.append(f"series {name!r}: data/timestamps have {got} rows, the stream committed {rows}")
        if _cached_are_loaded(io):
            out.validation_errors = [str(e) for e in validate(io=io, use_cached_namespaces=False)]
        else:
            out.validation_errors = [str(e) for e in validate(path=str(path))]
        try:
            out.inspector = _inspect(nwbfile)
        except Exception:  # noqa: BLE001 - a check that raises is a finding (nwbinspector's own inspect_nwbfile's rule)
            out.inspector = [{"importance": "ERROR", "check": "nwbinspector", "location": None, "object": None,
                              "message": traceback.format_exc()}]
    return out


def _cached_are_loaded(io: NWBHDF5IO) -> bool:
    """Whether every namespace cached in the file is loaded in this process at the cached version."""
    catalog = io.manager.namespace_catalog
    cached = io._file.get("specifications", {})  # (hdmf's own validation reads it there too)
    return all(name in catalog.namespaces and list(cached[name].keys()) == [catalog.get_namespace(name).version]
               for name in cached)


def series_lengths(path: Path) -> dict[str, tuple[int, int]]:
    """(rows of data, rows of time) of every series under /acquisition and /stimulus; a broken link raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", BrokenLinkWarning)
        with NWBHDF5IO(str(path), "r") as io:
            return _lengths(io.read())


def _lengths(nwbfile: NWBFile) -> dict[str, tuple[int, int]]:
    out = {}
    for name, ts in {**nwbfile.acquisition, **nwbfile.stimulus}.items():
        if not isinstance(ts, TimeSeries):  # the attached images
            continue
        n = len(ts.data)
        if getattr(ts, "external_file", None) is not None:  # frames are in video files
            n = ts.num_samples if ts.timestamps is None else len(ts.timestamps)
        out[name] = (n, len(ts.timestamps) if ts.timestamps is not None else n)
    return out


def _inspect(nwbfile: NWBFile) -> list[dict]:
    from nwbinspector import inspect_nwbfile_object, load_config  # imported late: it imports a lot

    out = []
    # check_file_extension: the file is checked as <id>.nwb.partial and renamed to <id>.nwb only afterwards.
    for m in inspect_nwbfile_object(nwbfile, config=load_config("dandi"), ignore=["check_file_extension"]):
        if m is None:
            continue
        out.append({"importance": m.importance.name, "check": m.check_function_name,
                    "location": m.location, "object": m.object_name, "message": str(m.message)})
    return sorted(out, key=lambda m: (m["importance"], m["check"], str(m["location"])))
