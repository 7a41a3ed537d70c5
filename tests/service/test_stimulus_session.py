"""A stimulus stream and attached photos through the daemon: images registered at RECORD, attach by API and CLI,
finalize by API, the master read back (real daemon, simulator, writers, ZeroMQ, pynwb)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from pynwb import NWBHDF5IO

from acqd.finalize import unseal_session
from acqd.record.streamfile import committed_rows, open_for_read
from acqd.client import ApiError
from acqd.service.procs import wait_until
from tests import zygote
from tests.conftest import SMALL_PROBE, recording, write_rig

CLI_TIMEOUT_S = 60


def stimulus_rig(tmp_path: Path) -> Path:
    """The example rig plus a stimulus program (20 Hz, strobing the NIDAQ's bit 2) over three PNGs in a folder
    named relative to the config file."""
    rig_file = write_rig(tmp_path, stream_overrides=SMALL_PROBE)
    images = tmp_path / "images"
    images.mkdir()
    for i, px in enumerate([np.full((8, 8), 5, np.uint8), np.zeros((6, 9, 3), np.uint8),
                            np.full((5, 5, 4), 255, np.uint8)]):
        Image.fromarray(px).save(images / f"s{i}.png")
    raw = yaml.safe_load(rig_file.read_text())
    raw["streams"].append({"name": "stim", "kind": "stimulus", "endpoint": f"ipc://{tmp_path}/ipc/stim",
                           "dtype": "uint8", "shape": [1], "rate": 20.0,
                           "sync": {"source": "strobe", "stream": "nidaq", "channel": 8, "bit": 2},
                           "stimulus": {"images": "images"}})
    rig_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    return rig_file


def cli(*args: str) -> subprocess.CompletedProcess:
    return zygote.run([sys.executable, "-m", "acqd.cli", *args], capture_output=True, text=True,
                      timeout=CLI_TIMEOUT_S)


@pytest.mark.e2e
def test_stimulus_images_registered_photos_attached_by_api_and_cli_then_in_the_master(tmp_path, daemon_factory):
    rig_file = stimulus_rig(tmp_path)
    daemon = daemon_factory(rig_file)
    photos = tmp_path / "data" / "photos"  # inside the data root: the API reads nothing outside it
    photos.mkdir(parents=True)
    rig_photo = np.arange(12 * 16, dtype=np.uint8).reshape(12, 16)
    Image.fromarray(rig_photo).save(photos / "rig.png")
    (photos / "notes.png").write_text("not an image")
    with recording(daemon, rig_file, "stim1", seed=11) as (_, folder):
        wait_until(lambda: daemon.command("status")["streams"]["stim"]["rows"] >= 30, "1.5 s of stimulus frames")
        assert sorted(p.name for p in (folder / "stimuli" / "stim").iterdir()) == ["s0.png", "s1.png", "s2.png"]
        got = daemon.command("attach", session="stim1", file=str(photos / "rig.png"), description="rig, top view",
                             resolution=10.0)  # while recording: it only adds files under attachments/
        daemon.command("stop")
    assert got["name"] == "rig.png" and got["shape"] == [12, 16] and got["attached_by"] == "control API"
    with pytest.raises(ApiError, match="outside the allowed folders") as e:
        daemon.command("attach", session="stim1", file=str(tmp_path / "images" / "s0.png"), description="x")
    assert e.value.status == 422
    with pytest.raises(ApiError, match="not an image file Pillow can read") as e:
        daemon.command("attach", session="stim1", file=str(photos / "notes.png"), description="x")
    assert e.value.status == 422
    subject = tmp_path / "subject.jpg"
    Image.fromarray(np.full((10, 10, 3), 99, np.uint8)).save(subject, quality=100)
    done = cli("attach", str(folder), str(subject), "--description", "the mouse", "--resolution", "50")
    assert done.returncode == 0 and "attached subject.jpg (10x10x3)" in done.stdout, done.stderr
    bad = cli("attach", str(folder), str(photos / "notes.png"), "--description", "x")
    assert bad.returncode == 2 and "not an image file Pillow can read" in bad.stderr
    try:
        daemon.command("finalize", session="stim1")
        job = wait_until(lambda: (j := daemon.command("finalize_status", session="stim1"))["state"] != "running"
                         and j, "finalize to finish", 300, every_s=0.25)
        assert job["state"] == "done", job["error"]
        with open_for_read(folder / "streams" / "stim.h5") as f:
            indices = f["data"][:committed_rows(f)][:, 0]
        with NWBHDF5IO(str(folder / "stim1.nwb"), "r") as io:
            nwb = io.read()
            ts = nwb.stimulus["stim"]
            assert np.array_equal(ts.data[:], indices) and set(np.unique(indices)) == {0, 1, 2}
            assert [im.name for im in ts.indexed_images.order_of_images.data] == ["0000_s0.png", "0001_s1.png",
                                                                                "0002_s2.png"]
            attached = nwb.acquisition["attached_images"]
            assert np.array_equal(attached["rig.png"].data[:], rig_photo) and attached["rig.png"].resolution == 10.0
            assert attached["subject.jpg"].data.shape == (10, 10, 3) and attached["subject.jpg"].resolution == 50.0
        with pytest.raises(ApiError, match="images can only be attached before finalize") as e:
            daemon.command("attach", session="stim1", file=str(photos / "rig.png"), description="late")
        assert e.value.status == 409
    finally:
        unseal_session(folder)
