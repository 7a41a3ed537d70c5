"""Reading a part nobody vouches for: the superblock's end of file read without HDF5, refusals, deadlines."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from acqd.config import StreamConfig
from acqd.record.partread import UnreadablePart, open_for_read, probe_parts
from acqd.record.superblock import SIGNATURE, left_open, part_problem, read_head, superblock_eof

CFG = StreamConfig(name="s", endpoint="ipc:///x", dtype="int16", shape=(4,), rate=1000.0, chunk_rows=100)
HERE = Path(__file__).resolve().parents[2]


def _part(path: Path, close: bool = True) -> Path:
    """A real stream part with 2000 committed rows; ``close=False``: left open for writing, as a killed writer's."""
    code = (f"import numpy as np, os\nfrom pathlib import Path\nfrom acqd.config import StreamConfig\n"
            f"from acqd.record.streamfile import StreamFile\n"
            f"cfg = StreamConfig.model_validate_json({CFG.model_dump_json()!r})\n"
            f"sf = StreamFile.create(Path({str(path)!r}), cfg, session={{}}, lines=[])\n"
            "for i in range(20):\n    sf.append(np.full((100, 4), i, np.int16), (i, 1, 100, 100 * i, 0, 0, 0))\n"
            "sf.flush(True)\n" + ("sf.close()\n" if close else "os._exit(9)\n"))
    subprocess.run([sys.executable, "-c", code], check=False, timeout=60, env={**os.environ, "PYTHONPATH": str(HERE)})
    return path


# -- the superblock, without HDF5 ------------------------------------------------------------------------------


@pytest.mark.parametrize("libver", ["earliest", "v108", "latest"])  # superblock versions 0, 2, 3
def test_superblock_eof_is_the_size_hdf5_writes(tmp_path, libver):
    path = tmp_path / "f.h5"
    with h5py.File(path, "w", libver=(libver, "latest") if libver != "earliest" else "earliest") as f:
        f["x"] = np.arange(1000)
    head = path.read_bytes()
    assert head[8] in ({"earliest": 0, "v108": 2, "latest": 3}[libver], 1)
    assert superblock_eof(head) == path.stat().st_size
    assert part_problem(path) is None


def test_superblock_after_a_user_block_records_the_whole_file(tmp_path):
    path = tmp_path / "ub.h5"
    with h5py.File(path, "w", userblock_size=1024) as f:
        f["x"] = np.arange(10)
    assert path.read_bytes()[1024:1032] == SIGNATURE and superblock_eof(path.read_bytes()) == path.stat().st_size


def test_version_1_superblock_has_its_four_extra_bytes():
    # v1: 4 bytes (indexed-storage K, reserved) before the addresses; offsets of 8 bytes.
    head = SIGNATURE + bytes([1, 0, 0, 0, 0, 8, 8, 0]) + b"\x04\x00\x10\x00" + b"\0" * 4 + b"\x20\x00\0\0"
    head += (0).to_bytes(8, "little") + (2**64 - 1).to_bytes(8, "little") + (4096).to_bytes(8, "little")
    assert superblock_eof(head + b"\0" * 64) == 4096
    assert superblock_eof(head[:-1]) is None  # cut inside the end-of-file address


@pytest.mark.parametrize("head", [b"", b"\0" * 4096, SIGNATURE, SIGNATURE + b"\x07" + b"\0" * 60,
                                  SIGNATURE + bytes([3, 3]) + b"\0" * 60,  # 3-byte offsets: not allowed
                                  SIGNATURE + bytes([3, 8, 8, 0]) + b"\xff" * 48])  # undefined addresses
def test_no_readable_superblock_is_none(head):
    assert superblock_eof(head) is None


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=3000), st.sampled_from([0, 512, 1024, 2048]), st.integers(0, 255))
def test_hostile_bytes_never_raise_and_the_answer_lies_within_the_offsets_size(tail, at, version):
    head = b"\0" * at + SIGNATURE + bytes([version]) + tail
    eof = superblock_eof(head)
    assert eof is None or 0 <= eof < 2**256


# -- refusing before HDF5 sees the file --------------------------------------------------------------------------


@pytest.mark.parametrize("close", [True, False], ids=["closed", "killed_writer"])
@pytest.mark.parametrize("size", [0, 1024, "minus1"])
def test_row37_a_truncated_or_empty_part_is_refused_at_once_never_opened_in_swmr_mode(tmp_path, close, size):
    # Issue 22 defect 1: the SWMR retry of a truncated file succeeded and reading /index then hung for > 600 s.
    path = _part(tmp_path / "s.h5", close=close)
    full = path.stat().st_size
    os.truncate(path, full - 1 if size == "minus1" else size)
    t = time.monotonic()
    with pytest.raises(UnreadablePart, match="truncated|empty"):
        open_for_read(path)
    assert time.monotonic() - t < 1.0
    health = probe_parts([path])[path]
    assert health.rows is None and health.bytes == path.stat().st_size and health.empty == (size == 0)


def test_row37_probe_reads_healthy_parts_and_kills_a_reader_that_hangs(tmp_path):
    good = _part(tmp_path / "good.h5")
    crashed = _part(tmp_path / "crashed.h5", close=False)  # SWMR flag still set: opened in SWMR mode
    hung = _part(tmp_path / "hung.h5", close=False)
    raw = bytearray(hung.read_bytes())
    with h5py.File(good, "r") as f:  # the same layout: /index's object header is at the same address
        at = h5py.h5o.get_info(f["index"].id).addr
    raw[at + 8:at + 40] = bytes(b ^ 0x5A for b in raw[at + 8:at + 40])  # a garbled header, size unchanged
    hung.write_bytes(raw)
    assert part_problem(hung) is None  # not truncated: only a deadline can save the reader
    t = time.monotonic()
    found = probe_parts([good, hung, crashed], timeout_s=3.0)
    assert time.monotonic() - t < 20
    assert found[good].rows == found[crashed].rows == 2000 and found[good].problem is None
    assert found[hung].rows is None and "no answer within 3 s" in found[hung].problem
    assert not [p for p in _children() if "acqd.record.partread" in p]  # the hung reader was killed


def _children() -> list[str]:
    me = os.getpid()
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == me:
            out.append(cmd)
    return out



def test_left_open_tells_a_killed_writers_part_from_a_closed_one(tmp_path):
    closed = _part(tmp_path / "closed.h5")
    killed = _part(tmp_path / "killed.h5", close=False)
    assert not left_open(read_head(closed)[1]) and left_open(read_head(killed)[1])
    assert left_open(b"") and left_open(b"\0" * 600)  # no superblock: nobody vouches for it
