"""Shipping to a local folder with the real rclone: verified copies, refusals, and destinations that fail."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from acqd.finalize.seal import verify_manifest
from acqd.share.ship import READY, Shipper
from acqd.share.ship import rclone as rclone_mod
from acqd.share.ship.queue import FAILED, VERIFIED
from acqd.share.ship.verify import shipped_copies
from tests import zygote
from tests.share.shipping import local_destination, sealed_session, tree

pytestmark = pytest.mark.skipif(shutil.which("rclone") is None, reason="rclone is not installed (.ci/run installs it)")
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


def wait_for(shipper: Shipper, job_id: int, states: tuple[str, ...], timeout_s: float = 90.0):
    deadline = time.monotonic() + timeout_s
    while (job := shipper.queue.get(job_id)).state not in states:
        assert time.monotonic() < deadline, f"job {job_id} still {job.state}: {job.error}"
        time.sleep(0.02)
    return job


@pytest.fixture
def tmpfs(tmp_path):
    mounted = []

    def mount(name: str, options: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True, timeout=10)
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], timeout=10)


def test_a_session_ships_verified_with_ready_json_and_shipping_json(tmp_path):
    folder = sealed_session(tmp_path / "data")
    events = []
    dest = local_destination(tmp_path / "nas")
    shipper = Shipper(tmp_path / "data", (dest,), lambda kind, payload: events.append((kind, payload)))
    [job] = shipper.ship(folder)
    job = shipper.run(job, dest)
    assert (job.state, job.error, job.attempts) == (VERIFIED, None, 1)
    copy = tmp_path / "nas" / folder.name
    local = tree(folder)
    shipped = tree(copy)
    ready = json.loads(shipped.pop(READY))
    assert shipped == {name: data for name, data in local.items() if name != "shipping.json"}
    assert ready["manifest_sha256"] == job.manifest_sha256 and ready["files"] == len(shipped)
    [record] = shipped_copies(folder)
    assert (record["destination"], record["path"], record["manifest_sha256"]) == ("nas", str(copy), ready[
        "manifest_sha256"])
    assert verify_manifest(folder) == []  # shipping.json sits beside the sealed set, not in it
    out = zygote.run([sys.executable, "-m", "acqd.cli", "verify", str(folder)], capture_output=True, text=True,
                     timeout=60)
    assert out.returncode == 0 and f"verified copy at nas: {copy} (" in out.stdout  # acqd verify reports the copy
    assert [k for k, _ in events if k != "ship_progress"] == ["ship_queued", "shipped"]
    assert shipper.ship(folder)[0].id == job.id  # shipping a verified copy again is a no-op
    shipper.queue.close()


def test_a_followers_session_lands_in_the_leaders_session_under_nodes_and_own_sessions_stay(tmp_path):
    led = sealed_session(tmp_path / "data", "m1_day3", node="rig-b", leader={"node": "rig-a", "session": "m1_day3"})
    own = sealed_session(tmp_path / "data", "m1_day4", seed=1, node="rig-b")
    dest = local_destination(tmp_path / "leader", name="leader", sessions="led").model_copy(
        update={"path": "{session}/nodes/{node}"})
    shipper = Shipper(tmp_path / "data", (dest,))
    [job] = shipper.ship(led)
    job = shipper.run(job, dest)
    assert (job.state, job.error) == (VERIFIED, None)
    landed = tmp_path / "leader" / "m1_day3" / "nodes" / "rig-b"
    shipped = tree(landed)
    assert json.loads(shipped.pop(READY))["path"] == str(landed)
    assert shipped == {n: d for n, d in tree(led).items() if n != "shipping.json"}
    assert shipped_copies(led)[0]["path"] == str(landed)
    with pytest.raises(ValueError, match="no ship destination takes m1_day4: leader takes only sessions a leader"):
        shipper.ship(own)  # a session no leader started never goes to a 'led' destination...
    with pytest.raises(ValueError, match="takes only sessions a leader started"):
        shipper.ship(own, to="leader")  # ...not even when asked by name
    assert not (tmp_path / "leader" / "m1_day4").exists()
    shipper.queue.close()


def test_a_session_changed_after_its_seal_is_refused_and_nothing_leaves(tmp_path):
    folder = sealed_session(tmp_path / "data")
    (folder / "streams" / "s1.h5").write_bytes(b"tampered")
    events = []
    dest = local_destination(tmp_path / "nas")
    shipper = Shipper(tmp_path / "data", (dest,), lambda kind, payload: events.append((kind, payload)))
    job = shipper.run(shipper.ship(folder)[0], dest)
    assert job.state == FAILED
    assert job.error == "session changed since it was sealed, refused: streams/s1.h5: contents changed"
    assert not (tmp_path / "nas").exists()
    assert events[-1][0] == "ship_refused"
    shipper.queue.close()


def test_a_file_changed_at_the_destination_is_caught_by_reverify_and_resent_by_retry(tmp_path):
    folder = sealed_session(tmp_path / "data")
    dest = local_destination(tmp_path / "nas")
    shipper = Shipper(tmp_path / "data", (dest,))
    job = shipper.run(shipper.ship(folder)[0], dest)
    remote = tmp_path / "nas" / folder.name / "streams" / "s0.h5"
    data = bytearray(remote.read_bytes())
    data[1000] ^= 0xFF
    remote.write_bytes(bytes(data))
    job = shipper.run(shipper.reverify(job.id), dest)
    assert job.state == FAILED
    assert job.error == "changed at the destination after verification: streams/s0.h5 (sha256 differs)"
    assert not (tmp_path / "nas" / folder.name / READY).exists() and shipped_copies(folder) == []
    job = shipper.run(shipper.retry(job.id), dest)
    assert job.state == VERIFIED and remote.read_bytes() == (folder / "streams" / "s0.h5").read_bytes()
    shipper.queue.close()


def test_a_file_that_arrives_corrupt_is_resent_once_then_the_job_fails_naming_it(tmp_path, monkeypatch):
    """A destination that corrupts what it stores (rclone wrapped by a script that flips a byte of s0.h5 after
    each copy): re-sent once, then failed with the file named; READY.json never appears."""
    wrapper = tmp_path / "rclone-corrupting"
    target = tmp_path / "nas" / "m1_day3" / "streams" / "s0.h5"
    wrapper.write_text(f"""#!/bin/sh
{shutil.which("rclone")} "$@"; rc=$?
case " $* " in *" copy "*) [ -f {target} ] && printf 'X' | dd of={target} bs=1 seek=10 conv=notrunc 2>/dev/null;; esac
exit $rc
""")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(rclone_mod, "RCLONE", str(wrapper))
    folder = sealed_session(tmp_path / "data")
    dest = local_destination(tmp_path / "nas")
    shipper = Shipper(tmp_path / "data", (dest,))
    job = shipper.run(shipper.ship(folder)[0], dest)
    assert job.state == FAILED
    assert job.error == "verification failed after re-sending: streams/s0.h5 (sha256 differs)"
    assert not (tmp_path / "nas" / folder.name / READY).exists()
    shipper.queue.close()


def test_an_unknown_remote_fails_with_a_clear_error_and_capped_backoff_not_a_storm(tmp_path):
    folder = sealed_session(tmp_path / "data", sizes=(1000,))
    conf = tmp_path / "rclone.conf"
    conf.write_text("")
    dest = local_destination(tmp_path / "x", remote="nosuch:rig1", rclone_config=conf, max_attempts=3,
                             backoff_s=0.2, max_backoff_s=0.3)
    events = []
    shipper = Shipper(tmp_path / "data", (dest,), lambda kind, payload: events.append((kind, payload, time.time())))
    shipper.start()
    try:
        job = wait_for(shipper, shipper.ship(folder)[0].id, (FAILED,))
    finally:
        shipper.stop()
    assert job.attempts == 3
    assert job.error == "the destination's rclone remote is not in the rclone config (after 3 attempts)"
    failures = [(p["final"], t) for k, p, t in events if k == "ship_failed"]
    assert [final for final, _ in failures] == [False, False, True]
    gaps = [b - a for (_, a), (_, b) in zip(failures, failures[1:])]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.3  # backoff 0.2 s, then capped at 0.3 s


@ROOT_ONLY
def test_a_full_destination_fails_the_job_with_no_space_left(tmp_path, tmpfs):
    nas = tmpfs("nas", "size=1m")
    folder = sealed_session(tmp_path / "data", sizes=(3 << 20,))
    dest = local_destination(nas, max_attempts=2, retries=1, low_level_retries=1)
    shipper = Shipper(tmp_path / "data", (dest,))
    job = shipper.run(shipper.ship(folder)[0], dest)
    job = shipper.run(shipper.queue.get(job.id), dest)
    assert job.state == FAILED and job.attempts == 2
    assert job.error == "destination full (no space left on device) (after 2 attempts)"
    assert not (nas / folder.name / READY).exists()
    assert verify_manifest(folder) == []  # the local session is untouched
    shipper.queue.close()


@ROOT_ONLY
def test_a_read_only_destination_fails_the_job_saying_so(tmp_path, tmpfs):
    nas = tmpfs("nas", "size=1m,ro")
    folder = sealed_session(tmp_path / "data", sizes=(1000,))
    dest = local_destination(nas, max_attempts=1, retries=1, low_level_retries=1)
    shipper = Shipper(tmp_path / "data", (dest,))
    job = shipper.run(shipper.ship(folder)[0], dest)
    assert (job.state, job.error) == (FAILED, "destination is read-only (after 1 attempt)")
    shipper.queue.close()


def test_a_recording_pauses_a_pause_destination_and_throttles_a_throttle_one(tmp_path):
    """While a session records: the pause destination's copy is stopped (its attempt not counted) and waits; the
    throttle one is restarted at its throttle bandwidth; both end verified once the recording stops."""
    folder = sealed_session(tmp_path / "data", sizes=(1 << 20,) * 16)
    paused = local_destination(tmp_path / "a", name="a", bwlimit="2M")
    throttled = local_destination(tmp_path / "b", name="b", bwlimit="2M", while_recording="throttle",
                                  throttle_bwlimit="1M")
    events = []
    shipper = Shipper(tmp_path / "data", (paused, throttled), lambda kind, payload: events.append((kind, payload)))
    shipper.start()
    try:
        a, b = shipper.ship(folder)
        wait_for(shipper, a.id, ("copying",))
        wait_for(shipper, b.id, ("copying",))
        shipper.set_recording(True)
        job = wait_for(shipper, a.id, ("queued",))
        assert (job.error, job.attempts) == ("paused while a session records", 0)
        status = shipper.status()
        assert [(d["name"], d["paused"], d["bwlimit"]) for d in status["destinations"]] == [
            ("a", True, "2M"), ("b", False, "1M")]
        assert shipper.queue.get(a.id).state == "queued"  # it waits
        shipper.set_recording(False)
        assert wait_for(shipper, a.id, (VERIFIED, FAILED)).state == VERIFIED
        assert wait_for(shipper, b.id, (VERIFIED, FAILED)).state == VERIFIED
    finally:
        shipper.stop()
    assert tree(tmp_path / "a" / folder.name).keys() == tree(tmp_path / "b" / folder.name).keys()


def test_reverify_without_the_local_session_is_refused_and_keeps_the_copy_verified(tmp_path):
    folder = sealed_session(tmp_path / "data", sizes=(1000,))
    dest = local_destination(tmp_path / "nas")
    shipper = Shipper(tmp_path / "data", (dest,))
    job = shipper.run(shipper.ship(folder)[0], dest)
    shutil.rmtree(folder)  # as delete_after does
    with pytest.raises(ValueError, match="the local session .* is gone"):
        shipper.reverify(job.id)
    assert shipper.queue.get(job.id).state == VERIFIED
    shipper.queue.close()


def test_an_export_ships_verified_beside_the_session_and_a_changed_one_is_refused(tmp_path):
    folder = sealed_session(tmp_path / "data", sizes=(1000,))
    out = tmp_path / "share"
    (out / "sub-m1" / "sub-m1_ses-day3").mkdir(parents=True)
    (out / "sub-m1" / "sub-m1_ses-day3.nwb").write_bytes(b"the export" * 1000)
    (out / "sub-m1" / "sub-m1_ses-day3" / "cam_external_file_0.mkv").write_bytes(b"video" * 1000)
    names = ["sub-m1/sub-m1_ses-day3.nwb", "sub-m1/sub-m1_ses-day3/cam_external_file_0.mkv"]
    dest = local_destination(tmp_path / "nas", what="export")
    shipper = Shipper(tmp_path / "data", (dest,))
    [job] = shipper.ship_export(folder.name, out, names, ["nas"])
    job = shipper.run(job, dest)
    assert (job.state, job.error) == (VERIFIED, None)
    copy = tmp_path / "nas" / folder.name / "export"
    shipped = tree(copy)
    ready = json.loads(shipped.pop(READY))
    assert shipped == {n: (out / n).read_bytes() for n in names}
    assert (ready["what"], ready["files"], ready["manifest_sha256"]) == ("export", 2, job.manifest_sha256)
    assert [(c["destination"], c["what"]) for c in shipped_copies(folder)] == [("nas", "export")]
    (out / names[0]).write_bytes(b"changed")
    [again] = shipper.ship_export(folder.name, out, names, ["nas"])
    assert again.id == job.id  # verified already
    job = shipper.run(shipper.retry(shipper.queue.fail(job.id, "x").id), dest)
    assert job.state == FAILED and job.error.startswith("export changed since it was queued, refused: sub-m1/")
    shipper.queue.close()
