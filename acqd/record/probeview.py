"""The probe view's features: band RMS, threshold crossings and a band-passed trace block, per ephys stream.

This module owns what the console's probe view shows of an ephys stream, computed inside its writer while a page
watches (``acqd.record.preview`` holds one ``ProbeFeatures`` for an ``ephys`` stream): per channel the RMS in the
AP band (Butterworth high-pass at ``AP_HZ``) and in the LFP band (decimated to ``LFP_RATE_HZ`` by a mean of
``LFP_TAPS`` rows per bin, then a Butterworth band-pass from ``LFP_LOW_HZ`` to ``LFP_HZ``), negative threshold crossings at ``THRESHOLD_MAD`` x the robust noise
(median absolute deviation / 0.6745, refreshed every ``THRESHOLD_REFRESH_S``) with their sample indices, and a
decimated trace window of a requested block of at most ``MAX_BLOCK`` channels in one band (raw, ap, lfp).
Filters are ``scipy.signal`` second-order sections whose state (``zi``) is carried from chunk to chunk, so a
chunk boundary leaves no trace in the output. scipy is imported where it is used, never at module import: every
writer imports this module, and scipy.signal doubled a writer's start-up (2.4 of 4.4 s on a loaded machine).

Budget: filtering all 384 channels at 30 kHz costs about 7 % of a core per probe (measured, docs/performance.md),
far over what a watching page may cost the data path. So the AP band (RMS, crossings, AP traces) is computed on
contiguous segments of ``AP_SEGMENT_S`` of every ``AP_PERIOD_S`` of device samples (about 3 % of the data; a
period that is no multiple of a second walks the segments through any once-a-second pattern), and each message
says how many seconds were analysed: rates are crossings per analysed second. The LFP band likewise runs on
``LFP_SEGMENT_S`` of every ``LFP_PERIOD_S`` (on 3 rows of every 30, filtered once per message). The first ``WARMUP_S``
(``LFP_WARMUP_S``) of a segment count no crossing and no RMS: the filter starts from its steady state for the first
row, but noise still rings briefly. Between segments a message repeats the last RMS; the trace block is the last
analysed segment. scipy's ``sosfilt`` runs along the last axis, one sample after the other (~5 ns a sample and
section here, bound by each output's dependency on the last, not by its copy): the samples filtered are the cost.
"""

from __future__ import annotations

import importlib
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

AP_HZ = 300.0
"""AP band: high-pass corner (Hz)."""
AP_ORDER = 2
LFP_HZ = 300.0
"""LFP band: upper corner (Hz), applied after decimating to ``LFP_RATE_HZ``."""
LFP_LOW_HZ = 1.0
"""LFP band: lower corner (Hz): the electrode's DC offset is no field potential."""
LFP_ORDER = 1
LFP_TAPS = 3
"""An LFP row is the mean of this many rows evenly spaced in its bin (a comb with nulls at multiples of
``LFP_RATE_HZ``: most of the anti-aliasing of a full block mean for a tenth of its cost, measured)."""
LFP_RATE_HZ = 1000.0
LFP_SEGMENT_S = 1.4
LFP_PERIOD_S = 6.9
"""The LFP band is analysed on ``LFP_SEGMENT_S`` of every ``LFP_PERIOD_S`` (20 % of the data): its filter costs as
much per row as the AP band's (scipy's loop is bound by each sample's dependency on the last, ~5 ns a sample), and
LFP power moves slowly. A multiple of ``AP_PERIOD_S``: both bands' segments start together."""
LFP_WARMUP_S = 0.4
"""The first rows of an LFP segment count in no RMS: the filter starts in the steady state of the first bin, and its
1 Hz high-pass forgets that start with a time constant of 0.16 s (e^-2.5 = 8 % of the first bin's deviation left)."""
AP_SEGMENT_S = 0.1
AP_PERIOD_S = 3.45
WARMUP_S = 0.003
THRESHOLD_MAD = 4.5
THRESHOLD_REFRESH_S = 5.0
NOISE_STEP = 4
NOISE_ROWS = 1500
"""The threshold's noise is measured on every ``NOISE_STEP``-th AP row until ``NOISE_ROWS`` are in (0.2 s of AP rows: one
chunk's few hundred correlated rows put the threshold anywhere from -55 to -100 on the same noise, measured)."""
REFRACTORY_S = 0.002
"""A channel's crossings closer than this count once (one spike's trough may recross the threshold)."""
WINDOW_S = 10.0
"""The crossings sent cover this long (the raster's window)."""
RATE_WINDOW_S = 45.0
"""Rates count the crossings of this long (4.5 times the raster's: the AP segments analyse 3 % of the data, and a
20 Hz unit then shows ~26 crossings, a Poisson spread of 20 %, rather than ~6)."""
MAX_CROSSINGS = 20000
"""Crossings kept in the rates' window at most (the oldest go first; counted in ``crossings_dropped``)."""
MAX_BLOCK = 64
TRACE_RATE_HZ = 2500.0
"""Trace block rows per second for raw and ap (ap keeps each bin's largest excursion, so spikes survive)."""
BANDS = ("raw", "ap", "lfp")
MAD_TO_SIGMA = 0.6745


_signal_loaded = threading.Event()
_signal_loader: threading.Thread | None = None
signal_import_s: float | None = None
"""How long importing scipy.signal took on its thread (None until it is done)."""


def _load_signal() -> None:
    global signal_import_s
    t0 = time.monotonic()
    importlib.import_module("scipy.signal")

    signal_import_s = time.monotonic() - t0
    _signal_loaded.set()


def signal_loaded() -> bool:
    """Whether scipy.signal is imported; the first call starts importing it on a thread. Importing it takes 1-2 s on
    a loaded machine, and a writer that imported it in its loop when a page opened went silent that long: the daemon
    reported it hung, then recovered (every probe, every time a page opened). A process that has it already gets
    True at once."""
    global _signal_loader
    if _signal_loaded.is_set():
        return True
    if _signal_loader is None:
        # Looked at before the thread starts: the thread puts a half-imported scipy.signal there as it begins.
        loaded = "scipy.signal" in sys.modules
        _signal_loader = threading.Thread(target=_load_signal, name="import-scipy-signal", daemon=True)
        _signal_loader.start()
        if loaded:  # imported by someone else already: done in a moment
            _signal_loader.join(timeout=1.0)
    return _signal_loaded.is_set()


def ap_sos(rate: float) -> np.ndarray:
    from scipy import signal

    return signal.butter(AP_ORDER, AP_HZ, "highpass", fs=rate, output="sos")


def lfp_factor(rate: float) -> int:
    """Rows averaged into one LFP row (1 when the stream is no faster than ``LFP_RATE_HZ``)."""
    return max(1, round(rate / LFP_RATE_HZ))


def lfp_sos(rate: float) -> np.ndarray:
    from scipy import signal

    fs = rate / lfp_factor(rate)
    return signal.butter(LFP_ORDER, [LFP_LOW_HZ, min(LFP_HZ, 0.45 * fs)], "bandpass", fs=fs, output="sos")


@lru_cache(maxsize=64)
def tap_rows(rel: int, n: int, q: int) -> np.ndarray:
    """Which of a chunk's ``n`` rows are LFP taps (``LFP_TAPS`` rows evenly spaced in each bin of ``q``), its first row
    ``rel`` rows into a bin. Chunks mostly have one size and phase: cached (do not modify the result)."""
    taps = min(LFP_TAPS, q)
    return np.flatnonzero(np.isin((rel + np.arange(n)) % q, [k * q // taps for k in range(taps)]))


def median(a: np.ndarray) -> np.ndarray:
    """``np.median`` along the last axis, by one ``np.partition``: numpy's median also partitions for its NaN check
    (several kth), which made it 10x slower on (385, 1500) float32 (11 ms against 1.2 ms, measured). A NaN sample
    makes its channel's value meaningless here rather than NaN."""
    n = a.shape[-1]
    k = n // 2
    part = np.partition(a, k, axis=-1)
    mid = part[..., k]
    return mid if n % 2 else (mid + part[..., :k].max(axis=-1)) / 2


def robust_threshold(ap: np.ndarray, axis: int = 0) -> np.ndarray:
    """Per channel: -THRESHOLD_MAD x the noise of the AP-band samples ``ap`` along ``axis`` (time; MAD / 0.6745,
    robust to the spikes)."""
    ap = np.moveaxis(ap, axis, -1)
    return -THRESHOLD_MAD * median(np.abs(ap - median(ap)[..., None])) / MAD_TO_SIGMA


def crossings(ap: np.ndarray, threshold: np.ndarray, below_before: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, channel) of each downward crossing of ``threshold`` in ``ap`` (channels x rows, contiguous rows), in
    time order; ``below_before``: each channel's state on the row before ``ap`` (a crossing that began in the previous
    chunk is not counted again). Only channels whose minimum is below their threshold are looked at: at -4.5 sigma
    that is the few with a spike, and one pass of ``min`` over the rest costs a fifth of the comparisons."""
    cand = np.flatnonzero(ap.min(axis=1) < threshold)
    sub = ap[cand]
    below = sub < threshold[cand, None]
    onset = below.copy()
    onset[:, 0] &= ~below_before[cand]
    onset[:, 1:] &= ~below[:, :-1]
    idx, rows = np.nonzero(onset)
    order = np.argsort(rows, kind="stable")  # by row, then channel (nonzero gives them by channel)
    return rows[order], cand[idx[order]]


def refractory(samples: np.ndarray, chans: np.ndarray, last: np.ndarray, gap: int) -> np.ndarray:
    """Which crossings (sorted by sample) are at least ``gap`` samples after the channel's previous kept one;
    ``last`` (per channel, updated) is the last kept crossing's sample."""
    keep = np.ones(len(samples), bool)
    for i in np.argsort(chans, kind="stable"):  # crossings are rare: a plain loop over them is cheap
        c = chans[i]
        if samples[i] - last[c] < gap:
            keep[i] = False
        else:
            last[c] = samples[i]
    return keep


def peak_decimate(x: np.ndarray, q: int) -> np.ndarray:
    """Rows in bins of ``q``, each bin's value of largest magnitude (a spike shows at any decimation)."""
    n = len(x) // q * q
    if n == 0:
        return x[:0]
    b = x[:n].reshape(n // q, q, -1)
    idx = np.abs(b).argmax(axis=1)
    return np.take_along_axis(b, idx[:, None, :], axis=1)[:, 0, :]


@dataclass
class BlockRequest:
    """The trace block a page asked for: channels (at most ``MAX_BLOCK``) and one band of ``BANDS``."""

    channels: tuple[int, ...] = ()
    band: str = "ap"

    @classmethod
    def of(cls, raw: dict | None, n_channels: int, skip: int | None) -> BlockRequest:
        raw = raw or {}
        band = raw.get("band") if raw.get("band") in BANDS else "ap"
        chans = tuple(dict.fromkeys(int(c) for c in raw.get("channels") or () if 0 <= int(c) < n_channels
                                    and int(c) != skip))[:MAX_BLOCK]
        return cls(chans or tuple(c for c in range(n_channels) if c != skip)[:MAX_BLOCK // 2], band)


@dataclass
class ProbeFeatures:
    """One ephys stream's probe features while a page watches; ``take`` per chunk, ``flush`` per message."""

    rate: float
    n_channels: int
    skip: int | None
    """A sync word's column: no signal, reported as null."""
    block: BlockRequest
    ap: np.ndarray
    lfp: np.ndarray
    q_lfp: int
    ap_zi: np.ndarray | None = None
    ap_next: int | None = None
    """The sample after the last AP-filtered chunk (a chunk starting there continues the filter)."""
    warm_until: int = 0
    below: np.ndarray | None = None
    last_cross: np.ndarray | None = None
    threshold: np.ndarray | None = None
    threshold_at: int | None = None
    noise: list[np.ndarray] = field(default_factory=list)
    """AP rows gathered for the next threshold."""
    lfp_zi: np.ndarray | None = None
    lfp_next: int | None = None
    lfp_origin: int = 0
    """The sample the LFP bins are counted from (the last start or gap)."""
    lfp_taps: list[np.ndarray] = field(default_factory=list)
    """Tap rows (``tap_rows``) not filtered yet, the first being the first tap of the bin starting at ``lfp_first``."""
    lfp_first: int = 0
    lfp_warm_until: int = 0
    ap_ss: np.ndarray | None = None
    ap_n: int = 0
    lfp_ss: np.ndarray | None = None
    lfp_n: int = 0
    analysed: list[tuple[int, int]] = field(default_factory=list)
    """(first, end) sample of each AP-analysed run in the window (merged when contiguous)."""
    cross_samples: list[np.ndarray] = field(default_factory=list)
    cross_chans: list[np.ndarray] = field(default_factory=list)
    crossings_dropped: int = 0
    block_rows: list[tuple[int, int, np.ndarray]] = field(default_factory=list)
    """(sample of the first row, sample step, rows) of the trace block since the last message."""
    ap_rms: list | None = None
    """The AP-band RMS of the last message that had AP rows."""
    lfp_rms: list | None = None
    """The LFP-band RMS of the last message that had LFP rows."""

    @classmethod
    def start(cls, rate: float, n_channels: int, skip: int | None, block: dict | None) -> ProbeFeatures:
        return cls(rate, n_channels, skip, BlockRequest.of(block, n_channels, skip), ap_sos(rate), lfp_sos(rate),
                   lfp_factor(rate))

    @property
    def ap32(self) -> np.ndarray:
        """The AP sections in float32: sosfilt then filters in float32 (half the memory traffic; the test's bound)."""
        return self.ap.astype(np.float32)

    @property
    def segment(self) -> tuple[int, int]:
        """(length, period) of the AP segments in samples."""
        return max(1, round(AP_SEGMENT_S * self.rate)), max(1, round(AP_PERIOD_S * self.rate))

    def in_segment(self, first: int) -> bool:
        length, period = self.segment
        return first % period < length

    def in_lfp_segment(self, first: int) -> bool:
        return first % max(1, round(LFP_PERIOD_S * self.rate)) < max(1, round(LFP_SEGMENT_S * self.rate))

    def take(self, data: np.ndarray, first: int) -> None:
        """Feed one accepted chunk (rows = samples, columns = channels) starting at device sample ``first``."""
        if len(data) == 0:
            return
        if self.in_lfp_segment(first):
            self._take_lfp(data, first)
        if self.block.band == "raw":
            self._keep_block(data, first, "raw")
        if self.in_segment(first):
            self._take_ap(data, first)

    def _take_ap(self, data: np.ndarray, first: int) -> None:
        from scipy import signal  # loaded since start(): a cached lookup

        if self.ap_next != first:  # a new segment (or a gap): the filter starts in the steady state of this row
            self.ap_zi = signal.sosfilt_zi(self.ap)[:, :, None].astype(np.float32) * data[0].astype(np.float32)
            self.warm_until = first + round(WARMUP_S * self.rate)
            self.below = np.zeros(self.n_channels, bool)
        # float32 sections: sosfilt's one copy of its input converts the samples to float32 and moves time last (its
        # loop runs along contiguous rows), so ``y.T`` is channel-major and contiguous: every step below reads rows
        y, self.ap_zi = signal.sosfilt(self.ap32, data, axis=0, zi=self.ap_zi)
        self.ap_next = first + len(y)
        if self.block.band == "ap":
            self._keep_block(y, first, "ap")
        skip = max(0, min(len(y), self.warm_until - first))
        used = y.T[:, skip:]
        if used.shape[1] == 0:
            return
        self.ap_ss = (0.0 if self.ap_ss is None else self.ap_ss) + np.einsum("ij,ij->i", used, used, dtype=np.float64)
        self.ap_n += used.shape[1]
        start = first + skip
        if self.analysed and self.analysed[-1][1] == start:
            self.analysed[-1] = (self.analysed[-1][0], start + used.shape[1])
        else:
            self.analysed.append((start, start + used.shape[1]))
        self._measure_noise(used, start)
        if self.threshold is not None:
            rows, chans = crossings(used, self.threshold, self.below if skip == 0 else np.zeros(self.n_channels, bool))
            if self.skip is not None:
                rows, chans = rows[chans != self.skip], chans[chans != self.skip]
            samples = start + rows
            if self.last_cross is None:
                self.last_cross = np.full(self.n_channels, -(1 << 62), np.int64)
            keep = refractory(samples, chans, self.last_cross, round(REFRACTORY_S * self.rate))
            if keep.any():
                self.cross_samples.append(samples[keep])
                self.cross_chans.append(chans[keep].astype(np.int32))
        self.below = y[-1] < self.threshold if self.threshold is not None else np.zeros(self.n_channels, bool)

    def _measure_noise(self, y: np.ndarray, start: int) -> None:
        """Renew the threshold every ``THRESHOLD_REFRESH_S`` from ``NOISE_ROWS`` rows of ``y`` (AP band, channels x
        rows); the very first one at once from what there is (then refined when the rows are in)."""
        if self.threshold is not None and not self.noise and start - self.threshold_at < THRESHOLD_REFRESH_S * self.rate:
            return
        self.noise.append(y[:, ::NOISE_STEP])
        rows = sum(a.shape[1] for a in self.noise)
        if rows >= NOISE_ROWS or (self.threshold is None and rows >= 25):
            self.threshold, self.threshold_at = robust_threshold(np.concatenate(self.noise, axis=1), axis=1), start
            if rows >= NOISE_ROWS:
                self.noise = []

    def _take_lfp(self, data: np.ndarray, first: int) -> None:
        """Keep ``data``'s LFP tap rows (one ``take`` per chunk); they are summed into bins and filtered at the next
        message: one filter call per message rather than per chunk."""
        if self.lfp_next != first:  # start (or a gap): drop a partial bin and the filter state, start afresh
            self._filter_lfp()
            self.lfp_taps, self.lfp_zi, self.lfp_origin, self.lfp_first = [], None, first, first
            self.lfp_warm_until = first + round(LFP_WARMUP_S * self.rate)
        self.lfp_next = first + len(data)
        idx = tap_rows((first - self.lfp_origin) % self.q_lfp, len(data), self.q_lfp)
        if len(idx):
            self.lfp_taps.append(data.take(idx, axis=0))

    def _filter_lfp(self) -> None:
        """Filter the whole LFP bins kept since the last call, in float32 like the AP band: half the cost of float64
        (0.06-0.09 against 0.15-0.17 % of a core per probe, measured), and with the 1 Hz corner at 1 kHz still within
        1e-4 of float64's RMS and 0.01 raw units of its samples at a 25000-unit offset
        (tests/record/test_probeview.py)."""
        taps = min(LFP_TAPS, self.q_lfp)
        rows = np.concatenate(self.lfp_taps) if len(self.lfp_taps) > 1 else (self.lfp_taps or [None])[0]
        n = 0 if rows is None else len(rows) // taps * taps
        if n == 0:
            return
        from scipy import signal

        self.lfp_taps = [rows[n:]] if n < len(rows) else []
        binned = rows[:n].reshape(n // taps, taps, -1).sum(axis=1, dtype=np.float32) / np.float32(taps)
        first, self.lfp_first = self.lfp_first, self.lfp_first + len(binned) * self.q_lfp
        if self.lfp_zi is None:
            self.lfp_zi = signal.sosfilt_zi(self.lfp)[:, :, None].astype(np.float32) * binned[0]
        y, self.lfp_zi = signal.sosfilt(self.lfp.astype(np.float32), binned, axis=0, zi=self.lfp_zi)
        used = y[max(0, -((first - self.lfp_warm_until) // self.q_lfp)):]  # bins from lfp_warm_until on
        if len(used):
            self.lfp_ss = (0.0 if self.lfp_ss is None else self.lfp_ss) + np.einsum("ij,ij->j", used, used,
                                                                                    dtype=np.float64)
            self.lfp_n += len(used)
        if self.block.band == "lfp":
            self.block_rows.append((first, self.q_lfp, y[:, list(self.block.channels)]))

    def _keep_block(self, rows: np.ndarray, first: int, band: str) -> None:
        q = max(1, round(self.rate / TRACE_RATE_HZ))
        sub = rows[:, list(self.block.channels)]
        if band == "ap":
            kept = peak_decimate(sub, q)
        else:
            start = (-first) % q  # a fixed grid of the device counter: even spacing across chunks
            kept, first = sub[start::q], first + start
        if len(kept):
            self.block_rows.append((first, q, kept))

    def window(self, now_sample: int) -> tuple[np.ndarray, np.ndarray, float]:
        """Crossings (samples, channels) and analysed seconds of the last ``RATE_WINDOW_S`` before ``now_sample``."""
        oldest = now_sample - round(RATE_WINDOW_S * self.rate)
        self.analysed = [(max(a, oldest), b) for a, b in self.analysed if b > oldest]
        if self.cross_samples:
            s, c = np.concatenate(self.cross_samples), np.concatenate(self.cross_chans)
            keep = s >= oldest
            s, c = s[keep], c[keep]
            if len(s) > MAX_CROSSINGS:
                self.crossings_dropped += len(s) - MAX_CROSSINGS
                s, c = s[-MAX_CROSSINGS:], c[-MAX_CROSSINGS:]
            self.cross_samples, self.cross_chans = [s], [c]
        else:
            s, c = np.empty(0, np.int64), np.empty(0, np.int32)
        return s, c, sum(b - a for a, b in self.analysed) / self.rate

    def flush(self, now_sample: int) -> dict:
        """The probe part of a preview message: RMS per band since the last message (raw units; null for the sync
        word and for a band without data yet), the crossings of the window and their per-channel rates, the trace
        block since the last message, and the settings that produced them."""
        self._filter_lfp()
        samples, chans, seconds = self.window(now_sample)
        counts = np.bincount(chans, minlength=self.n_channels)
        shown = samples >= now_sample - round(WINDOW_S * self.rate)
        samples, chans = samples[shown], chans[shown]
        # A message between two segments repeats the last segment's RMS (null until the first one)
        self.ap_rms = self._rms(self.ap_ss, self.ap_n) or self.ap_rms
        self.lfp_rms = self._rms(self.lfp_ss, self.lfp_n) or self.lfp_rms
        out = {
            "ap_rms": self.ap_rms, "lfp_rms": self.lfp_rms,
            "threshold": self._plain(self.threshold), "analysed_s": round(seconds, 4), "end": now_sample,
            "rates": self._plain(counts / seconds if seconds > 0 else None, 3),
            "crossings": {"samples": samples.tolist(), "channels": chans.tolist(), "dropped": self.crossings_dropped},
            "block": self._block(),
        }
        self.ap_ss = self.lfp_ss = None
        self.ap_n = self.lfp_n = 0
        return out

    def _block(self) -> dict:
        rows, self.block_rows = self.block_rows, []
        out = {"channels": list(self.block.channels), "band": self.block.band, "starts": [], "steps": [], "y": []}
        for first, step, y in rows:
            out["starts"].append(first)
            out["steps"].append(step)
            # whole raw units (integers encode as JSON several times faster than floats; a raw unit is ~2 uV)
            out["y"].append(np.rint(y).astype(np.int32).T.tolist() if y.dtype.kind == "f" else y.T.tolist())
        return out

    def _rms(self, ss: np.ndarray | None, n: int) -> list | None:
        return None if ss is None or n == 0 else self._plain(np.sqrt(ss / n), 2)

    def _plain(self, a: np.ndarray | None, digits: int = 1) -> list | None:
        if a is None:
            return None
        out = np.round(np.asarray(a, np.float64), digits).tolist()
        if self.skip is not None:
            out[self.skip] = None
        return [None if isinstance(v, float) and not math.isfinite(v) else v for v in out]


def settings(rate: float) -> dict:
    """What the view states about how its numbers were made, for a stream sampled at ``rate``."""
    q = lfp_factor(rate)
    return {"ap_hz": AP_HZ, "ap_order": AP_ORDER, "lfp_hz": [LFP_LOW_HZ, min(LFP_HZ, 0.45 * rate / q)],
            "lfp_order": LFP_ORDER, "lfp_rate_hz": rate / q,
            "lfp_segment_s": round(LFP_SEGMENT_S * rate) / rate, "lfp_period_s": round(LFP_PERIOD_S * rate) / rate,
            "threshold_mad": THRESHOLD_MAD, "threshold_refresh_s": THRESHOLD_REFRESH_S,
            "ap_segment_s": round(AP_SEGMENT_S * rate) / rate, "ap_period_s": round(AP_PERIOD_S * rate) / rate,
            "window_s": WINDOW_S, "rate_window_s": RATE_WINDOW_S, "trace_rate_hz": rate / max(1, round(rate / TRACE_RATE_HZ)),
            "refractory_s": REFRACTORY_S, "max_block": MAX_BLOCK}
