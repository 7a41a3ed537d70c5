"""Slow streams and idle writers: a writer sleeps until a message or a timer is due, and a slow stream with its
own sync edges is drained only when a timer is due. What must still hold: stats (the heartbeat) keep coming,
what arrives after a long idle spell is flushed within flush_interval_s, and the data is bit-exact."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from acqd.record.streamfile import open_for_read
from acqd.service.procs import wait_until
from tests.record.livewriter import LiveWriter, message

DAEMON_TIMING = {"flush_interval_s": 0.5, "fsync_interval_s": 1.0, "stats_interval_s": 0.5,
                 "clock_pair_interval_s": 1.0}
"""The daemon's defaults (acqd.config.DaemonConfig): heartbeat_timeout_s is 2.0."""
HEARTBEAT_TIMEOUT_S = 2.0


def voluntary_switches(pid: int) -> int:
    """How often the writer's main thread went to sleep (each poll that blocked is one)."""
    for line in Path(f"/proc/{pid}/task/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches")


def committed_rows(path: Path) -> int:
    with open_for_read(path) as f:
        return int(f["index"].shape[0])


def test_idle_recording_writer_sleeps_between_timers_and_keeps_its_heartbeat(tmp_path):
    w = LiveWriter(tmp_path, sync={"source": "frame"}, timing=DAEMON_TIMING)
    try:
        w.record()
        w.pump(0)
        start, first = len(w.msgs), time.monotonic()
        switches = voluntary_switches(w.proc.pid)
        arrivals = []
        while time.monotonic() - first < 3.0:
            w.pump(50)
            arrivals += [time.monotonic() for m in w.msgs[start:] if m["type"] == "stats"]
            start = len(w.msgs)
        woke = voluntary_switches(w.proc.pid) - switches
        gaps = np.diff([first, *arrivals])
        # The heartbeat: stats every stats_interval_s, well inside the daemon's heartbeat timeout.
        assert len(arrivals) >= 4 and gaps.max() < HEARTBEAT_TIMEOUT_S / 2, gaps
        # It woke for its timers (stats every 0.5 s, flush, clock pair), not 20 times a second (a 50 ms poll tick).
        assert woke <= 25, f"{woke} wake-ups in 3 s while idle"
        assert w.stats()["recording"]
    finally:
        assert w.close() == 0


def test_slow_stream_after_a_long_idle_spell_is_flushed_within_flush_interval_and_bit_exact(tmp_path):
    w = LiveWriter(tmp_path, sync={"source": "frame"}, timing=DAEMON_TIMING)  # 4 x int16 at 1 kHz: a slow stream
    try:
        w.connected()
        w.record()
        path = w.folder / "s.h5"
        sent = []
        for burst in range(2):
            w.stats(), w.stats(), w.stats()  # idle for over a second (three stats periods) before each burst
            t0 = time.time_ns()
            for k in range(10):  # 10 messages x 10 samples: whole 100-row chunks, so nothing is held back
                seq = burst * 10 + k
                frames, data = message(seq, seq * 10)
                w.driver.send_multipart(frames)
                sent.append(data)
            wait_until(lambda: committed_rows(path) == 10 * (burst + 1), "the burst to be committed", 10, 0.02)
            with open_for_read(path) as f:
                committed = f["index"]["committed_wall_ns"][-10:]
            # Durability: a kill -9 loses at most flush_interval_s of what arrived (slack for a busy machine).
            assert (committed.max() - t0) / 1e9 <= DAEMON_TIMING["flush_interval_s"] + 0.4
        w.stop()
        with open_for_read(path) as f:
            assert np.array_equal(f["data"][:], np.concatenate(sent))
            assert f["index"]["seq"].tolist() == list(range(20)) and f["gaps"].shape[0] == 0
    finally:
        assert w.close() == 0

