"""The daemon's signals reach the shipper through the real event bus: RECORD pauses, a finished finalize or
export queues the session for the destinations whose ``after:`` says so (a stand-in supervisor: only its bus,
data root and config are used)."""
from __future__ import annotations

import time
from types import SimpleNamespace

from acqd.service.shipping import Shipping
from acqd.service.snapshot import EventBus
from tests.share.shipping import local_destination, sealed_session


def _until(cond, what: str, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while not (value := cond()):
        assert time.monotonic() < deadline, what
        time.sleep(0.01)
    return value


def test_mode_and_job_events_drive_the_shipper(tmp_path):
    sealed_session(tmp_path / "data", "m1", sizes=(10,))
    dests = (local_destination(tmp_path / "a", name="on-finalize", after="finalize"),
             local_destination(tmp_path / "b", name="on-export", after="export"),
             local_destination(tmp_path / "c", name="by-hand", after="manual"))
    dests += (local_destination(tmp_path / "d", name="exports", what="export", after="manual"),)
    out = tmp_path / "share"
    (out / "sub-m1").mkdir(parents=True)
    (out / "sub-m1" / "sub-m1_ses-m1.nwb").write_bytes(b"nwb")
    report = {"out": str(out), "nwb": "sub-m1/sub-m1_ses-m1.nwb", "videos": []}
    sup = SimpleNamespace(data_root=tmp_path / "data", cfg=SimpleNamespace(ship=dests), events=EventBus(),
                          jobs={("export", "m1"): SimpleNamespace(report=report)})
    shipping = Shipping(sup)
    shipping.shipper.start = lambda: None  # no worker threads: only the queue is looked at
    shipping.start()
    try:
        sup.events.publish("mode", {"mode": "RECORD"})
        _until(lambda: shipping.shipper.status()["destinations"][0]["paused"], "RECORD to pause on-finalize")
        sup.events.publish("job", {"kind": "finalize", "session": "m1", "state": "running"})
        sup.events.publish("job", {"kind": "finalize", "session": "m1", "state": "done"})
        _until(lambda: shipping.shipper.queue.jobs(), "the finalized session to be queued")
        sup.events.publish("job", {"kind": "export", "session": "m1", "state": "done"})
        _until(lambda: len(shipping.shipper.queue.jobs()) == 3, "the exported session and its export to be queued")
        assert [(j.dest, j.what) for j in shipping.shipper.queue.jobs()] == [
            ("on-finalize", "session"), ("on-export", "session"), ("exports", "export")]
        assert shipping.shipper.queue.jobs()[2].folder == str(out)
        assert len(sup.events.recent("ship_queued")) == 3
        sup.events.publish("mode", {"mode": "ACQUIRE"})
        _until(lambda: not shipping.shipper.status()["destinations"][0]["paused"], "ACQUIRE to resume")
    finally:
        shipping.stop()
