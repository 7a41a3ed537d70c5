"""acqd.record.load: when a writer counts as behind, what it sheds in which order, and when the overload ends."""

from __future__ import annotations

from acqd.record.load import BEHIND_AFTER_S, CAUGHT_UP_S, SLOW_FLUSHES, Load


def test_a_socket_never_empty_for_longer_than_the_threshold_is_an_overload_that_sheds_in_order():
    load = Load(flush_interval_s=0.5)
    load.drained(0.0, False, 256)
    assert load.update(BEHIND_AFTER_S - 0.1) is None and not load.overloaded
    load.drained(0.5, False, 256)
    assert load.update(BEHIND_AFTER_S + 0.1) == "started"
    t0 = BEHIND_AFTER_S + 0.1
    assert load.shedding(t0) == ["previews"]
    assert load.shedding(t0 + 2.01) == ["previews", "live_sync"]
    assert load.shedding(t0 + 5.01) == ["previews", "live_sync", "stats"]
    st = load.stats(t0)
    assert st["overloaded"] and st["backlog_messages"] == 512 and st["behind_s"] == round(t0, 3)
    load.drained(t0 + 6, True, 3)  # caught up: the overload ends only after CAUGHT_UP_S without being behind
    assert load.update(t0 + 6) is None and load.overloaded
    assert load.update(t0 + 6 + CAUGHT_UP_S) == "ended" and load.shedding(t0 + 7 + CAUGHT_UP_S) == []


def test_one_slow_flush_is_not_an_overload_but_several_in_a_row_are():
    load = Load(flush_interval_s=0.25)
    load.flushed(0.4)
    load.flushed(0.01)
    assert load.update(1.0) is None
    for _ in range(SLOW_FLUSHES):
        load.flushed(0.4)
    assert load.update(2.0) == "started" and "flushes in a row" in load.describe(2.0)
    assert load.stats(2.0)["flush_max_s"] == 0.4


def test_an_encoder_more_than_half_full_is_behind():
    load = Load(flush_interval_s=0.5)
    load.encoder(30, 60)
    assert load.update(0.0) is None
    load.encoder(31, 60)
    assert load.update(0.1) == "started" and "encoder" in load.describe(0.1)
