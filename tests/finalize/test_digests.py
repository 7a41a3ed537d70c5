"""Seal as you go: parts split by duration, hashed by the daemon's hasher while recording, reused by finalize.

Real daemon, writers, hasher process and files: a part's digest is taken in the background once its writer closes
it (``digests.jsonl``); finalize trusts it only while the file's size, mtime, ctime and inode are unchanged, and the
manifest it writes always matches the files (``sha256sum -c``).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import h5py
import numpy as np
import pytest
from hdmf.backends.warnings import BrokenLinkWarning
from pynwb import NWBHDF5IO

from acqd.finalize import finalize_session, unseal_session, verify_manifest
from acqd.finalize.digests import Entry, entry_line, read_entries, read_lines, stamp
from acqd.finalize.layout import DIGESTS
from acqd.finalize.hasher import FAULT_ENV, MARKER_ENV, _open_for_append
from acqd.finalize.seal import unseal
from acqd.service.procs import pid_alive, wait_until
from tests.conftest import SMALL_RIG, assert_bit_exact, overlay, recording, rig_for, write_rig

PART_S = 0.5  # max_file_seconds of the probe in these tests: 15,000 rows a part


def small_rig(tmp_path: Path, **streams: dict) -> Path:
    """``SMALL_RIG`` (parts split by time whatever their width) with ``streams``' settings over it."""
    return write_rig(tmp_path, stream_overrides=overlay(SMALL_RIG, **streams))


def _parts(folder: Path) -> dict[str, list[dict]]:
    session = json.loads((folder / "session.json").read_text())
    return {name: s["parts"] for name, s in session["streams"].items()}


def _all_parts_hashed(daemon, folder: Path) -> bool:
    """Every part session.json lists has an entry in digests.jsonl and the daemon's hasher has nothing left."""
    listed = {p["path"] for ps in _parts(folder).values() for p in ps}
    return listed <= set(read_entries(folder)) and daemon.command("status")["hash_backlog_bytes"] == 0


def _sha256sum_check(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["sha256sum", "--quiet", "-c", "manifest.sha256"], cwd=folder, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.e2e
def test_time_rollover_parts_are_hashed_while_recording_and_read_through_the_master_bit_exact(tmp_path,
                                                                                              daemon_factory):
    rig_file = small_rig(tmp_path, probe={"max_file_seconds": PART_S / 2})
    daemon = daemon_factory(rig_file)
    with recording(daemon, rig_file, "timesplit", seed=41) as (_, folder):
        wait_until(lambda: daemon.command("status")["streams"]["probe"]["part"] >= 3, "a fourth probe part", 60)
        # The closed parts are hashed while the recording goes on.
        wait_until(lambda: {p["path"] for p in _parts(folder)["probe"][:3]} <= set(read_entries(folder)),
                   "digests of the first three closed parts", 30)
        daemon.command("stop")
    wait_until(lambda: _all_parts_hashed(daemon, folder), "digests of every part, the last ones too", 90)
    entries = read_entries(folder)
    for name, entry in entries.items():
        path = folder / name
        st = path.stat()
        assert entry.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry.stamp == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        assert entry.chunks["chunks_checked"] > 0 and not entry.chunks["corrupt"]
    probe = _parts(folder)["probe"]
    assert len(probe) >= 4 and [p["part"] for p in probe] == list(range(len(probe)))
    rows = [p["rows"] for p in probe]
    per_message = int(h5py.File(folder / probe[0]["path"], "r")["index"]["n_samples"][0])
    assert all(PART_S / 2 * 30000 <= r < PART_S / 2 * 30000 + per_message for r in rows[:-1])  # by samples' time

    report = finalize_session(folder)
    recorded = sum(len(ps) for ps in _parts(folder).values())
    assert report.sealed["digests"]["hashed_while_recording"] == recorded
    assert report.sealed["digests"]["changed_after_hashing"] == []
    assert report.integrity["chunks_checked"] == sum(e.chunks["chunks_checked"] for e in entries.values())
    assert verify_manifest(folder) == [] and _sha256sum_check(folder).returncode == 0
    assert f"{DIGESTS}" in (folder / "manifest.sha256").read_text()  # sealed with the record
    cfg, rig = rig_for(rig_file, seed=41)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", BrokenLinkWarning)
            with NWBHDF5IO(str(folder / "timesplit.nwb"), "r") as io:
                data = io.read().acquisition["probe"].data
                whole = []
                for p in probe:
                    with h5py.File(folder / p["path"], "r") as f:
                        assert assert_bit_exact(f, rig, "probe") == f["data"].shape[0] == p["rows"]
                        whole.append(f["data"][:])
                whole = np.concatenate(whole)
                assert data.shape == whole.shape and np.array_equal(data[:], whole)
    finally:
        unseal_session(folder)


@pytest.mark.e2e
def test_a_part_changed_after_it_was_hashed_is_hashed_again_and_the_manifest_never_lies(tmp_path, daemon_factory):
    rig_file = small_rig(tmp_path, probe={"max_file_seconds": PART_S})
    daemon = daemon_factory(rig_file)
    with recording(daemon, rig_file, "tampered", seed=42) as (_, folder):
        wait_until(lambda: daemon.command("status")["streams"]["probe"]["part"] >= 2, "a third probe part", 60)
        daemon.command("stop")
    wait_until(lambda: _all_parts_hashed(daemon, folder), "digests of every part", 30)
    target = folder / "streams" / "probe.part001.h5"
    early = read_entries(folder)["streams/probe.part001.h5"]
    # Flip one stored byte, same size, and put the mtime back: only the ctime tells (os.utime cannot set it).
    with h5py.File(target, "r") as f:
        offset = f["data"].id.get_chunk_info(0).byte_offset + 1000
    st = target.stat()
    with open(target, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    now = target.stat()
    assert (now.st_size, now.st_mtime_ns, now.st_ino) == (early.size, early.mtime_ns, early.inode)
    assert now.st_ctime_ns != early.ctime_ns

    report = finalize_session(folder, accept_corrupt=True)  # the flipped byte is a corrupt chunk: sealed as such
    try:
        check = _sha256sum_check(folder)
        assert check.returncode == 0, check.stdout + check.stderr
        assert verify_manifest(folder) == []
        listed = dict(line.split("  ")[::-1] for line in (folder / "manifest.sha256").read_text().splitlines())
        assert listed["streams/probe.part001.h5"] == hashlib.sha256(target.read_bytes()).hexdigest() != early.sha256
        changed = "streams/probe.part001.h5: changed after it was hashed during recording (ctime differ); hashed again"
        assert changed in report.warnings and report.sealed["digests"]["changed_after_hashing"] == [changed]
        assert report.sealed["digests"]["hashed_while_recording"] == sum(map(len, _parts(folder).values())) - 1
        # The chunk checks made while recording are not trusted either: the flip is found.
        assert [c["part"] for c in report.integrity["corrupt"]] == ["streams/probe.part001.h5"]
    finally:
        unseal_session(folder)


@pytest.mark.e2e
def test_kill9_of_the_daemon_while_hashing_leaves_a_session_that_finalizes(tmp_path, daemon_factory):
    rig_file = small_rig(tmp_path, probe={"max_file_seconds": PART_S})
    marker = tmp_path / "hasher.pid"
    # The hasher writes half of its second line, fsyncs it and waits: the daemon is killed right then.
    daemon = daemon_factory(rig_file, env={FAULT_ENV: "torn:2", MARKER_ENV: str(marker)})
    with recording(daemon, rig_file, "hashkill", seed=43) as (_, folder):
        writer_pids = [s["pid"] for s in daemon.command("status")["streams"].values()]
        hasher = int(wait_until(lambda: marker.exists() and marker.read_text(), "the hasher to tear a line", 60))
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.proc.wait(30)
        wait_until(lambda: not pid_alive(hasher) and not any(map(pid_alive, writer_pids)),
                   "the hasher and the writers to die with the daemon", 30)
    raw = (folder / DIGESTS).read_bytes()
    assert raw.count(b"\n") == 1 and not raw.endswith(b"\n")  # one whole entry, then a torn one
    (whole,) = read_entries(folder)
    daemon_factory(rig_file).command("status")  # a restarted daemon marks the session interrupted
    assert json.loads((folder / "session.json").read_text())["state"] == "interrupted"

    report = finalize_session(folder)
    try:
        assert report.sealed["digests"]["hashed_while_recording"] == 1  # the whole line; the torn one is ignored
        assert verify_manifest(folder) == [] and _sha256sum_check(folder).returncode == 0
        cfg, rig = rig_for(rig_file, seed=43)
        for p in _parts(folder)["probe"]:
            with h5py.File(folder / p["path"], "r") as f:
                assert assert_bit_exact(f, rig, "probe") == f["data"].shape[0] > 0
    finally:
        unseal_session(folder)


def test_a_rolled_back_finalize_leaves_unsealed_parts_as_they_were_hashed(tmp_path):
    # A failed finalize unseals every part; a part it never sealed must keep its stamp (ctime included), or the
    # next finalize would distrust and re-hash every digest taken while recording.
    part = tmp_path / "probe.part001.h5"
    part.write_bytes(b"x" * 4096)
    before = stamp(part)
    unseal([part])
    assert stamp(part) == before


def test_a_torn_line_is_ignored_and_ended_before_the_next_entry(tmp_path):
    good = Entry("streams/a.h5", 1, 2, 3, 4, "0" * 64)
    (tmp_path / DIGESTS).write_bytes(entry_line(good) + entry_line(replace(good, path="streams/b.h5"))[:40])
    assert list(read_entries(tmp_path)) == ["streams/a.h5"]
    fd = _open_for_append(tmp_path)  # what a restarted hasher does first
    try:
        os.write(fd, entry_line(replace(good, path="streams/c.h5")))
    finally:
        os.close(fd)
    assert list(read_entries(tmp_path)) == ["streams/a.h5", "streams/c.h5"]


def test_a_line_is_trusted_only_with_its_own_check_and_old_lines_without_one_are_hashed_again(tmp_path):
    good = Entry("streams/a.h5", 1, 2, 3, 4, "0" * 64, {"chunks_checked": 1})
    old = json.dumps(asdict(good))  # as acqd wrote it before lines had a check
    edited = entry_line(good).decode().replace('"size": 1', '"size": 2')
    (tmp_path / DIGESTS).write_text(old + "\n" + edited + entry_line(replace(good, path="streams/b.h5")).decode())
    assert read_lines(tmp_path) == ({"streams/b.h5": replace(good, path="streams/b.h5")}, 2)


@pytest.mark.e2e
def test_a_camera_part_encoded_to_video_brings_its_video_files_to_the_hasher(tmp_path, daemon_factory):
    rig_file = small_rig(tmp_path, camera={"max_file_seconds": 1.0, "video": {"codec": "ffv1", "frames_per_file": 30}})
    daemon = daemon_factory(rig_file)
    with recording(daemon, rig_file, "videohash", seed=44) as (_, folder):
        wait_until(lambda: daemon.command("status")["streams"]["camera"]["part"] >= 1, "a second camera part", 60)
        first = folder / _parts(folder)["camera"][0]["path"]
        with h5py.File(first, "r") as f:  # closed: its finished video files are listed
            videos = [f"video/{n.decode()}" for n in f["video"]["file"][:]]
        assert len(videos) == 2  # 60 frames, 30 per file
        wait_until(lambda: set(videos) <= set(read_entries(folder)), "digests of the first part's video files", 30)
        daemon.command("stop")
    for name in videos:
        entry = read_entries(folder)[name]
        assert entry.sha256 == hashlib.sha256((folder / name).read_bytes()).hexdigest() and entry.chunks is None


@pytest.mark.parametrize("module", ["acqd.finalize.hasher", "acqd.finalize.scrub"])
def test_the_background_processes_start_without_runpys_double_import_warning(tmp_path, module):
    """The daemon starts the hasher and the scrub with ``python -m``; had their package imported them first, runpy
    would warn ("found in sys.modules ... unpredictable behaviour") in the daemon's log at every session, and run
    the module's code a second time as ``__main__``."""
    done = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", module, str(tmp_path / "none"), "1"],
                          capture_output=True, text=True, timeout=60)
    assert "RuntimeWarning" not in done.stderr and "Traceback" not in done.stderr, done.stderr
