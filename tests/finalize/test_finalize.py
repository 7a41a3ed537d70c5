"""acqd finalize end to end on recorded sessions (tests/sessions.py): real h5py, pynwb, hdmf, nwbinspector.

One simulated rig (seed 3) is recorded once per module: a probe with a dropped chunk (a SEQ gap), a NIDAQ (the
reference) carrying the sync and camera-strobe lines, a camera timed by its strobes, and a sensor whose writer
was killed with -9 mid-session (part 0 left with its SWMR flag, part 1 written by the restarted writer). Tests
finalize copies of it. Truth: device sample k of stream s happened at reference seconds
``ref_clock.phase(dev_clock.time_of(k)) / ref_rate``; session time is that minus the timebase's zero.
Every finalized folder is unsealed (chattr -i) at teardown so pytest can delete it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pynwb import NWBHDF5IO, validate

from acqd.errors import FinalizeError
from acqd.finalize import seal
from acqd.finalize import (MANIFEST, PAUSE_ENV, PAUSE_MARKER_ENV, finalize_session, is_immutable, pair_frames,
                           unseal_session, verify_manifest)
from acqd.session import SESSION_FILE, write_json_atomic
from acqd.sim.simulate import Rig, SimParams
from acqd.record.streamfile import StreamFile
from tests import zygote
from sessions import Recording, Restart, record_session, small_config
from nwbread import read_master, series_times, stream_data

SEED = 3
SID = "S1"
RECORDING = Recording(drops={"probe": [(8.0, 8.15)]}, restart=Restart("sensor", 10.0, crash=True))
SUBPROCESS_TIMEOUT_S = 120
real_sha256 = seal._sha256


pytestmark = pytest.mark.xdist_group("finalize")  # one xdist worker: the module-scoped session is built once


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> tuple[Path, Rig]:
    """The closed session (never finalized itself: tests finalize copies) and the rig that produced it."""
    root = tmp_path_factory.mktemp("recorded")
    cfg = small_config(root)
    rig = Rig(cfg, SimParams(seed=SEED, seconds=60))
    return record_session(cfg, rig, SID, RECORDING), rig


@pytest.fixture
def sealed_dirs():
    """Folders to unseal at teardown."""
    dirs: list[Path] = []
    yield dirs
    for d in dirs:
        if d.exists():
            unseal_session(d)


def copy_session(src: Path, dest_parent: Path, dirs: list[Path]) -> Path:
    dest = dest_parent / src.name
    dest_parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dest, symlinks=True)
    dirs.append(dest)
    return dest


@pytest.fixture(scope="module")
def finalized(recorded, tmp_path_factory):
    """A finalized copy of the recorded session and its report; unsealed after the module."""
    src, _ = recorded
    folder = tmp_path_factory.mktemp("finalized") / SID
    shutil.copytree(src, folder)
    stages: list[tuple[str, float]] = []
    try:
        report = finalize_session(folder, lambda stage, done: stages.append((stage, done)))
        yield folder, report, stages
    finally:
        unseal_session(folder)


# -- the master file -----------------------------------------------------------------------------------------


def test_master_reads_from_anywhere_and_matches_the_streams_and_the_truth(finalized, recorded, tmp_path,
                                                                          monkeypatch):
    folder, report, _ = finalized
    _, rig = recorded
    moved = tmp_path / "elsewhere" / "renamed-session"
    moved.parent.mkdir()
    os.rename(folder, moved)  # the whole folder moves; links inside it are relative
    try:
        monkeypatch.chdir(tmp_path)
        qc = json.loads((moved / "qc" / "qc.json").read_text())
        zero_s = qc["timebase"]["zero_reference_s"]
        ref_clock = rig.devices[qc["timebase"]["reference"]].clock
        io, nwbfile = read_master(moved / f"{SID}.nwb")
        with io:
            assert set(nwbfile.acquisition) == {"probe", "nidaq", "camera", "sensor"}
            for name, ts in nwbfile.acquisition.items():
                s = report.streams[name]
                data, samples = stream_data(moved, s.parts)
                assert len(data) == s.rows
                assert np.array_equal(ts.data[:], data), name
                t = series_times(ts)
                assert len(t) == s.rows and np.all(np.diff(t) > 0), name
                assert t.min() >= 0
                truth = ref_clock.phase(rig.devices[name].clock.time_of(samples.astype(float))) / ref_clock.rate
                error = np.abs(t + zero_s - truth)
                assert error.max() <= s.clock["error_bound_s"] + 1e-9, (name, error.max(), s.clock)
            assert type(nwbfile.acquisition["probe"]).__name__ == "ElectricalSeries"
            assert type(nwbfile.acquisition["camera"]).__name__ == "ImageSeries"
            electrodes = nwbfile.electrodes.to_dataframe()
            assert len(electrodes) == 33 and list(electrodes["is_electrode"]).count(False) == 1
            gaps = nwbfile.intervals["gaps"].to_dataframe()
            assert sorted(zip(gaps["stream"], gaps["kind"])) == [("probe", "seq"), ("sensor", "writer_restart")]
            fits = nwbfile.processing["sync"]["clock_fits"].to_dataframe().set_index("stream")
            assert fits.loc["nidaq", "source"] == "reference" and fits.loc["camera", "source"] == "strobe"
            assert fits.loc["probe", "source"] == "sync" and fits.loc["probe", "n_gaps"] == 1
            assert fits.loc["probe", "pairing"].startswith("intervals") and fits.loc["probe", "host_segments"] == ""
            assert fits.loc["nidaq", "pairing"] == "" and (fits["rejected_pairs"] >= 0).all()
            # the timebase is the reference's row: its zero sample is qc.json's, the other rows carry -1
            assert fits.loc["nidaq", "zero_sample"] == qc["timebase"]["zero_sample"] >= 0
            assert (fits.drop(index="nidaq")["zero_sample"] == -1).all() and fits.loc["probe", "rate"] == 30000.0
            assert "timebase" not in nwbfile.processing["sync"].data_interfaces
            assert {"nidaq_sync", "nidaq_strobe_camera", "probe_sync", "sensor_sync"} <= set(nwbfile.events)
        with h5py.File(moved / f"{SID}.nwb", "r") as f:
            for name in ("probe", "nidaq", "camera", "sensor"):
                for key in ("data", "sync"):
                    link = f[f"acquisition/{name}"].get(key, getlink=True)
                    assert isinstance(link, h5py.ExternalLink) and not os.path.isabs(link.filename), (name, key)
            assert "edges" in f["acquisition/sensor/sync"] and "edges" in f["acquisition/probe/sync"]
    finally:
        os.rename(moved, folder)


def test_timing_representation_follows_gaps_and_camera_frames_reconcile(finalized):
    _, report, stages = finalized
    s = report.streams
    assert s["nidaq"].timing == "rate" and s["camera"].timing == "rate"
    assert s["probe"].timing == "timestamps" and s["sensor"].timing == "timestamps"  # gap; writer restart
    assert s["sensor"].recovered == ["recovered/sensor.h5"] and s["sensor"].linked == "vds/sensor.h5"
    frames = s["camera"].frames
    assert frames["dropped"] == 0 and frames["extra_strobes"] == 0
    assert frames["paired"] == frames["recorded"] - frames["frames_outside_strobe_recording"]
    assert all(not st.flags for st in s.values())
    fractions = [f for _, f in stages]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_validation_and_dandi_inspection_pass(finalized):
    folder, report, _ = finalized
    assert validate(path=str(folder / f"{SID}.nwb")) == []
    assert report.check["ok"] and not report.check["validation_errors"] and not report.check["read_errors"]
    assert not [m for m in report.check["inspector"] if m["importance"] in ("CRITICAL", "ERROR", "PYNWB_VALIDATION")]


def test_sealed_read_only_immutable_and_manifest_verifies(finalized, tmp_path, sealed_dirs):
    folder, report, _ = finalized
    assert json.loads((folder / SESSION_FILE).read_text())["state"] == "finalized"
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.endswith(".partial")]
    assert all(p.stat().st_mode & 0o777 == 0o444 for p in files)
    if report.sealed["immutable"]:
        assert all(is_immutable(p) for p in files)
        with pytest.raises(PermissionError):
            open(folder / "streams" / "probe.h5", "r+b")
    else:
        assert report.sealed["immutable_error"]  # said honestly why not
    listed = (folder / MANIFEST).read_text().splitlines()
    assert len(listed) == len(files) - 1 and verify_manifest(folder) == []  # all but itself; session.json too
    # A finalized session that was tampered with is reported, never re-finalized over.
    copy = copy_session(folder, tmp_path / "tampered", sealed_dirs)
    unseal_session(copy)
    with open(copy / "qc" / "qc.json", "ab") as f:
        f.write(b" ")
    assert verify_manifest(copy) == ["qc/qc.json: contents changed"]
    with pytest.raises(FinalizeError, match="does not match its manifest"):
        finalize_session(copy)


# -- idempotence, determinism, resumption -------------------------------------------------------------------


def test_row21_finalize_twice_gives_identical_bytes_and_changes_nothing(recorded, finalized, tmp_path, sealed_dirs,
                                                                       monkeypatch):
    src, _ = recorded
    reference, _, _ = finalized
    other = copy_session(src, tmp_path / "another" / "place", sealed_dirs)
    hashed = []
    monkeypatch.setattr(seal, "_sha256", lambda path, stop=None: hashed.append(path) or real_sha256(path))
    finalize_session(other)
    listed = [other / line.split("  ", 1)[1] for line in (other / MANIFEST).read_text().splitlines()]
    # every file read once for the manifest, the recorded ones early; session.json is hashed from memory
    assert sorted(hashed) == sorted(p for p in listed if p.name != SESSION_FILE)
    for rel in (MANIFEST, SESSION_FILE, f"{SID}.nwb"):
        assert (other / rel).read_bytes() == (reference / rel).read_bytes(), rel
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in other.rglob("*")}
    again = finalize_session(other)
    assert not again.changed and "already finalized, nothing changed" in again.message
    assert set(again.streams) == {"probe", "nidaq", "camera", "sensor"} and again.check["ok"]
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in other.rglob("*")} == before


def test_digests_hash_ahead_and_again_only_what_changed(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(os.urandom(9 << 20))  # more than one hashing block
    b.write_bytes(b"before")
    with seal.Digests([a, b]) as digests:
        assert digests.get(a) == hashlib.sha256(a.read_bytes()).hexdigest()
        digests.get(b)
        b.write_bytes(b"after, longer")  # changed after it was hashed: hashed again when asked
        assert digests.get(b) == hashlib.sha256(b"after, longer").hexdigest()
        c = tmp_path / "c"
        c.write_bytes(b"")
        assert digests.get(c) == hashlib.sha256(b"").hexdigest()  # never queued: hashed on demand


@pytest.mark.parametrize("step", ["partial", "sealed"])
def test_kill_9_during_finalize_then_rerun_gives_the_same_result(recorded, finalized, tmp_path, sealed_dirs, step):
    src, _ = recorded
    reference, _, _ = finalized
    folder = copy_session(src, tmp_path / "killed", sealed_dirs)
    marker = tmp_path / "paused"
    env = {**os.environ, PAUSE_ENV: step, PAUSE_MARKER_ENV: str(marker)}
    proc = zygote.popen([sys.executable, "-m", "acqd.cli", "finalize", str(folder)], env=env,
                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
        while not (marker.exists() and marker.read_text()):  # the hook creates the file, then writes its pid
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "finalize never reached the pause point"
            time.sleep(0.05)
        assert marker.read_text() == str(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(SUBPROCESS_TIMEOUT_S) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert json.loads((folder / SESSION_FILE).read_text())["state"] == "finalizing"
    master = folder / f"{SID}.nwb"
    if step == "partial":
        assert (folder / f"{SID}.nwb.partial").exists() and not master.exists()
    else:
        assert master.exists() and not (folder / MANIFEST).exists()
    report = finalize_session(folder)
    assert report.changed and report.state == "finalized"
    assert not list(folder.rglob("*.partial"))
    for rel in (MANIFEST, SESSION_FILE, f"{SID}.nwb"):
        assert (folder / rel).read_bytes() == (reference / rel).read_bytes(), rel


# -- refusals -------------------------------------------------------------------------------------------------


def test_row22_finalize_while_recording_is_refused(recorded, tmp_path):
    src, _ = recorded
    cfg = small_config(tmp_path)
    folder = tmp_path / "live"
    (folder / "streams").mkdir(parents=True)
    session = json.loads((src / SESSION_FILE).read_text())
    session.update(state="recording", streams={"nidaq": {"parts": [{"part": 0, "path": "streams/nidaq.h5",
                                                                       "rows": None}]}})
    write_json_atomic(folder / SESSION_FILE, session)
    writer = StreamFile.create(folder / "streams" / "nidaq.h5", cfg.stream("nidaq"), session={}, lines=[])
    try:
        plain = subprocess.run([sys.executable, "-c", "import h5py, sys; h5py.File(sys.argv[1], 'r')",
                                str(folder / "streams" / "nidaq.h5")], capture_output=True, text=True,
                               timeout=SUBPROCESS_TIMEOUT_S)
        assert plain.returncode == 1 and "already open for write" in plain.stderr  # a live file: SWMR flag set
        before = (folder / SESSION_FILE).read_bytes()
        with pytest.raises(FinalizeError, match="still recording"):
            finalize_session(folder)
        # Even when session.json says closed, a file a writer still holds open is refused.
        write_json_atomic(folder / SESSION_FILE, {**session, "state": "closed"})
        with pytest.raises(FinalizeError, match="still open in another process"):
            finalize_session(folder)
        write_json_atomic(folder / SESSION_FILE, json.loads(before))
        assert (folder / SESSION_FILE).read_bytes() == before
    finally:
        writer.close(fsync=False)
    assert sorted(p.name for p in folder.rglob("*")) == ["nidaq.h5", SESSION_FILE, "streams"]
    assert not any(is_immutable(p) for p in folder.rglob("*") if p.is_file())
    assert (folder / "streams" / "nidaq.h5").stat().st_mode & 0o200


def test_a_master_that_fails_inspection_seals_nothing_and_leaves_the_state(recorded, tmp_path, sealed_dirs):
    src, _ = recorded
    folder = copy_session(src, tmp_path / "bad-metadata", sealed_dirs)
    session = json.loads((folder / SESSION_FILE).read_text())
    session["metadata"]["subject"]["species"] = "mouse"  # DANDI: CRITICAL (not a Latin binomial)
    write_json_atomic(folder / SESSION_FILE, session)
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(FinalizeError, match="check_subject_species_form"):
        finalize_session(folder)
    after = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after == before  # no master, no partial, no qc, no recovered copy; session.json as it was
    assert not any(is_immutable(folder / p) for p in after)


def test_a_camera_encoded_to_video_links_its_files(tmp_path, sealed_dirs):
    cfg = small_config(tmp_path / "data", camera_video={"codec": "ffv1", "frames_per_file": 400})
    rig = Rig(cfg, SimParams(seed=SEED, seconds=60))
    folder = record_session(cfg, rig, "V1", Recording(seconds=12.0))
    sealed_dirs.append(folder)
    report = finalize_session(folder)
    cam = report.streams["camera"]
    assert cam.series_rows == cam.rows == 720 and cam.timing == "rate" and not cam.flags
    assert cam.video == {"files": [f"video/camera_000_{n:04d}.mkv" for n in range(2)], "starting_frames": [0, 400]}
    manifest = (folder / MANIFEST).read_text()
    assert all(f in manifest for f in cam.video["files"]) and verify_manifest(folder) == []
    io, nwbfile = read_master(folder / "V1.nwb")
    with io:
        ts = nwbfile.acquisition["camera"]
        assert ts.format == "external" and list(ts.external_file[:]) == cam.video["files"]
        assert list(ts.starting_frame[:]) == [0, 400] and ts.num_samples == 720
        _, frames = stream_data(folder, cam.parts)
        decoded = np.concatenate([_decode(folder / f) for f in ts.external_file[:]])
        assert np.array_equal(decoded, rig.samples("camera", int(frames[0]), len(frames)))  # ffv1: lossless
        ref = rig.devices["nidaq"].clock
        truth = ref.phase(rig.devices["camera"].clock.time_of(frames.astype(float))) / ref.rate
        error = np.abs(series_times(ts) + report.timebase["zero_reference_s"] - truth)
        assert error.max() <= cam.clock["error_bound_s"]


def _decode(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="gray") for f in c.decode(video=0)])


# -- host-time fallback and frame pairing ---------------------------------------------------------------------


def test_a_stream_without_sync_is_timed_by_host_receive_times_and_flagged(tmp_path, sealed_dirs):
    cfg = small_config(tmp_path / "data", no_sync=("sensor",))
    rig = Rig(cfg, SimParams(seed=SEED, seconds=60))
    folder = record_session(cfg, rig, "H1", Recording(seconds=15.0))
    sealed_dirs.append(folder)
    report = finalize_session(folder)
    sensor = report.streams["sensor"]
    assert sensor.clock["source"] == "host" and "host receive times" in sensor.flags[0]
    assert sensor.clock["error_bound_s"] < 0.005
    io, nwbfile = read_master(folder / "H1.nwb")
    with io:
        ts = nwbfile.acquisition["sensor"]
        assert "host receive times" in ts.comments
        _, samples = stream_data(folder, sensor.parts)
        ref = rig.devices["nidaq"].clock
        truth = ref.phase(rig.devices["sensor"].clock.time_of(samples.astype(float))) / ref.rate
        error = np.abs(series_times(ts) + report.timebase["zero_reference_s"] - truth)
        assert error.max() <= sensor.clock["error_bound_s"] + 1e-3  # + unobservable min-latency difference


def test_a_camera_whose_writer_fell_behind_is_never_silently_mis_paired(tmp_path, sealed_dirs):
    """Regression: receive latency growing 50 ms per second made the host prior slip frames against the
    regular strobe train; finalize accepted a fit of +28,000 ppm. It must flag it instead."""
    cfg = small_config(tmp_path / "data")
    rig = Rig(cfg, SimParams(seed=SEED, seconds=60))
    folder = record_session(cfg, rig, "B1", Recording(seconds=15.0, backlog={"camera": 0.05}))
    sealed_dirs.append(folder)
    camera = finalize_session(folder).streams["camera"]
    assert camera.clock["source"] == "host" and "strobe pairing implausible" in camera.flags[0]


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(offset=st.floats(-0.45, 0.45), jitter=st.floats(0.0, 0.1), drop=st.floats(0.0, 0.2), seed=st.integers(0, 99))
def test_pair_frames_finds_each_frames_strobe(offset, jitter, drop, seed):
    """Frames k = 1000.. at true times k / 60 (+ a slow drift); strobes for most of them; a prior off by
    ``offset`` periods plus per-frame jitter (fractions of a period) pairs every frame with its own strobe."""
    rng = np.random.default_rng(seed)
    period = 1 / 60
    frames = np.arange(1000, 1600)
    true_s = frames * period * (1 + 30e-6)
    has_strobe = rng.random(len(frames)) >= drop
    strobe_s = true_s[has_strobe] + rng.uniform(0, 3.3e-5, has_strobe.sum())
    prior = true_s + offset * period + rng.uniform(-jitter, jitter, len(frames)) * period
    fi, sj, found = pair_frames(frames, prior, strobe_s, period)
    assert np.array_equal(fi, np.flatnonzero(has_strobe))
    assert np.array_equal(sj, np.arange(has_strobe.sum()))
    assert abs(found + offset * period) < 0.15 * period


@pytest.mark.parametrize("alone", [False, True])
def test_a_counter_reset_of_the_reference_finalizes_on_another_timebase_flagged(tmp_path, alone):
    """Issue 24.4: the NIDAQ (the reference) restarted mid-session: finalize refused the whole session ("the reference
    stream 'nidaq' counter was reset"; align_stream would have raised ValueError on its edges). Now another synced
    stream recorded in one counter segment (the probe) is the timebase and the NIDAQ is aligned to it segment by
    segment; with no such stream (``alone``) the NIDAQ's longest segment is, its other one host-timed. Flagged,
    with a verdict, and never a lost session."""
    cfg = small_config(tmp_path / "data", no_sync=("probe", "sensor") if alone else ())
    rig = Rig(cfg, SimParams(seed=4, seconds=60))
    folder = record_session(cfg, rig, "refreset", Recording(seconds=30.0, counter_reset={"nidaq": 17.0}))
    try:
        report = finalize_session(folder)
    finally:
        unseal_session(folder)
    nidaq = report.streams["nidaq"]
    assert nidaq.clock["segments"] == 2 and "counter was reset" in nidaq.flags[0], nidaq.flags
    assert any("counter was reset" in w for w in report.warnings)
    assert report.timebase["configured_reference"] == "nidaq"
    assert nidaq.qc["verdict"] == "WARN" and report.streams["camera"].clock["source"] == "strobe"
    if alone:
        assert report.timebase["reference"] == "nidaq" and len(nidaq.clock["host_segments"]) == 1
        k = nidaq.clock["host_segments"][0]
        assert any(r.startswith(f"counter segment {k} timed by host") for r in nidaq.qc["reasons"])
    else:
        assert report.timebase["reference"] == "probe" and nidaq.clock["source"] == "sync"
        assert nidaq.clock["host_segments"] == [] and nidaq.clock["error_bound_samples"] <= 1.5
    # The NIDAQ's samples on either side of the reset land where they were recorded: 30 s of session, in order.
    with NWBHDF5IO(str(folder / report.master), "r") as io:
        t = io.read().acquisition["nidaq"].get_timestamps()[:]
    assert np.all(np.diff(t) > 0) and 29.5 < t[-1] - t[0] < 30.5
