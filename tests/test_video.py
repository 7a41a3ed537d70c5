"""A camera recorded as external video files: lossless, split into files, listed in the stream file."""

from __future__ import annotations

import json
from pathlib import Path

import av
import h5py
import numpy as np
import pytest

from acqd.procs import wait_until
from tests.conftest import recording, rig_for, write_rig



def decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="gray") for f in c.decode(video=0)])


@pytest.mark.slow
def test_camera_frames_go_to_lossless_video_files(tmp_path: Path, daemon_factory):
    video = {"codec": "ffv1", "frames_per_file": 50}
    rig_file = write_rig(tmp_path, stream_overrides={"camera": {"video": video}})
    daemon = daemon_factory(rig_file)
    with recording(daemon, rig_file, "video", seed=31) as (_, folder):
        wait_until(lambda: daemon.command("status")["streams"]["camera"]["rows"] > 170, "170 frames", 30)
        daemon.command("stop")
    assert not json.loads((folder / "session.json").read_text())["incomplete"]
    cfg, rig = rig_for(rig_file, seed=31)
    with h5py.File(folder / "streams" / "camera.h5", "r") as f:
        assert f["data"].shape == (0, 480, 640)
        files = f["video"][:]
        index = f["index"][:]
    assert len(files) >= 4 and list(files["first_row"]) == list(np.cumsum([0, *files["n_frames"][:-1]]))
    assert all(n == 50 for n in files["n_frames"][:-1])
    frames = np.concatenate([decode(folder / "video" / name.decode()) for name in files["file"]])
    assert len(frames) == int(files["n_frames"].sum()) == int(index["n_samples"].sum())
    for row in index:
        a, n = int(row["file_row"]), int(row["n_samples"])
        assert np.array_equal(frames[a:a + n], rig.samples("camera", int(row["first_sample"]), n))
    assert sorted(p.name for p in (folder / "video").iterdir()) == sorted(n.decode() for n in files["file"])
