"""A writer's timers (acqd.record.schedule): flushes keep their cadence whatever the work at each one takes."""

from __future__ import annotations

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


@pytest.mark.parametrize("work_s", [0.0, 0.05, 0.2])
def test_stats_and_clock_pairs_ride_along_with_the_flushes_instead_of_waking_the_writer_apart(monkeypatch, work_s):
    """The daemon's defaults (flush and stats every 0.5 s, a clock pair every 1 s), each wake-up's work taking
    ``work_s``: two wake-ups a second, every one a flush, stats at each and a pair at every other, none of them
    more than half its interval early. Before, the stats deadline drifted by the work after each report and the
    writer woke ~4.7 times a second, each wake-up handling every stream's batch (a group writer of 96 streams:
    ~0.6 ms per stream each)."""
    clock = [100.0]
    monkeypatch.setattr(schedule.time, "monotonic", lambda: clock[0])
    s = Schedule.start(0.5, None, 0.5, 1.0, now=100.0)
    wakes: list[tuple[float, bool, bool, bool]] = []
    last = {"stats": -1.0, "pair": -1.0}
    while clock[0] < 110.0:
        clock[0] = max(clock[0], s.wake_at(recording=True, paired=True))
        now = clock[0]
        due = s.due(now, recording=True, paired=True)
        for timer, interval in (("stats", 0.5), ("pair", 1.0)):
            if getattr(due, timer):
                assert now - last[timer] >= interval / 2 - 1e-9, (timer, now - last[timer])
                last[timer] = now
        wakes.append((now, due.flush, due.stats, due.pair))
        clock[0] += work_s
        s.advance(due, now, shed_stats=False)
    steady = [w for w in wakes if w[0] >= 101.0]
    assert all(flush and stats for _, flush, stats, _ in steady), steady
    assert len(steady) == pytest.approx(2 * (wakes[-1][0] - 101.0) + 1, abs=1)
    pairs = [t for t, _, _, pair in steady if pair]
    assert [round(b - a, 6) for a, b in zip(pairs, pairs[1:])] == [1.0] * (len(pairs) - 1)
