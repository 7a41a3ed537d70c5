"""A whole rig recorded through real daemon, writer and simulator processes over real sockets."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from acqd.service.procs import wait_until
from acqd.record.streamfile import committed_rows, open_for_read
from tests.conftest import assert_bit_exact, recording, rig_for



def edges_in_file(f: h5py.File, label: str) -> np.ndarray:
    edges = f["sync/edges"][:]
    lines = json.loads(f["sync/edges"].attrs["lines"])
    line = next((i for i, ln in enumerate(lines) if ln["label"] == label), 0)
    return edges["sample"][edges["line"] == line].astype(np.int64)


def expected_in_range(expected: np.ndarray, f: h5py.File) -> np.ndarray:
    """Truth edges the recording could see: after its first sample, before its end."""
    index = f["index"][:]
    first = int(index["first_sample"][0])
    end = int(index["first_sample"][-1]) + int(index["n_samples"][-1])
    return expected[(expected > first) & (expected < end)]


@pytest.mark.e2e
def test_rig_is_recorded_bit_exact_with_sync_edges_and_live_readers(rig_file: Path, daemon_factory, tmp_path):
    daemon = daemon_factory(rig_file)
    with recording(daemon, rig_file, "bitexact", seed=3) as (status, folder):
        assert status["mode"] == "RECORD"
        probe = folder / "streams" / "probe.h5"

        # A live SWMR reader sees the stream grow within a flush interval (0.25 s here).
        with h5py.File(probe, "r", libver="latest", swmr=True) as live:
            wait_until(lambda: live["data"].refresh() or live["data"].shape[0] > 0, "first flushed rows", 5)
            seen = live["data"].shape[0]
            wait_until(lambda: live["data"].refresh() or live["data"].shape[0] > seen, "the file to grow", 2.0)

        wait_until(lambda: all(s["rows"] > 0 for s in daemon.command("status")["streams"].values()),
                   "every stream to hold data")
        wait_until(lambda: daemon.command("status")["streams"]["probe"]["rows"] > 3 * 30000, "3 s of probe data")
        daemon.command("stop")
    status = daemon.command("stop", idle=True)
    assert status["mode"] == "IDLE"

    cfg, rig = rig_for(rig_file, seed=3)
    session = json.loads((folder / "session.json").read_text())
    assert session["state"] == "closed" and not session["incomplete"], session["incidents"]
    for s in cfg.streams:
        with h5py.File(folder / "streams" / f"{s.name}.h5", "r") as f:  # closed cleanly: no SWMR flag needed
            rows = assert_bit_exact(f, rig, s.name)
            assert rows == f["data"].shape[0] == committed_rows(f) > 0
            assert f["gaps"].shape[0] == 0 and f["rejects"].shape[0] == 0
            index = f["index"][:]
            assert np.array_equal(index["first_sample"][1:], index["first_sample"][:-1] + index["n_samples"][:-1])
            assert np.all(np.diff(index["seq"].astype(np.int64)) == 1)
            assert json.loads(f.attrs["session"])["session_id"] == "bitexact"
            assert f["data"].attrs["unit"] == s.units and f["data"].attrs["conversion"] == s.conversion
            assert f["sync/clock"].shape[0] > 0
            if s.name == "camera":
                continue  # timed by strobes on the nidaq's line
            got = edges_in_file(f, "sync")
            want = expected_in_range(rig.expected_edges(s.name), f)
            assert len(want) >= 2
            assert np.array_equal(got, want), s.name
    with open_for_read(folder / "streams" / "nidaq.h5") as f:
        got = edges_in_file(f, "strobe:camera")
        want = expected_in_range(rig.expected_edges("nidaq", "strobe:camera"), f)
        assert len(want) > 100 and np.array_equal(got, want)
