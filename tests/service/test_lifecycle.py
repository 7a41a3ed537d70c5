"""The operator's whole session through the control API: record, stop, finalize on stop, read the NWB."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from pynwb import NWBHDF5IO

from acqd.finalize import unseal_session
from acqd.service.procs import wait_until
from acqd.record.streamfile import committed_rows, open_for_read
from tests.conftest import SMALL_PROBE, assert_bit_exact, recording, rig_for, write_rig


@pytest.mark.e2e
def test_record_stop_finalize_on_stop_then_read_the_master(tmp_path: Path, daemon_factory):
    rig_file = write_rig(tmp_path, stream_overrides=SMALL_PROBE)
    raw = yaml.safe_load(rig_file.read_text())
    raw["daemon"]["finalize_on_stop"] = True
    rig_file.write_text(yaml.safe_dump(raw))
    daemon = daemon_factory(rig_file)
    with recording(daemon, rig_file, "lifecycle", seed=41) as (_, folder):
        wait_until(lambda: daemon.command("status")["streams"]["probe"]["rows"] > 4 * 30000, "4 s of data")
        daemon.command("stop")  # finalize_on_stop starts the finalizer in the background
    try:
        job = wait_until(lambda: (j := daemon.command("finalize_status", session="lifecycle"))["state"] != "running"
                         and j, "finalize to finish", 300, every_s=0.25)
        assert job["state"] == "done", job["error"]
        report = job["report"]
        assert json.loads((folder / "session.json").read_text())["state"] == "finalized"
        master = folder / "lifecycle.nwb"
        assert report["master"].endswith("lifecycle.nwb") and master.is_file()
        with NWBHDF5IO(str(master), "r") as io:
            nwb = io.read()
            series = {**nwb.acquisition}
            series_rows = {name: ts.data.shape[0] for name, ts in series.items()}
            assert nwb.subject.subject_id == "mouse001"
            for name in ("probe", "nidaq", "camera", "sensor"):
                with open_for_read(folder / "streams" / f"{name}.h5") as f:
                    rows = committed_rows(f)
                    assert series[name].data.shape[0] == rows
                    assert np.array_equal(series[name].data[-10:], f["data"][rows - 10:rows])
        again = daemon.command("finalize", session="lifecycle")  # idempotent through the API too
        done = wait_until(lambda: (j := daemon.command("finalize_status", session="lifecycle"))["state"] != "running"
                          and j, "the second finalize", 120, every_s=0.25)
        assert again["state"] == "running" and done["state"] == "done" and done["report"]["changed"] is False

        out = tmp_path / "share"
        daemon.command("export", session="lifecycle", out=str(out))
        exported = wait_until(lambda: (j := daemon.command("export_status", session="lifecycle"))["state"] != "running"
                              and j, "the export", 300, every_s=0.25)
        assert exported["state"] == "done", exported["error"]
        (nwb_file,) = out.rglob("*.nwb")
        assert nwb_file.parent.name == "sub-mouse001" and nwb_file.name.startswith("sub-mouse001_ses-lifecycle")
        with NWBHDF5IO(str(nwb_file), "r") as io:
            assert io.read().acquisition["nidaq"].data.shape[0] == series_rows["nidaq"]
    finally:
        unseal_session(folder)


@pytest.mark.e2e
def test_two_recordings_in_one_daemon_run_both_hold_their_data(small_rig_file: Path, daemon_factory):
    """Regression: after a first stop, writers kept state 'recording' and a second RECORD opened no files."""
    rig_file = small_rig_file
    daemon = daemon_factory(rig_file)
    folders = []
    for n, seed in enumerate((51, 52)):
        with recording(daemon, rig_file, f"take{n}", seed=seed) as (_, folder):
            wait_until(lambda: daemon.command("status")["streams"]["probe"]["rows"] > 30000, "1 s of data")
            assert all(s["state"] == "recording" for s in daemon.command("status")["streams"].values())
            daemon.command("stop")
        assert all(s["state"] == "acquiring" for s in daemon.command("status")["streams"].values())
        folders.append(folder)
    for n, folder in enumerate(folders):
        session = json.loads((folder / "session.json").read_text())
        assert session["state"] == "closed" and not session["incomplete"], session["incidents"]
        _, rig = rig_for(rig_file, seed=51 + n)
        for name in ("probe", "nidaq", "camera", "sensor"):
            with open_for_read(folder / "streams" / f"{name}.h5") as f:
                assert assert_bit_exact(f, rig, name) == committed_rows(f) > 0
