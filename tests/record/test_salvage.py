"""Salvage of a truncated part (row 37): the prefix its index proves, at any cut, and nothing it does not prove."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from acqd.config import StreamConfig
from acqd.record.salvage import salvage_part
from acqd.record.streamfile import committed_rows

CFG = StreamConfig(name="s", endpoint="ipc:///x", dtype="int16", shape=(64,), rate=1000.0, chunk_rows=100)
HERE = Path(__file__).resolve().parents[2]
MESSAGES, ROWS = 300, 100


def _part(path: Path, close: bool) -> Path:
    """A real part of 300 messages of 100 rows (message i holds the value i), flushed and fsynced every 5
    messages as a writer does; ``close=False``: left open for writing, as a killed writer's."""
    code = (f"import numpy as np, os\nfrom pathlib import Path\nfrom acqd.config import StreamConfig\n"
            f"from acqd.record.streamfile import StreamFile\n"
            f"cfg = StreamConfig.model_validate_json({CFG.model_dump_json()!r})\n"
            f"sf = StreamFile.create(Path({str(path)!r}), cfg, session={{}}, lines=[])\n"
            f"for i in range({MESSAGES}):\n"
            f"    sf.append(np.full(({ROWS}, 64), i, np.int16), (i, 1, {ROWS}, {ROWS} * i, 0, 0, 0))\n"
            "    if i % 5 == 4:\n        sf.flush(True)\n" + ("sf.close()\n" if close else "os._exit(9)\n"))
    subprocess.run([sys.executable, "-c", code], check=False, timeout=60, env={**os.environ, "PYTHONPATH": str(HERE)})
    return path


@pytest.mark.parametrize("close", [True, False], ids=["closed", "killed_writer"])
def test_row37_salvage_at_ten_cuts_keeps_exactly_the_proven_prefix(tmp_path, close):
    # Issue 22 defect 1: "recovery copies what the index proves and reports the rest"; a truncated part was lost whole.
    part = _part(tmp_path / "s.h5", close)
    with h5py.File(part, "r", swmr=not close) as f:
        assert committed_rows(f) == MESSAGES * ROWS
        data = f["data"]
        ends = sorted(c.byte_offset + c.size for c in (data.id.get_chunk_info(k) for k in range(data.id.get_num_chunks())))
    size = part.stat().st_size
    salvaged = []
    for k in range(1, 11):
        cut = size * k // 10 - (k == 10)  # ten cuts, the last one byte short
        cut_part = tmp_path / "cut.h5"
        shutil.copyfile(part, cut_part)
        os.truncate(cut_part, cut)
        out = tmp_path / f"out{k}.h5"
        got = salvage_part(cut_part, out, tmp_path / "scratch.h5")
        assert got.bytes == cut and got.expected_bytes == size and got.problem is None
        assert not (tmp_path / "scratch.h5").exists()
        # Every chunk wholly below the cut is kept, up to the first that is not (the chunks of /data are written
        # in order, and every message fills exactly one), and nothing else.
        assert got.rows == ROWS * next(i for i, e in enumerate(ends + [float("inf")]) if e > cut)
        assert got.index_rows == got.rows // ROWS and got.listed_index_rows == MESSAGES
        with h5py.File(out, "r") as f:  # a clean part: opens without SWMR, its extent is its proven rows
            assert f["data"].shape[0] == committed_rows(f) == got.rows == f.attrs["salvaged_rows"]
            kept = f["data"][:]
            assert np.array_equal(kept[:, 0], np.repeat(np.arange(got.index_rows), ROWS).astype(np.int16))
        salvaged.append(got.rows)
    assert salvaged == sorted(salvaged) and salvaged[-1] == (MESSAGES - 1) * ROWS
    print(f"{'closed' if close else 'killed writer'}: rows salvaged at cuts of 10..100 %: {salvaged} of "
          f"{MESSAGES * ROWS}")


def test_row37_a_part_cut_inside_its_header_salvages_nothing_and_says_why(tmp_path):
    part = _part(tmp_path / "s.h5", close=True)
    os.truncate(part, 1024)
    got = salvage_part(part, tmp_path / "out.h5", tmp_path / "scratch.h5")
    assert got.rows == got.index_rows == 0 and "HDF5 cannot read what is left of it" in got.problem
    assert not (tmp_path / "out.h5").exists() and not (tmp_path / "scratch.h5").exists()
