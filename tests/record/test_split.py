"""A stream split by size: parts follow each other with no loss and no false gap."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from acqd.service.procs import wait_until
from tests.conftest import assert_bit_exact, recording, rig_for, write_rig



@pytest.mark.e2e
def test_probe_rolls_over_into_parts_that_join_exactly(tmp_path: Path, daemon_factory):
    rig_file = write_rig(tmp_path, stream_overrides={"probe": {"max_file_bytes": 12_000_000}})
    daemon = daemon_factory(rig_file)
    with recording(daemon, rig_file, "split", seed=21) as (_, folder):
        wait_until(lambda: daemon.command("status")["streams"]["probe"]["part"] >= 3, "a fourth part", 60)
        daemon.command("stop")
    session = json.loads((folder / "session.json").read_text())
    parts = session["streams"]["probe"]["parts"]
    assert [p["part"] for p in parts] == list(range(len(parts))) and len(parts) >= 4
    # disk_low is about the machine's disk (< 10 min left at the rig's ~40 MB/s: under 25 GB free), not the rollover
    assert not session["incomplete"] and [i for i in session["incidents"] if i["kind"] != "disk_low"] == []
    cfg, rig = rig_for(rig_file, seed=21)
    end = None
    edges = []
    for p in parts:
        with h5py.File(folder / p["path"], "r") as f:
            assert f.attrs["part"] == p["part"] and f["gaps"].shape[0] == 0
            assert assert_bit_exact(f, rig, "probe") == f["data"].shape[0] == p["rows"] > 0
            index = f["index"][:]
            if end is not None:
                assert int(index["first_sample"][0]) == end  # the next part starts where the last ended
            end = int(index["first_sample"][-1] + index["n_samples"][-1])
            edges.extend(f["sync/edges"]["sample"][:].tolist())
            if p["part"] < parts[-1]["part"]:
                assert 12_000_000 <= (folder / p["path"]).stat().st_size < 12_000_000 + 16 * 2**20
    with h5py.File(folder / parts[0]["path"], "r") as f:
        start = int(f["index"]["first_sample"][0])
    truth = rig.expected_edges("probe")
    assert np.array_equal(edges, truth[(truth > start) & (truth < end)])
