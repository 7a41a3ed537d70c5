"""A camera recorded as external video files: lossless, split into files, listed in the stream file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import av
import h5py
import numpy as np
import pytest
from hdmf.backends.hdf5.h5tools import BrokenLinkWarning
from pynwb import NWBHDF5IO

from acqd.finalize import unseal_session
from acqd.service.procs import Daemon, wait_until
from tests import zygote
from tests.conftest import recording, rig_for, write_rig


def decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="gray") for f in c.decode(video=0)])


SEED = 32
pytestmark = pytest.mark.xdist_group("video")  # one xdist worker: the module-scoped recording is made once


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Iterator[tuple[Path, Path]]:
    """(rig file, session folder): one recording of the example rig (385-channel probe split into 8 MB parts, a
    camera encoded to FFV1 files of 50 frames, frame 150 dropped) read by both end-to-end tests here; unsealed at
    teardown (the finalize test seals it)."""
    tmp = tmp_path_factory.mktemp("video")
    rig_file = write_rig(tmp, stream_overrides={"probe": {"max_file_bytes": 8_000_000},
                                                "camera": {"video": {"codec": "ffv1", "frames_per_file": 50}}})
    daemon = Daemon(rig_file, tmp / "data", tmp)
    try:
        with recording(daemon, rig_file, "modular", seed=SEED, faults=("camera:drop:150",)) as (_, folder):
            wait_until(lambda: (s := daemon.command("status")["streams"])["probe"]["part"] >= 3
                       and s["camera"]["last_seq"] > 200, "four probe parts and the dropped frame", 60)
            daemon.command("stop")
    finally:
        daemon.stop(timeout_s=30)
    try:
        yield rig_file, folder
    finally:
        unseal_session(folder)


@pytest.mark.e2e
def test_camera_frames_go_to_lossless_video_files(recorded):
    rig_file, folder = recorded
    assert not json.loads((folder / "session.json").read_text())["incomplete"]
    cfg, rig = rig_for(rig_file, seed=SEED)
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


@pytest.mark.e2e
def test_finalized_session_with_split_probe_and_video_camera_reads_from_anywhere(recorded, tmp_path: Path,
                                                                                  monkeypatch):
    rig_file, folder = recorded
    out = zygote.run([sys.executable, "-m", "acqd.cli", "finalize", str(folder), "--json"], capture_output=True,
                     text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    moved = tmp_path / "moved" / "modular"
    moved.parent.mkdir()
    os.rename(folder, moved)
    monkeypatch.chdir(tmp_path)
    try:
        cfg, rig = rig_for(rig_file, seed=SEED)
        camera = report["streams"]["camera"]
        assert camera["frames"]["dropped"] == 1, camera["frames"]
        zero_s = report["timebase"]["zero_reference_s"]
        ref = rig.devices[cfg.reference].clock
        with warnings.catch_warnings():
            warnings.simplefilter("error", BrokenLinkWarning)
            with NWBHDF5IO(str(moved / "modular.nwb"), "r") as io:
                nwb = io.read()
                probe = nwb.acquisition["probe"]
                parts = json.loads((moved / "session.json").read_text())["streams"]["probe"]["parts"]
                assert len(parts) >= 4
                whole = np.concatenate([h5py.File(moved / p["path"], "r")["data"][:] for p in parts])
                assert probe.data.shape == whole.shape and np.array_equal(probe.data[:], whole)
                video = nwb.acquisition["camera"]
                with h5py.File(moved / "streams" / "camera.h5", "r") as f:
                    files, index = f["video"][:], f["index"][:]
                assert list(video.external_file[:]) == [f"video/{n.decode()}" for n in files["file"]]
                assert list(video.starting_frame[:]) == list(files["first_row"])
                frames = np.concatenate([np.arange(r["first_sample"], r["first_sample"] + r["n_samples"])
                                         for r in index])
                t = video.timestamps[:]
                truth = ref.phase(rig.devices["camera"].clock.time_of(frames.astype(float))) / ref.rate - zero_s
                assert len(t) == len(frames) and np.abs(t - truth).max() <= camera["clock"]["error_bound_s"]
    finally:
        os.rename(moved, folder)
        unseal_session(folder)


def test_the_encoder_backlog_is_bounded_without_ever_blocking(tmp_path: Path):
    # A frame beyond video.max_backlog_s is refused (the writer records it as a gap with reason encoder); a message
    # larger than the whole bound still goes into an empty queue (else it could never be stored).
    from acqd.config import VideoConfig
    from acqd.record.video import VideoSink

    sink = VideoSink(tmp_path / "video", "cam", 0, VideoConfig(max_backlog_s=0.05), rate=100.0, delay_s=0.2)
    frames = np.zeros((8, 16, 16), np.uint8)
    assert sink.max_backlog == 5 and sink.has_room(8)
    sink.append(frames)  # the encoder holds the first frame for 0.2 s: the queue cannot drain meanwhile
    assert not sink.has_room(1) and sink.backlog >= 5
    seen = []
    sink.close(lambda backlog, encoded: seen.append((backlog, encoded)))
    assert sink.frames == 8 and seen and seen[0][0] > seen[-1][0]  # close reported its progress while it waited
    (name, first, n), = sink.take_finished()
    assert (first, n) == (0, 8) and decode(tmp_path / "video" / name).shape == (8, 16, 16)


def test_a_writer_imports_pyav_only_when_it_encodes_video():
    """Every writer imports acqd.record.video; PyAV's import (~0.35 s) was paid by all four writers of each ACQUIRE."""
    code = "import sys, acqd.record.writer; print('av' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "False", run.stderr
