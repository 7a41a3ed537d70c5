"""Clock alignment: map each device's sample counter to reference seconds.

This module owns the arithmetic of synchronisation, given sync-edge sample indices (or host receive
times) already read from the streams: pairing the TTL edges that two devices latched from the same
pulse, splitting at counter resets, fitting and choosing the map, bounding its error, and refusing a
pairing that is not unique. Pure numpy, no I/O: the finalizer calls ``align_stream`` (or
``fit_host_clock`` for a stream without a sync line) and stores ``ClockFit.to_dict()`` in the QC
report. Reference seconds are reference samples / nominal reference rate. Method and rules, for
readers of that report: docs/clock-alignment.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from acqd.errors import ClockFitError

__all__ = ["ClockFit", "ClockFitError", "Pairing", "align_stream", "fit_clock", "fit_host_clock", "pair_edges",
           "split_counter_resets"]

# Pairing. Random 0.5-1.5 s intervals latched at 60 Hz agree by chance with p ~ 0.035 each, so a
# pattern of four consecutive intervals matches a wrong place with p ~ 1e-6.
_PATTERN = 4
_MAX_ANCHORS = 256  # device positions whose patterns are looked up: plenty, and bounds the cost
_MAX_MATCHES = 3  # an anchor fitting more reference positions than this is no evidence (regular train)
_MIN_ANCHORS = 3  # anchors that must agree on one pairing before it is believed
_AGREE_S = 0.02  # anchors of one pairing agree on the offset within this (+ latch quantisation):
#                  half for the slope grid's step, half for thermal wander; far below the 0.5 s
#                  minimum sync interval, so different pairings never merge.
_ROUNDS = 4  # assign-and-refit rounds: the first uses the loose anchor tolerance, the rest tighten it

# Fitting.
_MIN_PAIRS = 10
_FOLDS = 5  # fold f holds out every pair whose index is f modulo _FOLDS
_SPACINGS_S = (30.0, 60.0, 120.0, 300.0, 600.0)  # knot spacings tried by the piecewise model
_MAX_KNOTS = 500  # keeps the dense knot solve cheap on day-long recordings
_PIECEWISE_GAIN = 0.9  # piecewise must cut the held-out RMS error by 10 % to replace affine (stable
#                        clocks: within 1 %; wander worth a sample: by 15 % or more)
_ENVELOPE_QUANTILE = 0.2  # host fit: the line follows the fastest fifth of the deliveries


@dataclass(frozen=True, slots=True, eq=False)  # eq=False: numpy fields have no scalar ==
class Pairing:
    """Which device sync edges and reference sync edges come from the same pulse."""

    dev_index: np.ndarray
    """Indices into the device edges of the paired edges, increasing."""
    ref_index: np.ndarray
    """Indices into the reference edges, same length, increasing: ``ref_index[n]`` pairs ``dev_index[n]``."""
    unmatched_dev: int
    """Device edges, within the span both streams cover, with no partner (missed by the reference, or spurious)."""
    unmatched_ref: int
    """Reference edges, within the span both streams cover, with no partner."""
    ambiguous: bool
    """More than one pairing explains the edges (e.g. a regular pulse train): no pairs are returned."""
    reason: str
    """Why there are no pairs (ambiguous, or no consistent match); empty when pairing succeeded."""


@dataclass(frozen=True, slots=True, eq=False)  # eq=False: numpy fields have no scalar ==
class ClockFit:
    """A map from a device's sample counter to reference seconds, with its quality report."""

    knots: tuple[np.ndarray, ...]
    """Per counter segment: device sample positions of the map's knots, increasing."""
    seconds: tuple[np.ndarray, ...]
    """Per counter segment: reference seconds at the knots; the map is linear between and beyond them."""
    model: str
    """'affine' (constant rate) or 'piecewise' (continuous piecewise-linear: the rate wanders); the latter if any
    segment needed it."""
    source: str
    """'sync' (shared TTL edges: sample accuracy) or 'host' (host receive times: millisecond accuracy)."""
    dev_rate: float
    """Nominal device rate in Hz, to express errors in device samples."""
    n_pairs: int
    """Edge pairs (sync) or (sample, host time) points of the device (host) that the fit used."""
    unmatched_dev: int
    """Device edges without a reference partner inside the span both streams cover."""
    unmatched_ref: int
    """Reference edges without a device partner inside the span both streams cover."""
    drift_ppm: float
    """Mean rate error against nominal, measured on the reference clock; positive: the device runs fast."""
    residual_rms_s: float
    """RMS of the fit residuals: sync, paired reference time minus map (mostly latch quantisation); host,
    receive time minus the fitted envelope (latency jitter)."""
    residual_max_s: float
    """Largest absolute fit residual."""
    error_bound_s: float
    """Bound on the map's error between the end knots. Sync: the largest error predicting pairs held out of the
    fit, and never less than half a sample of each clock. Host: how far the two fitted envelopes sit above the
    fastest deliveries, summed."""

    @property
    def segments(self) -> int:
        """Counter segments (one more than the counter resets), each with its own map."""
        return len(self.knots)

    @property
    def counter_resets(self) -> int:
        """Times the device counter went backwards (device restarted)."""
        return len(self.knots) - 1

    @property
    def residual_rms_samples(self) -> float:
        """``residual_rms_s`` in device samples."""
        return self.residual_rms_s * self.dev_rate

    @property
    def residual_max_samples(self) -> float:
        """``residual_max_s`` in device samples."""
        return self.residual_max_s * self.dev_rate

    @property
    def error_bound_samples(self) -> float:
        """``error_bound_s`` in device samples."""
        return self.error_bound_s * self.dev_rate

    def to_reference(self, samples: np.ndarray, segment: int | None = None) -> np.ndarray:
        """Reference seconds of (possibly fractional) device sample positions of one counter segment.

        ``segment`` is required when the counter was reset: the same sample index then occurs in several
        segments, so only the caller knows which one a sample belongs to. The map is fitted between the
        first and last paired edges (the end knots); beyond them it extends the end pieces, and ``error_bound_s``
        does not cover that extrapolation.
        """
        if segment is None:
            if len(self.knots) > 1:
                raise ValueError(f"the device counter was reset ({len(self.knots)} segments): pass segment=")
            segment = 0
        return _evaluate(self.knots[segment], self.seconds[segment], np.asarray(samples, dtype=np.float64))

    def to_dict(self) -> dict[str, float | int | str]:
        """The quality report as plain JSON-able values."""
        return {
            "source": self.source, "model": self.model, "segments": self.segments,
            "counter_resets": self.counter_resets, "n_pairs": self.n_pairs, "unmatched_dev": self.unmatched_dev,
            "unmatched_ref": self.unmatched_ref, "drift_ppm": self.drift_ppm,
            "residual_rms_s": self.residual_rms_s, "residual_max_s": self.residual_max_s,
            "residual_rms_samples": self.residual_rms_samples, "residual_max_samples": self.residual_max_samples,
            "error_bound_s": self.error_bound_s, "error_bound_samples": self.error_bound_samples,
        }


def split_counter_resets(samples: np.ndarray) -> list[slice]:
    """Slices of ``samples`` between the points where the device counter goes backwards (device restarted)."""
    starts = (np.flatnonzero(np.diff(samples) < 0) + 1).tolist()
    bounds = [0, *starts, len(samples)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def pair_edges(dev_edges: np.ndarray, dev_rate: float, ref_edges: np.ndarray, ref_rate: float, *,
               max_ppm: float = 200.0, prior_s: np.ndarray | None = None, prior_tol_s: float = 0.0) -> Pairing:
    """Pair device and reference sync edges (strictly increasing sample indices) that come from the same pulse.

    The clocks may be offset by any amount and differ in rate by up to ``max_ppm``; edges may be missing or
    spurious on either side. ``prior_s`` is an optional independent estimate, good to ``prior_tol_s``, of each
    device edge's reference time (e.g. a host-time fit): it lets a regular pulse train pair when it is better
    than half a period. Bad data never raises: an ambiguous or failed pairing has no pairs and says why.
    """
    d = _increasing(dev_edges, "dev_edges") / dev_rate
    r = _increasing(ref_edges, "ref_edges") / ref_rate
    if min(len(d), len(r)) <= _PATTERN:
        return _no_pairs(False, f"too few sync edges ({len(d)} device, {len(r)} reference)")
    quant = 1 / dev_rate + 1 / ref_rate  # each device latches an edge up to one of its samples late
    slope_max = max_ppm * 1e-6
    ia, ja, n_vague = _anchor_matches(d, r, quant, slope_max, prior_s, prior_tol_s + quant)
    if n_vague > len(np.unique(ia)):
        return _no_pairs(True, f"sync intervals are not distinctive: {n_vague} anchor patterns each fit more than "
                               f"{_MAX_MATCHES} reference positions (regular pulse train?); pairing needs a prior "
                               "better than half a pulse period")
    # Hypothesis: reference time = device time + offset, the offset drifting linearly (the rate error).
    mid = 0.5 * (d[0] + d[-1])
    x, offsets = d[ia] - mid, r[ja] - d[ia]
    width = _AGREE_S + 2 * quant
    agree, n_rival, rival_shift = _vote(x, offsets, slope_max, width)
    n_agree = int(agree.sum())
    if n_agree < _MIN_ANCHORS:
        return _no_pairs(False, f"no consistent interval pattern between device and reference edges "
                                f"({n_agree} anchors agree)")
    if n_rival >= max(_MIN_ANCHORS, n_agree / 10):
        return _no_pairs(True, f"two pairings fit: {n_agree} anchor patterns agree on one, {n_rival} on another "
                               f"{rival_shift:+.3f} s away (repeating pulse pattern?)")
    slope, icpt = _line(x[agree], offsets[agree])
    tol = width
    for _ in range(_ROUNDS):
        pred = d + icpt + slope * (d - mid)
        di, rj = _assign(pred, r, tol)
        if len(di) < 2:
            break
        slope, icpt = _line(d[di] - mid, r[rj] - d[di])
        res = r[rj] - d[di] - icpt - slope * (d[di] - mid)
        # True pairs scatter about the fit by latch quantisation and model misfit (thermal wander). The 95th
        # percentile of |residual| measures that scatter while ignoring a few wrong pairs (spurious edges);
        # twice it, plus half a latch step of each clock, keeps every true pair and shuts spurious edges out.
        # (Not a MAD: at equal rates residuals are integer sample steps, and their MAD is often zero.)
        tol = min(tol, quant / 2 + 2 * float(np.quantile(np.abs(res), 0.95)))
    lo, hi = max(r[0], pred[0]) - tol, min(r[-1], pred[-1]) + tol  # span both streams cover
    n_dev, n_ref = int(np.sum((pred >= lo) & (pred <= hi))), int(np.sum((r >= lo) & (r <= hi)))
    return Pairing(di, rj, n_dev - len(di), n_ref - len(di), False, "")


def fit_clock(dev_samples: np.ndarray, ref_seconds: np.ndarray, dev_rate: float) -> ClockFit:
    """Fit reference seconds against (strictly increasing, possibly fractional) device sample positions.

    Tries an affine map and continuous piecewise-linear maps with knots every 30 s to 10 min, scores each by
    ``_FOLDS``-fold held-out error, and keeps affine unless a piecewise map cuts the held-out RMS by 10 %.
    """
    x = _increasing(dev_samples, "dev_samples")
    y = np.asarray(ref_seconds, dtype=np.float64)
    if len(x) < _MIN_PAIRS:
        raise ClockFitError(f"only {len(x)} sync pairs; need at least {_MIN_PAIRS}")
    span_s = (x[-1] - x[0]) / dev_rate
    pieces = sorted({min(_MAX_KNOTS, round(span_s / s)) for s in _SPACINGS_S} - {0, 1})
    heldout = {n: _heldout_errors(x, y, n) for n in [1, *pieces]}
    rms = {n: float(np.sqrt(np.mean(e**2))) for n, e in heldout.items()}
    n = min(pieces, key=rms.__getitem__, default=1)
    if rms[n] >= _PIECEWISE_GAIN * rms[1]:
        n = 1
    knots = _knots(x, n)
    values = _solve(x, y, knots)
    return _single_fit(knots, values, "affine" if n == 1 else "piecewise", "sync", dev_rate, len(x),
                       y - _evaluate(knots, values, x), float(np.abs(heldout[n]).max()))


def align_stream(dev_edges: np.ndarray, dev_rate: float, ref_edges: np.ndarray, ref_rate: float, *,
                 max_ppm: float = 200.0, prior: ClockFit | None = None) -> ClockFit:
    """Map a device's sample counter to reference seconds from the sync edges both latched.

    Edges are sample indices, the reference's strictly increasing. Splits the device edges at counter resets,
    pairs and fits each segment. ``prior`` (e.g. from ``fit_host_clock``, one segment per counter segment)
    narrows the pairing to edges it agrees with, within its error bound: the only way a regular pulse train
    pairs. Raises ClockFitError when a segment's pairing is ambiguous or has too few pairs.
    """
    dev_edges = np.asarray(dev_edges, dtype=np.int64)
    ref_edges = np.asarray(ref_edges, dtype=np.int64)
    segments = split_counter_resets(dev_edges)
    if prior is not None and prior.segments != len(segments):
        raise ClockFitError(f"the prior has {prior.segments} counter segments, the sync edges {len(segments)}")
    fits = []
    for s, seg in enumerate(segments):
        edges = dev_edges[seg]
        prior_s = None if prior is None else prior.to_reference(edges, s)
        p = pair_edges(edges, dev_rate, ref_edges, ref_rate, max_ppm=max_ppm, prior_s=prior_s,
                       prior_tol_s=0.0 if prior is None else prior.error_bound_s)
        if p.ambiguous or len(p.dev_index) < _MIN_PAIRS:
            raise ClockFitError(f"counter segment {s}: {p.reason or f'only {len(p.dev_index)} sync edges paired'}")
        # A latched index k means the edge fell in (k-1, k] of that counter: on average at k - 1/2. That
        # average holds only if the pulses' phase against the sample clocks varies; pulses locked to a clock
        # (e.g. generated by the reference) latch with a constant, unknown lag. The bound therefore never
        # claims better than half a sample of each clock, which held-out errors cannot see.
        fit = fit_clock(edges[p.dev_index] - 0.5, (ref_edges[p.ref_index] - 0.5) / ref_rate, dev_rate)
        fits.append(replace(fit, unmatched_dev=p.unmatched_dev, unmatched_ref=p.unmatched_ref,
                            error_bound_s=max(fit.error_bound_s, 0.5 / dev_rate + 0.5 / ref_rate)))
    return _combine(fits)


def fit_host_clock(dev_samples: np.ndarray, dev_host_s: np.ndarray, ref_samples: np.ndarray,
                   ref_host_s: np.ndarray, dev_rate: float, ref_rate: float) -> ClockFit:
    """Fallback for a stream without a sync line: map it to reference seconds through host receive times.

    Each sample index comes with the host time (seconds, one host clock for both streams) at which the data
    up to that index had arrived; for a chunk pass the index just past its last sample, since a chunk is
    sent only once complete. Receive time is true time plus a positive, variable latency, so each stream is
    fitted by the lower envelope of its receive times and the two lines are composed. A difference between
    the two streams' minimum latencies cannot be observed and is not in the error bound.
    """
    ref_slope, ref_icpt, ref_res = _lower_envelope(np.asarray(ref_samples, np.float64),
                                                   np.asarray(ref_host_s, np.float64))
    dev_samples = np.asarray(dev_samples, dtype=np.float64)
    dev_host_s = np.asarray(dev_host_s, dtype=np.float64)
    fits = []
    for seg in split_counter_resets(dev_samples):
        x = dev_samples[seg]
        if len(x) < _MIN_PAIRS:
            raise ClockFitError(f"only {len(x)} host-time points in a counter segment; need {_MIN_PAIRS}")
        slope, icpt, res = _lower_envelope(x, dev_host_s[seg])
        knots = x[[0, -1]]
        # Host time -> reference sample via the reference line; subtract the large host times first.
        values = (icpt - ref_icpt + slope * knots) / ref_slope / ref_rate
        fits.append(_single_fit(knots, values, "affine", "host", dev_rate, len(x), np.concatenate([res, ref_res]),
                                float(-res.min() - ref_res.min())))
    return _combine(fits)


def _anchor_matches(d: np.ndarray, r: np.ndarray, quant: float, slope_max: float, prior_s: np.ndarray | None,
                    prior_tol: float) -> tuple[np.ndarray, np.ndarray, int]:
    """(device edge, reference edge) candidates whose next ``_PATTERN`` intervals agree, and the number of
    anchors dropped because their pattern fits too many reference positions to be evidence.

    Intervals are blind to the clocks' offset and nearly blind to their rate error, so this needs no guess.
    """
    empty = np.empty(0, dtype=np.int64)
    dev_iv = sliding_window_view(np.diff(d), _PATTERN)
    ref_iv = sliding_window_view(np.diff(r), _PATTERN)
    anchors = np.unique(np.linspace(0, len(dev_iv) - 1, min(len(dev_iv), _MAX_ANCHORS)).astype(np.int64))
    found_i, found_j, n_vague = [empty], [empty], 0
    for block in np.array_split(anchors, -(-len(anchors) // 32)):  # bounds memory to 32 x reference edges
        # Each interval is off by less than one sample of each clock at its two ends, plus the rate error.
        tol = quant + slope_max * dev_iv[block] + 1e-9
        ok = np.ones((len(block), len(ref_iv)), dtype=bool)
        for p in range(_PATTERN):
            ok &= np.abs(ref_iv[:, p] - dev_iv[block, p, None]) <= tol[:, p, None]
        if prior_s is not None:
            ok &= np.abs(r[: len(ref_iv)] - prior_s[block, None]) <= prior_tol
        vague = ok.sum(axis=1) > _MAX_MATCHES
        n_vague += int(vague.sum())
        rows, j = np.nonzero(ok & ~vague[:, None])
        found_i.append(block[rows])
        found_j.append(j)
    return np.concatenate(found_i), np.concatenate(found_j), n_vague


def _vote(x: np.ndarray, offsets: np.ndarray, slope_max: float, width: float) -> tuple[np.ndarray, int, float]:
    """The anchors on the line ``offset = c + slope * x`` (``|slope| <= slope_max``) that most anchors share,
    found by a grid over the slope; and the size and offset of the best rival line at that slope."""
    if len(x) == 0:
        return np.zeros(0, dtype=bool), 0, 0.0
    # Grid step: the nearest slope is off by at most step/2, i.e. _AGREE_S/4 at the ends of the recording.
    reach = max(float(np.abs(x).max()), 1.0)
    slopes = np.linspace(-slope_max, slope_max, int(np.ceil(2 * slope_max / (0.5 * _AGREE_S / reach))) + 1)
    best = (-1, 0.0, 0.0)  # (anchors in the window, slope, window start)
    for s in slopes:
        n, start = _densest_window(np.sort(offsets - s * x), width)
        if n > best[0]:
            best = (n, s, start)
    _, s, start = best
    y = offsets - s * x
    agree = (y >= start) & (y <= start + width)
    rivals = np.sort(y[np.abs(y - start - width / 2) > 2 * width])
    n_rival, rival_start = _densest_window(rivals, width)
    return agree, n_rival, rival_start - start


def _densest_window(y: np.ndarray, width: float) -> tuple[int, float]:
    """Most sorted values ``y`` within one window ``[start, start + width]``, and that start."""
    if len(y) == 0:
        return 0, 0.0
    counts = np.searchsorted(y, y + width, side="right") - np.arange(len(y))
    k = int(np.argmax(counts))
    return int(counts[k]), float(y[k])


def _assign(pred: np.ndarray, r: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Pair each predicted device edge with the only reference edge within ``tol``; anything contested (two
    candidates, or one reference edge claimed twice) is dropped, since precision matters more than recall."""
    lo = np.searchsorted(r, pred - tol, side="left")
    hi = np.searchsorted(r, pred + tol, side="right")
    dev = np.flatnonzero(hi - lo == 1)
    ref = lo[dev]
    _, inverse, counts = np.unique(ref, return_inverse=True, return_counts=True)
    keep = counts[inverse] == 1
    return dev[keep], ref[keep]


def _no_pairs(ambiguous: bool, reason: str) -> Pairing:
    empty = np.empty(0, dtype=np.int64)
    return Pairing(empty, empty, 0, 0, ambiguous, reason)


def _heldout_errors(x: np.ndarray, y: np.ndarray, n_intervals: int) -> np.ndarray:
    """Error predicting each pair from a fit (``n_intervals`` pieces) to the folds that exclude it."""
    fold = np.arange(len(x)) % _FOLDS
    errors = np.empty(len(x))
    for f in range(_FOLDS):
        train = fold != f
        knots = _knots(x[train], n_intervals)
        errors[~train] = y[~train] - _evaluate(knots, _solve(x[train], y[train], knots), x[~train])
    return errors


def _knots(x: np.ndarray, n_intervals: int) -> np.ndarray:
    """About ``n_intervals + 1`` knots evenly spread in time, placed on data points so that every piece is
    determined even across a gap in the sync edges. One interval is the affine model."""
    targets = np.linspace(x[0], x[-1], n_intervals + 1)
    return x[np.unique(np.searchsorted(x, targets))]


def _solve(x: np.ndarray, y: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """Least-squares values at ``knots`` of the continuous piecewise-linear function through (x, y)."""
    i = np.clip(np.searchsorted(knots, x, side="right") - 1, 0, len(knots) - 2)
    w = (x - knots[i]) / (knots[i + 1] - knots[i])
    k = len(knots)
    # Normal equations of the hat-function basis: tridiagonal, well conditioned (every knot is a data point).
    diag = np.bincount(i, (1 - w) ** 2, k) + np.bincount(i + 1, w**2, k)
    off = np.bincount(i, (1 - w) * w, k - 1)
    a = np.diag(diag) + np.diag(off, 1) + np.diag(off, -1)
    b = np.bincount(i, (1 - w) * y, k) + np.bincount(i + 1, w * y, k)
    return np.linalg.solve(a, b)


def _evaluate(knots: np.ndarray, values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The piecewise-linear map at ``x``, extended beyond the end knots along the end pieces."""
    y = np.interp(x, knots, values)
    first = (values[1] - values[0]) / (knots[1] - knots[0])
    last = (values[-1] - values[-2]) / (knots[-1] - knots[-2])
    y = np.where(x < knots[0], values[0] + (x - knots[0]) * first, y)
    return np.where(x > knots[-1], values[-1] + (x - knots[-1]) * last, y)


def _lower_envelope(x: np.ndarray, host: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Line ``host = icpt + slope * x`` along the fastest deliveries (latency only ever adds), with the
    residuals of all points: refit to the lowest ``_ENVELOPE_QUANTILE`` of the residuals until it settles."""
    keep = np.ones(len(x), dtype=bool)
    for _ in range(5):
        slope, icpt = _line(x[keep], host[keep])
        res = host - icpt - slope * x
        keep = res <= np.quantile(res, _ENVELOPE_QUANTILE)
    return slope, icpt, res


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares (slope, intercept) of ``y = intercept + slope * x``, centred for precision."""
    xm, ym = x.mean(), y.mean()
    dx = x - xm
    slope = float(dx @ (y - ym) / (dx @ dx))
    return slope, float(ym - slope * xm)


def _increasing(values: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 1 or np.any(np.diff(a) <= 0):
        raise ValueError(f"{name} must be a strictly increasing 1-D array (split counter resets first)")
    return a


def _single_fit(knots: np.ndarray, values: np.ndarray, model: str, source: str, dev_rate: float, n_pairs: int,
                residuals: np.ndarray, error_bound_s: float) -> ClockFit:
    mean_rate = (values[-1] - values[0]) / (knots[-1] - knots[0])  # reference seconds per device sample
    return ClockFit(knots=(knots,), seconds=(values,), model=model, source=source, dev_rate=dev_rate,
                    n_pairs=n_pairs, unmatched_dev=0, unmatched_ref=0,
                    drift_ppm=float((1 / (mean_rate * dev_rate) - 1) * 1e6),
                    residual_rms_s=float(np.sqrt(np.mean(residuals**2))),
                    residual_max_s=float(np.abs(residuals).max()), error_bound_s=error_bound_s)


def _combine(fits: list[ClockFit]) -> ClockFit:
    """One fit of several counter segments; the report pools them (sums, weighted means, worst cases)."""
    if len(fits) == 1:
        return fits[0]
    n = np.array([f.n_pairs for f in fits], dtype=np.float64)
    return ClockFit(
        knots=tuple(k for f in fits for k in f.knots), seconds=tuple(s for f in fits for s in f.seconds),
        model="piecewise" if any(f.model == "piecewise" for f in fits) else "affine",
        source=fits[0].source, dev_rate=fits[0].dev_rate, n_pairs=int(n.sum()),
        unmatched_dev=sum(f.unmatched_dev for f in fits), unmatched_ref=sum(f.unmatched_ref for f in fits),
        drift_ppm=float(np.average([f.drift_ppm for f in fits], weights=n)),
        residual_rms_s=float(np.sqrt(np.average([f.residual_rms_s**2 for f in fits], weights=n))),
        residual_max_s=max(f.residual_max_s for f in fits), error_bound_s=max(f.error_bound_s for f in fits))
