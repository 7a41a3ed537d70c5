"""The plan of the master NWB file as plain data: what ``acqd.finalize.nwb`` writes, without pynwb.

Frozen dataclasses computed by ``acqd.finalize`` (``plan``, ``timing``, ``lsl``, ``electrodes``) and handed to
``nwb.write_master``, the read-back verdict ``MasterCheck``, and which metadata fields pass unchanged into the
NWBFile (``GENERAL_FIELDS``). They live apart from ``nwb`` so that what only needs the plan or the field names
(``amend`` in the daemon, which checks metadata at RECORD) does not import pynwb, hdmf, pandas and scipy at start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

__all__ = ["GENERAL_FIELDS", "AnnotationsPlan", "ElectrodeRow", "ElectrodesPlan", "EventsPlan", "ImagePlan",
           "MasterCheck", "MasterPlan", "SeriesPlan", "StimulusPlan", "TablePlan", "Timing", "nwbfile_fields"]


@dataclass(frozen=True, slots=True)
class Timing:
    """How a series is placed on the session timebase: a start and a rate, or one timestamp per row."""

    rows: int
    starting_time: float | None = None
    """Seconds of row 0 (regular sampling only)."""
    rate: float | None = None
    """Rows per second of the session timebase, float64 (regular sampling only)."""
    timestamps: Callable[[int, int], np.ndarray] | None = None
    """Seconds of rows [a, b), float64; computed block by block while the file is written."""

    @property
    def regular(self) -> bool:
        return self.timestamps is None


@dataclass(frozen=True, slots=True)
class ElectrodeRow:
    """One column of an ephys stream's data as a row of the electrodes table (positions in um, on the probe)."""

    channel_name: str
    group: str
    location: str
    is_electrode: bool
    rel_x: float = float("nan")
    rel_y: float = float("nan")
    rel_z: float = float("nan")
    contact_id: str = ""
    shank: str = ""
    reference: str = ""


@dataclass(frozen=True, slots=True)
class ElectrodesPlan:
    """An ephys stream's device, electrode groups ``{name: (description, location)}`` and one row per column."""

    device_name: str
    device_description: str
    manufacturer: str | None
    model: str | None
    serial: str | None
    groups: dict[str, tuple[str, str]]
    rows: list[ElectrodeRow]
    positions: bool
    """The stream has a probe layout (rel_x, rel_y, contact_id, shank, reference are known)."""
    three_d: bool = False


@dataclass(frozen=True, slots=True)
class ImagePlan:
    """One still image written into the master: GrayscaleImage, RGBImage or RGBAImage by its shape."""

    name: str
    pixels: np.ndarray
    """(h, w), (h, w, 3) or (h, w, 4)."""
    description: str
    resolution: float | None = None
    """Pixels per cm, when known."""


@dataclass(frozen=True, slots=True)
class StimulusPlan:
    """A stimulus stream under /stimulus/presentation: an IndexSeries into ``images``, or an OpticalSeries."""

    images: tuple[ImagePlan, ...] = ()
    """The unique images, index i = images[i]; empty: the stream's rows are the frames (OpticalSeries)."""
    field_of_view: tuple[float, ...] | None = None
    distance: float | None = None
    orientation: str | None = None


@dataclass(frozen=True, slots=True)
class SeriesPlan:
    """One stream as one series under /acquisition."""

    name: str
    kind: str
    """Stream kind: 'ephys' -> ElectricalSeries, 'video' -> ImageSeries, else TimeSeries."""
    data_file: Path | None
    """The HDF5 file holding the dataset to link (a stream file, a recovered copy, or a VDS over parts); None for a
    camera whose frames are in external video files."""
    sync_file: Path
    """The HDF5 file whose ``/sync`` group holds this stream's raw sync record."""
    unit: str
    conversion: float
    offset: float
    description: str
    comments: str
    timing: Timing
    channel_names: tuple[str, ...] = ()
    sync_channels: tuple[int, ...] = ()
    """Columns of ``data`` that carry digital words, not signals (ephys: not electrodes)."""
    device_description: str = ""
    external_files: tuple[str, ...] = ()
    """Video files holding the frames, relative to the master's folder (ImageSeries external_file)."""
    starting_frames: tuple[int, ...] = ()
    """Index in the series of each external file's first frame."""
    electrodes: ElectrodesPlan | None = None
    """Ephys: the device and electrodes table rows (acqd.finalize.electrodes)."""
    stimulus: StimulusPlan | None = None
    """A stimulus stream: written under /stimulus/presentation instead of /acquisition."""

    @property
    def group(self) -> str:
        """Where the series is in the file."""
        return "acquisition" if self.stimulus is None else "stimulus/presentation"


@dataclass(frozen=True, slots=True)
class EventsPlan:
    """One digital line's rising edges seen by one stream, as an EventsTable under /events."""

    name: str
    description: str
    source_description: str
    timestamps: np.ndarray
    samples: np.ndarray
    """The raw device sample index of each edge (the stream's own counter)."""
    resolution: float
    columns: dict[str, tuple[str, list | np.ndarray]] = field(default_factory=dict)
    """More columns ``{name: (description, values)}`` (LSL markers: label, lsl_timestamp)."""


@dataclass(frozen=True, slots=True)
class AnnotationsPlan:
    """Operator notes as the EventsTable /events/annotations, on the session timebase."""

    timestamps: np.ndarray
    texts: list[str]
    reference_samples: np.ndarray
    """The reference stream's sample counter at each note (-1: placed by host time)."""
    host_times: list[str]
    """When each note was taken (ISO 8601, host clock)."""
    resolution: float


@dataclass(frozen=True, slots=True)
class TablePlan:
    """A DynamicTable: name, description and columns ``{name: (description, values)}``."""

    name: str
    description: str
    columns: dict[str, tuple[str, list | np.ndarray]]


@dataclass(frozen=True, slots=True)
class MasterPlan:
    """Everything the master file holds, already computed."""

    identifier: str
    session_id: str
    session_description: str
    session_start_time: datetime
    file_create_date: datetime
    subject: dict
    notes: str
    series: list[SeriesPlan]
    events: list[EventsPlan]
    gaps: TablePlan | None
    """Columns start_time, stop_time and more, for /intervals/gaps; None when nothing is missing."""
    sync_tables: list[TablePlan]
    """Tables under /processing/sync (clock fits, timebase, frame reconciliation)."""
    experimenter: tuple[str, ...] = ()
    institution: str | None = None
    lab: str | None = None
    experiment_description: str | None = None
    keywords: tuple[str, ...] = ()
    annotations: AnnotationsPlan | None = None
    """/events/annotations; None when the session has no notes."""
    general: dict = field(default_factory=dict)
    """More NWBFile fields from the metadata (``nwbfile_fields``: related_publications, protocol, surgery ...)."""
    attachments: tuple[ImagePlan, ...] = ()
    """Photos attached to the session (acqd attach): an Images container /acquisition/attached_images."""


@dataclass
class MasterCheck:
    """What reading the master back found. ``ok`` means: no read error, no schema error, nothing critical."""

    read_errors: list[str] = field(default_factory=list)
    validation_errors: list[str] = field(default_factory=list)
    inspector: list[dict] = field(default_factory=list)
    """nwbinspector messages: importance, check, location, message."""

    @property
    def blocking(self) -> list[str]:
        bad = {"ERROR", "PYNWB_VALIDATION", "CRITICAL"}
        return [*self.read_errors, *self.validation_errors,
                *(f"{m['importance']}: {m['check']} at {m['location']}: {m['message']}" for m in self.inspector
                  if m["importance"] in bad)]

    @property
    def ok(self) -> bool:
        return not self.blocking

    def to_dict(self) -> dict:
        return {"ok": self.ok, "read_errors": self.read_errors, "validation_errors": self.validation_errors,
                "inspector": self.inspector}


GENERAL_FIELDS = {"related_publications": "related_publications", "protocol": "protocol", "surgery": "surgery",
                  "pharmacology": "pharmacology", "virus": "virus", "stimulus_notes": "stimulus",
                  "data_collection": "data_collection"}
"""SessionMetadata field -> NWBFile argument, for the /general fields acqd passes through unchanged."""


def nwbfile_fields(meta: dict) -> dict:
    """The NWBFile arguments of ``GENERAL_FIELDS`` that ``meta`` (SessionMetadata as JSON) sets."""
    return {arg: (list(meta[k]) if isinstance(meta[k], (list, tuple)) else meta[k])
            for k, arg in GENERAL_FIELDS.items() if meta.get(k)}
