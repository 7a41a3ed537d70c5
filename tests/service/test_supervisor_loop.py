"""What the supervisor loop does per wake (acqd.service.supervisor._pump): the per-stream checks run at most every
CHECK_EVERY_S however often writer messages wake it, and still run while it is woken continuously; its rounds write
the parts the writers listed."""

from __future__ import annotations

import json
import time

from acqd.config import load_config
from acqd.service.sessionrecord import PART_SAVE_S, SessionRecord
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


def test_the_rounds_write_the_parts_the_writers_listed(tmp_path):
    """Parts listed or closed wait for the loop's rounds (SessionRecord.flush), which write them within PART_SAVE_S."""
    cfg = load_config(write_rig(tmp_path))
    sup = Supervisor(cfg)
    try:
        sup.session_record = record = SessionRecord.create(sup.data_root, "s1", cfg, {"session_description": "x"})
        record.add_part("probe", 0, str(record.streams_dir / "probe.h5"))
        t0 = time.monotonic()
        while not json.loads((record.folder / "session.json").read_text())["streams"]["probe"]["parts"]:
            assert time.monotonic() - t0 < PART_SAVE_S + 2.0, "the part never reached session.json"
            sup._pump(0.01)
    finally:
        sup.session_record = None
        sup.shutdown()
