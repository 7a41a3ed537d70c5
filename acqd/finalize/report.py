"""What a finalize run reports: to its caller, and in the session's QC report.

This module owns ``FinalizeReport`` and ``StreamReport`` (returned by ``finalize_session``, rendered by the
CLI, streamed by the API), the ``qc/qc.json`` summary made from them (which a rerun on a finalized session
reads back), and the per-stream plot data handed to ``acqd.finalize.qc``, which writes both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from acqd.finalize import qc
from acqd.finalize.layout import MANIFEST, QC_DIR
from acqd.finalize.streams import Stream
from acqd.finalize.timing import Alignment, edge_segments, to_reference

QC_SUMMARY = f"{QC_DIR}/qc.json"


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
    lsl: dict | None = None
    """LSL streams: time-correction residuals, host-clock bound and timestamp jitter (docs/lsl.md)."""


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
    qc: str = QC_SUMMARY
    warnings: list[str] = field(default_factory=list)
    integrity: dict = field(default_factory=dict)
    """``integrity.Integrity.to_dict()``: chunks checked against their checksums, the corrupt ones, parts without."""
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def qc_summary(report: FinalizeReport) -> dict:
    """The content of ``qc/qc.json``; ``finalize_session`` rebuilds an already-finalized session's report from it."""
    return {"session_id": report.session_id, "master": report.master, "timebase": report.timebase,
            "streams": {n: asdict(r) for n, r in report.streams.items()}, "validation": report.check,
            "warnings": report.warnings, "integrity": report.integrity}


def qc_plot(s: Stream, a: Alignment, zero_s: float, report: StreamReport) -> qc.StreamPlot:
    """One stream's QC panels: fit residuals, offset from the nominal rate, gaps, arrival rate."""
    fit = a.fit
    pair_t = res = np.empty(0)
    if a.pairs is not None and len(a.pairs[0]):
        pos, ref_s = a.pairs
        segs = np.zeros(len(pos), dtype=np.int64) if fit.segments == 1 else edge_segments(pos)
        pred = to_reference(fit, pos, segs)
        pair_t, res = pred - zero_s, ref_s - pred
    step = max(1, len(s.index) // 2000)  # at most ~2000 points a panel: the PNG stays small and fast to draw
    chunk = s.index[::step]
    x = chunk["first_sample"].astype(np.float64)
    seg = s.segment[::step]
    t = to_reference(fit, x, seg) - zero_s
    nominal = t[0] + (x - x[0]) / s.rate  # where the chunks would be if the device ran at its nominal rate
    host_s = (s.index["host_mono_ns"] - s.index["host_mono_ns"][0]) / 1e9
    return qc.StreamPlot(name=s.name, pair_time_s=pair_t, residual_s=res, time_s=t,
                         offset_vs_nominal_s=np.where(seg == 0, t - nominal, np.nan),
                         gaps=[(g["start_time"], g["stop_time"]) for g in report.gaps],
                         receive_time_s=host_s, receive_samples=s.index["n_samples"].astype(np.int64),
                         nominal_rate=s.rate, title=f"{s.name}: {fit.source} / {fit.model}, drift "
                         f"{fit.drift_ppm:+.2f} ppm, bound {fit.error_bound_s * 1e6:.1f} us")
