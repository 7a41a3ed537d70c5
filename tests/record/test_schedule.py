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
