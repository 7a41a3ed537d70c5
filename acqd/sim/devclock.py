"""Simulated device clocks: the ground truth that the simulator publishes and the clock fit is tested against.

A device's sample counter advances at its nominal rate scaled by a constant crystal error (``ppm``)
plus an optional slow sinusoidal thermal wander of the frequency (``wander_ppm`` peak, period
``wander_period_s``). ``phase(t)`` is the (fractional) counter value at true time ``t``; sample ``k``
is taken at the true time where ``phase == k``. Pure numpy, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class DeviceClock:
    """One device's counter as a function of true (reference) time, in seconds."""

    rate: float
    """Nominal sample rate in Hz."""
    offset_s: float = 0.0
    """True time at which the counter reads 0."""
    ppm: float = 0.0
    """Constant frequency error in parts per million (positive: the device runs fast)."""
    wander_ppm: float = 0.0
    """Peak amplitude of a sinusoidal frequency wander, in ppm."""
    wander_period_s: float = 600.0
    """Period of the wander."""

    def phase(self, t: np.ndarray | float) -> np.ndarray:
        """Fractional counter value at true time ``t``."""
        t = np.asarray(t, dtype=np.float64)
        elapsed = t - self.offset_s
        wander = 0.0
        if self.wander_ppm:
            omega = 2 * np.pi / self.wander_period_s
            # Integral of wander_ppm * sin(omega * elapsed), zero at elapsed == 0.
            wander = self.wander_ppm * 1e-6 * (1 - np.cos(omega * elapsed)) / omega
        return self.rate * (elapsed * (1 + self.ppm * 1e-6) + wander)

    def sample_at(self, t: np.ndarray | float) -> np.ndarray:
        """Index of the first sample taken at or after true time ``t`` (how a digital input latches an edge)."""
        return np.ceil(self.phase(t) - 1e-9).astype(np.int64)

    def time_of(self, k: np.ndarray | float) -> np.ndarray:
        """True time of (possibly fractional) sample index ``k``: the inverse of ``phase``."""
        k = np.asarray(k, dtype=np.float64)
        t = self.offset_s + k / (self.rate * (1 + self.ppm * 1e-6))
        if self.wander_ppm:
            # phase is strictly increasing with derivative ~rate; Newton converges in a few steps.
            for _ in range(4):
                t = t - (self.phase(t) - k) / self.rate
        return t


def random_pulse_times(
    rng: np.random.Generator, start_s: float, stop_s: float, min_interval_s: float = 0.5, max_interval_s: float = 1.5
) -> np.ndarray:
    """Rising-edge times of a random-interval sync train in [start_s, stop_s).

    Random intervals make every stretch of the train unique, so edges seen by two devices can be
    paired without ambiguity even when some are missing on either side.
    """
    mean = 0.5 * (min_interval_s + max_interval_s)
    n = int((stop_s - start_s) / mean * 1.2) + 2
    times = start_s + np.cumsum(rng.uniform(min_interval_s, max_interval_s, n))
    return times[times < stop_s]


def regular_pulse_times(start_s: float, stop_s: float, period_s: float = 1.0, ppm: float = 0.0) -> np.ndarray:
    """Rising-edge times of a regular square wave in [start_s, stop_s) (SpikeGLX's default imec/NI sync is
    1 Hz), from a generator whose own crystal is off by ``ppm``. Every stretch looks alike: pairing needs a
    prior better than half a period."""
    period = period_s * (1 + ppm * 1e-6)
    return start_s + period * np.arange(int(np.ceil((stop_s - start_s) / period)))


def barcode_pulses(rng: np.random.Generator, start_s: float, stop_s: float, every_s: float = 30.0,
                   bit_s: float = 0.03, bits: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(rising-edge times, pulse widths) of barcodes as Open Ephys / IBL barcode generators emit them: every
    ``every_s`` (+-0.5 s) a 10 ms start pulse, 10 ms low, then an incrementing counter, ``bits`` bits of
    ``bit_s`` each, least significant first; consecutive 1 bits are one pulse."""
    rises, widths = [], []
    t, code = start_s + float(rng.uniform(0, every_s)), int(rng.integers(0, 2**20))
    while t + 0.02 + bits * bit_s < stop_s:
        rises.append(t)
        widths.append(0.01)
        word = [(code >> b) & 1 for b in range(bits)] + [0]
        b = 0
        while b < bits:
            if word[b]:
                run = next(e for e in range(b, bits + 1) if not word[e]) - b
                rises.append(t + 0.02 + b * bit_s)
                widths.append(run * bit_s)
                b += run
            b += 1
        code += 1
        t += every_s + float(rng.uniform(-0.5, 0.5))
    return np.asarray(rises), np.asarray(widths)
