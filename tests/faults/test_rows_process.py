"""Fault-matrix rows of the daemon's processes (/work/shared/fault-matrix.md): writer and daemon deaths, hangs,
commands that time out, a second daemon, a full disk. Real daemon, real writer processes, real signals."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import pytest

from acqd.record.streamfile import committed_rows, open_for_read
from acqd.client import ApiError
from acqd.service.procs import Daemon, Simulator, pid_alive, stop_process, wait_until
from tests import zygote
from tests.conftest import SMALL_PROBE, SMALL_RIG, acquiring, assert_bit_exact, recording, rig_for, write_rig
from tests.sessions import SUBJECT


def writers_of(daemon_pid: int) -> list[int]:
    """Live writer processes of the daemon ``daemon_pid``, and their fork server, whoever their parent now: a forked
    writer keeps its server's command line, which names the daemon (acqd.record.forkserver)."""
    tag = f"acqd.record.forkserver {daemon_pid} "
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if tag in cmd and pid_alive(int(d.name)):
            pids.append(int(d.name))
    return pids


def seqs_accounted_for(path: Path) -> tuple[int, int]:
    """Every seq from the first to the last stored is either stored or inside a recorded SEQ gap, exactly;
    returns (messages stored, messages in gaps)."""
    with open_for_read(path) as f:
        seqs = [int(s) for s in f["index"]["seq"]]
        gaps = [(int(g["seq_from"]), int(g["seq_to"])) for g in f["gaps"][:] if g["kind"] == 1]
    lost = {s for a, b in gaps for s in range(a, b)}
    assert not lost & set(seqs), "a seq is both stored and in a gap"
    assert sorted(set(seqs) | lost) == list(range(min(seqs), max(seqs) + 1)), f"{path.name}: unaccounted seqs"
    return len(seqs), len(lost)


def incidents(folder: Path) -> list[dict]:
    return json.loads((folder / "session.json").read_text())["incidents"]


def stall_writers(tmp_path: Path, daemon_factory, hung: tuple[str, ...], pull: tuple[str, ...], seed: int,
                  small_probe: bool = False) -> dict:
    """Record; SIGSTOP the writers of ``hung`` until the heartbeat flags them (and 0.5 s more), checking status and
    preflight meanwhile; SIGCONT; record on; stop. Streams in ``pull`` use PUSH/PULL, the others PUB/SUB;
    ``small_probe``: a 32-channel probe (``SMALL_PROBE``) when the probe is not among the stalled.
    Returns the session, the detection time, and per stream (messages stored, messages in recorded gaps)."""
    overrides = {**(SMALL_PROBE if small_probe else {}), **{n: {"socket": "pull"} for n in pull}}
    rig_file = write_rig(tmp_path, stream_overrides=overrides)
    daemon = daemon_factory(rig_file)
    with recording(daemon, rig_file, "stall", seed=seed) as (_, folder):
        pids = {n: s["pid"] for n, s in daemon.command("status")["streams"].items()}
        try:
            for n in hung:
                os.kill(pids[n], signal.SIGSTOP)
            t0 = time.monotonic()
            first = wait_until(lambda: all((s := daemon.command("status")["streams"])[n]["state"] == "hung"
                                           for n in hung) and s, "the heartbeat to flag the stopped writers", 15)
            detected_s = time.monotonic() - t0
            later = wait_until(lambda: (s := daemon.command("status")["streams"])[hung[0]]["heard_s"]
                               > first[hung[0]]["heard_s"] + 0.5 and s, "time to pass")
            for n in hung:  # never the last stats frozen: silence grows, rates are not stale
                assert later[n]["silent_s"] > first[n]["silent_s"] and later[n]["messages_per_s"] == 0.0
                assert later[n]["mb_per_s"] == 0.0
            assert all(later[n]["state"] == "recording" for n in pids if n not in hung)
            problems = " ".join(daemon.command("preflight")["problems"])
            assert all(f"stream {n!r} has a hung writer" in problems for n in hung), problems
            wait_until(lambda: {i["stream"] for i in incidents(folder) if i["kind"] == "writer_hung"} == set(hung),
                       "the hang incidents in session.json")
        finally:
            for n in hung:
                os.kill(pids[n], signal.SIGCONT)
        back = wait_until(lambda: all((s := daemon.command("status")["streams"])[n]["state"] == "recording"
                                      for n in hung) and s, "the writers to recover")
        assert {n: back[n]["pid"] for n in pids} == pids  # recovered, not restarted
        rows = {n: back[n]["rows"] for n in hung}
        wait_until(lambda: all(daemon.command("status")["streams"][n]["rows"] > rows[n] for n in hung),
                   "the recovered writers to record again")
        assert not daemon.command("preflight")["problems"]
        daemon.command("stop")
    session = json.loads((folder / "session.json").read_text())
    assert {i["stream"] for i in session["incidents"] if i["kind"] == "writer_recovered"} == set(hung)
    _, rig = rig_for(rig_file, seed=seed)
    counts = {}
    for n in hung:
        path = folder / "streams" / f"{n}.h5"
        counts[n] = seqs_accounted_for(path)
        with h5py.File(path, "r") as f:
            assert assert_bit_exact(f, rig, n) == committed_rows(f) > 0
    for n in pull:
        assert counts[n][1] == 0, f"{n} (PULL) lost messages"
    return {"session": session, "detected_s": detected_s, "counts": counts}


@pytest.mark.e2e
def test_row29_hung_writer_is_reported_refused_and_recovers_without_silent_loss(tmp_path, daemon_factory):
    # camera: SUB (a hang can only lose what ZeroMQ drops: a recorded gap); sensor: PULL (nothing lost).
    out = stall_writers(tmp_path, daemon_factory, hung=("camera", "sensor"), pull=("sensor",), seed=29,
                         small_probe=True)
    assert out["detected_s"] < 8, out["detected_s"]  # heartbeat_timeout_s is 2 s
    print(f"row29: detected in {out['detected_s']:.2f} s; (stored, lost in gaps) {out['counts']}")


@pytest.mark.e2e
def test_row08_stalled_writer_of_the_heaviest_stream_loses_nothing_silently(tmp_path, daemon_factory):
    # probe (23 MB/s) over PULL: the driver's queue absorbs the stall; nidaq over SUB: any drop is an exact gap.
    out = stall_writers(tmp_path, daemon_factory, hung=("probe", "nidaq"), pull=("probe",), seed=8)
    assert not out["session"]["incomplete"]
    print(f"row08: detected in {out['detected_s']:.2f} s; (stored, lost in gaps) {out['counts']}")


def kill_daemon_during_acquire(tmp_path: Path, seed: int) -> tuple[list[int], dict[int, str]]:
    """Start a daemon, send `acquire`, kill -9 the daemon after a random delay (0-0.6 s); returns (writer pids
    seen while it lived, writer processes of this test still alive 10 s after: what /proc says of each)."""
    rig_file = write_rig(tmp_path)
    daemon = Daemon(rig_file, tmp_path / "data", tmp_path)
    tag = daemon.pid
    seen: set[int] = set()
    try:
        threading.Thread(target=lambda: _quietly(daemon.command, "acquire"), daemon=True).start()
        deadline = time.monotonic() + random.Random(seed).uniform(0.0, 0.6)
        while time.monotonic() < deadline:
            seen.update(writers_of(tag))
            time.sleep(0.005)
        daemon.proc.kill()
        daemon.proc.wait(30)
        seen.update(writers_of(tag))
        try:
            wait_until(lambda: not writers_of(tag), "every writer to exit", 10)
        except TimeoutError:
            pass
        return sorted(seen), {pid: proc_facts(pid) for pid in writers_of(tag)}
    finally:
        for pid in writers_of(tag):  # never leave an orphan behind, whatever the verdict
            os.kill(pid, signal.SIGKILL)
        stop_process(daemon.proc)


def proc_facts(pid: int) -> str:
    """What would say why a process is still there: its state, parent, signal masks, where it waits, its command."""
    d = Path(f"/proc/{pid}")
    try:
        status = dict(line.split(":\t", 1) for line in (d / "status").read_text().splitlines() if ":\t" in line)
        facts = {k: status.get(k, "?").strip() for k in ("State", "PPid", "SigBlk", "SigIgn", "SigCgt")}
        facts["wchan"] = (d / "wchan").read_text()
        facts["cmd"] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:300]
        return json.dumps(facts)
    except OSError as e:
        return f"gone ({e})"


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - the daemon is killed under the request
        pass


@pytest.mark.e2e
@pytest.mark.parametrize("seed", range(10))
def test_row31_daemon_killed_during_acquire_leaves_no_orphan_writer(tmp_path, seed):
    seen, orphans = kill_daemon_during_acquire(tmp_path, seed)
    assert not orphans, f"writers outlived the daemon: {orphans} (seen: {seen})"
    print(f"row31 seed {seed}: {len(seen)} writer processes had started when the daemon was killed")


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 130))
def test_row31_daemon_kill_sweep(tmp_path, seed):
    seen, orphans = kill_daemon_during_acquire(tmp_path, seed)
    assert not orphans, f"writers outlived the daemon: {orphans} (seen: {seen})"


@pytest.mark.e2e
def test_row32_second_daemon_with_the_same_rig_is_refused_and_the_first_loses_nothing(tmp_path, daemon_factory):
    pull = {"sensor": {"socket": "pull"}, "nidaq": {"socket": "pull"}}
    rig_file = write_rig(tmp_path, stream_overrides={**SMALL_RIG, **pull})
    daemon = daemon_factory(rig_file)
    with recording(daemon, rig_file, "first", seed=32) as (_, folder):
        second = zygote.run([sys.executable, "-m", "acqd.cli", "serve", "--config", str(rig_file), "--data-root",
                             str(tmp_path / "other"), "--port", "0"], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=60)
        assert second.returncode == 2, second.stderr
        (line,) = second.stderr.strip().splitlines()  # one clear line, no traceback
        assert line.startswith("acqd: error: endpoint ipc://") and "is already served by another acqd" in line
        assert f"pid {daemon.pid}" in line
        rows = daemon.command("status")["streams"]["sensor"]["rows"]
        wait_until(lambda: daemon.command("status")["streams"]["sensor"]["rows"] > rows + 1000, "more data")
        daemon.command("stop")
    cfg, rig = rig_for(rig_file, seed=32)
    for s in cfg.streams:
        path = folder / "streams" / f"{s.name}.h5"
        assert seqs_accounted_for(path)[1] == 0
        with h5py.File(path, "r") as f:
            assert f["gaps"].shape[0] == 0 and committed_rows(f) > 0
            if s.socket == "pull":  # what a second daemon would have taken
                assert assert_bit_exact(f, rig, s.name) == committed_rows(f)
    assert not json.loads((folder / "session.json").read_text())["incomplete"]


@pytest.mark.e2e
def test_row30_stop_against_a_stalled_writer_then_record_never_silently_lacks_the_stream(tmp_path, daemon_factory):
    rig_file = write_rig(tmp_path, stream_overrides=SMALL_RIG)
    daemon = daemon_factory(rig_file)
    with recording(daemon, rig_file, "a", seed=30) as (_, first):
        pid = daemon.command("status")["streams"]["sensor"]["pid"]
        try:
            os.kill(pid, signal.SIGSTOP)
            t0 = time.monotonic()
            daemon.command("stop")  # the writer cannot answer: stop gives up on it once it is seen hung
            stop_s = time.monotonic() - t0
            with pytest.raises(ApiError, match="stream 'sensor' has a hung writer") as refused:
                daemon.command("record", session="b", metadata={"subject": SUBJECT})
            assert refused.value.status == 409 and not (tmp_path / "data" / "b").exists()
        finally:
            os.kill(pid, signal.SIGCONT)
        # It resumes, handles the stale `stop` (closing a's file), and is reconciled to acquiring.
        wait_until(lambda: daemon.command("status")["streams"]["sensor"]["state"] == "acquiring", "the writer back")
        wait_until(lambda: not daemon.command("preflight")["problems"], "every stream to flow")
        third = Path(daemon.command("record", session="c", metadata={"subject": SUBJECT})["session"]["path"])
        rows = wait_until(lambda: (s := daemon.command("status")["streams"])["sensor"]["rows"] > 500 and s,
                          "the sensor to record in the next session")
        assert all(s["state"] == "recording" and s["pid"] for s in rows.values())
        daemon.command("stop")
    assert stop_s < 15, stop_s  # not the 30 s command timeout
    a = json.loads((first / "session.json").read_text())
    assert a["state"] == "closed" and a["incomplete"]
    assert {"writer_hung", "stop_timeout", "late_close"} <= {i["kind"] for i in a["incidents"] if i["stream"] == "sensor"}
    with h5py.File(first / "streams" / "sensor.h5", "r") as f:  # its rows reached a's record when it closed
        assert a["streams"]["sensor"]["parts"][0]["rows"] == committed_rows(f)
    c = json.loads((third / "session.json").read_text())
    assert c["state"] == "closed" and not c["incomplete"], c["incidents"]
    _, rig = rig_for(rig_file, seed=30)
    for s in ("probe", "nidaq", "camera", "sensor"):
        for folder in (first, third):  # a's sensor file was closed by the writer when it resumed
            with h5py.File(folder / "streams" / f"{s}.h5", "r") as f:
                assert committed_rows(f) > 0
                if s == "sensor":
                    assert assert_bit_exact(f, rig, s) == committed_rows(f)
    print(f"row30: stop returned in {stop_s:.2f} s with the writer stopped")


@pytest.mark.e2e
def test_row30_record_while_a_writer_is_stalled_says_so_and_records_it_once_it_answers(tmp_path, daemon_factory):
    rig_file = write_rig(tmp_path, stream_overrides=SMALL_RIG)
    daemon = daemon_factory(rig_file)
    with acquiring(daemon, rig_file, seed=33):
        pid = daemon.command("status")["streams"]["sensor"]["pid"]
        try:
            os.kill(pid, signal.SIGSTOP)  # stalled, not yet seen hung: preflight passes
            status = daemon.command("record", session="late", metadata={"subject": SUBJECT})
        finally:
            os.kill(pid, signal.SIGCONT)
        folder = Path(status["session"]["path"])
        assert status["session"]["incomplete"] and status["streams"]["sensor"]["state"] == "hung"
        rows = wait_until(lambda: (s := daemon.command("status")["streams"]["sensor"])["rows"] > 500 and s,
                          "the writer to handle its record command when it answers")
        assert rows["state"] == "recording" and rows["pid"] == pid
        daemon.command("stop")
    session = json.loads((folder / "session.json").read_text())
    assert session["incomplete"]
    (why,) = [i for i in session["incidents"] if i["kind"] == "record_start_failed"]
    assert why["stream"] == "sensor" and "hung before opening its file" in why["detail"]
    assert [p["path"] for p in session["streams"]["sensor"]["parts"]] == ["streams/sensor.h5"]
    _, rig = rig_for(rig_file, seed=33)
    with h5py.File(folder / "streams" / "sensor.h5", "r") as f:
        assert assert_bit_exact(f, rig, "sensor") == committed_rows(f) > 0


@pytest.mark.e2e
def test_row30_a_lost_writer_report_is_reconciled_from_its_stats(tmp_path):
    """A writer's report can be lost (its control send queue full: counted as unsent_reports, never blocking the
    data path). Here its `recording` report is dropped: the supervisor still learns the writer's real state from
    the next stats, so RECORD neither times out nor leaves the part unlisted."""
    from acqd.config import load_config
    from acqd.service.supervisor import Supervisor

    rig_file = write_rig(tmp_path, stream_overrides=SMALL_RIG)
    sup = Supervisor(load_config(rig_file))
    real = sup._on_writer_message
    dropped = []

    def lossy(name: str, msg: dict) -> None:
        if name == "sensor" and msg.get("type") == "recording" and not dropped:
            dropped.append(msg)
            return
        real(name, msg)

    sup._on_writer_message = lossy
    sim = None
    try:
        sup.acquire()
        sim = Simulator(rig_file, 60, seed=34)
        sup._wait_for(lambda: not sup.preflight(), "all streams to flow")
        t0 = time.monotonic()
        status = sup.record({"subject": SUBJECT}, "lossy")
        record_s = time.monotonic() - t0
        assert dropped and status["streams"]["sensor"]["state"] == "recording"
        folder = Path(status["session"]["path"])
        assert [p["path"] for p in sup.session["streams"]["sensor"]["parts"]] == ["streams/sensor.h5"]
        sup.stop_recording()
    finally:
        if sim:
            sim.stop()
        sup.shutdown()
    assert record_s < 10, record_s
    session = json.loads((folder / "session.json").read_text())
    assert session["streams"]["sensor"]["parts"][0]["rows"] > 0 and not session["incomplete"]


def chattr(flag: str, path: Path) -> None:
    subprocess.run(["chattr", flag, str(path)], check=True, timeout=30, capture_output=True)


def can_chattr(path: Path) -> bool:
    probe = path / "chattr-probe"
    probe.mkdir()
    try:
        chattr("+i", probe)
    except (OSError, subprocess.CalledProcessError):
        return False
    chattr("-i", probe)
    return True


@pytest.mark.e2e
def test_row06_disk_reserve_warns_then_stops_recording_cleanly_and_session_json_follows(tmp_path, daemon_factory):
    """Free space is pushed below ``disk_reserve_bytes`` by a preallocated filler file (no real fill of the disk);
    while it happens session.json cannot be written (the folder is made immutable): the closed state, the
    incompleteness and the incident reach it as soon as it can be written again."""
    if not can_chattr(tmp_path):
        pytest.skip("needs chattr +i (root on ext4)")
    reserve = shutil.disk_usage(tmp_path).free - 1_000_000_000  # other processes share this disk: a wide margin
    rig_file = write_rig(tmp_path, stream_overrides=SMALL_RIG, daemon_overrides={"disk_reserve_bytes": reserve})
    daemon = daemon_factory(rig_file)
    filler = tmp_path / "filler"
    with recording(daemon, rig_file, "reserve", seed=6) as (status, folder):
        wait_until(lambda: any(i["kind"] == "disk_low" for i in incidents(folder)), "the 2x reserve warning")
        wait_until(lambda: daemon.command("status")["streams"]["probe"]["rows"] > 0, "data")
        chattr("+i", folder)
        try:
            with open(filler, "wb") as f:  # sized now: 200 MB below the reserve, whatever happened meanwhile
                os.posix_fallocate(f.fileno(), 0, max(1, shutil.disk_usage(tmp_path).free - reserve + 200_000_000))
            stopped = wait_until(lambda: (s := daemon.command("status"))["mode"] == "ACQUIRE" and s["session"] is None
                                 and s, "recording to stop at the reserve and its session to close", 30)
            assert json.loads((folder / "session.json").read_text())["state"] == "recording"  # not writable yet
        finally:
            chattr("-i", folder)
        assert all(s["state"] == "acquiring" for s in stopped["streams"].values())
        problems = " ".join(daemon.command("preflight")["problems"])
        assert "below daemon.disk_reserve_bytes" in problems
        session = wait_until(lambda: (s := json.loads((folder / "session.json").read_text()))["state"] == "closed"
                             and s, "the retried session.json write")
        filler.unlink()
    assert session["incomplete"] and session["stopped_reason"] == "disk reserve reached"
    kinds = [i["kind"] for i in session["incidents"]]
    assert kinds.index("disk_low") < kinds.index("disk_full")
    _, rig = rig_for(rig_file, seed=6)
    for s in ("probe", "sensor"):  # closed cleanly: plain open, every committed row as sent and listed
        with h5py.File(folder / "streams" / f"{s}.h5", "r") as f:
            assert assert_bit_exact(f, rig, s) == committed_rows(f) == f["data"].shape[0] > 0
            assert session["streams"][s]["parts"][0]["rows"] == committed_rows(f)


def serve_briefly(rig_file: Path, data_root: Path) -> subprocess.CompletedProcess:
    """``acqd serve`` that is expected to refuse to start (a hard timeout if it does start)."""
    return zygote.run([sys.executable, "-m", "acqd.cli", "serve", "--config", str(rig_file), "--data-root",
                       str(data_root), "--port", "0"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                      timeout=60)


@pytest.mark.e2e
def test_row24_second_instance_and_endpoint_hijack_are_refused(tmp_path, daemon_factory):
    """Same config and data root: refused by the data root lock. Another config that shares only one endpoint
    (one the first daemon binds: a second bind of an ipc path would silently take it over): refused too."""
    rig_file = write_rig(tmp_path, stream_overrides={**SMALL_RIG, "sensor": {"bind": True}})
    daemon = daemon_factory(rig_file)
    with recording(daemon, rig_file, "held", seed=24) as (_, folder):
        same = serve_briefly(rig_file, tmp_path / "data")
        assert same.returncode == 2 and same.stderr.strip().splitlines() == [
            f"acqd: error: another acqd is already serving {(tmp_path / 'data').resolve()}"]
        other = tmp_path / "other"
        other.mkdir()
        hijack = write_rig(other, stream_overrides={"sensor": {"endpoint": f"ipc://{tmp_path}/ipc/sensor"}})
        second = serve_briefly(hijack, other / "data")
        assert second.returncode == 2, second.stderr
        (line,) = second.stderr.strip().splitlines()
        assert line.startswith(f"acqd: error: endpoint ipc://{tmp_path}/ipc/sensor (stream 'sensor') is already "
                               f"served by another acqd (pid {daemon.pid}")
        rows = daemon.command("status")["streams"]["sensor"]["rows"]
        wait_until(lambda: daemon.command("status")["streams"]["sensor"]["rows"] > rows + 1000, "more data")
        daemon.command("stop")
    assert seqs_accounted_for(folder / "streams" / "sensor.h5")[1] == 0
    with h5py.File(folder / "streams" / "sensor.h5", "r") as f:
        assert f["gaps"].shape[0] == 0 and committed_rows(f) > 0


@pytest.mark.e2e
def test_row23_unwritable_data_root_is_refused_with_the_path_and_the_reason(tmp_path, daemon_factory):
    if not can_chattr(tmp_path):
        pytest.skip("needs chattr +i (root on ext4): chmod does not stop root")
    locked = tmp_path / "locked"
    locked.mkdir()
    # parent_directory is confined to configured roots (control.data_roots): the locked folder is one of them
    rig_file = write_rig(tmp_path, stream_overrides=SMALL_RIG,
                         daemon_overrides={"control": {"data_roots": [str(locked)]}})
    chattr("+i", locked)
    try:
        start = serve_briefly(rig_file, locked / "data")  # cannot even be created
        assert start.returncode == 2 and start.stderr.strip().splitlines() == [
            f"acqd: error: data root {locked / 'data'} cannot be written: Operation not permitted"]
        daemon = daemon_factory(rig_file)
        with pytest.raises(ApiError) as moved:  # Open Ephys: PUT /api/recording {"parent_directory": ...}
            daemon.client.request("PUT", "/api/recording", {"parent_directory": str(locked)})
        assert moved.value.status == 409
        assert str(moved.value) == f"data root {locked} cannot be written: Operation not permitted"
        assert daemon.client.request("GET", "/api/recording")["parent_directory"] == str(tmp_path / "data")
    finally:
        chattr("-i", locked)
    with acquiring(daemon, rig_file, seed=23):
        try:
            chattr("+i", tmp_path / "data")  # made unwritable while the daemon runs
            with pytest.raises(ApiError) as refused:
                daemon.command("record", session="later", metadata={"subject": SUBJECT})
            assert refused.value.status == 409
            assert str(refused.value) == f"data root {tmp_path / 'data'} cannot be written: Operation not permitted"
            cli = zygote.run([sys.executable, "-m", "acqd.cli", "record", "--session", "later", "--url",
                              daemon.url, "--subject-id", "m1", "--species", "Mus musculus", "--sex", "F",
                              "--age", "P90D"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=60)
            assert cli.returncode == 2 and cli.stderr.strip().splitlines() == [f"acqd: error: {refused.value}"]
        finally:
            chattr("-i", tmp_path / "data")
    assert not any(p.is_dir() for p in (tmp_path / "data").iterdir())  # no session folder was left behind


@pytest.mark.e2e
def test_writer_control_socket_is_private_ipc_removed_on_exit_and_junk_is_counted(tmp_path):
    import zmq

    run = tmp_path / "run"
    log = tmp_path / "daemon.log"
    rig_file = write_rig(tmp_path, stream_overrides=SMALL_RIG)
    daemon = Daemon(rig_file, tmp_path / "data", tmp_path, env={"ACQD_RUNTIME_DIR": str(run)}, log=log)
    ctx = zmq.Context()
    try:
        (folder,) = run.glob(f"daemon-{daemon.pid}-*")
        assert folder.stat().st_mode & 0o777 == 0o700 and folder.stat().st_uid == os.getuid()
        assert (folder / "control").is_socket()
        daemon.command("acquire")
        junk = [[b"not json"], [b"[1, 2]"], [b"\xff\xfe"], [b"two", b"frames"], [b'{"type": "stats", "pid": 1}']]
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.IDENTITY, b"rogue")
        s.setsockopt(zmq.LINGER, 1000)
        s.connect(f"ipc://{folder}/control")
        for frames in junk:
            s.send_multipart(frames)
        s.close()
        wait_until(lambda: log.read_text().count("ignored a malformed message") == 5, "the junk to be counted")
        status = daemon.command("status")
        assert all(st["state"] == "acquiring" for st in status["streams"].values())
        assert daemon.stop() == 0
    finally:
        ctx.term()
        stop_process(daemon.proc)
    text = log.read_text()
    assert "Traceback" not in text and "5 so far" in text
    assert not folder.exists()
    assert list((run / "endpoints").iterdir()) == []
