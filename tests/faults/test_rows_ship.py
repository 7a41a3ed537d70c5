"""Row 42: shipping killed at a random moment (kill -9 of rclone or of the shipping process, the SFTP server gone
for a few seconds), then resumed: every job ends verified, no file at the destination is missing or corrupt, a
READY.json never stands over an incomplete copy, and the local session is never touched.

Real parts: Debian's rclone, an sshd of the test's own (tests/share/sftp.py), the shipper in its own process
(tests/share/ship_runner.py), kill -9 by pid. 5 kills in ``make test``; 100 kills of a 200 MB session with
``-m slow``.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from acqd.finalize.seal import read_manifest, verify_manifest
from acqd.config.ship import ShipDestination
from acqd.share.ship import READY, Queue, Shipper
from acqd.share.ship.queue import COPYING, QUEUE_FILE
from acqd.share.ship.verify import expected
from tests.share.sftp import SSHD, SftpServer, descendants
from tests.share.shipping import sealed_session, with_ship

ROOT = Path(__file__).resolve().parents[2]
KINDS = ("rclone", "daemon", "sftp")
pytestmark = pytest.mark.skipif(shutil.which("rclone") is None or not Path(SSHD).exists(),
                                reason="rclone or openssh-server is not installed (.ci/run installs both)")


def _runner(data_root: Path, dests: Path, session: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.share.ship_runner", str(data_root), str(dests), session],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _rclone_of(proc: subprocess.Popen) -> int | None:
    for pid in descendants(proc.pid):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "rclone":
                return pid
        except OSError:
            pass
    return None


def _copying(proc: subprocess.Popen, deadline: float) -> bool:
    """Wait until the runner runs rclone (the kill lands mid-ship, not before it); False if the runner finished."""
    while _rclone_of(proc) is None:
        if proc.poll() is not None:
            assert proc.returncode == 0, f"the shipper exited {proc.returncode}"
            return False
        assert time.monotonic() < deadline, "no rclone started"
        time.sleep(0.01)
    return True


def _destination_state(copy: Path, want: dict[str, str]) -> tuple[int, int]:
    """(missing, corrupt) files of the copy, by sha256 against the manifest."""
    from acqd.finalize.seal import _sha256

    missing = sum(not (copy / n).is_file() for n in want)
    corrupt = sum((copy / n).is_file() and _sha256(copy / n) != d for n, d in want.items())
    return missing, corrupt


def ship_with_kills(tmp_path: Path, runs: int, kills: int, sizes: tuple[int, ...], bwlimit: str | None,
                    seed: int, outage_s: tuple[float, float] = (1.0, 3.0), verbose: bool = False,
                    stall_timeout_s: float = 30.0) -> dict:
    """Ship ``runs`` sessions one after the other, each killed ``kills`` times at random moments (the kinds in
    turn), and count what went wrong."""
    rng = random.Random(seed)
    server = SftpServer(tmp_path / "sshd")
    server.start()
    data_root, nas = tmp_path / "data", tmp_path / "nas"
    dests = tmp_path / "dests.json"
    dests.write_text(json.dumps([{"name": "lab", "remote": f"lab:{nas}", "rclone_config": str(server.rclone_conf()),
                                  "bwlimit": bwlimit, "backoff_s": 0.1, "max_backoff_s": 0.5, "max_attempts": 50,
                                  "retries": 1, "low_level_retries": 2, "stall_timeout_s": stall_timeout_s}]))
    figures = {"runs": 0, "kills": dict.fromkeys(KINDS, 0), "missing": 0, "corrupt": 0, "early_ready": 0,
               "local_changed": 0, "not_verified": 0, "hung": 0, "seconds": []}
    n = 0
    try:
        for run in range(runs):
            name = f"s{run:03d}"
            folder = sealed_session(data_root, name, sizes=sizes, seed=run)
            want = expected(folder)
            t0 = time.monotonic()
            deadline = t0 + 300
            proc = _runner(data_root, dests, name)
            try:
                for _ in range(kills):
                    if not _copying(proc, deadline):
                        break  # the job finished before this kill
                    time.sleep(rng.uniform(0.1, 0.6))  # a random moment of the copy (or of the hashing after it)
                    kind = KINDS[n % len(KINDS)]
                    n += 1
                    if kind == "rclone" and (pid := _rclone_of(proc)) is not None:
                        os.kill(pid, signal.SIGKILL)
                    elif kind == "daemon":
                        proc.kill()
                        proc.wait(10)
                    elif kind == "sftp":
                        server.kill()
                    figures["kills"][kind] += 1
                    # right after a kill: a READY.json never stands over a copy that does not verify
                    if (nas / name / READY).exists() and _destination_state(nas / name, want) != (0, 0):
                        figures["early_ready"] += 1
                    if kind == "sftp":
                        time.sleep(rng.uniform(*outage_s))  # the server is gone for a few seconds
                        server.start()
                    if kind == "daemon":
                        proc = _runner(data_root, dests, name)  # the daemon restarts: the job resumes
                try:
                    assert proc.wait(max(1.0, deadline - time.monotonic())) == 0
                except subprocess.TimeoutExpired:
                    figures["hung"] += 1  # counted (and failed by _check), and the sweep goes on
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
            figures["seconds"].append(time.monotonic() - t0)
            q = Queue(data_root / QUEUE_FILE)
            states = [(j.state, j.error) for j in q.jobs(name)]
            q.close()
            figures["not_verified"] += states != [("verified", None)]
            missing, corrupt = _destination_state(nas / name, want)
            figures["missing"] += missing
            figures["corrupt"] += corrupt
            figures["local_changed"] += bool(verify_manifest(folder)) or set(read_manifest(folder)) != set(want) - {
                "manifest.sha256"}
            figures["early_ready"] += not (nas / name / READY).exists()
            figures["runs"] += 1
            shutil.rmtree(folder)  # counted: 100 sessions of 200 MB, twice over, would fill a shared disk
            shutil.rmtree(nas / name, ignore_errors=True)
            if verbose:
                print(f"row 42 run {run + 1}: {figures['seconds'][-1]:.1f} s; "
                      f"{json.dumps({k: v for k, v in figures.items() if k != 'seconds'})}", file=sys.stderr,
                      flush=True)
    finally:
        server.kill()
    return figures


def _check(figures: dict, runs: int) -> None:
    assert figures["runs"] == runs
    assert (figures["missing"], figures["corrupt"], figures["early_ready"], figures["local_changed"],
            figures["not_verified"], figures["hung"]) == (0, 0, 0, 0, 0, 0), figures


def test_row42_ship_killed_five_times_resumes_and_every_job_ends_verified(tmp_path):
    figures = ship_with_kills(tmp_path, runs=1, kills=5, sizes=(1 << 20,) * 8, bwlimit="2M", seed=42,
                              outage_s=(1.0, 1.5))
    _check(figures, 1)
    assert sum(figures["kills"].values()) == 5 and all(figures["kills"].values()), figures["kills"]


@pytest.mark.slow
@pytest.mark.timeout(4 * 3600)
def test_row42_ship_of_200_mb_killed_100_times_resumes_and_every_job_ends_verified(tmp_path):
    figures = ship_with_kills(tmp_path, runs=100, kills=1, sizes=(120 << 20, 60 << 20, 20 << 20, 4096), bwlimit=None,
                              seed=4242, verbose=True)
    seconds = sorted(figures["seconds"])
    print(f"\nrow 42 slow: {json.dumps({k: v for k, v in figures.items() if k != 'seconds'})}; "
          f"seconds per run: median {seconds[len(seconds) // 2]:.1f}, max {seconds[-1]:.1f}")
    _check(figures, 100)


def test_row42_daemon_killed_mid_ship_takes_its_rclone_along_and_the_restarted_daemon_resumes(tmp_path,
                                                                                              daemon_factory):
    """The real daemon (acqd serve) killed -9 while its rclone copies: the rclone dies with it (no orphan keeps
    writing; PR_SET_PDEATHSIG, and failing that the SIGPIPE of its next stats line), nothing is called verified,
    and the next daemon resumes the job to a verified copy."""
    from tests.conftest import write_rig

    rig = with_ship(write_rig(tmp_path), [{"name": "nas", "remote": str(tmp_path / "nas"), "after": "manual",
                                           "bwlimit": "2M"}])
    folder = sealed_session(tmp_path / "data", "m1_day3", sizes=(1 << 20,) * 8)
    want = expected(folder)
    daemon = daemon_factory(rig)
    [job] = daemon.command("ship", session="m1_day3")["jobs"]
    # Deadlines, not expected times: the daemon's rclone runs at nice 19 and idle I/O priority (checked below), so
    # on a busy machine it waits for every other process (two test suites at once: no copy after 20 s).
    deadline = time.monotonic() + 90
    while (rclone_pid := _rclone_of(daemon.proc)) is None or not (tmp_path / "nas" / "m1_day3").exists():
        assert time.monotonic() < deadline, "the daemon's rclone never started copying"
        time.sleep(0.01)
    nice = int(Path(f"/proc/{rclone_pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
    ioprio = subprocess.run(["ionice", "-p", str(rclone_pid)], capture_output=True, text=True, timeout=10).stdout
    assert (nice, ioprio.strip()) == (19, "idle")  # shipping never competes with a recording for CPU or disk
    daemon.proc.kill()
    daemon.proc.wait(10)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{rclone_pid}").exists() and "Z" not in Path(f"/proc/{rclone_pid}/stat").read_text().split()[2]:
        assert time.monotonic() < deadline, "rclone outlived the daemon"
        time.sleep(0.01)
    q = Queue(tmp_path / "data" / QUEUE_FILE)
    assert q.get(job["id"]).state in ("copying", "verifying")  # as the kill left it: not verified
    q.close()
    assert not (tmp_path / "nas" / "m1_day3" / READY).exists()
    daemon = daemon_factory(rig)  # restarted: the job resumes
    deadline = time.monotonic() + 120
    while (state := daemon.command("ship_status")["jobs"][0])["state"] != "verified":
        assert state["state"] != "failed" and time.monotonic() < deadline, state
        time.sleep(0.05)
    assert _destination_state(tmp_path / "nas" / "m1_day3", want) == (0, 0)
    assert verify_manifest(folder) == []


def test_row42_a_destination_that_goes_silent_mid_file_is_given_up_on_and_the_job_resumes_to_verified(tmp_path):
    """The SFTP server frozen (SIGSTOP) mid-copy: its connection stays open and says nothing, as over a network that
    drops packets without a reset. rclone alone waits out its 5-minute I/O timeout; acqd stops it once it moved
    nothing for the destination's stall_timeout_s, says why (the job's error, the ship_failed event, the log), and
    retries; once the server answers again the job ends verified with every file intact."""
    server = SftpServer(tmp_path / "sshd")
    server.start()
    events: list[tuple[str, dict]] = []
    folder = sealed_session(tmp_path / "data", "m1_day3", sizes=(1 << 20,) * 4)
    want = expected(folder)
    dest = ShipDestination(name="lab", remote=f"lab:{tmp_path / 'nas'}", rclone_config=server.rclone_conf(),
                           bwlimit="1M", stall_timeout_s=5, backoff_s=0.1, max_backoff_s=0.5, max_attempts=50,
                           retries=1, low_level_retries=2)
    shipper = Shipper(tmp_path / "data", (dest,), lambda kind, payload: events.append((kind, payload)))
    shipper.start()
    try:
        [job] = shipper.ship(folder)
        deadline = time.monotonic() + 90  # rclone runs at nice 19, idle I/O: on a busy machine it waits for the rest
        while (j := shipper.queue.get(job.id)).state != COPYING or j.bytes_done == 0:
            assert time.monotonic() < deadline and j.state not in ("verified", "failed"), j
            time.sleep(0.02)
        server.freeze()
        deadline = time.monotonic() + 60  # 5 s of stall, stretched by any time rclone waits for a CPU
        while not (stalls := [p for k, p in events if k == "ship_failed" and "stalled" in (p["error"] or "")]):
            assert time.monotonic() < deadline, "rclone was left waiting on a silent destination"
            time.sleep(0.05)
        assert stalls[0]["error"].startswith("rclone stalled: nothing moved for 5 s") and not stalls[0]["final"]
        server.thaw()
        deadline = time.monotonic() + 120
        while (j := shipper.queue.get(job.id)).state != "verified":
            assert time.monotonic() < deadline and j.state != "failed", j
            time.sleep(0.05)
    finally:
        shipper.stop()
        server.thaw()
        server.kill()
    assert _destination_state(tmp_path / "nas" / "m1_day3", want) == (0, 0)
    assert (tmp_path / "nas" / "m1_day3" / READY).exists() and verify_manifest(folder) == []
