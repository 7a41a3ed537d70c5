"""What the supervisor loop does per wake (acqd.service.supervisor._pump): the per-stream checks run at most every
CHECK_EVERY_S however often writer messages wake it, and still run while it is woken continuously."""

from __future__ import annotations

import time

from acqd.config import load_config
from acqd.service.supervisor import CHECK_EVERY_S, Supervisor
from tests.conftest import write_rig


def test_the_per_stream_checks_run_at_most_every_check_interval(tmp_path, monkeypatch):
    sup = Supervisor(load_config(write_rig(tmp_path)))
    calls: list[float] = []
    monkeypatch.setattr(sup.writers, "check_heartbeats", lambda: calls.append(time.monotonic()))
    try:
        t0, wakes = time.monotonic(), 0
        while len(calls) < 4:  # woken again at once each time (a message from every writer in turn)
            assert time.monotonic() - t0 < 10, f"{len(calls)} checks in {wakes} wakes"
            sup._pump(0)
            wakes += 1
        assert wakes > 4 * len(calls)
        assert min(b - a for a, b in zip(calls, calls[1:])) >= 0.9 * CHECK_EVERY_S  # (stamped after the gate)
    finally:
        sup.shutdown()
