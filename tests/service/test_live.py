"""The live view's publishing rate (acqd.service.live): a writer's stats message republishes the snapshot at once
only when what the verdict reads changed; its counters wait for the periodic snapshot. The snapshot's JSON."""

from __future__ import annotations

import json

import numpy as np

from acqd.config import load_config
from acqd.service.live import Live
from acqd.service.snapshot import Snapshot
from acqd.service.supervisor import Supervisor
from tests.conftest import write_rig


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


def test_the_snapshot_reads_as_the_status_it_was_built_from(tmp_path):
    """The snapshot's body (orjson) decodes to what ``json.dumps(default=str)`` made of the same status: a daemon's
    status, with a numpy float where a fit puts one, a path and a tuple; one line, as an SSE data line needs."""
    sup = Supervisor(load_config(write_rig(tmp_path)))
    try:
        status = {**sup.status(), "drift": np.float64(1.25), "folder": tmp_path, "pair": (1, 2), "none": None}
        body = Snapshot.of(1, status).body
        assert json.loads(body) == json.loads(json.dumps(status, default=str)) and b"\n" not in body
        assert json.loads(body)["drift"] == 1.25
    finally:
        sup.shutdown()
