"""A writer's timers (acqd.record.schedule): flushes keep their cadence whatever the work at each one takes."""

from __future__ import annotations

import random

import numpy as np
import pytest

from acqd.record import schedule
from acqd.record.schedule import Schedule


@pytest.mark.parametrize("work_s, period_s", [(0.0, 0.5), (0.2, 0.5), (0.3, 0.55), (0.6, 0.85)])
def test_flushes_keep_their_cadence_and_a_writer_behind_still_gets_half_an_interval(monkeypatch, work_s, period_s):
    """Flush every 0.5 s, each flush's work taking ``work_s``: the flushes start every 0.5 s while the work fits in
    half an interval, then half an interval after it ends. Counted from the end of the work, as before, the period
    was 0.5 s + the work: a group writer of 96 slow streams, whose work grows with the period, flushed every ~1.1 s
    and its messages waited up to 2 s (p99 publish -> flushed)."""
    clock = [100.0]
    monkeypatch.setattr(schedule.time, "monotonic", lambda: clock[0])
    s = Schedule.start(0.5, None, 10.0, 10.0, now=0.0)  # the schedule began long before the recording
    starts = []
    for _ in range(8):
        clock[0] = max(clock[0], s.wake_at(recording=True, paired=False))
        due = s.due(clock[0], recording=True, paired=False)
        assert due.flush
        starts.append(clock[0])
        now = clock[0]
        clock[0] += work_s
        s.advance(due, now, shed_stats=False)
    periods = [round(b - a, 6) for a, b in zip(starts[1:], starts[2:])]  # from the second: the first catches up
    assert periods == [period_s] * len(periods), periods


def test_a_recording_writer_wakes_once_per_flush_and_no_timer_comes_late(monkeypatch):
    """The daemon's defaults (flush and stats every 0.5 s, fsync and clock pair every 1 s), each wake-up up to 20 ms
    late and its work 40 ms: the stats and the clock pair ride along with the flushes (one wake-up per flush, where
    three timers on phases of their own took 4.6 a second), and no timer comes later than its interval allows (the
    fsync, counted from the last one, came 1.5 s apart whenever a wake-up was earlier than the one before)."""
    rng = random.Random(1)
    clock = [0.0]
    monkeypatch.setattr(schedule.time, "monotonic", lambda: clock[0])
    s = Schedule.start(0.5, 1.0, 0.5, 1.0, now=0.0)
    wakes, at = 0, {"flush": [], "fsync": [], "stats": [], "pair": []}
    while clock[0] < 60.0:
        clock[0] = max(clock[0], s.wake_at(recording=True, paired=True)) + rng.uniform(0.0, 0.02)
        now = clock[0]
        due = s.due(now, recording=True, paired=True)
        wakes += 1
        for timer in at:
            if getattr(due, timer):
                at[timer].append(now)
        clock[0] += 0.04
        s.advance(due, now, shed_stats=False)
    assert wakes == len(at["flush"]), (wakes, len(at["flush"]))
    late = 0.02 + 0.04  # a wake-up's lateness and the work before the next deadline is set
    for timer, interval in (("stats", 0.5), ("fsync", 1.0), ("pair", 1.0)):
        gaps = np.diff(at[timer])
        assert gaps.max() <= interval + late, (timer, gaps.max())
        assert gaps.min() >= interval - 0.25 - late, (timer, gaps.min())  # early by at most half a flush interval
