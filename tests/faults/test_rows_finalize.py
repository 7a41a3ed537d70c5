"""Fault-matrix rows of finalize and of the files it reads (../shared/fault-matrix.md, docs/faults.md).

Rows proven elsewhere, named after their row there:
- row 21 (finalize twice):
  tests/finalize/test_finalize.py::test_row21_finalize_twice_gives_identical_bytes_and_changes_nothing
- row 22 (finalize while recording): tests/finalize/test_finalize.py::test_row22_finalize_while_recording_is_refused
- row 5 (power loss) cannot run here (LazyFS needs FUSE and root mounts): docs/faults.md; the nearest test that
  runs is tests/record/test_streamfile.py::test_flush_fsyncs_the_file_itself_when_due.

A small session (tests/sessions.py, 4 s of the example rig, the sensor gzip-compressed) is recorded once per
module; every test finalizes its own copy, unsealed at teardown.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

from acqd.config import StreamConfig
from acqd.errors import FinalizeError
from acqd.finalize import MANIFEST, finalize_session, is_immutable, unseal_session, verify_manifest
from acqd.finalize.streams import read_stream
from acqd.record.streamfile import committed_rows, open_for_read
from acqd.session import SESSION_FILE, write_json_atomic
from acqd.sim.simulate import Rig, SimParams
from tests import zygote
from sessions import Recording, record_session, small_config, working_copy

SID = "F1"
TIMEOUT_S = 60


pytestmark = pytest.mark.xdist_group("rows_finalize")  # one xdist worker: the module-scoped session is built once


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    """A closed session: probe, nidaq (reference), camera, sensor (gzip)."""
    cfg = small_config(tmp_path_factory.mktemp("rows-finalize"))
    cfg = cfg.model_copy(update={"streams": tuple(s.model_copy(update={"compression": "gzip"}) if s.name == "sensor"
                                                  else s for s in cfg.streams)})
    return record_session(cfg, Rig(cfg, SimParams(seed=5, seconds=20)), SID, Recording(seconds=4.0))


@pytest.fixture
def session(recorded, tmp_path) -> Iterator[Path]:
    yield from working_copy(recorded, tmp_path)


def snapshot(folder: Path) -> dict[str, tuple[bytes, int, bool]]:
    """(bytes, mode, immutable) of every file, links not followed."""
    out = {}
    for d, _, names in os.walk(folder):
        for n in names:
            p = Path(d) / n
            out[str(p.relative_to(folder))] = ((os.readlink(p).encode(), 0, False) if p.is_symlink()
                                               else (p.read_bytes(), p.stat().st_mode, is_immutable(p)))
    return out


def stored_row_bytes(path: Path, row: int) -> tuple[int, int]:
    """(file offset, length) of one row of an uncompressed stream's /data, from HDF5's chunk info."""
    with h5py.File(path, "r") as f:
        data = f["data"]
        per_chunk = data.chunks[0]
        info = data.id.get_chunk_info_by_coord((row // per_chunk * per_chunk, *([0] * (data.ndim - 1))))
        assert info.filter_mask == 0 and data.compression is None
        row_bytes = data.dtype.itemsize * int(np.prod(data.shape[1:]))
        return info.byte_offset + (row % per_chunk) * row_bytes, row_bytes


def overwrite(path: Path, offset: int, n: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in old))


def index_row(path: Path, k: int) -> tuple[int, int, int]:
    """(first file row, end file row, seq) of index row ``k``."""
    with open_for_read(path) as f:
        r = f["index"][k]
        return int(r["file_row"]), int(r["file_row"]) + int(r["n_samples"]), int(r["seq"])


# -- row 34: a stream file corrupted on disk before finalize ---------------------------------------------------


def test_row34_corrupt_chunk_is_reported_per_chunk_and_nothing_is_sealed(session):
    probe = session / "streams" / "probe.h5"
    a, b, seq = index_row(probe, 7)
    offset, row_bytes = stored_row_bytes(probe, a + 3)
    overwrite(probe, offset, row_bytes)  # one row inside index row 7's chunk
    before = snapshot(session)
    with pytest.raises(FinalizeError) as e:
        finalize_session(session)
    assert f"streams/probe.h5 rows [{a}, {b}) (stream 'probe', seq {seq}): checksum mismatch" in str(e.value)
    assert "1 chunk(s) do not match" in str(e.value)
    assert snapshot(session) == before  # nothing sealed, hashed into a manifest, or changed; state still closed
    assert json.loads((session / SESSION_FILE).read_text())["state"] == "closed"


def test_row34_accept_corrupt_seals_with_the_corruption_recorded(session):
    probe = session / "streams" / "probe.h5"
    a, b, seq = index_row(probe, 2)
    overwrite(probe, *stored_row_bytes(probe, a))
    report = finalize_session(session, accept_corrupt=True)
    corrupt = [{"stream": "probe", "part": "streams/probe.h5", "rows": (a, b), "seq": seq,
                "problem": "checksum mismatch"}]
    assert report.state == "finalized" and report.integrity["corrupt"] == corrupt and report.integrity["accepted"]
    assert "1 corrupt chunk(s) accepted" in report.message
    qc = json.loads((session / "qc" / "qc.json").read_text())
    assert qc["integrity"]["corrupt"] == [{**corrupt[0], "rows": [a, b]}]
    record = json.loads((session / SESSION_FILE).read_text())["finalize"]["integrity"]
    assert record["accepted"] and record["corrupt"] == [f"streams/probe.h5 rows [{a}, {b}) (stream 'probe', "
                                                        f"seq {seq}): checksum mismatch"]
    assert record["chunks_checked"] == report.integrity["chunks_checked"] > 0
    assert verify_manifest(session) == []


def test_row34_a_corrupt_compressed_chunk_is_found_too(session):
    sensor = session / "streams" / "sensor.h5"
    with h5py.File(sensor, "r") as f:
        info = f["data"].id.get_chunk_info(0)  # the first stored (gzip) chunk
        rows_per_chunk = f["data"].chunks[0]
    overwrite(sensor, info.byte_offset + info.size // 2, 64)
    with pytest.raises(FinalizeError) as e:
        finalize_session(session)
    listed = [line for line in str(e.value).splitlines() if "streams/sensor.h5 rows" in line]
    assert listed and all(int(line.split("[")[1].split(",")[0]) < rows_per_chunk for line in listed)
    assert not (session / MANIFEST).exists()


def test_row34_files_without_checksums_are_reported_not_checksummed(session):
    nidaq = session / "streams" / "nidaq.h5"
    with h5py.File(nidaq, "r+") as f:  # as format 1 wrote it: /index without crc32
        index = f["index"][:]
        old = index[[n for n in index.dtype.names if n != "crc32"]]
        del f["index"]
        f.create_dataset("index", data=np.array(old.tolist(), dtype=[(n, index.dtype[n]) for n in old.dtype.names]),
                         maxshape=(None,), chunks=(4096,))
    report = finalize_session(session)
    assert report.integrity["not_checksummed"] == ["streams/nidaq.h5"] and not report.integrity["corrupt"]
    assert "streams/nidaq.h5: written without chunk checksums (not checksummed)" in report.warnings


# -- row 35: links and unknown files in a session folder; session.json edited after finalize ------------------


def test_row35_a_planted_part_symlink_is_refused_not_adopted(session, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    foreign = outside / "foreign.h5"
    shutil.copy(session / "streams" / "probe.h5", foreign)
    os.symlink(foreign, session / "streams" / "probe.part009.h5")
    os.symlink(outside / "victim.txt", session / "notes.txt")
    (outside / "victim.txt").write_text("keep me writable")
    outside_before, before = snapshot(outside), snapshot(session)
    with pytest.raises(FinalizeError) as e:
        finalize_session(session)
    text = str(e.value)
    assert f"streams/probe.part009.h5: a symbolic link (to {foreign})" in text
    assert f"notes.txt: a symbolic link (to {outside / 'victim.txt'})" in text
    assert snapshot(outside) == outside_before and snapshot(session) == before  # no chmod, no hash, no link


def test_row35_unknown_files_and_folders_are_refused_by_path(session):
    (session / "streams" / "probe.backup.h5").write_bytes(b"x")
    (session / "scratch").mkdir()
    before = snapshot(session)
    with pytest.raises(FinalizeError) as e:
        finalize_session(session)
    assert "streams/probe.backup.h5: not a file acqd writes" in str(e.value)
    assert "scratch/: not a folder acqd writes" in str(e.value)
    assert snapshot(session) == before


def test_row35_a_part_path_outside_streams_in_session_json_is_refused(session, tmp_path):
    record = json.loads((session / SESSION_FILE).read_text())
    record["streams"]["probe"]["parts"].append({"part": 1, "path": "../../outside.h5", "rows": 0})
    write_json_atomic(session / SESSION_FILE, record)
    with pytest.raises(FinalizeError, match=r"lists '../../outside.h5' as a part of 'probe'"):
        finalize_session(session)


def test_row35_session_json_edited_after_finalize_is_reported(session):
    finalize_session(session)
    listed = dict(reversed(line.split("  ", 1)) for line in (session / MANIFEST).read_text().splitlines())
    assert listed[SESSION_FILE] == hashlib.sha256((session / SESSION_FILE).read_bytes()).hexdigest()
    unseal_session(session)
    record = json.loads((session / SESSION_FILE).read_text())
    record["incomplete"] = not record["incomplete"]
    write_json_atomic(session / SESSION_FILE, record)
    assert verify_manifest(session) == [f"{SESSION_FILE}: contents changed"]
    with pytest.raises(FinalizeError, match=f"does not match its manifest:\n  {SESSION_FILE}: contents changed"):
        finalize_session(session)
    os.symlink("/etc/hostname", session / "qc" / "extra")
    cli = zygote.run([sys.executable, "-m", "acqd.cli", "verify", str(session)], capture_output=True, text=True,
                     timeout=TIMEOUT_S)
    assert cli.returncode == 1
    assert cli.stdout.splitlines() == [f"{SESSION_FILE}: contents changed", "qc/extra: a symbolic link, not in the "
                                       "manifest"]


# -- row 23: read-only edge cases ----------------------------------------------------------------------------

OPEN_RPLUS = textwrap.dedent("""
    import os, sys, h5py
    if len(sys.argv) > 2:
        os.setgid(int(sys.argv[3])); os.setuid(int(sys.argv[2]))
    try:
        h5py.File(sys.argv[1], "r+")
    except OSError as e:
        print("refused:", e)
        sys.exit(3)
    sys.exit(0)
""")


@pytest.mark.skipif(os.geteuid() != 0, reason="setuid and chattr +i need root")
def test_row23_finalized_files_refuse_r_plus_as_another_user_and_as_root(session, tmp_path):
    report = finalize_session(session)
    before = snapshot(session)
    nobody = pwd.getpwnam("nobody")
    for rel in ("streams/probe.h5", f"{SID}.nwb"):
        as_nobody = subprocess.run([sys.executable, "-c", OPEN_RPLUS, str(session / rel), str(nobody.pw_uid),
                                    str(nobody.pw_gid)], capture_output=True, text=True, timeout=TIMEOUT_S)
        assert as_nobody.returncode == 3 and "refused" in as_nobody.stdout, as_nobody.stderr
        if report.sealed["immutable"]:  # root ignores 0444, not chattr +i
            as_root = subprocess.run([sys.executable, "-c", OPEN_RPLUS, str(session / rel)], capture_output=True,
                                     text=True, timeout=TIMEOUT_S)
            assert as_root.returncode == 3 and "refused" in as_root.stdout, as_root.stderr
    assert snapshot(session) == before and verify_manifest(session) == []


FINALIZE_AS = textwrap.dedent("""
    import os, sys
    from acqd.errors import AcqdError
    from acqd.finalize import finalize_session  # imported as root: the interpreter's stdlib may be under /root
    os.setgid(int(sys.argv[3])); os.setuid(int(sys.argv[2]))
    try:
        finalize_session(sys.argv[1])
    except AcqdError as e:
        print(e)
        sys.exit(3)
""")


@pytest.mark.skipif(os.geteuid() != 0, reason="setuid needs root")
def test_row23_finalize_by_a_user_who_may_not_write_is_refused_clearly(recorded):
    nobody = pwd.getpwnam("nobody")
    with tempfile_dir() as parent:  # under /tmp, readable by nobody (pytest's tmp_path is 0700)
        folder = parent / SID
        shutil.copytree(recorded, folder)
        (folder / SESSION_FILE).chmod(0o644)  # a session shared read-only: other users may read it, not write it
        before = snapshot(folder)
        run = subprocess.run([sys.executable, "-c", FINALIZE_AS, str(folder), str(nobody.pw_uid), str(nobody.pw_gid)],
                             capture_output=True, text=True, timeout=TIMEOUT_S)
        assert run.returncode == 3, run.stderr
        assert f"{SID}: finalize must write the session folder and seal its files" in run.stdout
        assert f"uid {nobody.pw_uid}" in run.stdout and "Traceback" not in run.stderr
        assert snapshot(folder) == before


class tempfile_dir:
    """A 0755 folder in /tmp, removed afterwards."""

    def __enter__(self) -> Path:
        import tempfile

        self.path = Path(tempfile.mkdtemp(prefix="acqd-row23-"))
        self.path.chmod(0o755)
        return self.path

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


# -- row 26: recovery of a crashed SWMR file works on a copy ----------------------------------------------------

KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys, numpy as np
    from acqd.config import StreamConfig
    from acqd.record.streamfile import StreamFile
    cfg = StreamConfig.model_validate_json(sys.argv[2])
    sf = StreamFile.create(sys.argv[1], cfg, session={}, lines=[])
    for i in range(25):
        sf.append(np.full((100, 4), i, np.int16), (i, 1, 100, 100 * i, 0, 0, 0))
        if i == 20:
            sf.flush(fsync=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_row26_recovery_of_a_crashed_swmr_file_works_on_a_copy(tmp_path):
    cfg = StreamConfig(name="s", endpoint="ipc:///x", dtype="int16", shape=(4,), rate=1000.0, chunk_rows=300)
    (tmp_path / "streams").mkdir()
    path = tmp_path / "streams" / "s.h5"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path), cfg.model_dump_json()], timeout=TIMEOUT_S)
    assert proc.returncode == -9
    with pytest.raises(OSError, match="already open for write"):
        h5py.File(path, "r")  # the SWMR-write flag is still set: a plain open fails
    digest, stat = hashlib.sha256(path.read_bytes()).hexdigest(), path.stat()
    stream = read_stream(tmp_path, cfg, [path])
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest and path.stat().st_mtime_ns == stat.st_mtime_ns
    part = stream.parts[0]
    assert part.recovered and part.link == tmp_path / "recovered" / "s.h5"
    with open_for_read(path) as original, h5py.File(part.link, "r") as copy:  # the copy opens plainly
        committed = committed_rows(original)
        assert committed == part.rows == 2100  # 21 appends flushed, 7 whole chunks of 300 rows
        assert np.array_equal(copy["data"][:], original["data"][:committed])
        assert np.array_equal(copy["index"][:], original["index"][:])


# -- row 28: a live preview reader while recording ----------------------------------------------------------

PREVIEW_READER = textwrap.dedent("""
    import sys, time, h5py
    with h5py.File(sys.argv[1], "r", libver="latest", swmr=True) as f:
        d = f["data"]
        print("open", d.shape[0], flush=True)
        deadline = time.monotonic() + float(sys.argv[2])
        while time.monotonic() < deadline:
            d.refresh()
            print(d.shape[0], flush=True)
            time.sleep(0.01)
""")


def test_row28_a_live_swmr_reader_sees_growth_and_never_blocks_the_writer(tmp_path):
    from acqd.record.streamfile import StreamFile

    cfg = StreamConfig(name="s", endpoint="ipc:///x", dtype="int16", shape=(4,), rate=1000.0, chunk_rows=100)
    path = tmp_path / "s.h5"
    sf = StreamFile.create(path, cfg, session={}, lines=[])
    reader = subprocess.Popen([sys.executable, "-c", PREVIEW_READER, str(path), "20"], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert reader.stdout.readline().startswith("open")
        slowest = 0.0
        for i in range(10):  # one "flush interval" per step: append a chunk, flush, wait until the reader sees it
            t = time.monotonic()
            sf.append(np.full((100, 4), i, np.int16), (i, 1, 100, 100 * i, 0, 0, 0))
            sf.flush(fsync=False)
            slowest = max(slowest, time.monotonic() - t)
            while int(reader.stdout.readline()) < 100 * (i + 1):
                pass
        assert slowest < 0.5  # the reader never held the writer up
    finally:
        reader.kill()
        reader.wait(TIMEOUT_S)
        reader.stdout.close()
        sf.close(fsync=False)
