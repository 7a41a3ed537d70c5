"""Rows whose earlier tests did not prove the whole row (issue 22, "Tests that do not yet prove their row").

- row 2: the crash-at-Nth-write hook (``ACQD_FAULT=<stream>:crash_after_write:N``) at the first append (the part
  holds its header only), after a flush, and then a crash of finalize itself; each time the session finalizes.
- row 31: a daemon killed while its writers start, then restarted: no message of any stream goes to an orphan.
- row 33: hostile well-formed header values injected into a live recording, then finalize: a clear report.
- row 34: a part truncated below its superblock's end of file is never sealed as verified.
"""

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

from acqd.finalize import PAUSE_ENV, PAUSE_MARKER_ENV
from acqd.record.streamfile import committed_rows, open_for_read
from acqd.service.procs import wait_until
from acqd.wire.protocol import HEADER
from tests import zygote
from tests.conftest import SMALL_RIG, assert_bit_exact, overlay, recording, rig_for, write_rig
from tests.faults.test_rows_process import kill_daemon_during_acquire, seqs_accounted_for

FINALIZE_TIMEOUT_S = 240.0


def _finalize(folder: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return zygote.run([sys.executable, "-m", "acqd.cli", "finalize", str(folder), "--json"], capture_output=True,
                      text=True, timeout=FINALIZE_TIMEOUT_S, env={**os.environ, **(env or {})})


def _kill_finalize_at(folder: Path, step: str, tmp: Path) -> None:
    """Run finalize until it reaches ``step`` (acqd.finalize's test pause), then kill -9 it."""
    marker = tmp / f"paused-{step}"
    proc = zygote.popen([sys.executable, "-m", "acqd.cli", "finalize", str(folder)], stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                        env={**os.environ, PAUSE_ENV: step, PAUSE_MARKER_ENV: str(marker)})
    try:
        wait_until(lambda: marker.exists() or proc.poll() is not None, "finalize to reach " + step, FINALIZE_TIMEOUT_S)
        assert proc.poll() is None, f"finalize exited ({proc.returncode}) before {step}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(60)


# -- row 2 ----------------------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("n", [1, 150], ids=["first_append", "after_flushes"])
def test_row02_crash_at_the_nth_write_then_a_crash_of_finalize_loses_only_the_gap(tmp_path, daemon_factory, n):
    rig_file = write_rig(tmp_path, stream_overrides=SMALL_RIG)  # the sensor's crash is the subject
    daemon = daemon_factory(rig_file, env={"ACQD_FAULT": f"sensor:crash_after_write:{n}"})
    with recording(daemon, rig_file, f"crash{n}", seed=2) as (_, folder):
        wait_until(lambda: (s := daemon.command("status")["streams"]["sensor"])["part"] == 1
                   and s["state"] == "recording" and s["rows"] > 1000, "the restarted writer to record part 1")
        daemon.command("stop")
    daemon.command("stop", idle=True)
    cfg, rig = rig_for(rig_file, seed=2)
    streams = folder / "streams"
    with open_for_read(streams / "sensor.h5") as f:  # killed at the Nth append: what its index proves
        before = committed_rows(f)
        assert assert_bit_exact(f, rig, "sensor") == before
        last = f["index"][-1] if f["index"].shape[0] else None
    assert (before == 0) == (n == 1)  # the first append was never flushed: the part holds its header only
    with h5py.File(streams / "sensor.part001.h5", "r") as f:
        after = assert_bit_exact(f, rig, "sensor")
        assert after == f["data"].shape[0] > 0
        first, gaps = f["index"][0], f["gaps"][:]
    if last is not None:  # the loss is exactly the gap between the last committed and the first of the new part
        assert [(int(g["seq_from"]), int(g["seq_to"])) for g in gaps[:1]] == (
            [] if int(first["seq"]) == int(last["seq"]) + 1 else [(int(last["seq"]) + 1, int(first["seq"]))])

    _kill_finalize_at(folder, "partial", tmp_path)  # row 2's "finalize": a crash of finalize itself
    assert json.loads((folder / "session.json").read_text())["state"] == "finalizing"
    assert not (folder / f"crash{n}.nwb").exists()  # no half-written master under its final name
    done = _finalize(folder)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["state"] == "finalized" and report["streams"]["sensor"]["rows"] == before + after
    assert report["streams"]["sensor"]["parts"] == ["streams/sensor.h5", "streams/sensor.part001.h5"]


# -- row 31 ---------------------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("seed", [3, 4])
def test_row31_a_restarted_daemon_loses_no_message_to_an_orphan_writer(tmp_path, daemon_factory, seed):
    # The row's promise is not only "no orphan process" but "the restarted daemon loses nothing to one": with
    # PUSH/PULL an orphan still connected to a driver would take every other message (round robin).
    seen, orphans = kill_daemon_during_acquire(tmp_path, seed)
    assert not orphans, f"writers outlived the daemon: {orphans} (seen: {seen})"
    pull = overlay(SMALL_RIG, **{n: {"socket": "pull"} for n in ("probe", "nidaq", "sensor", "camera")})
    rig_file = write_rig(tmp_path, stream_overrides=pull)
    daemon = daemon_factory(rig_file)
    with recording(daemon, rig_file, "after", seed=seed) as (_, folder):
        wait_until(lambda: all(s["rows"] > 0 for s in daemon.command("status")["streams"].values())
                   and daemon.command("status")["streams"]["nidaq"]["rows"] > 60000, "2 s recorded")
        daemon.command("stop")
    cfg, rig = rig_for(rig_file, seed=seed)
    for s in cfg.streams:
        path = folder / "streams" / f"{s.name}.h5"
        stored, lost = seqs_accounted_for(path)
        assert lost == 0 and stored > 0, f"{s.name}: {lost} message(s) lost"
        with h5py.File(path, "r") as f:
            assert f["gaps"].shape[0] == 0 and assert_bit_exact(f, rig, s.name) == committed_rows(f)
    assert not json.loads((folder / "session.json").read_text())["incomplete"]


# -- row 33 ---------------------------------------------------------------------------------------------------


def committed_rows_of(path: Path) -> int:
    with open_for_read(path) as f:
        return committed_rows(f)


def _sensor_header(seq: int, first: int = 0, n: int = 10, ndim: int = 1, shape=(3, 0, 0, 0), epoch: int = 1) -> bytes:
    return HEADER.pack(b"ACQD", 1, HEADER.size, 0, epoch, seq, first, n, ndim, *shape, b"<f4", 0, b"sensor")


@pytest.mark.e2e
def test_row33_hostile_values_in_a_live_recording_then_finalize_gives_a_clear_report(tmp_path, daemon_factory):
    rig_file = write_rig(tmp_path, stream_overrides={"sensor": {"bind": True, "socket": "pull"}, **SMALL_RIG})
    daemon = daemon_factory(rig_file)
    payload = bytes(10 * 3 * 4)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    try:
        with recording(daemon, rig_file, "hostile", seed=33) as (_, folder):
            push.connect(f"ipc://{tmp_path}/ipc/sensor")
            wait_until(lambda: daemon.command("status")["streams"]["sensor"]["rows"] > 500
                       and committed_rows_of(folder / "streams" / "sensor.h5"), "sensor data committed")
            with open_for_read(folder / "streams" / "sensor.h5") as f:  # the driver's epoch: same publisher
                epoch = int(f["index"][-1]["epoch"])
            # (A message of another epoch is a publisher restart by the protocol: accepted after a restart gap.)
            hostile = [_sensor_header(s, epoch=epoch, **kw) for s, kw in (
                (2**64 - 1, {}), (2**63, {}), (2**40, {}), (3, {"first": 2**64 - 5}), (3, {"n": 2**32 - 1}),
                (3, {"ndim": 0}), (3, {"ndim": 5}), (3, {"shape": (2**32 - 1, 0, 0, 0)}))]
            for h in hostile:
                push.send_multipart([b"sensor", h, payload])
            wait_until(lambda: daemon.command("status")["streams"]["sensor"]["rejected"] >= len(hostile),
                       "every hostile message rejected")
            rows = daemon.command("status")["streams"]["sensor"]["rows"]
            wait_until(lambda: daemon.command("status")["streams"]["sensor"]["rows"] > rows + 500,
                       "valid messages after them stored")
            daemon.command("stop")
    finally:
        ctx.destroy(linger=0)
    cfg, rig = rig_for(rig_file, seed=33)
    with h5py.File(folder / "streams" / "sensor.h5", "r") as f:
        assert assert_bit_exact(f, rig, "sensor") == committed_rows(f) > 0  # nothing poisoned or fabricated
    done = _finalize(folder)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    report = json.loads(done.stdout)
    qc = report["streams"]["sensor"]["qc"]
    assert sum(qc["rejects"].values()) == len(hostile) and f"{len(hostile)} messages rejected" in str(qc)
    assert report["state"] == "finalized" and report["streams"]["sensor"]["rows"] == committed_rows(
        h5py.File(folder / "streams" / "sensor.h5", "r"))


# -- row 34 ---------------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_row34_a_part_truncated_below_its_superblock_eof_is_listed_lost_never_sealed_as_verified(tmp_path,
                                                                                                  daemon_factory):
    # Row 34's tests corrupted bytes in place; none cut a part short, which hung finalize (issue 22 defect 1).
    rig_file = write_rig(tmp_path, stream_overrides=SMALL_RIG)
    daemon = daemon_factory(rig_file)
    with recording(daemon, rig_file, "cut34", seed=34) as (_, folder):
        wait_until(lambda: daemon.command("status")["streams"]["nidaq"]["rows"] > 60000, "2 s recorded")
        daemon.command("stop")
    probe = folder / "streams" / "probe.h5"
    size = probe.stat().st_size
    os.truncate(probe, size // 2)  # a closed part, its superblock intact, its end gone
    t = time.monotonic()
    done = _finalize(folder)
    assert time.monotonic() - t < FINALIZE_TIMEOUT_S and done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    (lost,) = report["integrity"]["lost"]
    assert lost["part"] == "streams/probe.h5" and lost["bytes"] == size // 2 and not lost["empty"]
    assert f"truncated: {size // 2} bytes of the {size}" in lost["problem"]
    assert not any("probe.h5" in c for c in report["integrity"]["corrupt"])
    assert report["streams"]["probe"]["rows"] == lost["salvaged_rows"] > 0  # what its index proves is kept
    session = json.loads((folder / "session.json").read_text())
    assert session["incomplete"] and session["finalize"]["integrity"]["lost"] == report["integrity"]["lost"]
