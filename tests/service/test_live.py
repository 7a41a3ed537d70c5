"""The live view's publishing rate (acqd.service.live): a writer's stats message republishes the snapshot at once
only when what the verdict reads changed; its counters wait for the periodic snapshot."""

from __future__ import annotations

from acqd.service.live import Live


def stats(**over: object) -> dict:
    msg = {"type": "stats", "pid": 7, "connected": True, "recording": True, "messages_per_s": 100.0, "rows": 1000,
           "recording_counts": {"gaps": 0, "rejected_total": 0}, "load": {"overloaded": False}, "shedding": []}
    return {**msg, **over}


def noted(lv: Live, msg: dict, state: str = "recording", stream: str = "slow000") -> bool:
    lv.changed = False
    lv.note(stream, msg, state)
    return lv.changed


def test_counters_wait_for_the_periodic_snapshot_and_a_change_is_published_at_once():
    lv = Live()
    assert noted(lv, stats())  # the stream's first stats
    assert not noted(lv, stats(messages_per_s=99.0, rows=1100, silent_s=0.01))  # only counters moved
    assert noted(lv, stats(connected=False))
    assert noted(lv, stats())
    assert noted(lv, stats(recording_counts={"gaps": 1, "rejected_total": 0}))
    assert noted(lv, stats(recording_counts={"gaps": 1, "rejected_total": 3}))
    assert noted(lv, stats(recording_counts={"gaps": 1, "rejected_total": 3}, load={"overloaded": True}))
    assert noted(lv, stats(recording_counts={"gaps": 1, "rejected_total": 3}, load={"overloaded": True}),
                 state="acquiring")  # the supervisor reconciled its state
    assert noted(lv, stats(), stream="slow001")  # another stream's first stats
    assert noted(lv, {"type": "closing", "pid": 7, "encoder_backlog": 3, "encoded": 10})  # a stop's progress
