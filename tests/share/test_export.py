"""acqd export end to end on a finalized session (tests/sessions.py): real h5py, pynwb, hdmf, nwbinspector.

One session is recorded once per module with everything an export must resolve: a probe compressed with an
hdf5plugin filter (Blosc) and a dropped chunk (timestamps), a camera encoded to three video files
(ImageSeries.external_file), and a sensor whose writer was killed with -9 (two parts joined by a virtual
dataset, its /sync too). Its session and subject ids hold characters dandi organize replaces. A copy is
finalized (sealed) and exported once; the unfinalized original is kept for the refusal tests. Sealed folders are
unsealed at teardown.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from hdmf.backends.warnings import BrokenLinkWarning
from pynwb import NWBHDF5IO, validate

from acqd.share.export import ExportError, dandi_path, export_session, external_file_name, sanitize
from acqd.finalize import finalize_session, unseal_session, verify_manifest
from acqd.sim.simulate import Rig, SimParams
from tests import zygote
from sessions import SUBJECT as TEST_SUBJECT
from sessions import Recording, Restart, record_session, small_config

SID = "2023-11-14_22.13"
SUBJECT = "mouse_01:a"
STEM = "sub-mouse-01-a_ses-2023-11-14-22-13_ecephys+image"  # dandi: '_', ':', '.' -> '-'; modalities sorted
RECORDING = Recording(seconds=10.0, drops={"probe": [(5.0, 5.15)]}, restart=Restart("sensor", 7.0, crash=True))
SUBPROCESS_TIMEOUT_S = 120
GZIP, SHUFFLE = 1, 2  # HDF5's built-in filter ids: every reader has them


pytestmark = pytest.mark.xdist_group("export")  # one xdist worker: the module-scoped session is built once


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    """(recorded, never finalized; finalized copy) of the session; the copy is unsealed after the module."""
    root = tmp_path_factory.mktemp("export")
    cfg = small_config(root / "recorded", camera_video={"codec": "ffv1", "frames_per_file": 200})
    streams = tuple(s.model_copy(update={"compression": "blosc-lz4"}) if s.name == "probe" else s
                    for s in cfg.streams)
    cfg = cfg.model_copy(update={"streams": streams})
    recorded = record_session(cfg, Rig(cfg, SimParams(seed=3, seconds=30)), SID, RECORDING,
                              {"subject": {**TEST_SUBJECT, "subject_id": SUBJECT}})
    folder = root / "finalized" / SID
    shutil.copytree(recorded, folder)
    try:
        finalize_session(folder)
        yield recorded, folder
    finally:
        unseal_session(folder)


@pytest.fixture(scope="module")
def exported(sessions, tmp_path_factory):
    """The finalized session exported once: (session folder, out folder, report, progress calls, files before)."""
    _, folder = sessions
    before = _snapshot(folder)
    out = tmp_path_factory.mktemp("dandiset")
    calls: list[tuple[str, float]] = []
    report = export_session(folder, out, lambda stage, done: calls.append((stage, done)))
    return folder, out, report, calls, before


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def _read(path: Path) -> tuple[NWBHDF5IO, object]:
    """Read-only, with a broken link an error instead of silently empty data."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", BrokenLinkWarning)
        io = NWBHDF5IO(str(path), "r")
        return io, io.read()


# -- naming (pure) --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "field", "expected"), [
    ("mouse_01:a", "subject_id", "mouse-01-a"),
    ("2023-11-14_22.13", "session_id", "2023-11-14-22-13"),
    ("a*b\\c/d<e>f|g\"h'i?j%k@l;m", "subject_id", "a-b-c-d-e-f-g-h-i-j-k-l-m"),
    ("ok-Name+1", "subject_id", "ok-Name+1"),
    (".nwb", "extension", ".nwb"),
])
def test_ids_are_sanitised_as_dandi_organize_does(value, field, expected):
    assert sanitize(value, field) == expected


def test_dandi_paths_and_external_file_names():
    assert dandi_path("m1", "s_1", ["image", "ecephys"]) == "sub-m1/sub-m1_ses-s-1_ecephys+image.nwb"
    assert dandi_path("m1", "s1") == "sub-m1/sub-m1_ses-s1.nwb"
    with pytest.raises(ExportError, match="subject_id"):
        dandi_path("", "s1")
    assert (external_file_name("sub-m1/sub-m1_ses-s1_image.nwb", "abc", 2, "video/cam_000_0002.mkv")
            == "sub-m1_ses-s1_image/abc_external_file_2.mkv")


# -- the export ---------------------------------------------------------------------------------------------------


def test_layout_and_video_names_are_what_dandi_organize_produces(exported):
    folder, out, report, calls, _ = exported
    nwb_rel = f"sub-mouse-01-a/{STEM}.nwb"
    assert report.nwb == nwb_rel
    with h5py.File(out / nwb_rel, "r") as f:
        camera = f["acquisition/camera"]
        object_id = camera.attrs["object_id"]
        external = [v.decode() for v in camera["external_file"][()]]
        starting = list(camera["external_file"].attrs["starting_frame"])
    videos = [f"{STEM}/{object_id}_external_file_{n}.mkv" for n in range(3)]
    assert external == videos and starting == [0, 200, 400]  # relative to the NWB file's folder
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted([nwb_rel, *(f"sub-mouse-01-a/{v}" for v in videos)])  # no staging left behind
    assert report.videos == [f"sub-mouse-01-a/{v}" for v in videos]
    for n, v in enumerate(videos):
        assert (out / "sub-mouse-01-a" / v).read_bytes() == (folder / f"video/camera_000_{n:04d}.mkv").read_bytes()
    fractions = [f for _, f in calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert [s for s, _ in calls][0] == "check" and "copy" in {s for s, _ in calls}


def test_the_export_is_self_contained_and_compressed_only_with_gzip(exported):
    _, out, report, _, _ = exported
    links, virtual, filters = [], [], set()
    with h5py.File(out / report.nwb, "r") as f:
        def visit(name: str, link) -> None:
            if isinstance(link, h5py.ExternalLink):
                links.append(name)
            elif isinstance(link, h5py.HardLink) and isinstance(obj := f[name], h5py.Dataset):
                if obj.is_virtual:
                    virtual.append(name)
                plist = obj.id.get_create_plist()
                filters.update(plist.get_filter(i)[0] for i in range(plist.get_nfilters()))

        f.visititems_links(visit)
        assert f["acquisition/probe/data"].compression == "gzip"
    assert links == [] and virtual == [] and filters == {GZIP, SHUFFLE}


def test_every_series_matches_the_master_bit_exactly(exported):
    folder, out, report, _, _ = exported
    mio, master = _read(folder / f"{SID}.nwb")
    eio, export = _read(out / report.nwb)
    with mio, eio:
        assert set(export.acquisition) == set(master.acquisition) == {"probe", "nidaq", "camera", "sensor"}
        for name, m in master.acquisition.items():
            e = export.acquisition[name]
            assert type(e) is type(m)
            assert np.array_equal(e.data[:], m.data[:]) and e.data.dtype == m.data.dtype, name
            for attr in ("unit", "conversion", "offset", "resolution", "description", "comments", "starting_time",
                         "rate", "num_samples" if name == "camera" else "unit"):
                assert getattr(e, attr) == getattr(m, attr), (name, attr)
            if m.timestamps is None:
                assert e.timestamps is None and isinstance(e.rate, float)
            else:
                assert np.array_equal(e.timestamps[:], m.timestamps[:]) and e.timestamps.dtype == np.float64, name
        assert master.acquisition["probe"].timestamps is not None and master.acquisition["nidaq"].rate == 30000.0
        assert len(export.acquisition["sensor"].data) == len(master.acquisition["sensor"].data) > 0  # VDS resolved
        assert list(export.acquisition["probe"].electrodes.data[:]) == list(master.acquisition["probe"].electrodes.data[:])
        me, ee = master.electrodes.to_dataframe(), export.electrodes.to_dataframe()
        assert me.drop(columns="group").equals(ee.drop(columns="group"))
        assert list(me["group"].map(lambda g: g.name)) == list(ee["group"].map(lambda g: g.name))
        for table in master.events:
            assert export.events[table].to_dataframe().equals(master.events[table].to_dataframe())
        assert export.intervals["gaps"].to_dataframe().equals(master.intervals["gaps"].to_dataframe())
        assert export.subject.subject_id == SUBJECT and export.session_id == SID
        rows = {n: int(ts.num_samples if n == "camera" else len(ts.data)) for n, ts in master.acquisition.items()}
    assert {n: s["rows"] for n, s in report.series.items()} == rows and rows["camera"] == 600


def test_raw_sync_is_present_for_each_series_that_had_it(exported):
    folder, out, report, _, _ = exported
    with h5py.File(folder / f"{SID}.nwb", "r") as m, h5py.File(out / report.nwb, "r") as e:
        for name in ("probe", "nidaq", "camera", "sensor"):
            assert isinstance(m[f"acquisition/{name}"].get("sync", getlink=True), h5py.ExternalLink)
            src, dst = m[f"acquisition/{name}/sync"], e[f"acquisition/{name}/sync"]
            assert isinstance(e[f"acquisition/{name}"].get("sync", getlink=True), h5py.HardLink)
            assert sorted(dst) == sorted(src) == ["clock", "edges", "offsets"]  # offsets: driver clock offsets (LSL)
            for key in src:
                assert np.array_equal(dst[key][()], src[key][()]) and dst[key].dtype == src[key].dtype, (name, key)
                assert dict(dst[key].attrs) == dict(src[key].attrs)
            assert dict(dst.attrs) == dict(src.attrs)
        assert len(e["acquisition/probe/sync/edges"]) > 10 and len(e["acquisition/sensor/sync/clock"]) > 0
    assert all(s["sync"] for s in report.series.values())


def test_validation_and_dandi_inspection_pass(exported):
    from nwbinspector import inspect_nwbfile, load_config

    _, out, report, _, _ = exported
    assert validate(path=str(out / report.nwb)) == []
    found = [m for m in inspect_nwbfile(nwbfile_path=str(out / report.nwb), config=load_config("dandi")) if m]
    assert not [m for m in found if m.importance.name in ("CRITICAL", "ERROR", "PYNWB_VALIDATION")], found
    assert report.check["ok"] and not report.check["validation_errors"] and not report.check["read_errors"]


def test_plain_pynwb_reads_it_without_hdf5plugin(exported):
    """Another process that imports nothing but pynwb (no hdf5plugin filters) reads every series."""
    _, out, report, _, _ = exported
    script = (
        "import json, sys\n"
        "from pynwb import NWBHDF5IO\n"
        "with NWBHDF5IO(sys.argv[1], 'r') as io:\n"
        "    nwb = io.read()\n"
        "    sums = {k: int(ts.data[:].astype('int64').sum()) if ts.data.dtype.kind in 'iu' else float(ts.data[:].sum())\n"
        "            for k, ts in nwb.acquisition.items()}\n"
        "print(json.dumps({'hdf5plugin': 'hdf5plugin' in sys.modules, 'sums': sums}))\n")
    run = subprocess.run([sys.executable, "-c", script, str(out / report.nwb)], capture_output=True, text=True,
                         timeout=SUBPROCESS_TIMEOUT_S, cwd=out)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["hdf5plugin"] is False
    assert result["sums"]["camera"] == 0 and result["sums"]["probe"] != 0  # camera frames are in the videos


def test_the_sealed_session_is_untouched(exported):
    folder, _, _, _, before = exported
    assert _snapshot(folder) == before
    assert verify_manifest(folder) == []


# -- refusals ---------------------------------------------------------------------------------------------------


def test_an_existing_export_is_never_overwritten(exported):
    folder, out, report, _, _ = exported
    before = _snapshot(out)
    with pytest.raises(ExportError, match="already exists"):
        export_session(folder, out)
    assert _snapshot(out) == before


def test_refuses_unfinalized_tampered_or_inside_the_session(sessions, tmp_path):
    recorded, folder = sessions
    with pytest.raises(ExportError, match="not finalized"):
        export_session(recorded, tmp_path / "out")
    with pytest.raises(ExportError, match="outside the \\(sealed\\) session"):
        export_session(folder, folder / "export")
    tampered = tmp_path / "tampered" / SID
    shutil.copytree(folder, tampered)
    unseal_session(tampered)
    with open(tampered / "streams" / "nidaq.h5", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x01")
    with pytest.raises(ExportError, match="does not match its manifest"):
        export_session(tampered, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_one_export_of_a_session_into_a_folder_at_a_time(exported, tmp_path):
    import fcntl

    folder, _, _, _, _ = exported
    out = tmp_path / "out"
    staging = out / f".acqd-export-{SID}.partial"
    staging.mkdir(parents=True)
    fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running export holds it
        with pytest.raises(ExportError, match="another export of .* is running"):
            export_session(folder, out)
        assert staging.is_dir() and [p.name for p in out.iterdir()] == [staging.name]  # the other's, untouched
    finally:
        os.close(fd)


# -- the CLI, as the daemon runs it --------------------------------------------------------------------------------


def test_cli_progress_jsonl_reports_then_refuses_a_second_export(exported, tmp_path):
    folder, _, first, _, _ = exported
    cmd = [sys.executable, "-m", "acqd.cli", "export", str(folder), "--out", str(tmp_path / "out"),
           "--progress-jsonl", "--gzip-level", "1"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    progress, last = lines[:-1], lines[-1]
    assert progress and all(set(p) == {"stage", "fraction"} for p in progress)
    fractions = [p["fraction"] for p in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert last["report"]["nwb"] == first.nwb and last["report"]["check"]["ok"]
    assert (tmp_path / "out" / first.nwb).is_file()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert again.returncode == 2
    assert "already exists" in json.loads(again.stdout.splitlines()[-1])["error"]


def test_a_bids_named_session_exports_under_its_bids_name(tmp_path):
    """RECORD with BIDS entities names the folder sub-M12_ses-3_task-gonogo_run-1 and stores them in the
    metadata; the export is named from them (not from the sanitised folder name)."""
    cfg = small_config(tmp_path / "data", probe_channels=4)
    bids = {"sub": "M12", "ses": "3", "task": "gonogo", "run": "1"}
    folder = record_session(cfg, Rig(cfg, SimParams(seed=4, seconds=20)), "sub-M12_ses-3_task-gonogo_run-1",
                            Recording(seconds=4.0), {"bids": bids, "subject": {**TEST_SUBJECT, "subject_id": "M12"}})
    try:
        finalize_session(folder)
        report = export_session(folder, tmp_path / "dandiset")
    finally:
        unseal_session(folder)
    assert report.nwb == "sub-M12/sub-M12_ses-3_task-gonogo_run-1_ecephys+image.nwb"
    assert (tmp_path / "dandiset" / report.nwb).is_file()
    assert dandi_path("M12", "x", ["ecephys"], {"sub": "M12", "acq": "np", "run": "2"}) == \
        "sub-M12/sub-M12_acq-np_run-2_ecephys.nwb"


def test_amend_after_export_marks_it_stale_and_export_rebuilds_it(exported, tmp_path):
    """Issue 23.3: the export said sex F after the session was amended to M. Now the amendment marks exports stale,
    the console shows it, and exporting again into the same folder rebuilds the export with the amended metadata.
    The amendment changes the session, so it runs on copies of the module's finalized session and of its export
    (made by ``export_session`` from the same master: exporting it again would give the same files)."""
    from acqd.finalize.amend import amend_session
    from acqd.service.http.console import session_row
    from acqd.session import read_session

    finalized, exported_out, first, _, _ = exported
    folder = tmp_path / SID
    shutil.copytree(finalized, folder)
    out = tmp_path / "dandiset"
    shutil.copytree(exported_out, out)
    try:
        info = {"session_id": SID, "state": "finalized", "path": str(folder)}
        done = {"export": {"state": "done", "master_sha256": first.master_sha256}}
        assert session_row(info, done)["state"] == "exported"
        with pytest.raises(ExportError, match="already exists and is current"):
            export_session(folder, out)
        with h5py.File(out / first.nwb, "r") as f:
            sex = f["general/subject/sex"][()].decode()
        new_sex = "M" if sex != "M" else "F"
        amendment = amend_session(folder, {"subject": {"sex": new_sex}}, who="x")
        assert amendment["exports_stale"] is True
        assert read_session(folder)["amendments"][-1]["exports_stale"] is True
        assert session_row(info, done)["state"] == "export stale"
        out_cli = zygote.run([sys.executable, "-m", "acqd.cli", "export", str(folder), "--out", str(out)],
                             capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
        assert out_cli.returncode == 0 and "rebuilt the stale export" in out_cli.stdout, out_cli.stderr
        with h5py.File(out / first.nwb, "r") as f:
            assert f["general/subject/sex"][()].decode() == new_sex
            assert f.attrs["acqd_master_sha256"] == amendment["master_sha256"] != first.master_sha256
        assert sorted(p.name for p in out.iterdir()) == [first.nwb.split("/")[0]]  # no staging left behind
        assert sorted(p.relative_to(out).as_posix() for p in (out / first.nwb).parent.iterdir()) == sorted(
            [first.nwb, first.nwb.removesuffix(".nwb")])
        done["export"]["master_sha256"] = amendment["master_sha256"]
        assert session_row(info, done)["state"] == "exported"
    finally:
        unseal_session(folder)
