"""Every stream on the session timebase: clock alignment, time zero, row times, gaps and events.

This module owns how finalize times a stream (docs/finalize.md "Align" and "The timebase"): the map from each
stream's sample counter to reference seconds (``align_all``: the reference exactly, shared sync edges, camera
strobes through another stream's map, host receive times as the flagged fallback; the fits themselves are
``acqd.finalize.clock``'s), the pairing of camera frames with strobes, session time zero and the wall clock there, the
choice between ``starting_time + rate`` and one timestamp per row, and the gaps and digital-line events in
session time. Everything here is computed from the ``Stream`` model; nothing is written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone

import numpy as np

from acqd.finalize import lsl
from acqd.finalize.masterplan import EventsPlan, Timing
from acqd.finalize.clock import ClockFit, align_stream, fit_clock, fit_host_clock, split_counter_resets
from acqd.config import ChannelSync, FrameSync, StrobeSync
from acqd.errors import ClockFitError, FinalizeError
from acqd.finalize.streams import Stream
from acqd.record.ingest import Gap
from acqd.record.streamfile import gap_reasons

REGULAR_TOL_SAMPLES = 0.1  # starting_time + rate only if the map is that close to one straight line
MIN_TIMEBASE_EDGES = 10  # a stream that replaces a reset reference needs edges to pair (clock._MIN_PAIRS)
MIN_PAIRED_FRACTION = 0.9  # of the frames recorded while the strobe line was recorded
MAX_PLAUSIBLE_PPM = 1000.0  # crystal clocks are off by tens of ppm; more means frames slipped against strobes
MAX_PRIOR_TREND_PPM = 2000.0  # a camera's receive latency may creep this fast (a tilted host-time prior)


def host_caption(bound_s: float) -> str:
    """How a host-timed stream or segment is flagged: with the bound its own receive times measured (a stream read
    per message is good to a fraction of a millisecond, one read late or in batches to far less), never a nominal
    accuracy."""
    return f"timed by host receive times (measured bound {bound_s * 1e3:.2f} ms)"


# -- clock alignment -----------------------------------------------------------------------------------------------


@dataclass
class Alignment:
    """One stream's map to reference seconds, and what the report must say about it."""

    fit: ClockFit
    flags: list[str]
    frames: dict | None = None
    pairs: tuple[np.ndarray, np.ndarray] | None = None
    """(device positions, reference seconds) the fit rests on, for the QC residual plot."""
    lsl: dict | None = None
    """LSL streams timed by their timestamps: time-correction residuals and timestamp jitter (acqd.finalize.lsl)."""


def align_all(streams: dict[str, Stream], ref: Stream, max_ppm: float = 200.0) -> dict[str, Alignment]:
    """Fit every stream to the timebase ``ref`` (``timebase_of``); strobe-timed streams last, since they go through
    another's fit. ``max_ppm``: the largest rate difference the sync pairing searches (qc.max_pairing_ppm)."""
    whole = streams.get(ref.name, ref)
    out = {ref.name: Alignment(_identity(ref), []) if whole.n_segments == 1 else align_reference(whole, ref)}
    order = sorted((n for n in streams if n != ref.name), key=lambda n: isinstance(streams[n].cfg.sync, StrobeSync))
    for name in order:
        s = streams[name]
        sync = s.cfg.sync
        if isinstance(sync, StrobeSync) and sync.stream in out:
            out[name] = _align_strobe(s, streams[sync.stream], out[sync.stream].fit, ref)
        elif isinstance(sync, (ChannelSync, FrameSync)):
            out[name] = align_sync(s, ref, max_ppm)
        elif lsl.is_lsl_timed(s.cfg):
            fit, flags, qc = lsl.align_lsl(s, ref)
            out[name] = Alignment(fit, flags, lsl=qc)
        else:
            why = ("no sync source" if sync is None else f"its strobe stream {sync.stream!r} did not record")
            host = _host_fit(s, ref)
            out[name] = Alignment(host, [f"{why}: {host_caption(host.error_bound_s)}"])
    return out


def timebase_of(streams: dict[str, Stream], ref: Stream) -> tuple[Stream, str]:
    """The stream whose clock is the session timebase, and a flag when it is not simply the reference.

    A reference whose counter was reset (the device restarted) cannot define one timebase. Another stream with its
    own sync edges recorded in one counter segment takes its place, the longest recorded one: the reference is then
    aligned to it like any device, each counter segment by its own edges. Without one, the reference's longest
    counter segment is the timebase and its other segments are timed by host receive times (``align_reference``).
    """
    if ref.n_segments == 1:
        return ref, ""
    others = [s for n, s in streams.items() if n != ref.name and s.n_segments == 1
              and len(s.edges.get("sync", ())) >= MIN_TIMEBASE_EDGES and isinstance(s.cfg.sync, (ChannelSync, FrameSync))]
    why = f"the reference stream {ref.name!r} counter was reset ({ref.n_segments} counter segments)"
    if others:
        best = max(others, key=lambda s: (s.rows / s.rate, len(s.edges["sync"])))
        return best, (f"{why}: the timebase is the clock of {best.name!r} instead, and {ref.name!r} is aligned to it "
                      "by its sync edges, segment by segment")
    k = _longest_segment(ref)
    inside = ref.segment == k
    edges = {label: e[edge_segments(e) == k] for label, e in ref.edges.items()}
    one = replace(ref, index=ref.index[inside], edges=edges, rows=int(ref.index["n_samples"][inside].sum()))
    return one, (f"{why}, and no other stream with sync edges recorded in one counter segment: the timebase is its "
                 f"counter segment {k}; its other segments are timed by host receive times")


def align_reference(ref: Stream, timebase: Stream) -> Alignment:
    """The configured reference's map when its longest counter segment is the timebase (``timebase_of``): that
    segment exactly, the others through host receive times, listed in ``host_segments`` with their bounds."""
    host = _host_fit(ref, timebase)
    own = _longest_segment(ref)
    exact = _identity(timebase)
    knots, seconds = list(host.knots), list(host.seconds)
    knots[own], seconds[own] = exact.knots[0], exact.seconds[0]
    bounds = list(host.segment_bounds_s or (host.error_bound_s,) * host.segments)
    bounds[own] = 0.0
    others = tuple(k for k in range(host.segments) if k != own)
    fit = replace(host, knots=tuple(knots), seconds=tuple(seconds), source="reference", drift_ppm=0.0,
                  residual_rms_s=0.0, residual_max_s=0.0, error_bound_s=max(bounds), segment_bounds_s=tuple(bounds),
                  host_segments=others, notes=tuple(f"counter segment {k}" for k in others))
    return Alignment(fit, [f"counter segment {k}: {host_caption(bounds[k])}" for k in others])


def _longest_segment(s: Stream) -> int:
    """The counter segment holding the most samples."""
    return int(np.argmax(np.bincount(s.segment, weights=s.index["n_samples"])))


def _identity(ref: Stream) -> ClockFit:
    """The reference's own map: reference seconds = sample / nominal rate, exactly."""
    a = float(ref.index["first_sample"][0])
    knots = np.array([a, a + max(1, ref.rows)])
    return ClockFit(knots=(knots,), seconds=(knots / ref.rate,), model="affine", source="reference",
                    dev_rate=ref.rate, n_pairs=0, unmatched_dev=0, unmatched_ref=0, drift_ppm=0.0,
                    residual_rms_s=0.0, residual_max_s=0.0, error_bound_s=0.0)


def align_sync(s: Stream, ref: Stream, max_ppm: float, host: ClockFit | None = None) -> Alignment:
    """Pair the stream's sync edges with the reference's, the host-time fit as the prior (which lets a regular
    train pair when host timing resolves its period); a counter segment whose edges cannot be fitted is timed by
    host receive times alone, flagged; the whole stream only if no segment can be fitted. ``host``: that fit when
    the stream's host clock is not the reference's (another PC's stream: acqd.finalize.nodes composes it)."""
    dev, refe = s.edges.get("sync", np.empty(0, np.int64)), ref.edges.get("sync", np.empty(0, np.int64))
    try:
        host = host or _host_fit(s, ref)
    except FinalizeError:  # too few host points: the edges alone may still do
        host = None
    prior = host if host is not None and host.segments == len(split_counter_resets(dev)) else None
    try:
        fit = align_stream(dev, s.rate, refe, ref.rate, max_ppm=max_ppm, prior=prior)
        if fit.segments != s.n_segments:
            raise ClockFitError(f"sync edges show {fit.segments} counter segments, the chunk index {s.n_segments}")
    except ClockFitError as e:
        host = host or _host_fit(s, ref)
        return Alignment(host, [f"sync fit failed ({e}): {host_caption(host.error_bound_s)}"])
    flags = [f"{note}: {host_caption(fit.segment_bounds_s[k])}" for k, note in zip(fit.host_segments, fit.notes)]
    return Alignment(covering_rows(fit, s), flags, pairs=_nearest_pairs(dev, fit, refe / ref.rate - 0.5 / ref.rate))


def covering_rows(fit: ClockFit, s: Stream) -> ClockFit:
    """The fit with its error bound grown to cover the stream's rows beyond the end knots (extrapolated)."""
    seg, first, last = s.segment, s.first_sample, s.chunk_end - 1
    return fit.with_extrapolation([float(first[seg == k].min()) for k in range(fit.segments)],
                                  [float(last[seg == k].max()) for k in range(fit.segments)])


def _nearest_pairs(dev_edges: np.ndarray, fit: ClockFit, ref_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each device edge with the reference edge nearest its fitted time, if within 5 error bounds (QC only)."""
    if len(dev_edges) == 0 or len(ref_s) < 2:
        return np.empty(0), np.empty(0)
    pos = dev_edges.astype(np.float64) - 0.5
    pred = to_reference(fit, pos, edge_segments(dev_edges))
    j = _nearest(ref_s, pred)
    keep = np.abs(ref_s[j] - pred) <= 5 * max(fit.error_bound_s, 1e-6)
    return pos[keep], ref_s[j][keep]


def _host_fit(s: Stream, ref: Stream) -> ClockFit:
    """Device sample -> reference seconds through host receive times (acqd.finalize.clock.fit_host_clock)."""
    base = int(min(s.index["host_mono_ns"].min(), ref.index["host_mono_ns"].min()))
    try:
        return fit_host_clock(s.chunk_end, (s.index["host_mono_ns"] - base) / 1e9, ref.chunk_end,
                              (ref.index["host_mono_ns"] - base) / 1e9, s.rate, ref.rate)
    except ClockFitError as e:
        raise FinalizeError(f"stream {s.name!r} cannot be placed on the timebase: {e}") from None


def _align_strobe(s: Stream, target: Stream, target_fit: ClockFit, ref: Stream) -> Alignment:
    """A camera: frame k strobed line 'strobe:<camera>' of ``target``; its edges, through the target's fit, time
    the frames. Frames pair with strobes by the host-time estimate (good to well under half a frame period),
    then a clock is fitted to the pairs like any other stream's."""
    host = _host_fit(s, ref)
    strobes = target.edges.get(f"strobe:{s.name}", np.empty(0, np.int64))
    strobe_s = to_reference(target_fit, strobes.astype(np.float64) - 0.5, edge_segments(strobes))
    frames, _ = s.row_samples(0, s.rows)
    period = 1.0 / s.rate
    try:
        if s.n_segments > 1:
            raise ClockFitError("the camera's frame counter was reset")
        fi, sj, offset = pair_frames(frames, host.to_reference(frames.astype(np.float64)), strobe_s, period)
        fit = fit_clock(frames[fi].astype(np.float64), strobe_s[sj], s.rate)
    except ClockFitError as e:
        return Alignment(host, [f"strobe fit failed ({e}): {host_caption(host.error_bound_s)}"])
    t = fit.to_reference(frames.astype(np.float64))
    lo, hi = to_reference(target_fit, np.array([target.index["first_sample"][0], target.chunk_end[-1]], np.float64),
                          target.segment[[0, -1]])
    covered = (t >= lo) & (t <= hi)
    # A regular strobe train pairs only as well as the host-time prior: when the prior drifted (a writer
    # that fell behind), frames slip against strobes. Refuse what no real camera clock could do.
    if len(fi) < MIN_PAIRED_FRACTION * covered.sum() or abs(fit.drift_ppm) > MAX_PLAUSIBLE_PPM:
        return Alignment(host, [f"strobe pairing implausible ({len(fi)} of {int(covered.sum())} frames paired, "
                                f"drift {fit.drift_ppm:+.0f} ppm): {host_caption(host.error_bound_s)}"])
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
    doubt = _assignment_doubt(*_prior_offsets(strobe_s[sj], host.to_reference(frames[fi].astype(np.float64))),
                              period)
    if doubt:
        flags.append(f"frame/strobe assignment in doubt: {doubt}; check it")
    bound = max(fit.error_bound_s, 0.5 / target.rate + target_fit.error_bound_s)
    fit = replace(fit, source="strobe", unmatched_dev=frames_report["frames_without_strobe"],
                  unmatched_ref=frames_report["strobes_without_frame"], error_bound_s=bound,
                  pairing="frames by host time")
    fit = covering_rows(fit, s)
    return Alignment(fit, flags, frames_report, (frames[fi].astype(np.float64), strobe_s[sj]))


def _prior_offsets(strobe_s: np.ndarray, prior_s: np.ndarray) -> tuple[float, np.ndarray]:
    """How far the host-time prior sits from the paired strobes: the largest offset of its linear trend, and each
    frame's scatter about that trend."""
    d = strobe_s - prior_s
    if len(d) < 2:
        return (float(d[0]) if len(d) else 0.0), np.zeros(len(d))
    line = np.polyval(np.polyfit(prior_s - prior_s.mean(), d, 1), prior_s - prior_s.mean())
    return float(line[np.argmax(np.abs(line))]), d - line


def _assignment_doubt(offset: float, residuals: np.ndarray, period: float) -> str:
    """Why the frames may be paired with the wrong strobes, or '' when they cannot be.

    The host-time estimate of each frame is off the strobes by the difference between the camera's and the
    reference's receive latencies (``offset``, found modulo one frame) plus per-frame jitter (``residuals``).
    Frames are assigned correctly as long as that stays under half a frame; the assignment is in doubt when the
    offset plus the 99th percentile of the jitter reaches half a frame, where a frame could take its
    neighbour's strobe (an offset beyond it would shift every frame by one, which host times cannot show)."""
    spread = float(np.quantile(np.abs(residuals), 0.99)) if len(residuals) else 0.0
    if abs(offset) + spread >= period / 2:
        return (f"host-time estimate {offset * 1e3:+.1f} ms (+-{spread * 1e3:.1f} ms per frame) off the strobes "
                f"reaches half a frame ({period * 5e2:.1f} ms)")
    return ""


def pair_frames(frames: np.ndarray, prior_s: np.ndarray, strobe_s: np.ndarray, period: float
                ) -> tuple[np.ndarray, np.ndarray, float]:
    """Pair recorded frames with strobe edges: (frame indices, strobe indices, prior's mean offset in seconds).

    ``prior_s`` estimates each frame's time (host receive times: ms accurate, offset unknown within a frame).
    The offset between prior and strobes is the circular mean of each frame's distance to its nearest strobe
    (circular over one frame period, so it is found even if the prior is almost half a period off). A slow trend
    in that distance (the camera's receive latency creeping by up to ``MAX_PRIOR_TREND_PPM`` of the elapsed time,
    which tilts the host-time fit) is then fitted and removed; the corrected prior pairs each frame with the one
    strobe within a quarter period. A strobe claimed twice is dropped.
    """
    if len(strobe_s) < 2 or len(frames) == 0:
        raise ClockFitError(f"{len(strobe_s)} strobe edges for {len(frames)} frames")
    near = _nearest(strobe_s, prior_s)
    phase = np.exp(2j * np.pi * (strobe_s[near] - prior_s) / period)
    offset = float(np.angle(phase.mean()) * period / (2 * np.pi))
    pred = prior_s + offset + _prior_trend(prior_s + offset, strobe_s, period)
    j = _nearest(strobe_s, pred)
    ok = np.abs(strobe_s[j] - pred) < period / 4
    fi, sj = np.flatnonzero(ok), j[ok]
    _, inverse, counts = np.unique(sj, return_inverse=True, return_counts=True)
    keep = counts[inverse] == 1
    return fi[keep], sj[keep], float(np.mean(pred - prior_s))


def _prior_trend(pred: np.ndarray, strobe_s: np.ndarray, period: float) -> np.ndarray:
    """The line through each frame's distance to its nearest strobe over time (frames within a quarter period of
    it, refitted twice); zero when there are too few frames or the slope exceeds ``MAX_PRIOR_TREND_PPM`` (more
    is not latency creeping but frames slipping, which the paired fraction and drift checks must see)."""
    if len(pred) < 10:
        return np.zeros(len(pred))
    d = strobe_s[_nearest(strobe_s, pred)] - pred
    t = pred - pred.mean()
    line = np.zeros(len(pred))
    for _ in range(3):
        use = np.abs(d - line) < period / 4
        if use.sum() < 10 or np.ptp(t[use]) == 0:
            return np.zeros(len(pred))
        slope, icpt = np.polyfit(t[use], d[use], 1)
        if abs(slope) > MAX_PRIOR_TREND_PPM * 1e-6:
            return np.zeros(len(pred))
        line = icpt + slope * t
    return line


def _nearest(sorted_values: np.ndarray, x: np.ndarray) -> np.ndarray:
    j = np.clip(np.searchsorted(sorted_values, x), 1, len(sorted_values) - 1)
    return np.where(np.abs(sorted_values[j - 1] - x) <= np.abs(sorted_values[j] - x), j - 1, j)


def edge_segments(edges: np.ndarray) -> np.ndarray:
    """Counter segment of each edge: edges are stored in time order, so the counter going back starts a segment."""
    seg = np.zeros(len(edges), dtype=np.int64)
    for k, sl in enumerate(split_counter_resets(edges)):
        seg[sl] = k
    return seg


def to_reference(fit: ClockFit, positions: np.ndarray, segment: np.ndarray) -> np.ndarray:
    """Reference seconds of device positions, each through its counter segment's map."""
    out = np.empty(len(positions), dtype=np.float64)
    for k in np.unique(segment):
        if k >= fit.segments:
            raise FinalizeError(f"edges in counter segment {k}, but the clock fit has {fit.segments}")
        m = segment == k
        out[m] = fit.to_reference(positions[m], int(k))
    return out


# -- the timebase ---------------------------------------------------------------------------------------------------


def zero_sample(streams: dict[str, Stream], aligned: dict[str, Alignment], ref: Stream) -> int:
    """Session time zero, in whole reference samples: the earliest first recorded sample of any stream, so that
    no time is negative."""
    first = [aligned[n].fit.to_reference(np.array([float(s.index["first_sample"][0])]), 0)[0]
             for n, s in streams.items()]
    return int(np.floor(min(first) * ref.rate + 1e-9))


def wall_time(ref: Stream, zero_sample: int) -> datetime:
    """Host wall time of a reference sample: the first chunk's receive time, back by the samples since then."""
    end_ns = int(ref.index["host_wall_ns"][0])
    ns = end_ns - round((int(ref.chunk_end[0]) - zero_sample) / ref.rate * 1e9)
    return datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=ns // 1000)


# -- rows, gaps and events in session time -------------------------------------------------------------------------


def row_times(s: Stream, fit: ClockFit, zero_s: float, rows: np.ndarray | None = None
              ) -> Callable[[int, int], np.ndarray]:
    """Session seconds of series rows [a, b): file rows, or ``rows[a:b]`` when the series holds only those."""
    def times(a: int, b: int) -> np.ndarray:
        samples, seg = s.row_samples(a, b) if rows is None else s.samples_of(rows[a:b])
        return to_reference(fit, samples.astype(np.float64), seg) - zero_s
    return times


def series_timing(s: Stream, fit: ClockFit, zero_s: float) -> Timing:
    """starting_time + rate when every row continues the previous one and the map is one straight line over the
    stream within ``REGULAR_TOL_SAMPLES``; otherwise a timestamp per row."""
    if len(s.breaks) == 0 and fit.segments == 1 and s.rows >= 2:
        x0 = float(s.index["first_sample"][0])
        x1 = x0 + s.rows - 1
        y0, y1 = fit.to_reference(np.array([x0, x1]), 0)
        knots = fit.knots[0][(fit.knots[0] > x0) & (fit.knots[0] < x1)]
        line = y0 + (knots - x0) * (y1 - y0) / (x1 - x0)
        if np.all(np.abs(fit.to_reference(knots, 0) - line) * s.rate <= REGULAR_TOL_SAMPLES):
            if fit.source == "reference":  # exact: whole samples from zero, the nominal rate
                return Timing(rows=s.rows, starting_time=(x0 - round(zero_s * s.rate)) / s.rate, rate=s.rate)
            return Timing(rows=s.rows, starting_time=float(y0 - zero_s), rate=float((x1 - x0) / (y1 - y0)))
    return Timing(rows=s.rows, timestamps=row_times(s, fit, zero_s))


def extrapolated_rows(s: Stream, fit: ClockFit) -> int:
    """Rows before the first or after the last knot of their segment: their error is extrapolated.

    Streams over 5 million rows are counted at chunk boundaries only (approximate to a chunk), to bound memory.
    """
    if fit.source == "reference":
        return 0
    samples, seg = s.row_samples(0, s.rows) if s.rows <= 5_000_000 else (s.first_sample, s.segment)
    lo = np.array([k[0] for k in fit.knots])[seg]
    hi = np.array([k[-1] for k in fit.knots])[seg]
    return int(np.sum((samples < lo) | (samples > hi)))


def stream_gaps(s: Stream, fit: ClockFit, zero_s: float) -> list[dict]:
    """Every discontinuity the chunk index proves, with what the writer recorded about it."""
    kinds = {g.value: g.name.lower() for g in Gap}
    reasons = gap_reasons(s.recorded_gaps)
    recorded = {int(g["file_row"]): (g, why) for g, why in zip(s.recorded_gaps, reasons)}
    part_starts = set(s.part_start_chunks[1:])
    seg = s.segment
    out = []
    for i in s.breaks.tolist():
        row = int(s.index["file_row"][i])
        g, reason = recorded.get(row, (None, "writer" if i in part_starts else "unknown"))
        kind = kinds.get(int(g["kind"]), "unknown") if g is not None else (
            "writer_restart" if i in part_starts else "unrecorded")
        prev_end, first = int(s.chunk_end[i - 1]), int(s.index["first_sample"][i])
        start = fit.to_reference(np.array([float(prev_end)]), int(seg[i - 1]))[0] - zero_s
        stop = fit.to_reference(np.array([float(first)]), int(seg[i]))[0] - zero_s
        out.append({"stream": s.name, "kind": kind, "row": row, "start_time": float(start),
                    "stop_time": float(max(stop, start)), "sample_from": prev_end, "sample_to": first,
                    "samples_lost": first - prev_end if seg[i] == seg[i - 1] else -1,
                    "seq_from": int(g["seq_from"]) if g is not None else -1,
                    "seq_to": int(g["seq_to"]) if g is not None else -1, "reason": reason})
    return out + _trailing_gaps(s, fit, zero_s, kinds, reasons)


def _trailing_gaps(s: Stream, fit: ClockFit, zero_s: float, kinds: dict[int, str], reasons: list[str]) -> list[dict]:
    """Gaps the writer recorded after the last stored chunk (messages lost at the very end, e.g. by a camera's
    encoder): no later chunk proves them, the gap row does."""
    out = []
    for g, reason in zip(s.recorded_gaps, reasons):
        if int(g["file_row"]) < s.rows or not len(s.index):
            continue
        seg = int(s.segment[-1])
        start, stop = fit.to_reference(np.array([float(g["sample_from"]), float(g["sample_to"])]), seg) - zero_s
        out.append({"stream": s.name, "kind": kinds.get(int(g["kind"]), "unknown"), "row": int(g["file_row"]),
                    "start_time": float(start), "stop_time": float(max(stop, start)),
                    "sample_from": int(g["sample_from"]), "sample_to": int(g["sample_to"]),
                    "samples_lost": int(g["sample_to"]) - int(g["sample_from"]), "seq_from": int(g["seq_from"]),
                    "seq_to": int(g["seq_to"]), "reason": reason})
    return out


def stream_events(s: Stream, fit: ClockFit, zero_s: float) -> list[EventsPlan]:
    """One EventsTable per digital line the stream recorded. A latched sample k means the edge came in (k-1, k]."""
    out = []
    for label, samples in sorted(s.edges.items()):
        if len(samples) == 0:
            continue
        t = to_reference(fit, samples.astype(np.float64) - 0.5, edge_segments(samples)) - zero_s
        what = "shared sync pulses" if label == "sync" else f"frame strobes of {label.split(':', 1)[1]}"
        out.append(EventsPlan(
            name=f"{s.name}_{label.replace(':', '_')}", resolution=1.0 / s.rate, timestamps=t, samples=samples,
            description=f"rising edges of the {label!r} line ({what}) latched by {s.name}; time = the stream's clock "
                        f"fit at sample - 0.5",
            source_description=f"acqd: digital line {label!r} of stream {s.name}"))
    return out
