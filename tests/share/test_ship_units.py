"""The pure decisions of shipping: backoff, what differs, what rclone says; and the queue's transitions."""
from __future__ import annotations

import json
import re

import pytest

from acqd.share.ship import rclone
from acqd.share.ship.queue import COPYING, FAILED, QUEUED, VERIFIED, Queue, backoff_s
from acqd.share.ship.verify import describe, mismatches
from acqd.config.ship import ShipDestination


def test_backoff_doubles_from_the_base_and_stops_at_the_cap():
    assert [backoff_s(n, 30, 3600) for n in range(0, 10)] == [0, 30, 60, 120, 240, 480, 960, 1920, 3600, 3600]
    assert backoff_s(10_000, 30, 3600) == 3600  # no overflow however many attempts


def test_mismatches_name_missing_and_different_files_only():
    want = {"a": "1" * 64, "b": "2" * 64, "c": "3" * 64}
    found = {"a": "1" * 64, "b": "f" * 64, "extra": "4" * 64}
    assert mismatches(want, found) == ["b", "c"]
    assert describe(["b", "c"], found) == "b (sha256 differs), c (missing)"


def test_rclone_stats_errors_and_hashsum_are_read():
    stats, err = rclone.parse_log_line(json.dumps({"level": "warning", "msg": "x", "stats": {
        "bytes": 10, "totalBytes": 40, "speed": 2.5, "eta": 12, "transfers": 1}}))
    assert (stats.bytes, stats.total_bytes, stats.speed, stats.eta_s, err) == (10, 40, 2.5, 12, None)
    assert rclone.parse_log_line('{"level":"error","msg":"boom","object":"a.h5"}') == (None, "a.h5: boom")
    assert rclone.parse_log_line('{"level":"info","msg":"fine"}') == (None, None)
    assert rclone.parse_log_line("2026/01/01 Failed to copy: x") == (None, "2026/01/01 Failed to copy: x")
    assert rclone.parse_hashsum(f"{'a' * 64}  s/x.h5\nUNSUPPORTED  y\n{'b' * 64}  z z\n") == {
        "s/x.h5": "a" * 64, "z z": "b" * 64}


@pytest.mark.parametrize(("errors", "rc", "why"), [
    (["a.h5: write: no space left on device"], 1, "destination full (no space left on device)"),
    (["mkdir /x: read-only file system"], 1, "destination is read-only"),
    (["ssh: handshake failed: ssh: unable to authenticate, attempted methods [none publickey]"], 1,
     "wrong credentials for the destination (ssh authentication failed)"),
    (["dial tcp 127.0.0.1:1: connect: connection refused"], 1, "the destination refuses connections (server down?)"),
    (['Failed to create file system for "lab:x/READY.json": stat failed: connection lost'], 1,
     "the connection to the destination was lost"),
    ([], -9, "rclone was killed (SIGKILL)"),
    (["something new"], 3, "rclone exited 3: something new"),
])
def test_rclone_errors_become_one_line_reasons(errors, rc, why):
    assert rclone.reason(errors, rc) == why


def test_copy_sends_exactly_the_listed_files_by_checksum_at_the_given_bandwidth(tmp_path):
    dest = ShipDestination(name="nas", remote="lab:rig1/", rclone_config=tmp_path / "r.conf", retries=2)
    args = rclone.copy_args(dest, tmp_path / "s", rclone.remote_path(dest, "s"), tmp_path / "f.txt", "1M")
    assert args[:6] == ["rclone", "--config", str(tmp_path / "r.conf"), "copy", str(tmp_path / "s"), "lab:rig1/s"]
    for flag in (["--files-from-raw", str(tmp_path / "f.txt")], ["--checksum"], ["--retries", "2"],
                 ["--bwlimit", "1M"], ["--use-json-log"], ["--ignore-checksum"]):
        assert any(args[i:i + len(flag)] == flag for i in range(len(args))), flag
    assert "--bwlimit" not in rclone.copy_args(dest, tmp_path, "x", tmp_path / "f", None)
    # a re-send sends the listed files whatever the destination holds (SFTP: --checksum compares sizes only)
    assert "--ignore-times" not in args
    assert "--ignore-times" in rclone.copy_args(dest, tmp_path, "x", tmp_path / "f", None, resend=True)


def test_queue_transitions_survive_reopening_and_recover_requeues_interrupted_jobs(tmp_path):
    q = Queue(tmp_path / "q.sqlite")
    job = q.add("s1", tmp_path / "s1", "nas", "session")
    assert q.add("s1", tmp_path / "s1", "nas", "session").id == job.id  # no second job for the same copy
    assert q.start(job.id, 100).state == COPYING
    q.close()
    q = Queue(tmp_path / "q.sqlite")  # as after a kill -9 of the daemon
    assert q.recover() == [job.id]
    job = q.get(job.id)
    assert (job.state, job.attempts, job.bytes_total) == (QUEUED, 1, 100)
    assert q.next_due("nas").id == job.id and q.next_due("other") is None
    job = q.retry_later(q.start(job.id, 100).id, "network down", 1000)
    assert (job.state, job.error) == (QUEUED, "network down") and q.next_due("nas") is None
    assert q.fail(job.id, "gave up").state == FAILED
    assert q.add("s1", tmp_path / "s1", "nas", "session").id != job.id  # a failed copy can be shipped anew
    assert q.verified(q.requeue(job.id).id, "d" * 64).state == VERIFIED


def test_destination_config_refuses_bad_names_and_bandwidths():
    from pydantic import ValidationError

    from acqd.config.ship import ShipList
    from pydantic import TypeAdapter

    with pytest.raises(ValidationError, match="invalid destination name"):
        ShipDestination(name="../x", remote="/x")
    with pytest.raises(ValidationError, match="invalid bandwidth"):
        ShipDestination(name="x", remote="/x", bwlimit="fast")
    with pytest.raises(ValidationError, match="used twice"):
        TypeAdapter(ShipList).validate_python([{"name": "a", "remote": "/x"}, {"name": "a", "remote": "/y"}])


def test_delete_after_deletes_only_proven_old_finalized_sessions_and_says_why():
    from acqd.share.ship.cleanup import DAY_S, verdict
    from acqd.config.ship import DeleteAfter

    nas = ShipDestination(name="nas", remote="/n", delete_after=DeleteAfter(verified_copies=2, min_age_days=7,
                                                                             free_below_bytes=100))
    s3 = ShipDestination(name="s3", remote="s3:x")
    digest, now = "d" * 64, 100 * DAY_S
    copies = [{"destination": "nas", "manifest_sha256": digest}, {"destination": "s3", "manifest_sha256": digest}]

    def v(state="finalized", d=digest, c=copies, queue=frozenset({"nas", "s3"}), age_d=8.0, free=50):
        return verdict("m1", state, d, c, set(queue), now - age_d * DAY_S, [nas, s3], now, free)

    assert v().delete and v().reason.startswith("verified at nas, s3 (manifest sha256 dddddddddddd...), 8.0 days old")
    assert verdict("m1", "finalized", digest, copies, {"nas", "s3"}, 0, [nas, s3], now, 50, frozenset({"s3"})).reason \
        == "still shipping to s3"  # a re-verify or a new copy of it is running
    assert v(state="recording").reason == "session is recording, not finalized"
    assert v(state="finalizing").reason == "session is finalizing, not finalized"
    assert v(d=None).reason == "no manifest: not sealed"
    assert v(queue={"nas"}).reason == "nas: 1 of 2 verified copies"  # shipping.json alone is not proof
    assert v(c=[{"destination": "nas", "manifest_sha256": "e" * 64}, copies[1]]).reason == "nas: not verified there"
    assert v(age_d=3).reason == "nas: 3.0 of 7 days old"
    assert v(free=200).reason == "nas: free space 0.0 GB is not below 0.0 GB"
    assert verdict("m1", "finalized", digest, copies, {"nas", "s3"}, 0, [s3], now, 0).reason == \
        "no destination has delete_after"


def test_what_to_ship_follows_after_and_what():
    from acqd.share.ship.shipper import what_to_ship

    d = [ShipDestination(name="a", remote="/a"), ShipDestination(name="b", remote="/b", after="export"),
         ShipDestination(name="c", remote="/c", what="both"), ShipDestination(name="d", remote="/d", what="export"),
         ShipDestination(name="e", remote="/e", after="manual")]
    assert what_to_ship(d, "finalize") == (["a", "c"], [])
    assert what_to_ship(d, "export") == (["b"], ["c", "d"])


def test_destination_path_and_sessions_filter_are_checked_and_applied():
    from pydantic import ValidationError

    from acqd.share.ship.shipper import what_to_ship

    leader = ShipDestination(name="leader", remote="/data", path="{session}/nodes/{node}", sessions="led")
    assert leader.where("m1_day3", "rig-b") == "m1_day3/nodes/rig-b"
    assert ShipDestination(name="nas", remote="/n").where("m1_day3", "main") == "m1_day3"
    for bad, why in (("{subject}/x", "unknown placeholder {subject}"), ("/{session}", "a relative path"),
                     ("{session}/../x", "a relative path"), ("{session}//x", "a relative path"),
                     ("rig", "it must hold {session}"), ("{session", "invalid path"), ("{session!r}", "placeholder")):
        with pytest.raises(ValidationError, match=re.escape(why)):
            ShipDestination(name="x", remote="/x", path=bad)
    d = [leader, ShipDestination(name="nas", remote="/n", sessions="own"), ShipDestination(name="all", remote="/a")]
    assert what_to_ship(d, "finalize", led=True) == (["leader", "all"], [])
    assert what_to_ship(d, "finalize", led=False) == (["nas", "all"], [])


def test_a_queue_file_of_the_first_schema_gains_the_new_columns_and_keeps_its_jobs(tmp_path):
    import sqlite3

    old = sqlite3.connect(tmp_path / "q.sqlite")
    old.executescript("""CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, session TEXT NOT NULL,
        folder TEXT NOT NULL, dest TEXT NOT NULL, what TEXT NOT NULL, state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0, bytes_total INTEGER NOT NULL DEFAULT 0,
        bytes_done INTEGER NOT NULL DEFAULT 0, error TEXT, created REAL NOT NULL, updated REAL NOT NULL,
        started REAL, finished REAL, next_try REAL NOT NULL DEFAULT 0, manifest_sha256 TEXT);
        INSERT INTO jobs (session, folder, dest, what, state, created, updated) VALUES ('s1', '/x', 'nas', 'session',
        'verified', 1, 1);""")
    old.commit()
    old.close()
    q = Queue(tmp_path / "q.sqlite")
    [job] = q.jobs()
    assert (job.session, job.state, job.reverify, job.files) == ("s1", VERIFIED, 0, None)
    assert q.add("s2", tmp_path, "nas", "export", files="{}").files == "{}"
    q.close()


def test_a_stall_is_time_rclone_could_run_without_reading_a_step():
    from acqd.share.ship.stall import MOVED_STEP, StallClock

    asked = []

    def waits(t: float, starved: float = 0.0):  # run-queue waits of two threads at t (starved: share waited)
        return lambda: asked.append(t) or {1: starved * t, 2: 0.0}

    clock = StallClock(stall_s=5)
    assert not clock.feed(0.0, 1000, waits(0))
    for t in range(1, 6):  # the first still check is the waits' baseline; a byte now and then is no progress
        assert not clock.feed(float(t), 1000 + t, waits(t))
    assert clock.feed(6.0, 1006, waits(6))
    asked.clear()
    for t in range(7, 10):  # moving (a step read each check): stall time is 0, the waits are not even read
        assert not clock.feed(float(t), 1000 + (t - 6) * MOVED_STEP, waits(t))
    assert clock.stalled_s == 0.0 and asked == []
    # still again, but starved of CPU: the seconds a thread waited on a run queue do not count
    for t in range(10, 32):
        assert not clock.feed(float(t), 1000 + 3 * MOVED_STEP, waits(t, starved=0.9))
    assert 2.0 <= clock.stalled_s <= 2.2


def test_a_stalled_rclone_is_stopped_and_said_so(tmp_path):
    """The watchdog on a real process that reads nothing (a sleep standing in for rclone on a silent link)."""
    run = rclone.Run(["sleep", "60"])
    run.start()
    rc, _ = run.wait(lambda line: None, timeout_s=30, stall_s=1)
    assert rc != 0 and run.stalled.startswith("rclone stalled: nothing moved for 1 s")
