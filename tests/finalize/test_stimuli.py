"""Stimulus streams and attached photos, recorded (tests/sessions.py), finalized and exported: real pynwb, Pillow.

The small rig (configs/rig.yaml) gains two stimulus programs, both timed by strobes on the NIDAQ's digital word
(as the camera is): ``stim`` publishes the index of the image it showed per frame (5 Hz) into a set of four PNGs
(grayscale, RGB, RGBA: each shown several times), and ``screen`` publishes the RGB frames themselves (10 Hz).
A photo of the rig is attached before finalize. Truth: frame k of a stream was shown at reference seconds
``ref_clock.phase(dev_clock.time_of(k)) / ref_rate``; session time is that minus the timebase's zero.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from hdmf.backends.warnings import BrokenLinkWarning
from PIL import Image
from pynwb import NWBHDF5IO, validate

from acqd.config import RigConfig, StreamConfig
from acqd.errors import ConfigError, SessionError
from acqd.finalize import finalize_session, unseal_session
from acqd.images import attach, check_stimulus_images, read_image, register_stimulus_images
from acqd.record.streamfile import committed_rows, open_for_read
from acqd.share.export import export_session
from acqd.sim.simulate import Rig, SimParams
from sessions import Recording, record_session, small_config

SID = "ST1"
FOV, DISTANCE, ORIENTATION = (0.30, 0.20), 0.25, "row 0 is the top of the monitor, seen from the subject"


def stimulus_images(folder: Path) -> list[np.ndarray]:
    """Four images of three NWB kinds, different sizes, written as PNG (lossless: read back pixel-exact)."""
    folder.mkdir()
    rng = np.random.default_rng(7)
    images = [rng.integers(0, 256, (12, 16), dtype=np.uint8), rng.integers(0, 256, (12, 16, 3), dtype=np.uint8),
              rng.integers(0, 256, (10, 8, 4), dtype=np.uint8), np.full((6, 6), 200, np.uint8)]
    for i, px in enumerate(images):
        Image.fromarray(px).save(folder / f"img_{i:02d}.png")
    return images


def stimulus_config(root: Path, images: Path) -> RigConfig:
    cfg = small_config(root)
    raw = cfg.model_dump(mode="json")
    raw["streams"] += [
        {"name": "stim", "kind": "stimulus", "endpoint": "tcp://127.0.0.1:5555", "dtype": "uint16", "shape": [1],
         "rate": 5.0, "units": "index", "description": "image shown per frame by the stimulus program",
         "sync": {"source": "strobe", "stream": "nidaq", "channel": 8, "bit": 2},
         "stimulus": {"images": str(images)}},
        {"name": "screen", "kind": "stimulus", "endpoint": "tcp://127.0.0.1:5556", "dtype": "uint8",
         "shape": [24, 32, 3], "rate": 10.0, "units": "intensity", "description": "frames the monitor showed",
         "sync": {"source": "strobe", "stream": "nidaq", "channel": 8, "bit": 3},
         "stimulus": {"field_of_view": list(FOV), "distance": DISTANCE, "orientation": ORIENTATION}},
    ]
    return RigConfig.model_validate(raw)


pytestmark = pytest.mark.xdist_group("stimuli")  # one xdist worker: the module-scoped session is built once


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """(finalized folder, report, rig, image set, photo pixels, export path); unsealed after the module."""
    root = tmp_path_factory.mktemp("stimuli")
    images = stimulus_images(root / "images")
    cfg = stimulus_config(root / "data", root / "images")
    rig = Rig(cfg, SimParams(seed=5, seconds=40))
    # chunk_factor 2: the 5 Hz stream sends 20 messages, the host-time fallback's minimum is 10
    recorded = record_session(cfg, rig, SID, Recording(seconds=8.0, chunk_factor=2))
    register_stimulus_images(recorded, cfg)  # what the supervisor does when it creates the session folder
    photo = np.random.default_rng(8).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(photo).save(root / "rig photo.png")
    sidecar = attach(recorded, root / "rig photo.png", "the rig from the left", resolution=42.5, who="Doe, Jane")
    folder = root / "finalized" / SID
    shutil.copytree(recorded, folder)
    try:
        report = finalize_session(folder)
        out = root / "export"
        exported = out / export_session(folder, out).nwb
        yield folder, report, rig, images, photo, sidecar, exported
    finally:
        unseal_session(folder)


def read(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", BrokenLinkWarning)
        io = NWBHDF5IO(str(path), "r")
        return io, io.read()


def stream_rows(folder: Path, stream: str) -> tuple[np.ndarray, np.ndarray]:
    """(committed data, device sample of each row) of a one-part stream file."""
    with open_for_read(folder / "streams" / f"{stream}.h5") as f:
        n = committed_rows(f)
        samples = np.concatenate([np.arange(r["first_sample"], r["first_sample"] + r["n_samples"])
                                  for r in f["index"][:]])
        return f["data"][:n], samples


def true_times(folder: Path, rig: Rig, stream: str, samples: np.ndarray) -> np.ndarray:
    qc = json.loads((folder / "qc" / "qc.json").read_text())
    ref = rig.devices[qc["timebase"]["reference"]].clock
    return ref.phase(rig.devices[stream].clock.time_of(samples.astype(float))) / ref.rate - \
        qc["timebase"]["zero_reference_s"]


def test_index_stream_is_an_index_series_into_each_image_once_on_the_timebase(session):
    folder, report, rig, images, *_ = session
    data, samples = stream_rows(folder, "stim")
    assert len(data) >= 30 and np.bincount(data[:, 0], minlength=4).min() >= 3  # each image shown several times
    io, nwbfile = read(folder / f"{SID}.nwb")
    with io:
        ts = nwbfile.stimulus["stim"]
        assert type(ts).__name__ == "IndexSeries" and "stim" not in nwbfile.acquisition
        assert np.array_equal(ts.data[:], data[:, 0]) and ts.data.dtype == np.uint32
        assert np.array_equal(data[:, 0], rig.samples("stim", int(samples[0]), len(samples))[:, 0])
        container = ts.indexed_images
        assert container is nwbfile.stimulus_template["stim_images"]
        ordered = list(container.order_of_images.data)
        assert len(container.images) == 4 and [im.name for im in ordered] == sorted(container.images)
        for im, expected in zip(ordered, images):
            assert np.array_equal(im.data[:], expected)
            assert type(im).__name__ == {2: "GrayscaleImage", 3: "RGBImage", 4: "RGBAImage"}[
                2 if expected.ndim == 2 else expected.shape[2]]
        t = ts.timestamps[:] if ts.timestamps is not None else ts.starting_time + np.arange(len(data)) / ts.rate
        error = np.abs(t - true_times(folder, rig, "stim", samples))
        bound = report.streams["stim"].clock["error_bound_s"]
        assert report.streams["stim"].clock["source"] == "strobe" and error.max() <= bound + 1e-9, (error.max(), bound)


def test_frame_stream_is_an_optical_series_with_its_optics(session):
    folder, report, rig, *_ = session
    data, samples = stream_rows(folder, "screen")
    io, nwbfile = read(folder / f"{SID}.nwb")
    with io:
        ts = nwbfile.stimulus["screen"]
        assert type(ts).__name__ == "OpticalSeries"
        assert list(ts.field_of_view[:]) == list(FOV) and ts.distance == DISTANCE and ts.orientation == ORIENTATION
        assert np.array_equal(ts.data[:], data) and data.shape[1:] == (24, 32, 3)
        assert np.array_equal(data, rig.samples("screen", int(samples[0]), len(samples)))
        t = ts.timestamps[:] if ts.timestamps is not None else ts.starting_time + np.arange(len(data)) / ts.rate
        error = np.abs(t - true_times(folder, rig, "screen", samples))
        assert error.max() <= report.streams["screen"].clock["error_bound_s"] + 1e-9


def test_attached_photo_is_in_the_master_and_the_export(session):
    folder, _, _, _, photo, sidecar, exported = session
    assert sidecar["name"] == "rig_photo.png" and sidecar["attached_by"] == "Doe, Jane"
    for path in (folder / f"{SID}.nwb", exported):
        io, nwbfile = read(path)
        with io:
            image = nwbfile.acquisition["attached_images"]["rig_photo.png"]
            assert type(image).__name__ == "RGBImage" and np.array_equal(image.data[:], photo), path
            assert image.resolution == 42.5 and image.description.startswith("the rig from the left (attached by "
                                                                              "Doe, Jane")
    io, nwbfile = read(exported)  # the export holds the stimuli too, without links
    with io:
        assert np.array_equal(nwbfile.stimulus["screen"].data[:], stream_rows(folder, "screen")[0])
        assert len(nwbfile.stimulus_template["stim_images"].images) == 4
    with h5py.File(exported, "r") as f:  # the raw sync record of a stimulus series is re-created, not linked
        for name in ("stim", "screen"):
            assert isinstance(f[f"stimulus/presentation/{name}"].get("sync", getlink=True), h5py.HardLink)
            assert "clock" in f[f"stimulus/presentation/{name}/sync"]


def test_master_and_export_validate_with_nothing_critical_from_the_images(session):
    folder, report, *_, exported = session
    assert report.check["ok"]
    for path in (folder / f"{SID}.nwb", exported):
        assert validate(path=str(path)) == []
    ours = ("stim", "screen", "attached_images", "order_of_images", "img_", "rig_photo")
    bad = [m for m in report.check["inspector"] if m["importance"] in ("CRITICAL", "BEST_PRACTICE_VIOLATION")
           and any(k in f"{m['location']} {m['object']}" for k in ours)]
    assert not bad, bad


def test_attach_refuses_a_non_image_and_a_finalized_session(session, tmp_path):
    folder, *_ = session
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    recorded = folder.parent.parent / "data" / SID
    with pytest.raises(ConfigError, match=r"notes\.png: not an image file Pillow can read"):
        attach(recorded, text, "a photo")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="not an image file name"):
        attach(recorded, tmp_path / "notes.txt", "a photo")
    assert not (recorded / "attachments" / "notes.png").exists()
    photo = tmp_path / "late.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(photo)
    with pytest.raises(SessionError, match="is finalized: images can only be attached before finalize"):
        attach(folder, photo, "too late")


def test_stimulus_config_rules():
    base = {"name": "s", "kind": "stimulus", "endpoint": "tcp://127.0.0.1:1", "dtype": "uint16", "rate": 5.0}
    with pytest.raises(ValueError, match="needs an integer dtype and stimulus.images"):
        StreamConfig.model_validate({**base, "shape": [1], "stimulus": {}})
    with pytest.raises(ValueError, match="needs stimulus.field_of_view, distance and orientation"):
        StreamConfig.model_validate({**base, "dtype": "uint8", "shape": [4, 4], "stimulus": {"distance": 0.2}})
    with pytest.raises(ValueError, match="goes with kind 'stimulus'"):
        StreamConfig.model_validate({**base, "shape": [1]})


def test_missing_image_set_refuses_record_and_palette_images_widen(tmp_path):
    cfg = stimulus_config(tmp_path / "data", tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="stimulus image folder .*nowhere does not exist"):
        check_stimulus_images(cfg)  # the supervisor calls it before it creates the session folder
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no image file"):
        check_stimulus_images(stimulus_config(tmp_path / "data", tmp_path / "empty"))
    gray = np.arange(30, dtype=np.uint8).reshape(5, 6)
    Image.fromarray(gray).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(np.stack([gray, gray], axis=-1), mode="LA").save(tmp_path / "la.png")
    assert read_image(tmp_path / "palette.png").shape == (5, 6, 3)  # no NWB type for a palette: RGB
    assert np.array_equal(read_image(tmp_path / "la.png")[..., 3], gray)  # gray + alpha: RGBA
