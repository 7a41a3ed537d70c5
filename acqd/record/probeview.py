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
contiguous segments of ``AP_SEGMENT_S`` of every ``AP_PERIOD_S`` of device samples (about 4 % of the data; a
period that is no multiple of a second walks the segments through any once-a-second pattern), and each message
says how many seconds were analysed: rates are crossings per analysed second. The LFP path runs on every chunk
(on 3 rows of every 30, filtered once per message). The first ``WARMUP_S`` of a segment after a discontinuity count no
crossing and no RMS: the filter starts from its steady state for the first row, but noise still rings briefly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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
AP_SEGMENT_S = 0.1
AP_PERIOD_S = 2.3
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
RATE_WINDOW_S = 30.0
"""Rates count the crossings of this long (three times the raster's: the AP segments analyse a share of the data,
and a 20 Hz unit then shows ~25 crossings rather than ~8)."""
MAX_CROSSINGS = 20000
"""Crossings kept in the rates' window at most (the oldest go first; counted in ``crossings_dropped``)."""
MAX_BLOCK = 64
TRACE_RATE_HZ = 2500.0
"""Trace block rows per second for raw and ap (ap keeps each bin's largest excursion, so spikes survive)."""
BANDS = ("raw", "ap", "lfp")
MAD_TO_SIGMA = 0.6745


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


def lfp_bins(x: np.ndarray, q: int) -> np.ndarray:
    """Sums of ``LFP_TAPS`` rows evenly spaced in each bin of ``q`` rows of ``x`` (len(x) a multiple of q)."""
    taps = min(LFP_TAPS, q)
    acc = np.int32 if x.dtype.kind in "iu" and x.dtype.itemsize <= 2 else np.float64
    out = x[0::q].astype(acc)
    for k in range(1, taps):
        out += x[k * q // taps::q]
    return out


def robust_threshold(ap: np.ndarray) -> np.ndarray:
    """Per channel: -THRESHOLD_MAD x the noise of the AP-band rows ``ap`` (MAD / 0.6745, robust to the spikes)."""
    med = np.median(ap, axis=0)
    return -THRESHOLD_MAD * np.median(np.abs(ap - med), axis=0) / MAD_TO_SIGMA


def crossings(ap: np.ndarray, threshold: np.ndarray, below_before: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, channel) of each downward crossing of ``threshold`` in ``ap``; ``below_before``: each channel's state on
    the row before ``ap`` (a crossing that began in the previous chunk is not counted again)."""
    below = ap < threshold
    onset = below.copy()
    onset[0] &= ~below_before
    onset[1:] &= ~below[:-1]
    rows, chans = np.nonzero(onset)
    return rows, chans


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
    lfp_rest: np.ndarray | None = None
    """Rows left over from the last chunk, not yet a whole LFP bin."""
    lfp_bins: list[np.ndarray] = field(default_factory=list)
    """Block sums not filtered yet, from sample ``lfp_first`` on."""
    lfp_first: int = 0
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

    @classmethod
    def start(cls, rate: float, n_channels: int, skip: int | None, block: dict | None) -> ProbeFeatures:
        return cls(rate, n_channels, skip, BlockRequest.of(block, n_channels, skip), ap_sos(rate), lfp_sos(rate),
                   lfp_factor(rate))

    @property
    def segment(self) -> tuple[int, int]:
        """(length, period) of the AP segments in samples."""
        return max(1, round(AP_SEGMENT_S * self.rate)), max(1, round(AP_PERIOD_S * self.rate))

    def in_segment(self, first: int) -> bool:
        length, period = self.segment
        return first % period < length

    def take(self, data: np.ndarray, first: int) -> None:
        """Feed one accepted chunk (rows = samples, columns = channels) starting at device sample ``first``."""
        if len(data) == 0:
            return
        self._take_lfp(data, first)
        if self.block.band == "raw":
            self._keep_block(data, first, "raw")
        if self.in_segment(first):
            self._take_ap(data, first)

    def _take_ap(self, data: np.ndarray, first: int) -> None:
        from scipy import signal  # loaded since start(): a cached lookup

        x = data.astype(np.float32)
        if self.ap_next != first:  # a new segment (or a gap): the filter starts in the steady state of this row
            self.ap_zi = signal.sosfilt_zi(self.ap)[:, :, None].astype(np.float32) * x[0]
            self.warm_until = first + round(WARMUP_S * self.rate)
            self.below = np.zeros(self.n_channels, bool)
        y, self.ap_zi = signal.sosfilt(self.ap.astype(np.float32), x, axis=0, zi=self.ap_zi)
        self.ap_next = first + len(x)
        if self.block.band == "ap":
            self._keep_block(y, first, "ap")
        skip = max(0, min(len(y), self.warm_until - first))
        y_used = y[skip:]
        if len(y_used) == 0:
            return
        self.ap_ss = (0.0 if self.ap_ss is None else self.ap_ss) + np.einsum("ij,ij->j", y_used, y_used, dtype=np.float64)
        self.ap_n += len(y_used)
        start = first + skip
        if self.analysed and self.analysed[-1][1] == start:
            self.analysed[-1] = (self.analysed[-1][0], start + len(y_used))
        else:
            self.analysed.append((start, start + len(y_used)))
        self._measure_noise(y_used, start)
        if self.threshold is not None:
            rows, chans = crossings(y_used, self.threshold, self.below if skip == 0 else np.zeros(self.n_channels, bool))
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
        """Renew the threshold every ``THRESHOLD_REFRESH_S`` from ``NOISE_ROWS`` rows; the very first one at once from
        what there is (then refined when the rows are in)."""
        if self.threshold is not None and not self.noise and start - self.threshold_at < THRESHOLD_REFRESH_S * self.rate:
            return
        self.noise.append(y[::NOISE_STEP])
        rows = sum(len(a) for a in self.noise)
        if rows >= NOISE_ROWS or (self.threshold is None and rows >= 25):
            self.threshold, self.threshold_at = robust_threshold(np.concatenate(self.noise)), start
            if rows >= NOISE_ROWS:
                self.noise = []

    def _take_lfp(self, data: np.ndarray, first: int) -> None:
        """Block-average ``data`` into LFP rows (kept until the next message, filtered then: one filter call per
        message rather than per chunk)."""
        q = self.q_lfp
        if self.lfp_next != first:  # start (or a gap): drop a partial bin and the filter state, start afresh
            self._filter_lfp()
            self.lfp_rest, self.lfp_zi = None, None
        x = data if self.lfp_rest is None else np.concatenate([self.lfp_rest, data])
        x0 = first - (0 if self.lfp_rest is None else len(self.lfp_rest))
        self.lfp_next = first + len(data)
        n = len(x) // q * q
        self.lfp_rest = x[n:].copy() if n < len(x) else None
        if n:  # a few strided rows per bin (int32 sums for integer samples: exact)
            if not self.lfp_bins:
                self.lfp_first = x0
            self.lfp_bins.append(lfp_bins(x[:n], q))

    def _filter_lfp(self) -> None:
        """Filter the LFP rows kept since the last call (float64: a 1 Hz corner at 1 kHz needs it; few rows)."""
        if not self.lfp_bins:
            return
        from scipy import signal

        binned = np.concatenate(self.lfp_bins).astype(np.float64) / min(LFP_TAPS, self.q_lfp)
        self.lfp_bins = []
        if self.lfp_zi is None:
            self.lfp_zi = signal.sosfilt_zi(self.lfp)[:, :, None] * binned[0]
        y, self.lfp_zi = signal.sosfilt(self.lfp, binned, axis=0, zi=self.lfp_zi)
        self.lfp_ss = (0.0 if self.lfp_ss is None else self.lfp_ss) + np.einsum("ij,ij->j", y, y, dtype=np.float64)
        self.lfp_n += len(y)
        if self.block.band == "lfp":
            self.block_rows.append((self.lfp_first, self.q_lfp, y[:, list(self.block.channels)]))

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
        # A message between two AP segments repeats the last segment's RMS (null until the first one)
        self.ap_rms = self._rms(self.ap_ss, self.ap_n) or self.ap_rms
        out = {
            "ap_rms": self.ap_rms, "lfp_rms": self._rms(self.lfp_ss, self.lfp_n),
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
    return {"ap_hz": AP_HZ, "ap_order": AP_ORDER, "lfp_hz": [LFP_LOW_HZ, LFP_HZ], "lfp_order": LFP_ORDER, "lfp_rate_hz": rate / q,
            "threshold_mad": THRESHOLD_MAD, "threshold_refresh_s": THRESHOLD_REFRESH_S,
            "ap_segment_s": round(AP_SEGMENT_S * rate) / rate, "ap_period_s": round(AP_PERIOD_S * rate) / rate,
            "window_s": WINDOW_S, "rate_window_s": RATE_WINDOW_S, "trace_rate_hz": rate / max(1, round(rate / TRACE_RATE_HZ)),
            "refractory_s": REFRACTORY_S, "max_block": MAX_BLOCK}
