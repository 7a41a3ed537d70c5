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
