"""Storage faults end to end: parts cut short (row 37), a disk that fills at a part rollover (row 6)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from acqd.record.streamfile import committed_rows, open_for_read
from acqd.service.procs import pid_alive, wait_until
from tests.conftest import recording, write_rig

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
    done = subprocess.run([sys.executable, "-m", "acqd.cli", "finalize", str(folder), "--json"], capture_output=True,
                          text=True, timeout=FINALIZE_DEADLINE_S)
    return done, time.monotonic() - t


@pytest.mark.e2e
def test_row37_truncated_and_empty_parts_never_block_restart_finalize_or_the_next_session(tmp_path, daemon_factory):
    # Issue 22 defect 1: a part cut to 1024 bytes hung the restarted daemon (recover_interrupted) and finalize.
    rig_file = write_rig(tmp_path)
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
    rig_file = write_rig(tmp_path)
    folder = _interrupted_session(daemon_factory, rig_file, "cutref", seed=39)
    daemon_factory(rig_file).command("status")  # marks the session interrupted
    os.truncate(folder / "streams" / "nidaq.h5", 1024)
    done, took = _finalize(folder)
    assert done.returncode != 0 and took < FINALIZE_DEADLINE_S
    assert "reference stream 'nidaq' has no part that can be read" in done.stderr
    assert "streams/nidaq.h5 (1024 bytes) cannot be read" in done.stderr and "Traceback" not in done.stderr
    assert json.loads((folder / "session.json").read_text())["state"] == "interrupted"  # as it was found
