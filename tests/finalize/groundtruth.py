"""An independent ground truth for clock alignment: oscillators, sync trains, latched edges, host receive times.

Written apart from ``acqd.sim`` (which the finalizer's own simulator uses) so that the clock fit is not judged
by a model of the same hands. Differences on purpose: a device's counter is defined by integrating its
frequency on a fine grid of true time (the counter *is* the piecewise-linear interpolation of that grid, so it
is exact by construction), the thermal wander is a sum of several random sinusoids (not one), counter resets
start a new segment at any counter value, and edges carry the id of the pulse they came from (-1: spurious),
so a wrong pair can be recognised. Pure numpy; deterministic for a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GRID_S = 0.05  # the counter is linear between grid points of true time
HOST_EPOCH_S = 1.7e9  # host clock reading at true time 0


@dataclass(frozen=True)
class Oscillator:
    """A crystal-driven counter: nominal rate, a constant error, and a wander of its frequency."""

    rate: float
    grid_t: np.ndarray
    grid_count: np.ndarray

    @classmethod
    def make(cls, rng: np.random.Generator, rate: float, ppm: float, wander_ppm: float, t0: float, t1: float,
             wander: str = "sines") -> Oscillator:
        """``wander``: 'sines' (four random sinusoids of 300-3600 s), 'sine' (one of 300 s) or 'walk' (a random walk
        of the frequency), each scaled to a peak of ``wander_ppm``."""
        t = np.arange(t0 - 5.0, t1 + 5.0 + GRID_S, GRID_S)
        freq = np.full(len(t), 1 + ppm * 1e-6)
        if wander_ppm:
            w = np.zeros(len(t))
            if wander == "sines":
                for _ in range(4):
                    w += np.sin(2 * np.pi * t / rng.uniform(300, 3600) + rng.uniform(0, 2 * np.pi))
            elif wander == "sine":
                w = np.sin(2 * np.pi * t / 300.0 + rng.uniform(0, 2 * np.pi))
            elif wander == "walk":
                w = np.cumsum(rng.normal(0, 1, len(t)))
                w -= w.mean()
            else:
                raise ValueError(wander)
            freq += wander_ppm * 1e-6 * w / max(np.abs(w).max(), 1e-12)
        count = np.concatenate([[0.0], np.cumsum(0.5 * (freq[1:] + freq[:-1]) * GRID_S)]) * rate
        return cls(rate, t, count + rng.uniform(0, 1e6))

    def count(self, t: np.ndarray) -> np.ndarray:
        return np.interp(t, self.grid_t, self.grid_count)

    def time_at(self, count: np.ndarray) -> np.ndarray:
        return np.interp(count, self.grid_count, self.grid_t)


@dataclass(frozen=True)
class Recording:
    """One device's recording: counter segments (true start, true stop, counter value at start) on a clock."""

    osc: Oscillator
    segments: list[tuple[float, float, int]]

    def sample(self, t: np.ndarray, seg: int) -> np.ndarray:
        """The sample index that latches an edge at true time ``t`` (the first sample at or after it)."""
        a, _, k0 = self.segments[seg]
        return np.ceil(self.osc.count(t) - self.osc.count(a) + k0 - 1e-9).astype(np.int64)

    def true_time(self, k: np.ndarray, seg: int) -> np.ndarray:
        a, _, k0 = self.segments[seg]
        return self.osc.time_at(np.asarray(k, dtype=np.float64) - k0 + self.osc.count(a))

    def sample_span(self, seg: int) -> tuple[int, int]:
        """First and last sample of a segment."""
        a, b, _ = self.segments[seg]
        return int(self.sample(np.array([a]), seg)[0]), int(self.sample(np.array([b]), seg)[0]) - 1


@dataclass
class Edges:
    samples: np.ndarray
    pulse: np.ndarray
    """Pulse id of each edge; -1 for a spurious edge."""


def regular_train(t0: float, t1: float, period_s: float, gen_ppm: float, phase: float) -> np.ndarray:
    """A square wave from a generator with its own crystal error: one rising edge per period."""
    p = period_s * (1 + gen_ppm * 1e-6)
    return t0 + phase * p + np.arange(int((t1 - t0) / p) + 1) * p


def random_train(rng: np.random.Generator, t0: float, t1: float, lo: float = 0.5, hi: float = 1.5) -> np.ndarray:
    n = int((t1 - t0) / lo) + 2
    t = t0 + np.cumsum(rng.uniform(lo, hi, n))
    return t[t < t1]


def barcode_train(rng: np.random.Generator, t0: float, t1: float, every_s: float = 30.0, bit_s: float = 0.03,
                  bits: int = 32) -> np.ndarray:
    """Rising edges of barcodes: every ~``every_s`` a 10 ms start pulse, then an incrementing counter sent
    as ``bits`` bits of ``bit_s`` (an edge where a bit goes 0 -> 1)."""
    out = []
    start = t0 + rng.uniform(0, every_s)
    code = int(rng.integers(0, 2**20))
    while start < t1 - 2:
        out.append(start)
        prev = 0
        for b in range(bits):
            bit = (code >> b) & 1
            if bit and not prev:
                out.append(start + 0.04 + b * bit_s)
            prev = bit
        code += 1
        start += every_s + rng.uniform(-0.5, 0.5)
    return np.asarray(out)


def latch(rng: np.random.Generator, rec: Recording, pulses: np.ndarray, missing: float, extra: float) -> Edges:
    """Edges a recording latches in each of its segments, in time order; some missed, some spurious."""
    samples, ids = [], []
    for seg, (a, b, _) in enumerate(rec.segments):
        inside = np.flatnonzero((pulses >= a) & (pulses < b))
        inside = inside[rng.random(len(inside)) >= missing]
        n_extra = rng.binomial(max(len(inside), 1), extra)
        t = np.concatenate([pulses[inside], rng.uniform(a, b, n_extra)])
        pid = np.concatenate([inside, np.full(n_extra, -1)])
        k = rec.sample(t, seg)
        order = np.argsort(k, kind="stable")
        k, pid = k[order], pid[order]
        first = np.r_[True, np.diff(k) > 0]  # two edges on one sample are one edge
        samples.append(k[first])
        ids.append(pid[first])
    return Edges(np.concatenate(samples), np.concatenate(ids))


def host_points(rng: np.random.Generator, rec: Recording, chunk_s: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(sample just past each chunk, host receive time): a host clock 20 ppm off, latency 0.1-3 ms, 2 % +20 ms."""
    ks, hs = [], []
    for seg, (a, b, _) in enumerate(rec.segments):
        first, last = rec.sample_span(seg)
        step = max(1, int(round(chunk_s * rec.osc.rate)))
        k = np.arange(first + step, last + 1, step)
        t = rec.true_time(k, seg)
        latency = rng.uniform(1e-4, 3e-3, len(k)) + np.where(rng.random(len(k)) < 0.02, 0.02, 0.0)
        ks.append(k)
        hs.append(HOST_EPOCH_S + t * (1 + 20e-6) + latency - HOST_EPOCH_S)
    return np.concatenate(ks).astype(np.float64), np.concatenate(hs)


# -- whole cases: a reference and a device recording one train, and how a fit did --------------------------------

REF_RATE = 30000.0


@dataclass
class Case:
    ref: Recording
    dev: Recording
    ref_edges: Edges
    dev_edges: Edges
    ref_host: tuple[np.ndarray, np.ndarray]
    dev_host: tuple[np.ndarray, np.ndarray]
    period_s: float
    """The train's period (regular) or typical interval (others)."""
    drift_ppm: float
    """The device's mean rate error against the reference (both crystals are off)."""


def make_case(seed: int, scheme: str, seconds: float, *, dev_rate: float = 30000.0, ppm: float = 30.0,
              wander_ppm: float = 0.0, missing: float = 0.0, extra: float = 0.0, reset_at: float | None = None,
              late_periods: int = 0, period_s: float = 1.0, wander: str = "sines",
              unplugged: tuple[float, float] | None = None) -> Case:
    """The reference records [0, seconds); the device starts ``late_periods`` whole periods (+ a fraction of a
    second) later and stops a little before the end, its counter reset at ``reset_at`` (fraction of the run).
    ``wander``: the kind of frequency wander (``Oscillator.make``). ``unplugged``: a window of true time in which
    the device's sync cable was out (it latched no edge; the reference did)."""
    rng = np.random.default_rng(seed)
    ref_ppm = rng.uniform(-20, 20)
    ref_osc = Oscillator.make(rng, REF_RATE, ref_ppm, wander_ppm, -1, seconds + 1, wander)
    dev_osc = Oscillator.make(rng, dev_rate, ppm, wander_ppm, -1, seconds + 1, wander)
    ref = Recording(ref_osc, [(0.0, seconds, int(rng.integers(0, 10**7)))])
    start = late_periods * period_s + rng.uniform(0.05, 0.5)
    stop = seconds - rng.uniform(0.05, 0.5)
    if reset_at is None:
        segments = [(start, stop, int(rng.integers(0, 10**8)))]
    else:
        cut = start + reset_at * (stop - start)
        segments = [(start, cut, int(rng.integers(0, 10**8))), (cut + rng.uniform(0.1, 2.0), stop, 0)]
    dev = Recording(dev_osc, segments)
    if scheme == "regular":
        pulses = regular_train(-1, seconds + 1, period_s, rng.uniform(-50, 50), rng.uniform(0, 1))
    elif scheme == "random":
        pulses = random_train(rng, -1, seconds + 1)
    elif scheme == "barcode":
        pulses = barcode_train(rng, -1, seconds + 1)
        period_s = 30.0
    else:
        raise ValueError(scheme)
    dev_edges = latch(rng, dev, pulses, missing, extra)
    if unplugged is not None:
        t = np.where(dev_edges.pulse >= 0, pulses[np.maximum(dev_edges.pulse, 0)], np.nan)
        out = (t >= unplugged[0]) & (t < unplugged[1])
        dev_edges = Edges(dev_edges.samples[~out], dev_edges.pulse[~out])
    return Case(ref, dev, latch(rng, ref, pulses, missing, extra), dev_edges,
                host_points(rng, ref), host_points(rng, dev), period_s, relative_ppm(ppm, ref_ppm))


def relative_ppm(ppm: float, ref_ppm: float) -> float:
    """The drift a fit should find: a device's crystal error against the reference's (each vs true time)."""
    return ((1 + ppm * 1e-6) / (1 + ref_ppm * 1e-6) - 1) * 1e6


@dataclass
class Outcome:
    max_error_samples: float
    """Largest |map - truth| over every device sample recorded (extrapolated rows too), in device samples."""
    inside_error_samples: float
    """Largest |map - truth| between the end knots (the first and last pairs) of each segment."""
    bound_samples: float
    """The fit's error bound, grown to cover the extrapolated rows, in device samples."""
    covered: bool
    """Every error within the bound."""
    pairs: int
    wrong_pairs: int


def evaluate(case: Case, fit) -> Outcome:
    """Compare an ``acqd.finalize.clock`` fit with the truth over every sync-fitted segment."""
    rate = case.dev.osc.rate
    first, last = zip(*(case.dev.sample_span(s) for s in range(len(case.dev.segments))))
    # getattr: so that this module also judges fits of older acqd versions (regression checks)
    bounded = fit.with_extrapolation([float(a) for a in first], [float(b) for b in last]) \
        if hasattr(fit, "with_extrapolation") else fit
    worst, inside, wrong, pairs = 0.0, 0.0, 0, 0
    seg_of = np.repeat(np.arange(len(case.dev.segments)), [_count(case, s) for s in range(len(case.dev.segments))])
    for s in range(len(case.dev.segments)):
        if s in getattr(fit, "host_segments", ()):
            continue
        k = np.unique(np.r_[np.linspace(first[s], last[s], 4001).round(), first[s], last[s]])
        truth = case.ref.osc.count(case.dev.true_time(k, s)) - case.ref.osc.count(0.0) + case.ref.segments[0][2]
        err = np.abs(fit.to_reference(k, s if fit.segments > 1 else None) * REF_RATE - truth) / REF_RATE * rate
        worst = max(worst, float(err.max()))
        knots = fit.knots[s]
        within = (k >= knots[0]) & (k <= knots[-1])
        inside = max(inside, float(err[within].max()) if within.any() else 0.0)
        if getattr(fit, "pairs", ()):
            di, rj = fit.pairs[s]
            dev_pulse = case.dev_edges.pulse[seg_of == s][di]
            ref_pulse = case.ref_edges.pulse[rj]
            wrong += int(np.sum((dev_pulse < 0) | (dev_pulse != ref_pulse)))
            pairs += len(di)
    bound = bounded.error_bound_s * rate
    return Outcome(worst, inside, bound, worst <= bound + 1e-9, pairs, wrong)


def _count(case: Case, seg: int) -> int:
    """Device edges in segment ``seg`` (edges are stored segment after segment)."""
    from acqd.finalize.clock import split_counter_resets
    sl = split_counter_resets(case.dev_edges.samples)
    return sl[seg].stop - sl[seg].start if seg < len(sl) else 0


def align(case: Case, with_prior: bool = True):
    """``align_stream`` as finalize calls it: the host-time fit as the prior."""
    from acqd.finalize.clock import align_stream, fit_host_clock
    prior = None
    if with_prior:
        prior = fit_host_clock(*case.dev_host, *case.ref_host, case.dev.osc.rate, REF_RATE)
    return align_stream(case.dev_edges.samples, case.dev.osc.rate, case.ref_edges.samples, REF_RATE, prior=prior)


def qc_row(fit, name: str = "probe", rate: float = 30000.0, flags: list[str] | None = None) -> dict:
    """``stream_qc`` of a clock fit alone (no parts, no gaps, no incidents): the verdict the fit earns."""
    from types import SimpleNamespace

    from acqd.config import QcConfig
    from acqd.finalize.report import stream_qc
    stream = SimpleNamespace(name=name, parts=[], rate=rate)
    report = SimpleNamespace(clock=fit.to_dict(), gaps=[], frames=None, flags=flags or [])
    return stream_qc(stream, report, [], QcConfig())

