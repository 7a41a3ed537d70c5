"""Crashes and stops: what each loses is what the durability contract in the README says."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import h5py
import pytest

from acqd.config import load_config
from acqd.record.forkserver import FORK_FAILS_ENV
from acqd.service.procs import pid_alive, wait_until
from acqd.record.streamfile import committed_rows, open_for_read
from tests.conftest import SMALL_RIG, assert_bit_exact, parent_of, recording, rig_for, write_rig



def flushed_rows(path: Path) -> int:
    """Rows a SWMR reader can see right now (what reached the file at the last flush)."""
    with h5py.File(path, "r", libver="latest", swmr=True) as f:
        return committed_rows(f)


@pytest.mark.e2e
def test_a_crash_loop_is_given_up_but_crashes_spread_out_are_always_restarted(tmp_path, daemon_factory):
    window = 15.0  # one restart allowed per window; long enough for a restart on a loaded machine
    rig_file = write_rig(tmp_path, stream_overrides=SMALL_RIG,
                         daemon_overrides={"max_writer_restarts": 1, "restart_window_s": window})
    daemon = daemon_factory(rig_file)

    def probe() -> dict:
        return daemon.command("status")["streams"]["probe"]

    def kill_probe_writer() -> None:
        os.kill(probe()["pid"], signal.SIGKILL)

    with recording(daemon, rig_file, "crashloop", seed=5) as (_, folder):
        kill_probe_writer()
        wait_until(lambda: (p := probe())["restarts"] == 1 and p["state"] == "recording", "the first restart")
        restarted = time.monotonic()  # the supervisor restarted it before this
        wait_until(lambda: time.monotonic() - restarted > window, "the restart window to pass", timeout_s=2 * window)
        kill_probe_writer()  # outside the window: restarted again
        wait_until(lambda: (p := probe())["restarts"] == 2 and p["state"] == "recording", "the second restart")
        kill_probe_writer()  # within the window of the second restart: a crash loop
        stopped = wait_until(lambda: (p := probe())["state"] == "stopped_failed" and p, "the stream to be given up")
        assert stopped["restarts"] == 2 and stopped["pid"] is None
        assert "not restarted: already restarted 1 time(s) within 15 s" in stopped["reason"]
        others = {n: s["rows"] for n, s in daemon.command("status")["streams"].items() if n != "probe"}
        wait_until(lambda: all(daemon.command("status")["streams"][n]["rows"] > r for n, r in others.items()),
                   "the other streams to keep growing")
        daemon.command("stop")
    session = json.loads((folder / "session.json").read_text())
    died = [i["detail"] for i in session["incidents"] if i["kind"] == "writer_died" and i["stream"] == "probe"]
    assert len(died) == 3 and "restarted as pid" in died[1] and "not restarted" in died[2]
    assert session["incomplete"]
    assert sorted(p.name for p in (folder / "streams").glob("probe*.h5")) == [
        "probe.h5", "probe.part001.h5", "probe.part002.h5"]


@pytest.mark.e2e
def test_row01_writer_kill9_loses_at_most_a_flush_and_the_stream_resumes_in_a_new_part(rig_file, daemon_factory):
    daemon = daemon_factory(rig_file)
    with recording(daemon, rig_file, "writerkill", seed=11) as (_, folder):
        probe = folder / "streams" / "probe.h5"
        flushed = wait_until(lambda: flushed_rows(probe) >= 30000 and flushed_rows(probe), "1 s of flushed data")
        before = daemon.command("status")["streams"]
        os.kill(before["probe"]["pid"], signal.SIGKILL)
        after = wait_until(lambda: (s := daemon.command("status")["streams"])["probe"]["state"] == "recording"
                           and s["probe"]["part"] == 1 and s["probe"]["rows"] > 0 and s, "the restarted writer")
        assert after["probe"]["pid"] != before["probe"]["pid"] and after["probe"]["restarts"] == 1
        others = {n: s["rows"] for n, s in after.items() if n != "probe"}
        wait_until(lambda: all(daemon.command("status")["streams"][n]["rows"] > r for n, r in others.items()),
                   "the other streams to keep growing")
        daemon.command("stop")
    cfg, rig = rig_for(rig_file, seed=11)
    with open_for_read(folder / "streams" / "probe.h5") as f:  # killed: opens through SWMR, as flushed
        assert committed_rows(f) >= flushed
        assert assert_bit_exact(f, rig, "probe") == committed_rows(f)
    with h5py.File(folder / "streams" / "probe.part001.h5", "r") as f:
        assert f.attrs["part"] == 1 and assert_bit_exact(f, rig, "probe") == f["data"].shape[0] > 0
    for name in ("nidaq", "camera", "sensor"):
        with h5py.File(folder / "streams" / f"{name}.h5", "r") as f:
            assert f["gaps"].shape[0] == 0 and assert_bit_exact(f, rig, name) > 0
        assert not (folder / "streams" / f"{name}.part001.h5").exists()
    session = json.loads((folder / "session.json").read_text())
    died = [i for i in session["incidents"] if i["kind"] == "writer_died"]
    assert len(died) == 1 and died[0]["stream"] == "probe" and "signal 9" in died[0]["detail"]
    assert session["incomplete"] and [p["path"] for p in session["streams"]["probe"]["parts"]] == [
        "streams/probe.h5", "streams/probe.part001.h5"]


@pytest.mark.e2e
def test_the_writer_fork_server_killed_while_recording_every_stream_resumes_in_a_new_part(tmp_path, daemon_factory):
    rig_file = write_rig(tmp_path, stream_overrides=SMALL_RIG)
    daemon = daemon_factory(rig_file)
    with recording(daemon, rig_file, "forkserverkill", seed=12) as (_, folder):
        def recorded() -> dict | None:
            streams = daemon.command("status")["streams"]
            return streams if all(s["rows"] > 0 for s in streams.values()) else None

        before = wait_until(recorded, "every stream's first rows")
        server = parent_of(before["probe"]["pid"])
        assert server != daemon.pid and {parent_of(s["pid"]) for s in before.values()} == {server}
        os.kill(server, signal.SIGKILL)  # its writers get SIGTERM (PR_SET_PDEATHSIG) and close their parts
        def resumed() -> dict | None:
            streams = daemon.command("status")["streams"]
            return streams if all(s["state"] == "recording" and s["part"] == 1 and s["rows"] > 0
                                  for s in streams.values()) else None

        after = wait_until(resumed, "every stream to record into its next part")
        new = {parent_of(s["pid"]) for s in after.values()}
        assert len(new) == 1 and server not in new  # one new server forked them all
        daemon.command("stop")
    cfg, rig = rig_for(rig_file, seed=12)
    session = json.loads((folder / "session.json").read_text())
    died = {i["stream"]: i["detail"] for i in session["incidents"] if i["kind"] == "writer_died"}
    assert set(died) == {s.name for s in cfg.streams} and session["incomplete"]
    assert not [i for i in session["incidents"] if i["kind"] == "writer_reconciled"]
    for s in cfg.streams:
        assert "ended with the writer fork server, which died; restarted as pid" in died[s.name]
        assert died[s.name].endswith("recording into part 1"), died[s.name]  # at once, not corrected later
        for part in (f"{s.name}.h5", f"{s.name}.part001.h5"):
            with open_for_read(folder / "streams" / part) as f:
                assert assert_bit_exact(f, rig, s.name) == committed_rows(f) > 0, part


@pytest.mark.e2e
def test_a_writer_that_cannot_be_forked_again_stops_its_stream_with_the_reason_and_the_others_go_on(
        tmp_path, daemon_factory):
    rig_file = write_rig(tmp_path, stream_overrides=SMALL_RIG)
    started = len(load_config(rig_file).streams)  # each stream a writer of its own: forks 1..4 start them
    daemon = daemon_factory(rig_file, env={FORK_FAILS_ENV: str(started + 1)})
    with recording(daemon, rig_file, "nofork", seed=13) as (_, folder):
        probe = wait_until(lambda: (p := daemon.command("status")["streams"]["probe"])["rows"] > 0 and p, "data")
        os.kill(probe["pid"], signal.SIGKILL)  # its restart is the fork that fails
        stopped = wait_until(lambda: (p := daemon.command("status")["streams"]["probe"])["state"] == "stopped_failed"
                             and p, "the stream to stop with its reason")
        assert "not restarted: the writer fork server could not fork" in stopped["reason"], stopped["reason"]
        others = {n: s["rows"] for n, s in daemon.command("status")["streams"].items() if n != "probe"}
        wait_until(lambda: all(daemon.command("status")["streams"][n]["rows"] > r for n, r in others.items()),
                   "the other streams to keep recording")
        daemon.command("stop")
    session = json.loads((folder / "session.json").read_text())
    died = [i["detail"] for i in session["incidents"] if i["kind"] == "writer_died"]
    assert len(died) == 1 and "could not fork" in died[0] and session["incomplete"]


@pytest.mark.e2e
def test_row03_daemon_kill9_then_restart_finds_the_interrupted_session(rig_file, daemon_factory):
    daemon = daemon_factory(rig_file)
    with recording(daemon, rig_file, "daemonkill", seed=12) as (_, folder):
        writer_pids = [s["pid"] for s in daemon.command("status")["streams"].values()]
        wait_until(lambda: flushed_rows(folder / "streams" / "probe.h5") > 30000, "1 s of flushed data")
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.proc.wait(30)
        # The writers notice (PR_SET_PDEATHSIG) and close their files cleanly.
        wait_until(lambda: not any(pid_alive(p) for p in writer_pids), "the orphaned writers to exit", 30)
    assert json.loads((folder / "session.json").read_text())["state"] == "recording"
    again = daemon_factory(rig_file)
    status = again.command("status")
    assert status["mode"] == "IDLE"
    (found,) = status["recovered"]
    assert found["session_id"] == "daemonkill" and all(f["readable"] for f in found["files"].values())
    session = json.loads((folder / "session.json").read_text())
    assert session["state"] == "interrupted" and session["incomplete"]
    assert session["incidents"][-1]["kind"] == "daemon_interrupted"
    cfg, rig = rig_for(rig_file, seed=12)
    for s in cfg.streams:
        with h5py.File(folder / "streams" / f"{s.name}.h5", "r") as f:  # closed by the writers themselves
            assert assert_bit_exact(f, rig, s.name) == f["data"].shape[0] > 0


@pytest.mark.e2e
def test_row04_sigterm_closes_every_file_cleanly(rig_file, daemon_factory):
    daemon = daemon_factory(rig_file)
    with recording(daemon, rig_file, "sigterm", seed=13) as (_, folder):
        wait_until(lambda: flushed_rows(folder / "streams" / "probe.h5") > 0, "flushed data")
        assert daemon.stop() == 0
    session = json.loads((folder / "session.json").read_text())
    assert session["state"] == "closed" and not session["incomplete"]
    cfg, rig = rig_for(rig_file, seed=13)
    for s in cfg.streams:
        with h5py.File(folder / "streams" / f"{s.name}.h5", "r") as f:  # no SWMR flag, no h5clear
            assert assert_bit_exact(f, rig, s.name) == f["data"].shape[0] == committed_rows(f) > 0
        assert [p["rows"] for p in session["streams"][s.name]["parts"]] == [committed_rows(
            h5py.File(folder / "streams" / f"{s.name}.h5", "r"))]


@pytest.mark.e2e
def test_row06_full_disk_stops_the_stream_with_a_reason_and_keeps_committed_data(tmp_path, daemon_factory):
    rig_file = write_rig(tmp_path, stream_overrides={"camera": SMALL_RIG["camera"]})  # the probe's rate fills the limit
    daemon = daemon_factory(rig_file, env={"ACQD_WRITER_FSIZE_LIMIT": "probe=40000000"})
    with recording(daemon, rig_file, "diskfull", seed=14) as (_, folder):
        stopped = wait_until(lambda: (s := daemon.command("status")["streams"])["probe"]["state"] == "stopped_failed"
                             and s, "the probe writer to hit the file size limit", 60)
        assert "disk full" in stopped["probe"]["reason"]
        assert stopped["probe"]["restarts"] == 0  # a full disk is not retried
        rows = {n: s["rows"] for n, s in stopped.items() if n != "probe"}
        wait_until(lambda: all(daemon.command("status")["streams"][n]["rows"] > r for n, r in rows.items()),
                   "the other streams to keep recording")
        daemon.command("stop")
    assert daemon.command("status")["mode"] == "ACQUIRE"  # the daemon survived
    session = json.loads((folder / "session.json").read_text())
    assert session["incomplete"] and "disk full" in session["streams"]["probe"]["stopped_reason"]
    assert any(i["kind"] == "disk_full" and i["stream"] == "probe" for i in session["incidents"])
    cfg, rig = rig_for(rig_file, seed=14)
    with open_for_read(folder / "streams" / "probe.h5") as f:
        assert assert_bit_exact(f, rig, "probe") == committed_rows(f) > 0
