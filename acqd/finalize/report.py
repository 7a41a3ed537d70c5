"""What a finalize run reports: to its caller, and in the session's QC report.

This module owns ``FinalizeReport`` and ``StreamReport`` (returned by ``finalize_session``, rendered by the
CLI, streamed by the API), the ``qc/qc.json`` summary made from them (which a rerun on a finalized session
reads back), and the per-stream plot data handed to ``acqd.finalize.qc``, which writes both.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

import numpy as np

from acqd.config import QcConfig
from acqd.finalize import qc
from acqd.finalize.clock import envelope_residuals
from acqd.finalize.layout import MANIFEST, QC_DIR
from acqd.finalize.streams import Stream
from acqd.record.ingest import Reject
from acqd.record.streamfile import open_for_read

if TYPE_CHECKING:  # timing imports nwb (pynwb): not at import time, so the hasher and the scrub start fast
    from acqd.finalize.timing import Alignment

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"

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
    """``ClockFit.to_dict()``, plus 'extrapolated_rows': rows beyond the fit's end knots (extrapolated)."""
    flags: list[str]
    """Anything an analyst must know about this stream's timing (host-time fallback, failed sync fit...)."""
    gaps: list[dict]
    frames: dict | None = None
    """Cameras: frame / strobe reconciliation."""
    video: dict | None = None
    """Cameras encoded to video: the files (relative to the session folder) and each one's starting frame."""
    lsl: dict | None = None
    """LSL streams: time-correction residuals, host-clock bound and timestamp jitter (docs/lsl.md)."""
    qc: dict | None = None
    """The QC row (``stream_qc``): verdict and why, timing source, pairs, drift, residual vs bound, gaps,
    rejects by reason, writer restarts, disconnects, dropped frames, live sync losses."""
    node: str | None = None
    """The PC that recorded the stream, when another node of a multi-PC session did (acqd.finalize.nodes)."""


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
    session_log: dict = field(default_factory=dict)
    """``session.summarise_log``: what the daemon logged while the session recorded, in numbers."""
    trusted_from_recording: list[str] = field(default_factory=list)
    """Files (relative paths) whose sha256, and for parts whose chunk checks, finalize took from ``digests.jsonl``
    (read by the hasher while recording) without reading them again: the scrub after the seal re-reads them."""
    nodes: dict = field(default_factory=dict)
    """A multi-PC session: every node (this one included) with its state (leader, arrived, missing, unverified,
    unusable), verdict, streams and the problem (acqd.finalize.nodes); empty on a one-PC session."""
    verification: str = "pending"
    """``acqd.finalize.scrub.verification``: 'pending' until the scrub has read every sealed byte, then
    'verified' or 'failed'."""
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def qc_summary(report: FinalizeReport, limits: QcConfig = QcConfig()) -> dict:
    """The content of ``qc/qc.json``; ``finalize_session`` rebuilds an already-finalized session's report from it."""
    return {"session_id": report.session_id, "master": report.master, "timebase": report.timebase,
            "streams": {n: asdict(r) for n, r in report.streams.items()}, "validation": report.check,
            "warnings": report.warnings, "integrity": report.integrity, "session_log": report.session_log,
            "trusted_from_recording": report.trusted_from_recording, "nodes": report.nodes,
            "verdict": session_verdict(report.streams, report.nodes),
            "thresholds": limits.model_dump()}


def session_verdict(streams: dict[str, StreamReport], nodes: dict | None = None) -> str:
    """The worst stream verdict, or node verdict (a node of a multi-PC session that never arrived: WARN)."""
    verdicts = {(r.qc or {}).get("verdict", PASS) for r in streams.values()}
    verdicts |= {n.get("verdict", PASS) for n in (nodes or {}).values()}
    return FAIL if FAIL in verdicts else WARN if WARN in verdicts else PASS


def stream_qc(s: Stream, r: StreamReport, incidents: list[dict], limits: QcConfig, zero_s: float = 0.0) -> dict:
    """One stream's QC row and its verdict: FAIL when its clock is off the thresholds (residual, drift), WARN
    when anything an analyst must know happened (host timing, lost data, rejects, restarts, edge gaps, flags).
    ``zero_s``: the reference seconds of session time zero (edge gaps are listed in session time)."""
    c = r.clock
    edge_gaps = [{"start_time": g["reference_from_s"] - zero_s, "stop_time": g["reference_to_s"] - zero_s,
                  "seconds": g["seconds"], "bound_samples": g["bound_s"] * s.rate} for g in c.get("edge_gaps", [])]
    mine = [i for i in incidents if i.get("stream") == s.name]
    row = {
        "source": c["source"], "model": c["model"], "pairing": c.get("pairing", ""), "pairs": c["n_pairs"],
        "rejected_pairs": c.get("rejected_pairs", 0), "drift_ppm": c["drift_ppm"],
        "residual_max_samples": c["residual_max_samples"], "error_bound_samples": c["error_bound_samples"],
        "host_segments": c.get("host_segments", []), "gaps": len(r.gaps),
        "gap_seconds": float(sum(g["stop_time"] - g["start_time"] for g in r.gaps)),
        "gaps_by_reason": dict(Counter(g.get("reason", "unknown") for g in r.gaps)),
        "rejects": rejects_by_reason(s), "writer_restarts": sum(i["kind"] == "writer_died" for i in mine),
        "disconnects": sum(i["kind"] == "disconnected" for i in mine),
        "sync_losses": sum(i["kind"] == "sync_lost" for i in mine),  # the live sync lock (acqd.service.synclock)
        "dropped_frames": (r.frames or {}).get("dropped", 0), "edge_gaps": edge_gaps,
    }
    fails, warns = [], []
    timed_by_edges = c["source"] in ("sync", "strobe")
    if timed_by_edges and c["residual_max_samples"] > limits.max_residual_samples:
        fails.append(f"residual {c['residual_max_samples']:.2f} > {limits.max_residual_samples:g} samples")
    if c["source"] != "reference" and abs(c["drift_ppm"]) > limits.max_drift_ppm:
        unsure = c.get("drift_uncertainty_ppm", 0.0)
        if unsure is None or abs(c["drift_ppm"]) - unsure <= limits.max_drift_ppm:  # None: inf in qc.json
            warns.append(f"too short to verify: drift {c['drift_ppm']:+.1f} ppm beyond +-{limits.max_drift_ppm:g} "
                         f"but measured over {c.get('span_s', 0.0):.1f} s of {c['source']} timing, good to "
                         f"+-{unsure if unsure is not None else float('inf'):.0f} ppm")
        else:
            fails.append(f"drift {c['drift_ppm']:+.1f} ppm beyond +-{limits.max_drift_ppm:g}")
    if c["source"] == "host":
        warns.append(f"timed by host receive times (bound {c['error_bound_s'] * 1e3:.2f} ms)")
    bounds = c.get("segment_bounds_s") or []
    for k in row["host_segments"]:  # the edge-timed segments are judged above; these only by their bound
        bound = bounds[k] if k < len(bounds) else c["error_bound_s"]
        warns.append(f"counter segment {k} timed by host receive times (bound {bound * 1e3:.2f} ms, "
                     f"{bound * s.rate:.0f} samples)")
    for key, what in (("gaps", "gaps"), ("writer_restarts", "writer restarts"), ("disconnects", "disconnects"),
                      ("dropped_frames", "dropped frames"), ("sync_losses", "live sync losses")):
        if row[key]:
            by_reason = ", ".join(f"{n} {why}" for why, n in row["gaps_by_reason"].items()) if key == "gaps" else ""
            warns.append(f"{row[key]} {what}" + (f" ({by_reason})" if by_reason else ""))
    for g in edge_gaps:  # the sync line carried no edge (cable out): the map interpolates, its bound grows
        warns.append(f"no sync edges for {g['seconds']:.1f} s from session time {g['start_time']:.1f} s (bound "
                     f"there {g['bound_samples']:.2f} samples)")
    if row["rejects"]:
        warns.append(f"{sum(row['rejects'].values())} messages rejected")
    if r.flags and not warns:
        warns.append("flagged")
    row["verdict"] = FAIL if fails else WARN if warns else PASS
    row["reasons"] = fails + warns
    return row


def incident_times(incidents: list[dict], start: datetime) -> list[tuple[float, str | None, str]]:
    """(session time, stream or None, kind) of each incident in ``session.json`` (wall clock, ms accuracy)."""
    out = []
    for i in incidents:
        try:
            t = (datetime.fromisoformat(i["time"]) - start).total_seconds()
        except (KeyError, TypeError, ValueError):
            continue
        out.append((t, i.get("stream"), str(i.get("kind", ""))))
    return out


def rejects_by_reason(s: Stream) -> dict[str, int]:
    """Messages the writers rejected, by reason, from the stream files' ``rejects`` tables (every part)."""
    out: dict[str, int] = {}
    for part in s.parts:
        with open_for_read(part.path) as f:
            reasons = f["rejects"]["reason"][:] if "rejects" in f else np.empty(0)
        for code, n in zip(*np.unique(reasons, return_counts=True)):
            name = Reject(int(code)).name.lower() if int(code) in Reject._value2member_map_ else f"code {code}"
            out[name] = out.get(name, 0) + int(n)
    return dict(sorted(out.items()))


def qc_plot(s: Stream, a: Alignment, zero_s: float, report: StreamReport, incidents: list[tuple[float, str]],
            limits: QcConfig = QcConfig()) -> qc.StreamPlot:
    """One stream's QC panels: fit residuals (sync pairs, or host receive latency), offset from the nominal rate,
    the timeline (gaps, incidents), arrival rate, and for cameras the frame intervals and dropped frames."""
    from acqd.finalize.timing import edge_segments, to_reference

    fit = a.fit
    pair_t = res = np.empty(0)
    if fit.source == "host":  # the host pairs: each chunk's receive time above the fitted envelope
        x = s.chunk_end.astype(np.float64)
        host_s = s.index["host_mono_ns"] / 1e9
        res = np.concatenate([envelope_residuals(x[m], host_s[m]) for m in
                              (s.segment == k for k in range(s.n_segments))])
        pair_t = to_reference(fit, x, s.segment) - zero_s
    elif a.pairs is not None and len(a.pairs[0]):
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
    frame_t = dropped_t = np.empty(0)
    if s.cfg.kind == "video" and s.rows >= 2:
        frames, fseg = s.row_samples(0, s.rows)
        frame_t = to_reference(fit, frames.astype(np.float64), fseg) - zero_s
        jump = np.flatnonzero(np.diff(frames) > 1) + 1
        dropped_t = frame_t[jump]
    q = report.qc or {}
    if fit.source == "reference":
        title = f"{s.name}: reference clock (the timebase, exact by definition)"
    elif fit.source == "host":
        title = f"{s.name}: HOST-TIMED (receive times), bound {fit.error_bound_s * 1e3:.2f} ms"
    else:
        title = (f"{s.name}: {fit.source} / {fit.model}, {fit.n_pairs} pairs, drift {fit.drift_ppm:+.2f} ppm, "
                 f"residual max {fit.residual_max_samples:.2f} / bound {fit.error_bound_samples:.2f} samples")
    return qc.StreamPlot(name=s.name, pair_time_s=pair_t, residual_s=res, time_s=t,
                         offset_vs_nominal_s=np.where(seg == 0, t - nominal, np.nan),
                         gaps=[(g["start_time"], g["stop_time"], g["kind"]) for g in report.gaps],
                         receive_time_s=host_s, receive_samples=s.index["n_samples"].astype(np.int64),
                         nominal_rate=s.rate, title=f"{q.get('verdict', '')} {title}".strip(), source=fit.source,
                         residual_limit_s=limits.max_residual_samples / s.rate, bound_s=fit.error_bound_s,
                         incidents=incidents, frame_time_s=frame_t, dropped_frame_time_s=dropped_t)
