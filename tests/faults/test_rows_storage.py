"""Storage faults end to end: parts cut short (row 37), a disk that fills at a part rollover (row 6)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import zmq

from acqd.record.streamfile import committed_rows, open_for_read
from acqd.service.procs import pid_alive, wait_until
from tests import zygote
from tests.conftest import SMALL_RIG, assert_bit_exact, recording, rig_for, write_rig

RESTART_DEADLINE_S = 30.0
FINALIZE_DEADLINE_S = 240.0  # a healthy finalize of this rig takes ~20 s on the shared 2-core machine


def _interrupted_session(daemon_factory, rig_file: Path, name: str, seed: int) -> Path:
    """~3 s recorded, then the daemon killed: its writers close their parts, the session stays 'recording'."""
    daemon = daemon_factory(rig_file)
    with recording(daemon, rig_file, name, seed=seed) as (_, folder):
        writers = [s["pid"] for s in daemon.command("status")["streams"].values()]
        wait_until(lambda: daemon.command("status")["streams"]["nidaq"]["rows"] > 3 * 30000, "3 s recorded")
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.proc.wait(30)
        wait_until(lambda: not any(pid_alive(p) for p in writers), "the orphaned writers to exit", 30)
    return folder


def _finalize(folder: Path) -> tuple[subprocess.CompletedProcess, float]:
    t = time.monotonic()
    done = zygote.run([sys.executable, "-m", "acqd.cli", "finalize", str(folder), "--json"], capture_output=True,
                      text=True, timeout=FINALIZE_DEADLINE_S)
    return done, time.monotonic() - t


@pytest.mark.e2e
def test_row37_truncated_and_empty_parts_never_block_restart_finalize_or_the_next_session(tmp_path, daemon_factory):
    # Issue 22 defect 1: a part cut to 1024 bytes hung the restarted daemon (recover_interrupted) and finalize.
    rig_file = write_rig(tmp_path, stream_overrides=SMALL_RIG)  # the cut parts are the sensor's and the camera's
    folder = _interrupted_session(daemon_factory, rig_file, "cut", seed=37)
    streams = folder / "streams"
    with open_for_read(streams / "sensor.h5") as f:
        assert committed_rows(f) > 0
    os.truncate(streams / "sensor.h5", 1024)  # below its superblock's end of file
    os.truncate(streams / "camera.h5", 0)  # a bad copy, or a part created on a full disk

    t = time.monotonic()
    again = daemon_factory(rig_file)
    status = again.command("status")
    assert time.monotonic() - t < RESTART_DEADLINE_S and status["mode"] == "IDLE"
    (found,) = status["recovered"]
    files = found["files"]
    assert files["sensor.h5"] == {"readable": False, "bytes": 1024, "error": files["sensor.h5"]["error"]}
    assert "truncated: 1024 bytes" in files["sensor.h5"]["error"]
    assert not files["camera.h5"]["readable"] and files["camera.h5"]["bytes"] == 0
    assert files["probe.h5"]["readable"] and files["probe.h5"]["rows"] > 0 and files["nidaq.h5"]["readable"]

    done, took = _finalize(folder)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    lost = {x["part"]: x for x in report["integrity"]["lost"]}
    assert lost["streams/sensor.h5"]["bytes"] == 1024 and not lost["streams/sensor.h5"]["empty"]
    assert lost["streams/camera.h5"]["bytes"] == 0 and lost["streams/camera.h5"]["empty"]
    assert any("streams/sensor.h5 (1024 bytes) cannot be read and is listed as lost" in w for w in report["warnings"])
    assert any("streams/camera.h5 (0 bytes) is empty and skipped" in w for w in report["warnings"])
    assert set(report["streams"]) == {"probe", "nidaq"}
    session = json.loads((folder / "session.json").read_text())
    assert session["state"] == "finalized" and session["incomplete"]
    assert session["finalize"]["integrity"]["lost"] == report["integrity"]["lost"]

    with recording(again, rig_file, "next", seed=38) as (_, nxt):  # the rig records again
        wait_until(lambda: all(s["rows"] > 0 for s in again.command("status")["streams"].values()), "every stream")
        again.command("stop")
    assert sorted(p.name for p in (nxt / "streams").glob("*.h5")) == [
        "camera.h5", "nidaq.h5", "probe.h5", "sensor.h5"]


@pytest.mark.e2e
def test_row37_a_cut_reference_part_is_refused_by_name_within_the_deadline(tmp_path, daemon_factory):
    rig_file = write_rig(tmp_path, stream_overrides=SMALL_RIG)
    folder = _interrupted_session(daemon_factory, rig_file, "cutref", seed=39)
    daemon_factory(rig_file).command("status")  # marks the session interrupted
    os.truncate(folder / "streams" / "nidaq.h5", 1024)
    done, took = _finalize(folder)
    assert done.returncode != 0 and took < FINALIZE_DEADLINE_S
    assert "reference stream 'nidaq' has no part that can be read" in done.stderr
    assert "streams/nidaq.h5 (1024 bytes) cannot be read" in done.stderr and "Traceback" not in done.stderr
    assert json.loads((folder / "session.json").read_text())["state"] == "interrupted"  # as it was found


@pytest.mark.e2e
def test_row37_a_truncated_part_keeps_the_rows_its_index_proves_through_finalize(tmp_path, daemon_factory):
    # Issue 22 defect 1, "recovery copies what the index proves and reports the rest": a part cut short was lost whole.
    rig_file = write_rig(tmp_path, stream_overrides=SMALL_RIG)
    folder = _interrupted_session(daemon_factory, rig_file, "salvage", seed=40)
    daemon_factory(rig_file).command("status")  # marks the session interrupted
    probe = folder / "streams" / "probe.h5"
    with open_for_read(probe) as f:
        committed = committed_rows(f)
    size = probe.stat().st_size
    os.truncate(probe, size * 2 // 3)  # the superblock and the early index intact, the last third gone
    done, took = _finalize(folder)
    assert done.returncode == 0 and took < FINALIZE_DEADLINE_S, done.stderr[-3000:]
    report = json.loads(done.stdout)
    (lost,) = report["integrity"]["lost"]
    assert lost["part"] == "streams/probe.h5" and lost["salvaged_to"] == "recovered/probe.h5"
    assert lost["bytes"] == size * 2 // 3 and lost["expected_bytes"] == size and not lost["empty"]
    assert 0 < lost["salvaged_rows"] < committed and lost["salvaged_index_rows"] <= lost["listed_index_rows"]
    assert lost["salvaged_bytes"] == lost["salvaged_rows"] * 33 * 2  # int16 rows of SMALL_RIG's probe
    assert any(f"{size - size * 2 // 3} bytes of the {size} its superblock records are cut off" in w
               and "its index proves are salvaged into recovered/probe.h5; the rest is lost" in w
               for w in report["warnings"])
    assert report["streams"]["probe"]["rows"] == lost["salvaged_rows"]  # the master holds what was proven
    cfg, rig = rig_for(rig_file, seed=40)
    with h5py.File(folder / "recovered" / "probe.h5", "r") as f:  # a clean part: no SWMR flag, exact extent
        assert assert_bit_exact(f, rig, "probe") == f["data"].shape[0] == lost["salvaged_rows"]
    session = json.loads((folder / "session.json").read_text())
    assert session["state"] == "finalized" and session["incomplete"]


# -- row 6: a full disk at a part rollover (issue 22 defect 6) ------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 4 MiB tmpfs at ``tmp_path/streams`` (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mnt = tmp_path / "streams"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True, timeout=30)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=30)


def _fill(folder: Path, leave: int) -> None:
    """Take every free byte of ``folder``'s filesystem but ``leave``."""
    import shutil

    free = shutil.disk_usage(folder).free
    with open(folder / "ballast", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def test_row06_a_full_disk_at_a_rollover_stops_the_stream_and_never_leaves_an_empty_part(tmp_path, small_tmpfs):
    # Issue 22 defect 6: the next part was created on the full disk and stayed 0 bytes; finalize then failed on it.
    from tests.record.livewriter import LiveWriter, message

    w = LiveWriter(tmp_path, shape=(1024,), max_file_bytes=1 << 20, chunk_rows=64)
    try:
        _fill(small_tmpfs, leave=(1 << 20) + (700 << 10))  # room for the first part, not for a second one's reserve
        w.connected()
        w.record()
        deadline, seq = time.monotonic() + 30, 0
        while w.proc.poll() is None and time.monotonic() < deadline:  # 20 KiB each: the first part fills 1 MiB
            try:
                w.driver.send_multipart(message(seq, 10 * seq, shape=(1024,))[0], zmq.NOBLOCK)
                seq += 1
            except zmq.Again:  # the writer is busy (or gone): look again
                w.pump(50)
        w.wait_for(lambda m: m["type"] == "event" and m["kind"] == "disk_full", "the full disk to stop the stream")
        assert w.proc.wait(30) != 0
        (event,) = w.events("disk_full")
    finally:
        w.close()
    assert "a new part needs" in event["detail"]
    assert sorted(p.name for p in small_tmpfs.glob("*.h5")) == ["s.h5"]  # no part created on the full disk
    with h5py.File(small_tmpfs / "s.h5", "r") as f:  # closed cleanly before the rollover: no SWMR flag
        assert committed_rows(f) == f["data"].shape[0] > 0


def test_row06_a_file_size_limit_below_a_header_refuses_the_part_before_creating_it(tmp_path):
    # The no-root variant (RLIMIT_FSIZE gives EFBIG): the creation is refused, nothing is left behind.
    code = ("import resource, signal, sys\nfrom pathlib import Path\nfrom acqd.config import StreamConfig\n"
            "from acqd.errors import DiskFullError\nfrom acqd.record.streamfile import StreamFile\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
            "cfg = StreamConfig(name='s', endpoint='ipc:///x', dtype='int16', shape=(4,), rate=1000.0)\n"
            "try:\n    StreamFile.create(Path(sys.argv[1]), cfg, session={}, lines=[])\n"
            "except DiskFullError as e:\n    print('refused:', e)\n")
    path = tmp_path / "s.part001.h5"
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert "refused:" in done.stdout and "file size limit 4096" in done.stdout, done.stdout + done.stderr[-2000:]
    assert not path.exists()


@pytest.mark.e2e
def test_row06_an_empty_or_headerless_part_is_skipped_with_a_note_by_finalize(tmp_path, daemon_factory):
    # What a full disk at a rollover left before the fix: finalize failed with an OSError, or refused with
    # "the reference stream's counter was reset".
    rig_file = write_rig(tmp_path, stream_overrides=SMALL_RIG)
    daemon = daemon_factory(rig_file)
    with recording(daemon, rig_file, "fullroll", seed=6) as (_, folder):
        wait_until(lambda: daemon.command("status")["streams"]["nidaq"]["rows"] > 30000, "1 s recorded")
        daemon.command("stop")
    (folder / "streams" / "nidaq.part001.h5").write_bytes(b"")
    (folder / "streams" / "sensor.part001.h5").write_bytes(b"\x89HDF\r\n")  # cut inside the signature
    done, _ = _finalize(folder)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert any("streams/nidaq.part001.h5 (0 bytes) is empty and skipped" in w for w in report["warnings"])
    assert any("streams/sensor.part001.h5 (6 bytes) is empty and skipped" in w for w in report["warnings"])
    assert set(report["streams"]) == {"probe", "nidaq", "camera", "sensor"} and report["state"] == "finalized"
    assert not json.loads((folder / "session.json").read_text())["incomplete"]  # nothing committed was lost


# -- row 7: a disk that fails every write (issue 22 defect 14) ------------------------------------------------


def test_row07_a_disk_that_fails_every_write_stops_the_stream_cleanly_never_a_segfault(tmp_path):
    # Issue 22 defect 14: HDF5 could not close a part after its own write failed; creating the next part (or HDF5's
    # exit handlers) then crashed the writer with SIGSEGV, which the supervisor restarted as a crash.
    from acqd.record.writer import EXIT_WRITE_ERROR
    from tests.record.livewriter import LiveWriter, message

    w = LiveWriter(tmp_path, env={"ACQD_FAULT": "s:dead_disk:21"}, chunk_rows=10)
    try:
        w.connected()
        w.record()
        for seq in range(20):
            w.driver.send_multipart(message(seq, 10 * seq)[0])
        w.wait_handled(20)
        wait_until(lambda: w.stats()["rows"] == 200 and _committed(w.folder / "s.h5") == 200, "20 messages committed")
        for seq in range(20, 30):
            w.driver.send_multipart(message(seq, 10 * seq)[0], zmq.NOBLOCK)
        assert w.proc.wait(30) == EXIT_WRITE_ERROR  # not -11
        w.pump(0)
        (error,) = w.events("write_error")
        suspects = [m for m in w.msgs if m["type"] == "closed" and m.get("suspect")]
    finally:
        w.close()
    assert "s.part001.h5: write failed" in error["detail"]
    assert [Path(m["path"]).name for m in suspects] == ["s.h5", "s.part001.h5"]
    assert suspects[0]["rows"] == 200 and suspects[0]["final"] is False and suspects[1]["final"] is True
    assert _committed(w.folder / "s.h5") == 200  # what the index proved before the failure stays readable
    assert _committed(w.folder / "s.part001.h5") == 0


def _committed(path: Path) -> int:
    with open_for_read(path) as f:
        return committed_rows(f)


@pytest.mark.e2e
def test_row07_a_dead_disk_under_the_daemon_is_a_stopped_stream_not_a_crash_loop(tmp_path, daemon_factory):
    rig_file = write_rig(tmp_path, stream_overrides=SMALL_RIG)
    daemon = daemon_factory(rig_file, env={"ACQD_FAULT": "sensor:dead_disk:200"})  # ~2 s into the recording
    with recording(daemon, rig_file, "deaddisk", seed=7) as (_, folder):
        stopped = wait_until(lambda: (s := daemon.command("status")["streams"])["sensor"]["state"] == "stopped_failed"
                             and s, "the sensor stream to stop on its write error", 60)
        assert stopped["sensor"]["restarts"] == 0 and "fail" in stopped["sensor"]["reason"]  # never restarted
        rows = {n: s["rows"] for n, s in stopped.items() if n != "sensor"}
        wait_until(lambda: all(daemon.command("status")["streams"][n]["rows"] > r for n, r in rows.items()),
                   "the other streams to keep recording")
        daemon.command("stop")
    session = json.loads((folder / "session.json").read_text())
    kinds = [(i["kind"], i["stream"]) for i in session["incidents"]]
    assert ("write_error", "sensor") in kinds and ("suspect_part", "sensor") in kinds
    assert not [k for k in kinds if k[0] == "writer_died"] and session["incomplete"]
    assert _committed(folder / "streams" / "sensor.h5") > 0
