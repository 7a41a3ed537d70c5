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

__all__ = ["MIN_PAIRS", "ClockFit", "ClockFitError", "Pairing", "align_stream", "envelope_residuals", "fit_clock",
           "fit_host_clock", "pair_edges", "split_counter_resets"]

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
_WIDE_PPM = 5000.0  # a pairing refused within max_ppm is tried again this wide, to tell why (acqd.config.QcConfig)

# Fitting.
MIN_PAIRS = 10  # a fit needs this many pairs (public: the live sync lock waits for as many edges)
_FOLDS = 5  # fold f holds out every block of time whose index is f modulo _FOLDS
_BLOCK_S = 20.0  # held-out blocks are at most this long (and at least a tenth of the span per fold)...
_MAX_BLOCKS = 1000  # ...and at most this many, which bounds the cost on day-long recordings
_SPACINGS_S = (30.0, 60.0, 120.0, 300.0, 600.0)  # knot spacings tried by the piecewise model
_MIN_KNOT_SPAN = 0.5  # no piece shorter than this fraction of its nominal spacing (so no piece inside one burst)
_MAX_KNOTS = 500  # bounds the knot solve on day-long recordings
_SLOPE_SIGMAS = 4.0  # extrapolation: the end piece's rate is known to this many standard errors
_PIECEWISE_GAIN = 0.9  # piecewise must cut the held-out RMS error by 10 % to replace affine (stable
#                        clocks: within 1 %; wander worth a sample: by 15 % or more)...
_LATCH_MARGIN = 1.1  # ...and affine must miss held-out pairs by more than this x the latch's RMS error (0.41
#                     sample at equal rates): a margin that wander worth a fifth of a sample already exceeds
_EDGE_GAP_S = 10.0  # a stretch without sync pairs longer than this (and than twice the 99th-percentile interval:
#                     barcodes come every 30 s) is an edge gap: the map interpolates across it, and QC lists it
_EDGE_GAP_FACTOR = 2.0
_RATE_WINDOW_S = 60.0  # the device's rate is measured in windows at least this long (a quarter of the gap)...
_RATE_MIN_PAIRS = 5  # ...holding at least this many pairs
_ENVELOPE_POINTS = 100  # host fit: the line runs under the fastest delivery of each stretch of this many points...
_ENVELOPE_BLOCKS = (8, 64)  # ...and of at least 8 stretches (a bound needs more than the 2 a line passes through),
#                            at most 64 (a day at 100 messages/s: 20 min stretches)

# Re-matching after the first fit: each edge's tolerance follows the scatter of the pairs around it.
_LOCAL_PAIRS = 25  # neighbours on each side that measure the local scatter
_LOCAL_SIGMAS = 4.0  # tolerance: half a latch step of each clock + this many local RMS residuals
_PRIOR_MARGIN_S = 0.01  # added to a host-time prior's bound: the minimum latencies' difference is unobservable


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
    receive time minus the fitted envelope (latency jitter). With several counter segments, only those timed by
    their edges when there are any (``host_segments`` bring their bounds, not their latencies)."""
    residual_max_s: float
    """Largest absolute fit residual (of the edge-timed segments, as ``residual_rms_s``)."""
    error_bound_s: float
    """Bound on the map's error between the end knots. Sync: the largest error predicting pairs held out of the
    fit, and never less than half a sample of each clock. Host: for each of the two lines, the spread of the
    stretches' fastest deliveries above it (``_lower_envelope``), summed. ``with_extrapolation`` adds the error
    of rows beyond the end knots."""
    rejected_pairs: int = 0
    """Pairs of the first pairing dropped after the first fit: outside the tolerance that the local residuals
    set, or disagreeing with their neighbours (a spurious edge paired in place of a missing one)."""
    extrapolation_ppm: float = 0.0
    """How far (ppm of the elapsed time) the rate of the end pieces may be off: beyond the end knots the map's
    error grows by this much per second (slope standard error x _SLOPE_SIGMAS, plus the change in rate between
    the end piece and its neighbour)."""
    pairing: str = ""
    """How sync edges were paired: 'intervals' (random or barcoded intervals), 'intervals + host prior' (the
    host-time fit narrowed the candidates, which lets a regular train pair); empty for other sources."""
    host_segments: tuple[int, ...] = ()
    """Counter segments whose sync edges could not be fitted, timed by host receive times instead."""
    notes: tuple[str, ...] = ()
    """Why each segment in ``host_segments`` could not be fitted from its edges, in the same order."""
    segment_bounds_s: tuple[float, ...] = ()
    """``error_bound_s`` of each counter segment (empty: one segment)."""
    pairs: tuple[np.ndarray, ...] = ()
    """Per counter segment fitted from edges: (2, n) indices of the paired (device edge within the segment,
    reference edge) that the final fit rests on; empty for a host-timed segment."""
    edge_gaps: tuple[tuple[int, float, float, float], ...] = ()
    """(counter segment, device sample of the last pair before, of the first pair after, error bound inside) of
    each stretch without sync pairs longer than ``_EDGE_GAP_S`` (a sync cable unplugged): the map interpolates
    across it, and the bound there grows with the device's rate changes seen elsewhere (``_edge_gaps``)."""

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

    @property
    def span_s(self) -> float:
        """Device seconds between the end knots of the longest counter segment: what the drift is measured over."""
        return max(float(k[-1] - k[0]) for k in self.knots) / self.dev_rate

    @property
    def drift_uncertainty_ppm(self) -> float:
        """How far ``drift_ppm`` may be off: the map is known to ``error_bound_s`` at both ends of ``span_s``, so
        its mean rate to twice that over the span (host timing over 8 s: thousands of ppm; sync edges over
        minutes: a fraction of one)."""
        return 2e6 * self.error_bound_s / self.span_s if self.span_s > 0 else float("inf")

    def to_reference(self, samples: np.ndarray, segment: int | None = None) -> np.ndarray:
        """Reference seconds of (possibly fractional) device sample positions of one counter segment.

        ``segment`` is required when the counter was reset: the same sample index then occurs in several
        segments, so only the caller knows which one a sample belongs to. The map is fitted between the
        first and last paired edges (the end knots); beyond them it extends the end pieces. ``error_bound_s`` of a
        fit returned by ``with_extrapolation`` (as finalize reports it) covers those extrapolated rows too: it grows
        by ``extrapolation_ppm`` of the distance beyond the end knots.
        """
        if segment is None:
            if len(self.knots) > 1:
                raise ValueError(f"the device counter was reset ({len(self.knots)} segments): pass segment=")
            segment = 0
        return _evaluate(self.knots[segment], self.seconds[segment], np.asarray(samples, dtype=np.float64))

    def segment(self, s: int) -> ClockFit:
        """The map of counter segment ``s`` alone (the report's statistics are the whole fit's)."""
        return replace(self, knots=(self.knots[s],), seconds=(self.seconds[s],), host_segments=(), notes=(),
                       segment_bounds_s=(), pairs=(), edge_gaps=tuple((0, *g[1:]) for g in self.edge_gaps if g[0] == s))

    def with_extrapolation(self, first: list[float], last: list[float]) -> ClockFit:
        """This fit with ``error_bound_s`` covering rows beyond the end knots too: ``first`` and ``last`` are the
        first and last device sample each counter segment holds. The bound grows by ``extrapolation_ppm`` of
        the distance beyond the segment's end knots."""
        beyond = max([max(0.0, k[0] - a, b - k[-1]) for k, a, b in zip(self.knots, first, last)], default=0.0)
        return replace(self, error_bound_s=self.error_bound_s + self.extrapolation_ppm * 1e-6 * beyond / self.dev_rate)

    def to_dict(self) -> dict[str, float | int | str | list]:
        """The quality report as plain JSON-able values."""
        return {
            "source": self.source, "model": self.model, "segments": self.segments,
            "counter_resets": self.counter_resets, "n_pairs": self.n_pairs, "unmatched_dev": self.unmatched_dev,
            "unmatched_ref": self.unmatched_ref, "drift_ppm": self.drift_ppm,
            "residual_rms_s": self.residual_rms_s, "residual_max_s": self.residual_max_s,
            "residual_rms_samples": self.residual_rms_samples, "residual_max_samples": self.residual_max_samples,
            "error_bound_s": self.error_bound_s, "error_bound_samples": self.error_bound_samples,
            "rejected_pairs": self.rejected_pairs, "extrapolation_ppm": self.extrapolation_ppm,
            "pairing": self.pairing, "host_segments": list(self.host_segments),
            "segment_bounds_s": list(self.segment_bounds_s), "span_s": self.span_s,
            "edge_gaps": [{"segment": k, "sample_from": a, "sample_to": b, "seconds": (b - a) / self.dev_rate,
                           "reference_from_s": float(self.to_reference(np.array([a]), k)[0]),
                           "reference_to_s": float(self.to_reference(np.array([b]), k)[0]), "bound_s": bound}
                          for k, a, b, bound in self.edge_gaps],
            "drift_uncertainty_ppm": self.drift_uncertainty_ppm,
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
    period = _regular_period(d)
    if prior_s is not None and period and prior_tol_s + quant >= period / 2:
        return _no_pairs(True, f"sync intervals are not distinctive (a regular train, period {period:.4g} s) and the "
                               f"prior, good to {1e3 * prior_tol_s:.1f} ms, does not resolve the period")
    p = _pair_within(d, r, quant, max_ppm * 1e-6, prior_s, prior_tol_s)
    if p.reason and max_ppm < _WIDE_PPM:  # refused within max_ppm: is the device simply further off than that?
        return _beyond_max_ppm(dev_edges, dev_rate, ref_edges, ref_rate, prior_s, prior_tol_s, max_ppm) or p
    return p


def _beyond_max_ppm(dev_edges: np.ndarray, dev_rate: float, ref_edges: np.ndarray, ref_rate: float,
                    prior_s: np.ndarray | None, prior_tol_s: float, max_ppm: float) -> Pairing | None:
    """The true reason for a refused pairing when the edges pair unambiguously over ``_WIDE_PPM`` at a rate
    difference beyond ``max_ppm``; None when they do not (the first reason stands)."""
    wide = pair_edges(dev_edges, dev_rate, ref_edges, ref_rate, max_ppm=_WIDE_PPM, prior_s=prior_s,
                      prior_tol_s=prior_tol_s)
    if wide.ambiguous or len(wide.dev_index) < MIN_PAIRS:
        return None
    d = np.asarray(dev_edges, np.float64)[wide.dev_index] / dev_rate
    r = np.asarray(ref_edges, np.float64)[wide.ref_index] / ref_rate
    ppm = ((d[-1] - d[0]) / (r[-1] - r[0]) - 1) * 1e6
    if abs(ppm) <= max_ppm:
        return None
    return _no_pairs(False, f"the device clock runs {ppm:+.0f} ppm off the reference, beyond the {max_ppm:g} ppm the "
                            f"pairing searches (qc.max_pairing_ppm in the rig config: raise it for such a crystal)")


def _pair_within(d: np.ndarray, r: np.ndarray, quant: float, slope_max: float, prior_s: np.ndarray | None,
                 prior_tol_s: float) -> Pairing:
    """``pair_edges`` on device and reference times (s) at rate differences up to ``slope_max``."""
    ia, ja, n_vague = _anchor_matches(d, r, quant, slope_max, prior_s, prior_tol_s + quant)
    if n_vague > len(np.unique(ia)):
        prior = ("" if prior_s is None else f" (the prior, good to {1e3 * prior_tol_s:.1f} ms, does not resolve "
                 "the period)")
        return _no_pairs(True, f"sync intervals are not distinctive: {n_vague} anchor patterns each fit more than "
                               f"{_MAX_MATCHES} reference positions (regular pulse train?); pairing needs a prior "
                               f"better than half a pulse period{prior}")
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


def fit_clock(dev_samples: np.ndarray, ref_seconds: np.ndarray, dev_rate: float, *, latch_rms_s: float = 0.0,
              bounds: bool = True) -> ClockFit:
    """Fit reference seconds against (strictly increasing, possibly fractional) device sample positions.

    Tries an affine map and continuous piecewise-linear maps with knots every 30 s to 10 min, scores each by
    ``_FOLDS``-fold held-out error, and keeps affine unless a piecewise map cuts the held-out RMS by 10 %.
    Folds hold out whole blocks of time cut at the widest gaps between pairs, so a burst of edges (a barcode)
    is held out whole, and no piece is shorter than half its nominal spacing: clustered edges cannot make a
    short piece look good. ``latch_rms_s`` is the RMS error that latching puts on the pairs (seconds): while the
    affine map predicts held-out pairs that well, the latch explains all of its error and it is kept.
    ``bounds=False``: the map only (the live sync lock's drift and offset): when the pairs span too little time for
    any piecewise map, the affine one is returned without the held-out errors it would not be chosen by (its error
    bound and extrapolation are then nan), at a fraction of the cost; the map is the same.
    """
    x = _increasing(dev_samples, "dev_samples")
    y = np.asarray(ref_seconds, dtype=np.float64)
    if len(x) < MIN_PAIRS:
        raise ClockFitError(f"only {len(x)} sync pairs; need at least {MIN_PAIRS}")
    if not bounds and not _piece_counts((x[-1] - x[0]) / dev_rate):
        knots = x[[0, -1]]  # _knots(x, 1), without its search for inner knots (one interval has none)
        values = _solve(x, y, knots)
        fit = _single_fit(knots, values, "affine", "sync", dev_rate, len(x), y - _evaluate(knots, values, x), np.nan)
        return replace(fit, extrapolation_ppm=np.nan)
    n, heldout = _choose_pieces(x, y, dev_rate, latch_rms_s)
    knots = _knots(x, n)
    values = _solve(x, y, knots)
    return _sync_fit(x, y, knots, values, "affine" if n == 1 else "piecewise", dev_rate, heldout)


def _choose_pieces(x: np.ndarray, y: np.ndarray, dev_rate: float, latch_rms_s: float) -> tuple[int, np.ndarray]:
    """Pieces of the map ``fit_clock`` keeps (1: affine) and that map's held-out error at each pair."""
    pieces = _piece_counts((x[-1] - x[0]) / dev_rate)
    folds = _time_folds(x / dev_rate)
    heldout = {n: _heldout_errors(x, y, n, folds) for n in [1, *pieces]}
    n = min(pieces, key=lambda n: _rms(heldout[n]), default=1)
    if n > 1 and not _clearly_better(heldout[n], heldout[1], latch_rms_s):
        n = 1
    return n, heldout[n]


def _piece_counts(span_s: float) -> list[int]:
    """The numbers of pieces of the piecewise maps ``fit_clock`` tries over pairs spanning ``span_s`` seconds."""
    return sorted({min(_MAX_KNOTS, round(span_s / s)) for s in _SPACINGS_S} - {0, 1})


def _clearly_better(complex_err: np.ndarray, simple_err: np.ndarray, latch_rms_s: float) -> bool:
    """Whether a map with more parameters predicts held-out pairs clearly better than a simpler one: the simpler
    one's RMS error above what latching explains (``_LATCH_MARGIN`` x ``latch_rms_s``), and the other's lower by
    ``_PIECEWISE_GAIN``.

    Latch errors are not independent from pair to pair: 30 ms barcode bits are whole samples at common rates
    (one phase per burst), and a regular train whose period is nearly a whole number of samples of both clocks
    walks its phase slowly, over minutes. A piecewise map then follows the latch error itself, which whole
    held-out blocks do not reveal: 0.58 sample off where the affine map is 0.14."""
    if not np.all(np.isfinite(simple_err)):
        return True
    if _rms(simple_err) <= _LATCH_MARGIN * latch_rms_s:
        return False
    return _rms(complex_err) < _PIECEWISE_GAIN * _rms(simple_err)


def _sync_fit(x: np.ndarray, y: np.ndarray, knots: np.ndarray, values: np.ndarray, model: str, dev_rate: float,
              heldout: np.ndarray) -> ClockFit:
    """The ClockFit of a map through sync pairs (x, y), its bound the largest held-out error."""
    residuals = y - _evaluate(knots, values, x)
    base = float(np.abs(heldout).max())
    gaps = _edge_gaps(x, y, dev_rate, base)
    fit = _single_fit(knots, values, model, "sync", dev_rate, len(x), residuals, max([base, *(g[2] for g in gaps)]))
    return replace(fit, extrapolation_ppm=_extrapolation_ppm(x, residuals, knots, values, dev_rate),
                   edge_gaps=tuple((0, *g) for g in gaps))


def _edge_gaps(x: np.ndarray, y: np.ndarray, dev_rate: float, base: float) -> list[tuple[float, float, float]]:
    """(device sample before, after, error bound) of each edge gap between pairs at device samples ``x``
    (reference seconds ``y``): a stretch without pairs longer than ``_EDGE_GAP_S`` and ``_EDGE_GAP_FACTOR`` times
    the 99th percentile of the intervals between pairs (barcodes come every 30 s).

    Held-out blocks of at most ``_BLOCK_S`` never test an interpolation across minutes, so the bound there comes
    from the device's rate changes instead: across a gap of length L the map is a straight line between pairs on
    either side, and a rate that stays within a range R (the spread of the rates measured in windows of L/4, at
    least ``_RATE_WINDOW_S``, wherever there are pairs) leaves the truth at most R * L / 4 off that line (a rate
    R/2 above the mean for the first half of the gap, below it for the second). Plus the bound elsewhere."""
    t = x / dev_rate
    iv = np.diff(t)
    at = np.flatnonzero(iv > max(_EDGE_GAP_S, _EDGE_GAP_FACTOR * float(np.quantile(iv, 0.99)))) if len(iv) else iv
    if len(at) == 0:
        return []
    spread = _rate_spread(t, y, max(_RATE_WINDOW_S, float(iv[at].max()) / 4))
    return [(float(x[i]), float(x[i + 1]), base + spread * float(iv[i]) / 4) for i in at]


def _rate_spread(t: np.ndarray, y: np.ndarray, window: float) -> float:
    """Largest minus smallest rate (reference seconds per device second) of lines fitted to the pairs in windows of
    ``window`` seconds, overlapping by half, that hold at least ``_RATE_MIN_PAIRS`` pairs over half a window."""
    rates = []
    for a in np.arange(t[0], t[-1], window / 2):
        m = (t >= a) & (t < a + window)
        if m.sum() >= _RATE_MIN_PAIRS and np.ptp(t[m]) >= window / 2:
            rates.append(_line(t[m], y[m])[0])
    return float(np.ptp(rates)) if len(rates) >= 2 else 0.0


def align_stream(dev_edges: np.ndarray, dev_rate: float, ref_edges: np.ndarray, ref_rate: float, *,
                 max_ppm: float = 200.0, prior: ClockFit | None = None) -> ClockFit:
    """Map a device's sample counter to reference seconds from the sync edges both latched.

    Edges are sample indices, the reference's strictly increasing. Splits the device edges at counter resets,
    pairs and fits each segment on its own, then re-matches every edge with a tolerance set by the residuals
    around it and drops pairs that disagree with their neighbours before the final fit. ``prior`` (e.g. from
    ``fit_host_clock``, one segment per counter segment) narrows the pairing to edges it agrees with, within its
    error bound: the only way a regular pulse train pairs; a segment whose edges cannot be paired or fitted is
    then timed by the prior (listed in ``host_segments``). Raises ClockFitError when no segment can be fitted
    from its edges (or, without a prior, when any cannot), and when the reference's edges do not increase.
    """
    dev_edges = np.asarray(dev_edges, dtype=np.int64)
    ref_edges = np.asarray(ref_edges, dtype=np.int64)
    if np.any(np.diff(ref_edges) <= 0):  # bad data, not a bad call: a ClockFitError, as for the device's edges
        raise ClockFitError("the reference's sync edges do not increase (its counter was reset?): it cannot be the "
                            "timebase; finalize picks another (acqd.finalize.timing.timebase_of)")
    segments = split_counter_resets(dev_edges)
    if prior is not None and prior.segments != len(segments):
        raise ClockFitError(f"the prior has {prior.segments} counter segments, the sync edges {len(segments)}")
    fits, failed = [], []
    for s, seg in enumerate(segments):
        try:
            fits.append(_align_segment(dev_edges[seg], dev_rate, ref_edges, ref_rate, max_ppm,
                                       None if prior is None else prior.segment(s)))
        except ClockFitError as e:
            if prior is None or len(segments) == 1:
                raise ClockFitError(f"counter segment {s}: {e}") from None
            fits.append(prior.segment(s))
            failed.append((s, f"counter segment {s}: {e}"))
    if len(failed) == len(segments):
        raise ClockFitError("; ".join(why for _, why in failed))
    fits = _share_rate(fits, [dev_edges[seg] - 0.5 for seg in segments], (ref_edges - 0.5) / ref_rate, dev_rate,
                       ref_rate)
    return replace(_combine(fits), host_segments=tuple(s for s, _ in failed), notes=tuple(w for _, w in failed))


def _share_rate(fits: list[ClockFit], pos: list[np.ndarray], ref_s: np.ndarray, dev_rate: float, ref_rate: float
                ) -> list[ClockFit]:
    """The counter segments' maps refitted as one rate, the device crystal's, with an offset per segment, when
    that predicts each segment's held-out pairs as well as its own map does.

    A counter reset restarts the device's counter, not its crystal: its rate runs on across the reset. The
    segments are laid end to end (each shifted to follow the previous one by the reference time between them)
    and one line is fitted through all of them with a free offset per segment. A short segment alone measures
    its rate badly. Barcode edges make it worse: 30 ms bits are whole samples at common rates, so all edges of one burst
    latch with the same phase, and a segment of a few minutes holds as many independent measurements as bursts
    (8 in 4 minutes: its own affine map was 0.58 sample off at its ends; with the rate shared, 0.21). Only the
    affine map is shared: a piecewise one chosen over all segments at once followed a long segment's wander
    more coarsely than that segment's own map (1.03 sample off instead of 0.46 over 2 h of barcodes).
    """
    synced = [s for s, f in enumerate(fits) if f.source == "sync"]
    if len(synced) < 2:
        return fits
    xs = [pos[s][fits[s].pairs[0][0]] for s in synced]
    ys = [ref_s[fits[s].pairs[0][1]] for s in synced]
    shift = [0.0]
    for k in range(1, len(xs)):
        shift.append(xs[k - 1][-1] + shift[-1] + (ys[k][0] - ys[k - 1][-1]) * dev_rate - xs[k][0])
    x = np.concatenate([xk + sk for xk, sk in zip(xs, shift)])
    y, seg = np.concatenate(ys), np.repeat(np.arange(len(xs)), [len(xk) for xk in xs])
    if np.any(np.diff(x) <= 0):
        return fits  # the segments overlap in reference time: not one device running on
    latch = _latch_rms(dev_rate, ref_rate)
    shared = _heldout_errors(x, y, 1, _time_folds(x / dev_rate), seg)
    own = np.concatenate([_choose_pieces(xk, yk, dev_rate, latch)[1] for xk, yk in zip(xs, ys)])
    if any(_clearly_better(own[seg == k], shared[seg == k], latch) for k in range(len(xs))):
        return fits  # the rate changed across a reset (wander): judged per segment, or a long one hides a short one
    knots = x[[0, -1]]
    values, jumps = _solve_offsets(x, y, knots, seg)
    if not np.all(np.isfinite(jumps)):
        return fits
    out = list(fits)
    for k, s in enumerate(synced):
        inside = seg == k
        lo, hi = x[inside][0], x[inside][-1]
        at = np.array([lo, hi])
        fit = _sync_fit(xs[k], ys[k], at - shift[k], _evaluate(knots, values, at) + jumps[k], "affine", dev_rate,
                        shared[inside])
        out[s] = replace(fits[s], knots=fit.knots, seconds=fit.seconds, model=fit.model, drift_ppm=fit.drift_ppm,
                         residual_rms_s=fit.residual_rms_s, residual_max_s=fit.residual_max_s,
                         error_bound_s=max(fit.error_bound_s, 0.5 / dev_rate + 0.5 / ref_rate),
                         extrapolation_ppm=fit.extrapolation_ppm, edge_gaps=fit.edge_gaps)
    return out


def _latch_rms(dev_rate: float, ref_rate: float) -> float:
    """RMS error (seconds) of a pair's time difference from latching: each clock latches an edge up to one of its
    samples late, uniformly when the pulse's phase against it varies."""
    return float(np.sqrt((dev_rate**-2 + ref_rate**-2) / 12))


def _rms(e: np.ndarray) -> float:
    return float(np.sqrt(np.mean(e**2)))


def _align_segment(edges: np.ndarray, dev_rate: float, ref_edges: np.ndarray, ref_rate: float, max_ppm: float,
                   prior: ClockFit | None) -> ClockFit:
    """Pair, fit, re-match and refit one counter segment's edges."""
    tol_s = 0.0 if prior is None else prior.error_bound_s + _PRIOR_MARGIN_S
    p = pair_edges(edges, dev_rate, ref_edges, ref_rate, max_ppm=max_ppm,
                   prior_s=None if prior is None else prior.to_reference(edges), prior_tol_s=tol_s)
    if p.ambiguous or len(p.dev_index) < MIN_PAIRS:
        raise ClockFitError(p.reason or f"only {len(p.dev_index)} sync edges paired")
    # A latched index k means the edge fell in (k-1, k] of that counter: on average at k - 1/2. That
    # average holds only if the pulses' phase against the sample clocks varies; pulses locked to a clock
    # (e.g. generated by the reference) latch with a constant, unknown lag. The bound therefore never
    # claims better than half a sample of each clock, which held-out errors cannot see.
    pos, ref_s = edges - 0.5, (ref_edges - 0.5) / ref_rate
    latch = _latch_rms(dev_rate, ref_rate)
    first = fit_clock(pos[p.dev_index], ref_s[p.ref_index], dev_rate, latch_rms_s=latch)
    di, rj = _rematch(first, pos, ref_s, p.dev_index, p.ref_index, 1 / dev_rate + 1 / ref_rate)
    same = np.array_equal(di, p.dev_index) and np.array_equal(rj, p.ref_index)
    fit = first if same else fit_clock(pos[di], ref_s[rj], dev_rate, latch_rms_s=latch)
    kept = len(np.intersect1d(p.dev_index * (len(ref_s) + 1) + p.ref_index, di * (len(ref_s) + 1) + rj))
    return replace(fit, unmatched_dev=p.unmatched_dev + len(p.dev_index) - len(di),
                   unmatched_ref=p.unmatched_ref + len(p.dev_index) - len(di), rejected_pairs=len(p.dev_index) - kept,
                   error_bound_s=max(fit.error_bound_s, 0.5 / dev_rate + 0.5 / ref_rate),
                   pairing="intervals" if prior is None else "intervals + host prior", pairs=(np.stack([di, rj]),))


def _rematch(fit: ClockFit, pos: np.ndarray, ref_s: np.ndarray, di: np.ndarray, rj: np.ndarray, quant: float
             ) -> tuple[np.ndarray, np.ndarray]:
    """Pairs again, by the first fit: each device edge with the only reference edge within half a latch step of
    each clock plus ``_LOCAL_SIGMAS`` RMS residuals of the pairs around it; then pairs whose residual differs
    from their neighbours' mean by more than that are dropped. The pairing stage's tolerance follows a
    straight line and is wide under thermal wander; this one follows the fit and the local scatter."""
    pred = fit.to_reference(pos)
    local = _local_rms(ref_s[rj] - pred[di])
    tol = quant / 2 + _LOCAL_SIGMAS * np.interp(pos, pos[di], local)
    di, rj = _assign(pred, ref_s, tol)
    if len(di) < 3:
        return di, rj
    res = ref_s[rj] - pred[di]
    keep = np.abs(res - _neighbour_mean(res)) <= tol[di]
    return di[keep], rj[keep]


def _local_rms(res: np.ndarray) -> np.ndarray:
    """RMS of the residuals within ``_LOCAL_PAIRS`` pairs on either side of each (a running mean of squares)."""
    c = np.concatenate([[0.0], np.cumsum(res**2)])
    i = np.arange(len(res))
    lo, hi = np.maximum(i - _LOCAL_PAIRS, 0), np.minimum(i + _LOCAL_PAIRS + 1, len(res))
    return np.sqrt((c[hi] - c[lo]) / (hi - lo))


def _neighbour_mean(res: np.ndarray) -> np.ndarray:
    """Mean residual of the ``_LOCAL_PAIRS`` pairs on either side of each pair, itself excluded (so one wrong
    pair cannot pull its own reference; among 50 neighbours it moves theirs by a fiftieth of its offset)."""
    c = np.concatenate([[0.0], np.cumsum(res)])
    i = np.arange(len(res))
    lo, hi = np.maximum(i - _LOCAL_PAIRS, 0), np.minimum(i + _LOCAL_PAIRS + 1, len(res))
    return (c[hi] - c[lo] - res) / np.maximum(hi - lo - 1, 1)


def fit_host_clock(dev_samples: np.ndarray, dev_host_s: np.ndarray, ref_samples: np.ndarray,
                   ref_host_s: np.ndarray, dev_rate: float, ref_rate: float) -> ClockFit:
    """Fallback for a stream without a sync line: map it to reference seconds through host receive times.

    Each sample index comes with the host time (seconds, one host clock for both streams) at which the data
    up to that index had arrived; for a chunk pass the index just past its last sample, since a chunk is
    sent only once complete. Receive time is true time plus a positive, variable latency, so each stream is
    fitted by the lower envelope of its receive times and the two lines are composed. A difference between
    the two streams' minimum latencies cannot be observed and is not in the error bound.
    """
    ref_slope, ref_icpt, ref_res, ref_height = _lower_envelope(np.asarray(ref_samples, np.float64),
                                                               np.asarray(ref_host_s, np.float64))
    dev_samples = np.asarray(dev_samples, dtype=np.float64)
    dev_host_s = np.asarray(dev_host_s, dtype=np.float64)
    fits = []
    for seg in split_counter_resets(dev_samples):
        x = dev_samples[seg]
        if len(x) < MIN_PAIRS:
            raise ClockFitError(f"only {len(x)} host-time points in a counter segment; need {MIN_PAIRS}")
        slope, icpt, res, height = _lower_envelope(x, dev_host_s[seg])
        knots = x[[0, -1]]
        # Host time -> reference sample via the reference line; subtract the large host times first.
        values = (icpt - ref_icpt + slope * knots) / ref_slope / ref_rate
        fits.append(_single_fit(knots, values, "affine", "host", dev_rate, len(x), np.concatenate([res, ref_res]),
                                height + ref_height))
    return _combine(fits)


def envelope_residuals(samples: np.ndarray, host_s: np.ndarray) -> np.ndarray:
    """Host receive times above the line ``fit_host_clock`` fits under the fastest deliveries (for the QC plot)."""
    return _lower_envelope(np.asarray(samples, np.float64), np.asarray(host_s, np.float64))[2]


def _regular_period(d: np.ndarray) -> float:
    """The period of a regular train (most intervals within 1 % of their median), else 0."""
    iv = np.diff(d)
    med = float(np.median(iv))
    return med if float(np.median(np.abs(iv - med))) <= 0.01 * med else 0.0


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
    if prior_s is not None:
        return _anchor_matches_near(anchors, dev_iv, ref_iv, r, quant, slope_max, prior_s, prior_tol)
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


def _anchor_matches_near(anchors: np.ndarray, dev_iv: np.ndarray, ref_iv: np.ndarray, r: np.ndarray, quant: float,
                         slope_max: float, prior_s: np.ndarray, prior_tol: float) -> tuple[np.ndarray, np.ndarray, int]:
    """``_anchor_matches`` given a prior: only the reference positions within ``prior_tol`` of each anchor's prior
    time are candidates, so the cost follows the candidates, not anchors x reference edges."""
    lo = np.searchsorted(r[: len(ref_iv)], prior_s[anchors] - prior_tol, side="left")
    hi = np.searchsorted(r[: len(ref_iv)], prior_s[anchors] + prior_tol, side="right")
    n = hi - lo
    i = np.repeat(anchors, n)
    j = np.repeat(lo, n) + np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    tol = quant + slope_max * dev_iv[i] + 1e-9
    ok = np.all(np.abs(ref_iv[j] - dev_iv[i]) <= tol, axis=1)
    per_anchor = np.bincount(np.searchsorted(anchors, i[ok]), minlength=len(anchors))
    vague = per_anchor > _MAX_MATCHES
    keep = ok & ~np.repeat(vague, n)
    return i[keep], j[keep], int(vague.sum())


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


def _assign(pred: np.ndarray, r: np.ndarray, tol: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pair each predicted device edge with the only reference edge within ``tol`` (one for all, or per edge);
    anything contested (two
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


def _time_folds(t: np.ndarray) -> np.ndarray:
    """Fold of each pair (times ``t`` in seconds, increasing): whole blocks of time, cut at the widest gap between
    pairs near each nominal boundary, so a burst of edges is never split between folds."""
    span = t[-1] - t[0]
    length = max(min(_BLOCK_S, span / (2 * _FOLDS)), span / _MAX_BLOCKS, 1e-9)
    cuts = []
    for target in np.arange(t[0] + length, t[-1], length):
        lo = int(np.searchsorted(t, target - length / 2))
        hi = int(np.searchsorted(t, target + length / 2))
        lo, hi = max(lo, 1), max(min(hi, len(t) - 1), lo)
        cuts.append(lo + int(np.argmax(np.diff(t[lo - 1:hi + 1]))))
    block = np.searchsorted(np.unique(np.asarray(cuts, dtype=np.int64)), np.arange(len(t)), side="right")
    return block % _FOLDS


def _heldout_errors(x: np.ndarray, y: np.ndarray, n_intervals: int, folds: np.ndarray,
                    seg: np.ndarray | None = None) -> np.ndarray:
    """Error predicting each pair from a fit (``n_intervals`` pieces) to the folds that exclude it; inf for a pair
    whose counter segment (``seg``) has no pair left to fit its offset."""
    errors = np.zeros(len(x))
    for f in range(_FOLDS):
        train = folds != f
        if train.sum() < 2 or train.all():
            continue
        knots = _knots(x[train], n_intervals)
        if seg is None:
            errors[~train] = y[~train] - _evaluate(knots, _solve(x[train], y[train], knots), x[~train])
            continue
        values, jumps = _solve_offsets(x[train], y[train], knots, seg[train])
        errors[~train] = y[~train] - _evaluate(knots, values, x[~train]) - jumps[seg[~train]]
    return np.where(np.isnan(errors), np.inf, errors)


def _knots(x: np.ndarray, n_intervals: int) -> np.ndarray:
    """About ``n_intervals + 1`` knots evenly spread in time, placed on data points so that every piece is
    determined even across a gap in the sync edges, and no piece shorter than ``_MIN_KNOT_SPAN`` of the nominal
    spacing (data points clustered in bursts would otherwise put both ends of a piece in one burst). One
    interval is the affine model."""
    targets = np.linspace(x[0], x[-1], n_intervals + 1)
    candidates = x[np.unique(np.searchsorted(x, targets))]
    min_span = _MIN_KNOT_SPAN * (x[-1] - x[0]) / n_intervals
    kept = [x[0]]
    for k in candidates[1:-1].tolist():
        if k - kept[-1] >= min_span and x[-1] - k >= min_span:
            kept.append(k)
    kept.append(x[-1])
    return np.asarray(kept)


def _solve(x: np.ndarray, y: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """Least-squares values at ``knots`` of the continuous piecewise-linear function through (x, y)."""
    i = np.clip(np.searchsorted(knots, x, side="right") - 1, 0, len(knots) - 2)
    w = (x - knots[i]) / (knots[i + 1] - knots[i])
    k = len(knots)
    # Normal equations of the hat-function basis: tridiagonal, symmetric positive definite (every knot is a
    # data point). Solved in O(knots) without BLAS, so the time does not depend on its threading.
    diag = np.bincount(i, (1 - w) ** 2, k) + np.bincount(i + 1, w**2, k)
    off = np.bincount(i, (1 - w) * w, k - 1)
    b = np.bincount(i, (1 - w) * y, k) + np.bincount(i + 1, w * y, k)
    return _tridiagonal(diag, off, b)


def _solve_offsets(x: np.ndarray, y: np.ndarray, knots: np.ndarray, seg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``_solve`` plus a constant offset per counter segment (``seg``: 0, 1, ... for each point): the values at the
    knots, and each segment's offset (0 for the first segment with points; nan for one without, or when the
    offsets cannot be told from the map). The tridiagonal system is bordered by one column per further segment
    and solved through its Schur complement: one more tridiagonal solve per segment."""
    i = np.clip(np.searchsorted(knots, x, side="right") - 1, 0, len(knots) - 2)
    w = (x - knots[i]) / (knots[i + 1] - knots[i])
    k = len(knots)
    diag = np.bincount(i, (1 - w) ** 2, k) + np.bincount(i + 1, w**2, k)
    off = np.bincount(i, (1 - w) * w, k - 1)
    values = _tridiagonal(diag, off, np.bincount(i, (1 - w) * y, k) + np.bincount(i + 1, w * y, k))
    present = np.unique(seg)
    jumps = np.full(int(seg.max()) + 1, np.nan)
    jumps[present[0]] = 0.0
    cols = present[1:]
    if len(cols) == 0:
        return values, jumps
    masks = [seg == c for c in cols]
    border = np.stack([np.bincount(i[m], 1 - w[m], k) + np.bincount(i[m] + 1, w[m], k) for m in masks], axis=1)
    solved = np.stack([_tridiagonal(diag, off, border[:, j]) for j in range(len(cols))], axis=1)
    schur = np.diag([float(m.sum()) for m in masks]) - np.einsum("km,kn->mn", border, solved)
    rhs = np.array([float(y[m].sum()) for m in masks]) - np.einsum("km,k->m", border, values)
    try:
        c = np.linalg.solve(schur, rhs)
    except np.linalg.LinAlgError:
        return values, np.full(len(jumps), np.nan)
    jumps[cols] = c
    return values - solved @ c if len(cols) > 1 else values - solved[:, 0] * c[0], jumps


def _tridiagonal(diag: np.ndarray, off: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve a symmetric positive-definite tridiagonal system (Thomas algorithm: stable without pivoting for
    such matrices). numpy has no banded solver and this is the only one acqd needs."""
    n = len(diag)
    d, r = diag.tolist(), b.tolist()
    o = off.tolist()
    for j in range(1, n):
        m = o[j - 1] / d[j - 1]
        d[j] -= m * o[j - 1]
        r[j] -= m * r[j - 1]
    out = [0.0] * n
    out[-1] = r[-1] / d[-1]
    for j in range(n - 2, -1, -1):
        out[j] = (r[j] - o[j] * out[j + 1]) / d[j]
    return np.asarray(out)


def _extrapolation_ppm(x: np.ndarray, residuals: np.ndarray, knots: np.ndarray, values: np.ndarray,
                       dev_rate: float) -> float:
    """How far the rate of either end piece may be off, in ppm: ``_SLOPE_SIGMAS`` standard errors of the slope
    fitted to the pairs of that piece, plus the change in rate from the neighbouring piece (wander)."""
    slopes = np.diff(values) / np.diff(knots)
    floor = float(np.sqrt(np.mean(residuals**2)))
    worst = 0.0
    for piece, neighbour in ((0, 1), (len(slopes) - 1, len(slopes) - 2)):
        inside = (x >= knots[piece]) & (x <= knots[piece + 1])
        dx = x[inside] - x[inside].mean()
        spread = float(np.sum(dx * dx))
        scatter = max(floor, float(np.sqrt(np.mean(residuals[inside] ** 2))))
        se = scatter / np.sqrt(spread) if spread > 0 else np.inf
        change = abs(slopes[piece] - slopes[neighbour]) if len(slopes) > 1 else 0.0
        worst = max(worst, (_SLOPE_SIGMAS * se + change) * dev_rate * 1e6)
    return float(worst)


def _evaluate(knots: np.ndarray, values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The piecewise-linear map at ``x``, extended beyond the end knots along the end pieces."""
    y = np.interp(x, knots, values)
    first = (values[1] - values[0]) / (knots[1] - knots[0])
    last = (values[-1] - values[-2]) / (knots[-1] - knots[-2])
    y = np.where(x < knots[0], values[0] + (x - knots[0]) * first, y)
    return np.where(x > knots[-1], values[-1] + (x - knots[-1]) * last, y)


def _lower_envelope(x: np.ndarray, host: np.ndarray) -> tuple[float, float, np.ndarray, float]:
    """Line ``host = icpt + slope * x`` under every delivery (latency only ever adds), the residuals of all points
    (>= 0), and how far it sits below the fastest delivery of the stretch it fits worst (the error bound's share).

    The points are cut into stretches of equal count (``_ENVELOPE_POINTS`` each, within ``_ENVELOPE_BLOCKS``); the
    line is fitted to each stretch's fastest delivery, refitted until those settle, and lowered under the lowest.
    The bound is how far above it the stretches' fastest deliveries spread: a line tilted by a misjudged slope,
    or a clock that wanders, leaves some stretch's fastest delivery that far above it. Minima, not a low quantile:
    on a loaded PC a latency's fastest fifth moves by tenths of a millisecond from one second to the next while
    its minimum holds within ~0.1 ms (tests/multipc, 12 s on a loaded 2-core machine: a line through a host-timed
    stream's fastest fifth was tilted by 18 ppm, and once ended 0.27 ms off against its bound of 0.23 ms). A
    stream read in batches and one read per message share the minimum, so two streams' lines differ by their
    minimum latencies only."""
    stretches = min(len(x), int(np.clip(len(x) // _ENVELOPE_POINTS, *_ENVELOPE_BLOCKS)))
    blocks = np.array_split(np.arange(len(x)), stretches)
    slope, icpt = _line(x, host)
    for _ in range(5):
        res = host - icpt - slope * x
        fastest = np.array([b[np.argmin(res[b])] for b in blocks])
        fitted = _line(x[fastest], host[fastest])
        if fitted == (slope, icpt):
            break
        slope, icpt = fitted
    res = host - icpt - slope * x
    lows = np.array([res[b].min() for b in blocks])
    return slope, icpt + float(lows.min()), res - lows.min(), float(lows.max() - lows.min())


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares (slope, intercept) of ``y = intercept + slope * x``, centred for precision."""
    xm, ym = x.mean(), y.mean()
    dx = x - xm
    slope = float(np.sum(dx * (y - ym)) / np.sum(dx * dx))  # not BLAS (@): its threads cost more than the sum
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
    """One fit of several counter segments; the report pools them (sums, weighted means, worst cases).

    Drift and residuals describe the segments timed by their edges when there are any: a host-timed segment's
    residuals are receive latencies (milliseconds, thousands of samples), not the scatter of an edge fit, and its
    drift over a few seconds of host times is noise. Its share of the map's error is its bound, which
    ``error_bound_s`` (the worst segment's) and ``segment_bounds_s`` keep."""
    if len(fits) == 1:
        return fits[0]
    synced = [f for f in fits if f.source == "sync"]
    pooled = synced or fits
    n = np.array([f.n_pairs for f in pooled], dtype=np.float64)
    return ClockFit(
        knots=tuple(k for f in fits for k in f.knots), seconds=tuple(s for f in fits for s in f.seconds),
        model="piecewise" if any(f.model == "piecewise" for f in fits) else "affine",
        source="sync" if synced else fits[0].source, dev_rate=fits[0].dev_rate, n_pairs=int(n.sum()),
        unmatched_dev=sum(f.unmatched_dev for f in fits), unmatched_ref=sum(f.unmatched_ref for f in fits),
        drift_ppm=float(np.average([f.drift_ppm for f in pooled], weights=n)),
        residual_rms_s=float(np.sqrt(np.average([f.residual_rms_s**2 for f in pooled], weights=n))),
        residual_max_s=max(f.residual_max_s for f in pooled), error_bound_s=max(f.error_bound_s for f in fits),
        rejected_pairs=sum(f.rejected_pairs for f in fits),
        extrapolation_ppm=max(f.extrapolation_ppm for f in fits), pairing=synced[0].pairing if synced else "",
        segment_bounds_s=tuple(f.error_bound_s for f in fits),
        edge_gaps=tuple((k, *g[1:]) for k, f in enumerate(fits) for g in f.edge_gaps),
        pairs=tuple(f.pairs[0] if f.pairs else np.empty((2, 0), np.int64) for f in fits))
