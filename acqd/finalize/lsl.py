"""LSL streams on the session timebase: their per-sample timestamps, through the host clock, to reference seconds.

This module owns how finalize times a stream recorded from a Lab Streaming Layer outlet without a sync line
(docs/lsl.md "Timing"). Each row carries the outlet's LSL timestamp (``/timestamps``); the bridge stored the
inlet's time_correction() with the host's CLOCK_MONOTONIC in ``/sync/offsets``. A line fitted through those
offsets maps each timestamp to this host's clock (LabRecorder's and pyxdf's method), and the reference stream's
host receive times map the host clock to reference seconds (``acqd.finalize.clock.fit_host_clock``). The result
is a ``ClockFit`` with a knot at every row, so every row keeps its own timestamp (no dejittering).
Marker and irregular streams become an events table (``events_plan``) instead of a series. An LSL stream that
also records a sync line is aligned by its TTL edges like any other stream, not here.
"""

from __future__ import annotations

import numpy as np

from acqd.config import StreamConfig
from acqd.errors import FinalizeError
from acqd.finalize.masterplan import EventsPlan
from acqd.finalize.clock import ClockFit, fit_host_clock
from acqd.finalize.streams import Stream
from acqd.record.streamfile import NO_TIMESTAMP, open_for_read
from acqd.wire.lsl import decode_strings

SOURCE = "lsl"
FASTEST_DELIVERY_S = 1e-3
"""How late the reference's fastest delivery may still be: its host receive times place the host clock on the
reference only up to that latency, which no host-time method observes. ZeroMQ on one host delivered the fastest of a
few hundred messages 0.38 ms after its true time (issue 24); 1 ms allows a loaded machine. Part of the bound."""


def is_lsl_timed(cfg: StreamConfig) -> bool:
    """An LSL stream without a sync line: timed by its LSL timestamps."""
    return cfg.lsl is not None and cfg.sync is None


def is_events(cfg: StreamConfig) -> bool:
    """Marker (string) and irregular LSL streams are events, not a series."""
    return cfg.lsl is not None and (cfg.dtype == "|u1" or cfg.lsl_rate == 0)


def read_timing(s: Stream) -> tuple[np.ndarray, np.ndarray]:
    """(LSL timestamp in ns of every committed row, the clock offsets recorded) over all parts."""
    ts, offsets = [], []
    for p in s.parts:
        with open_for_read(p.link) as f:
            t = f["timestamps"][:p.rows] if "timestamps" in f else np.empty(0, np.int64)
            ts.append(t)
            if "sync/offsets" in f:
                offsets.append(f["sync/offsets"][:])
        if len(t) < p.rows or np.any(t == NO_TIMESTAMP):
            raise FinalizeError(f"stream {s.name!r}: {p.path.name} has rows without an LSL timestamp")
    return np.concatenate(ts), np.concatenate(offsets) if offsets else np.empty(0)


def fit_offsets(offsets: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Line ``offset_s = a + b * host_s`` through the recorded time corrections, one outlier pass (a correction
    measured during a network hiccup); returns (a, b, residuals in s of every record)."""
    if len(offsets) == 0:
        return 0.0, 0.0, np.zeros(0)
    x = offsets["host_mono_ns"].astype(np.float64) / 1e9
    y = offsets["offset_ns"].astype(np.float64) / 1e9
    if len(x) < 3 or np.ptp(x) == 0:
        a = float(np.median(y))
        return a, 0.0, y - a
    keep = np.ones(len(x), dtype=bool)
    for _ in range(2):
        b, a = np.polyfit(x[keep] - x[0], y[keep], 1)
        res = y - (a + b * (x - x[0]))
        # About the inliers' median, not zero: at least half the records are then kept. Measured from zero, a few
        # corrections in plateaus (a loaded machine) left none, and finalize failed on an empty fit.
        spread = np.abs(res - np.median(res[keep]))
        inliers = spread <= max(5 * 1.4826 * np.median(spread[keep]), 1e-6)
        if inliers.sum() < 3 or np.ptp(x[inliers]) == 0:
            break  # too few left for another line: keep this one
        keep = inliers
    return float(a - b * x[0]), float(b), res


def host_to_reference(ref: Stream) -> ClockFit:
    """Host CLOCK_MONOTONIC (in ns, as a 'device' counting at 1 GHz) -> reference seconds, from the reference's
    host receive times: the host clock is a device whose receive times are exact. The line runs through the
    reference's fastest delivery; ``error_bound_s``: how far above it the other stretches' fastest ones spread."""
    host_ns = ref.index["host_mono_ns"].astype(np.float64)
    return fit_host_clock(host_ns, host_ns / 1e9, ref.chunk_end, host_ns / 1e9, 1e9, ref.rate)


def jitter(s: Stream, ts_s: np.ndarray) -> tuple[float, float]:
    """A regular stream's timestamp jitter: RMS and largest deviation (s) from one line per counter stretch."""
    if is_events(s.cfg) or len(ts_s) < 3:
        return 0.0, 0.0
    samples, seg = s.row_samples(0, s.rows)
    res = np.zeros(len(ts_s))
    for k in np.unique(seg):
        m = seg == k
        if m.sum() >= 3:
            x = samples[m].astype(np.float64)
            b, a = np.polyfit(x - x[0], ts_s[m], 1)
            res[m] = ts_s[m] - (a + b * (x - x[0]))
    return float(np.sqrt(np.mean(res**2))), float(np.abs(res).max())


def align_lsl(s: Stream, ref: Stream) -> tuple[ClockFit, list[str], dict]:
    """The stream's map to reference seconds (a knot per row), its flags, and its LSL QC numbers."""
    ts_ns, offsets = read_timing(s)
    ts_s = ts_ns.astype(np.float64) / 1e9
    a, b, res = fit_offsets(offsets)
    host_ns = (ts_s + a + b * ts_s) * 1e9
    host = host_to_reference(ref)
    # An LSL timestamp has no delivery latency at all, so the map runs through the reference's fastest delivery,
    # as the host line does. Through the fastest fifth (before issue 24), every LSL stream landed ~5 ms late.
    ref_s = host.to_reference(host_ns)
    samples, seg = s.row_samples(0, s.rows)
    knots, seconds = [], []
    for k in range(int(seg.max()) + 1 if len(seg) else 0):
        x, y = samples[seg == k].astype(np.float64), ref_s[seg == k]
        if len(x) == 1:  # one row (a single marker): a second knot one nominal period on
            x, y = np.append(x, x[0] + 1), np.append(y, y[0] + 1 / s.rate)
        knots.append(x)
        seconds.append(y)
    flags = []
    if len(offsets) == 0:
        flags.append("no LSL time correction recorded: timestamps taken as this host's clock")
    jit_rms, jit_max = jitter(s, ts_s)
    res_abs = np.abs(res) if len(res) else np.zeros(1)
    rate = (seconds[0][-1] - seconds[0][0]) / (knots[0][-1] - knots[0][0])
    fit = ClockFit(knots=tuple(knots), seconds=tuple(seconds), model="timestamps", source=SOURCE,
                   dev_rate=s.rate, n_pairs=len(offsets), unmatched_dev=0, unmatched_ref=0,
                   drift_ppm=0.0 if is_events(s.cfg) else float((1 / (rate * s.rate) - 1) * 1e6),
                   residual_rms_s=float(np.sqrt(np.mean(res_abs**2))), residual_max_s=float(res_abs.max()),
                   error_bound_s=float(res_abs.max()) + host.error_bound_s + FASTEST_DELIVERY_S)
    median = float(np.median(offsets["offset_ns"])) / 1e9 if len(offsets) else 0.0
    qc = {"time_corrections": len(offsets), "offset_median_s": median, "offset_drift_ppm": b * 1e6,
          "offset_residual_rms_s": fit.residual_rms_s, "offset_residual_max_s": fit.residual_max_s,
          "host_to_reference_bound_s": host.error_bound_s, "jitter_rms_s": jit_rms, "jitter_max_s": jit_max}
    flags.append(f"LSL timestamps via {len(offsets)} time corrections (residual max "
                 f"{fit.residual_max_s * 1e6:.0f} us) and the host clock (bound {host.error_bound_s * 1e3:.2f} ms); "
                 f"timestamp jitter {jit_rms * 1e3:.3f} ms RMS")
    return fit, flags, qc


def events_plan(s: Stream, fit: ClockFit, zero_s: float, row_times) -> EventsPlan:
    """A marker or irregular stream as an events table: session time, the text (or values), the LSL timestamp."""
    ts_ns, _ = read_timing(s)
    parts = []
    for p in s.parts:
        with open_for_read(p.link) as f:
            parts.append(f["data"][:p.rows])
    data = np.concatenate(parts)
    if s.cfg.dtype == "|u1":
        text = decode_strings(data)
        columns = {"label" if i == 0 else f"label_{i}": (f"text of channel {i} of the marker", [r[i] for r in text])
                   for i in range(s.cfg.shape[0])}
    else:
        columns = {"value": (f"the sample's {s.cfg.shape[0]} channel value(s)", data)}
    columns["lsl_timestamp"] = ("the outlet's own LSL timestamp (s, its local_clock)", ts_ns / 1e9)
    return EventsPlan(
        name=s.name, timestamps=row_times(0, s.rows), samples=s.row_samples(0, s.rows)[0],
        resolution=fit.error_bound_s or 1e-3, columns=columns,
        description=f"{s.cfg.description or s.name}: events of LSL outlet {s.cfg.lsl.name or s.cfg.lsl.type!r}; "
                    f"time = LSL timestamp mapped to the reference clock (docs/lsl.md)",
        source_description=f"acqd: LSL stream {s.name}")
