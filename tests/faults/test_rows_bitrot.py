"""Fault-matrix row 38 (bit rot after hashing) and row 34's trusted-digest gap (../shared/fault-matrix.md).

Finalize trusts a part the hasher read while the session recorded (``digests.jsonl``) as long as its size, mtime,
ctime and inode are unchanged. Bytes that change underneath (a block device's bit rot) or a digest line that lies
(stale, forged, torn) leave that stamp alone: finalize then seals the session, says which parts it trusted, and the
scrub that reads every sealed byte again must find the change and name the file and the chunk before anything
calls the session verified.

A small session (tests/sessions.py) is written once per module; every test copies it and runs the real hasher
process over the copy (``python -m acqd.finalize.hasher``), as the daemon does while recording.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import mmap
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from acqd.finalize import MANIFEST, finalize_session, unseal_session
from acqd.finalize.scrub import is_verified, verification
from acqd.finalize.digests import entry_line, read_entries, stamp
from acqd.finalize.layout import DIGESTS
from acqd.finalize.scrub import scrub_session
from acqd.service.procs import wait_until
from acqd.session import read_session
from acqd.sim.simulate import Rig, SimParams
from sessions import Recording, record_session, small_config, working_copy
from tests import zygote
from tests.conftest import recording, write_rig
from tests.faults.test_rows_finalize import index_row, overwrite, stored_row_bytes

SID = "B1"
TIMEOUT_S = 60
PROBE = "streams/probe.h5"


pytestmark = pytest.mark.xdist_group("rows_bitrot")  # one xdist worker: the module-scoped session is built once


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    cfg = small_config(tmp_path_factory.mktemp("rows-bitrot"))
    return record_session(cfg, Rig(cfg, SimParams(seed=7, seconds=20)), SID, Recording(seconds=4.0))


@pytest.fixture
def session(recorded, tmp_path) -> Iterator[Path]:
    yield from working_copy(recorded, tmp_path)


def hash_parts(folder: Path) -> dict:
    """Run the daemon's hasher process over every part of the session (as it does while recording)."""
    parts = [{"path": p["path"], "stream": name} for name, s in read_session(folder)["streams"].items()
             for p in s["parts"]]
    done = subprocess.run([sys.executable, "-m", "acqd.finalize.hasher", str(folder), str(os.getpid())],
                          input="".join(json.dumps(p) + "\n" for p in parts), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    entries = read_entries(folder)
    assert {p["path"] for p in parts} <= set(entries)
    return entries


def corrupt_chunk(folder: Path, k: int) -> tuple[int, int, int, int]:
    """(offset in the file, first row, end row, seq) of a 64-byte span inside probe index row ``k``'s rows."""
    a, b, seq = index_row(folder / PROBE, k)
    offset, row_bytes = stored_row_bytes(folder / PROBE, a + 1)
    assert row_bytes >= 64
    return offset, a, b, seq


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(folder: Path) -> dict[str, str]:
    return dict(line.split("  ", 1)[::-1] for line in (folder / MANIFEST).read_text().splitlines())


def assert_scrub_names(record: dict, folder: Path, a: int, b: int, seq: int) -> None:
    details = [i["detail"] for i in record["incidents"]]
    assert record["state"] == "failed" and f"{PROBE}: contents changed" in details
    chunk = f"{PROBE} rows [{a}, {b}) (stream 'probe', seq {seq}): checksum mismatch"
    assert chunk in details
    (found,) = [i for i in record["incidents"] if i["detail"] == chunk]
    assert found["kind"] == "scrub_mismatch" and found["file"] == PROBE
    assert found["chunk"] == {"stream": "probe", "rows": [a, b], "seq": seq, "problem": "checksum mismatch"}
    assert not is_verified(folder) and verification(folder)["state"] == "failed"
    assert json.loads((folder / "scrub.json").read_text())["state"] == "failed"


# -- row 34: a part corrupted while its digest stays trusted -------------------------------------------------------


def test_row34_a_part_corrupted_under_a_digest_that_stays_trusted_is_sealed_unverified_and_scrubbed(session):
    early = hash_parts(session)[PROBE]
    offset, a, b, seq = corrupt_chunk(session, 7)
    overwrite(session / PROBE, offset, 64)
    # What bit rot leaves: the recording-time line (digest and chunk checks of the bytes as recorded) still matching
    # the file's stamp. open(r+b) moved the ctime, so the line is brought up to the new stamp, with a valid check.
    now = dict(zip(("size", "mtime_ns", "ctime_ns", "inode"), stamp(session / PROBE)))
    with open(session / DIGESTS, "ab") as f:
        f.write(entry_line(dataclasses.replace(early, **now)))

    report = finalize_session(session)
    assert report.state == "finalized" and report.integrity["corrupt"] == []  # finalize did not read it again...
    assert PROBE in report.trusted_from_recording and report.verification == "pending"  # ...and says so
    qc = json.loads((session / "qc" / "qc.json").read_text())
    assert PROBE in qc["trusted_from_recording"]
    assert PROBE in (session / "qc" / "index.html").read_text()
    assert manifest(session)[PROBE] == early.sha256 != sha256(session / PROBE)  # the manifest: bytes as recorded
    assert not is_verified(session) and verification(session)["state"] == "pending"

    cli = zygote.run([sys.executable, "-m", "acqd.cli", "verify", str(session)], capture_output=True, text=True,
                     timeout=TIMEOUT_S)
    assert cli.returncode == 1, cli.stdout + cli.stderr
    assert f"{PROBE} rows [{a}, {b}) (stream 'probe', seq {seq}): checksum mismatch" in cli.stdout.splitlines()
    assert_scrub_names(json.loads((session / "scrub.json").read_text()), session, a, b, seq)


def test_row34_a_clean_session_is_verified_only_after_the_scrub_and_not_after_its_manifest_changes(session):
    hash_parts(session)
    report = finalize_session(session)
    assert set(report.trusted_from_recording) >= {PROBE} and not is_verified(session)
    record = scrub_session(session)
    assert record["state"] == "verified" and record["incidents"] == [] and record["chunks_checked"] > 0
    assert record["files"] == len(manifest(session)) and is_verified(session)
    assert finalize_session(session).verification == "verified"  # a rerun only verifies, and reports it
    unseal_session(session)  # an edit of the manifest (an amend rewrites it) voids the verification
    with open(session / MANIFEST, "a") as f:
        f.write(f"{'0' * 64}  extra\n")
    assert verification(session)["state"] == "stale" and not is_verified(session)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          timeout=TIMEOUT_S).stdout.strip()  # a scrub killed mid-way leaves 'running' and its pid
    (session / "scrub.json").write_text(json.dumps({**record, "state": "running", "pid": int(gone)}))
    assert verification(session)["state"] == "interrupted" and not is_verified(session)


# -- row 38: digest lines that lie ----------------------------------------------------------------------------------


def test_row38_a_forged_digest_line_is_ignored_and_the_part_hashed_again(session):
    hash_parts(session)
    overwrite(session / PROBE, corrupt_chunk(session, 3)[0], 64)
    # A line written by hand for the corrupted part: the file's stamp now, the digest and the clean chunk checks
    # of the part as recorded, with no check, then with a wrong one.
    forged = {**dataclasses.asdict(read_entries(session)[PROBE]),
              **dict(zip(("size", "mtime_ns", "ctime_ns", "inode"), stamp(session / PROBE)))}
    with open(session / DIGESTS, "ab") as f:
        f.write(json.dumps(forged).encode() + b"\n" + json.dumps({**forged, "check": "0" * 64}).encode() + b"\n")

    report = finalize_session(session, accept_corrupt=True)
    assert PROBE not in report.trusted_from_recording
    assert manifest(session)[PROBE] == sha256(session / PROBE)  # hashed again: the manifest holds the bytes
    assert [c["part"] for c in report.integrity["corrupt"]] == [PROBE]  # chunks checked again: the flip found
    assert f"{DIGESTS}: 2 line(s) ignored (torn, edited, or without a valid check); the files they describe are " \
           "hashed again" in report.warnings


def test_row38_a_torn_digest_line_that_still_parses_is_ignored_and_the_part_hashed_again(session):
    entries = hash_parts(session)
    overwrite(session / PROBE, corrupt_chunk(session, 5)[0], 64)
    # A write torn inside the sha256: the line's second half holds the same-length bytes of another line, so it still
    # parses, with the file's current stamp and a digest that is no file's.
    line = entry_line(dataclasses.replace(entries[PROBE], **dict(zip(("size", "mtime_ns", "ctime_ns", "inode"),
                                                                       stamp(session / PROBE))))).decode()
    digest = entries[PROBE].sha256
    torn = line.replace(digest, digest[:32] + entries["streams/nidaq.h5"].sha256[32:])
    assert json.loads(torn)["path"] == PROBE
    with open(session / DIGESTS, "a") as f:
        f.write(torn)

    report = finalize_session(session, accept_corrupt=True)
    assert PROBE not in report.trusted_from_recording and "streams/nidaq.h5" in report.trusted_from_recording
    assert manifest(session)[PROBE] == sha256(session / PROBE)
    assert [c["part"] for c in report.integrity["corrupt"]] == [PROBE]


# -- row 38: bytes flipped on the block device after the hasher ran --------------------------------------------------


@pytest.fixture
def ext4(tmp_path) -> Path:
    """An ext4 file system in a 64 MiB image, loop-mounted; yields the mount point (its loop device in .device)."""
    if os.geteuid() != 0:
        pytest.skip("loop mounts need root")
    image, mnt = tmp_path / "ext4.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, timeout=TIMEOUT_S)
    device = subprocess.run(["losetup", "--find", "--show", str(image)], check=True, capture_output=True, text=True,
                            timeout=TIMEOUT_S).stdout.strip()
    try:
        subprocess.run(["mount", device, str(mnt)], check=True, timeout=TIMEOUT_S)
        try:
            (mnt / ".device").write_text(device)
            yield mnt
        finally:
            unseal_session(mnt)
            subprocess.run(["umount", str(mnt)], check=True, timeout=TIMEOUT_S)
    finally:
        subprocess.run(["losetup", "-d", device], check=True, timeout=TIMEOUT_S)


def physical_offset(path: Path, offset: int) -> int:
    """Where byte ``offset`` of ``path`` lies on its block device (filefrag's extents, in bytes)."""
    out = subprocess.run(["filefrag", "-s", "-v", "-b1", str(path)], check=True, capture_output=True, text=True,
                         timeout=TIMEOUT_S).stdout
    for m in re.finditer(r"^\s*\d+:\s*(\d+)\.\.\s*(\d+):\s*(\d+)\.\.\s*\d+:", out, re.M):
        first, last, physical = map(int, m.groups())
        if first <= offset <= last:
            return physical + offset - first
    raise AssertionError(f"byte {offset} of {path} is in no extent:\n{out}")


def flip_on_device(device: str, where: int, n: int) -> None:
    """XOR ``n`` bytes at ``where`` of the block device, with O_DIRECT (no page cache on the way) in whole blocks."""
    block = 4096
    start = where // block * block
    span = (where + n - start + block - 1) // block * block
    buf = mmap.mmap(-1, span)  # page-aligned, as O_DIRECT requires
    fd = os.open(device, os.O_RDWR | os.O_DIRECT)
    try:
        assert os.preadv(fd, [buf], start) == span
        i = where - start
        buf[i:i + n] = bytes(x ^ 0xA5 for x in buf[i:i + n])
        assert os.pwritev(fd, [buf], start) == span
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_cached(path: Path) -> None:
    """Forget the file's cached pages, so that the next read sees the device (the file is sealed: open read-only)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    Path("/proc/sys/vm/drop_caches").write_text("1")


def test_row38_bytes_flipped_on_the_block_device_after_hashing_are_found_by_the_scrub_and_never_verified(ext4,
                                                                                                         tmp_path):
    cfg = small_config(ext4 / "data")
    folder = record_session(cfg, Rig(cfg, SimParams(seed=7, seconds=20)), SID, Recording(seconds=4.0))
    early = hash_parts(folder)[PROBE]
    part = folder / PROBE
    offset, a, b, seq = corrupt_chunk(folder, 7)
    before, old = os.stat(part), part.read_bytes()[offset:offset + 64]
    subprocess.run(["sync"], check=True, timeout=TIMEOUT_S)

    flip_on_device((ext4 / ".device").read_text(), physical_offset(part, offset), 64)
    drop_cached(part)
    after = os.stat(part)
    assert part.read_bytes()[offset:offset + 64] == bytes(x ^ 0xA5 for x in old)  # the file system reads the flip
    assert stamp(part) == early.stamp and (before.st_ctime_ns, before.st_mtime_ns, before.st_size, before.st_ino) \
        == (after.st_ctime_ns, after.st_mtime_ns, after.st_size, after.st_ino)  # and nothing it keeps has changed

    report = finalize_session(folder)
    assert report.state == "finalized" and PROBE in report.trusted_from_recording
    assert manifest(folder)[PROBE] == early.sha256  # the manifest holds the bytes as recorded
    assert not is_verified(folder)
    record = scrub_session(folder)
    assert_scrub_names(record, folder, a, b, seq)
    assert [i["file"] for i in record["incidents"]] == [PROBE, PROBE]  # nothing else differs


# -- row 38 through the daemon: the scrub after a finalize job -------------------------------------------------------


@pytest.mark.e2e
def test_row38_the_daemon_scrubs_a_finalized_session_and_raises_an_incident_naming_file_and_chunk(tmp_path,
                                                                                                  daemon_factory):
    rig_file = write_rig(tmp_path, stream_overrides={"camera": {"shape": [48, 64]}})  # small frames: a quick finalize
    daemon = daemon_factory(rig_file)
    with recording(daemon, rig_file, "rot", seed=8) as (_, folder):
        wait_until(lambda: daemon.command("status")["session"]["elapsed_s"] > 0.5, "0.5 s of recording", 60)
        daemon.command("stop")
    part = folder / "streams" / "probe.h5"
    wait_until(lambda: "streams/probe.h5" in read_entries(folder) and daemon.command("status")[
        "hash_backlog_bytes"] == 0, "the hasher to finish", 30)
    early = read_entries(folder)["streams/probe.h5"]
    offset, a, b, seq = corrupt_chunk(folder, 3)
    overwrite(part, offset, 64)
    with open(folder / DIGESTS, "ab") as f:  # the line as bit rot leaves it (see the row 34 test above)
        f.write(entry_line(dataclasses.replace(early, **dict(zip(("size", "mtime_ns", "ctime_ns", "inode"),
                                                                  stamp(part))))))
    try:
        incidents = []
        with httpx.Client(base_url=daemon.url, timeout=httpx.Timeout(30, read=60)) as http:
            with http.stream("GET", "/api/events") as resp:  # subscribed before the job starts
                daemon.command("finalize", session="rot")
                kind, deadline = None, time.monotonic() + 90
                for line in resp.iter_lines():
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: ") and kind == "incident":
                        incidents.append(json.loads(line[6:]))
                        if incidents[-1]["kind"] == "scrub_mismatch" and incidents[-1].get("chunk"):
                            break
                    assert time.monotonic() < deadline, f"no scrub incident; saw {incidents[-5:]}"
            wait_until(lambda: daemon.command("status")["scrubs"].get("rot") == "failed", "the scrub to end", 60)
            assert not is_verified(folder)
            row = next(s for s in http.get("/api/console/sessions").json()["sessions"] if s["session_id"] == "rot")
            assert row["state"] == "finalized" and row["verification"] == "failed"
        found = incidents[-1]
        assert found["session"] == "rot" and found["file"] == "streams/probe.h5" and found["stream"] == "probe"
        assert found["detail"] == f"streams/probe.h5 rows [{a}, {b}) (stream 'probe', seq {seq}): checksum mismatch"
    finally:
        unseal_session(folder)
