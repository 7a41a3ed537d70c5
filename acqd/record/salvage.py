"""What a truncated part still proves: the prefix of its index whose rows are wholly on disk, copied to a clean part.

A part cut below its superblock's end of file (a crash, a full disk, a bad copy) cannot be opened by HDF5 as it
is: a plain open refuses it ("truncated file"), and SWMR-read mode, which skips that check, retries failed reads
of its metadata for ever (``acqd.record.superblock``). What lies below the cut is intact, though, and HDF5
allocates space at the end of the file as it grows: the superblock, the object headers and the first blocks of
each dataset's chunk index come first, the chunks follow in the order they were written. So ``salvage_part``:

1. copies the part and extends the copy with zeros (sparse) to the size its superblock records: HDF5 opens it,
   and whatever it reads from the missing end is zeros, which fail HDF5's metadata checksums (an error, never a
   hang: the copy is not short);
2. in a child process given a deadline (``python -m acqd.record.salvage``), locates every chunk of every dataset
   through HDF5 (``get_chunk_info_by_coord``) and trusts only rows in chunks wholly below the cut: the index rows
   so trusted whose ``/data`` rows are wholly below the cut, follow each other and match their crc32 are the
   prefix the index proves (the first row that does not ends it);
3. writes that prefix, its rows and the tables' trusted rows to a clean part (``write_clean_copy``, also the copy
   finalize makes of a part a killed writer left open); the rest is reported lost, with byte counts.

acqd never parses HDF5's chunk index itself (the design leaves HDF5's format to HDF5): a chunk whose address
sits in an index block beyond the cut cannot be located, even if its own bytes are below it, and ends the prefix
(measured in docs/faults.md, row 37).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from acqd.config import StreamConfig
from acqd.h5lock import written
from acqd.record.partread import PROBE_TIMEOUT_S, open_for_read
from acqd.record.streamfile import TABLES, dataset_options, rows_crc32
from acqd.record.superblock import read_head, superblock_eof

TABLE_NAMES = (*TABLES, "video")  # every table a part may hold (``video``: cameras encoded to video files)
_BLOCK_BYTES = 64 << 20  # /data rows are read (and copied) this many bytes at a time
SALVAGE_BYTES_PER_S = 20e6
"""The deadline of a salvage grows with the part: copy, read back, checksum and write (a slow disk's pace)."""


@dataclass(frozen=True)
class Salvaged:
    """What a salvage of a truncated part kept, and what it could not."""

    bytes: int
    """The part's size on disk."""
    expected_bytes: int
    """The size its superblock records: ``expected_bytes - bytes`` were cut off."""
    rows: int = 0
    """Rows of ``/data`` the index proves, copied to the clean part (0: nothing could be salvaged)."""
    index_rows: int = 0
    """Index rows (messages) proven and copied."""
    listed_index_rows: int = 0
    """Index rows found in chunks wholly below the cut; those beyond ``index_rows`` failed their proof."""
    data_bytes: int = 0
    """Bytes of the rows copied."""
    problem: str | None = None
    """Why nothing (more) could be salvaged, if HDF5 could not read the part at all."""


def write_clean_copy(src: h5py.File, out_path: Path, cfg: StreamConfig, rows: int, attrs: dict,
                     tables: dict[str, np.ndarray] | None = None) -> None:
    """Write ``src``'s first ``rows`` rows of ``/data`` and its tables (``tables``: the rows to keep of each; by
    default all of them) to a new file ``out_path``, with ``src``'s attributes and ``attrs``."""
    with written(out_path, "x", libver="latest") as out:
        out.attrs.update(dict(src.attrs))
        out.attrs.update(attrs)
        data = src["data"]
        n = 0 if cfg.video is not None else rows  # video-encoded: frames are in video/, /data stays empty
        dst = out.create_dataset("data", shape=(n, *data.shape[1:]), dtype=data.dtype, **dataset_options(cfg))
        dst.attrs.update(dict(data.attrs))
        step = max(1, _BLOCK_BYTES // max(1, cfg.sample_bytes))
        for a in range(0, n, step):
            dst[a:min(n, a + step)] = data[a:min(n, a + step)]
        for name in TABLE_NAMES:
            if name not in src:
                continue
            rows_of = src[name][:] if tables is None else tables[name]
            table = out.create_dataset(name, data=rows_of, maxshape=(None,), chunks=(4096,))
            table.attrs.update(dict(src[name].attrs))
        out["sync"].attrs.update(dict(src["sync"].attrs))


def trusted_rows(dset: h5py.Dataset, cut: int) -> int:
    """Rows of ``dset`` (along its first axis) from row 0 whose bytes lie wholly below byte ``cut``. A chunk cut
    through keeps its first rows when the dataset has no filter (a stored chunk is then its rows in order, as acqd
    chunks span whole rows); a filtered chunk is all or nothing."""
    n = dset.shape[0]
    if dset.chunks is None:  # contiguous: all or nothing (compact data lives in the object header, already read)
        offset = dset.id.get_offset()
        return n if offset is None or offset + dset.id.get_storage_size() <= cut else 0
    step = dset.chunks[0]
    row_bytes = dset.dtype.itemsize * int(np.prod(dset.chunks[1:], dtype=np.int64))
    plain = dset.id.get_create_plist().get_nfilters() == 0 and tuple(dset.chunks[1:]) == tuple(dset.shape[1:])
    for k in range(math.ceil(n / step)):
        info = dset.id.get_chunk_info_by_coord((k * step,) + (0,) * (dset.ndim - 1))
        if info.byte_offset is None:
            return k * step
        if info.byte_offset + info.size > cut:
            whole = max(0, cut - info.byte_offset) // row_bytes if plain else 0
            return min(n, k * step + whole)
    return n


def _readable_rows(f: h5py.File, name: str, cut: int) -> np.ndarray:
    """The rows of table ``name`` below the cut (none if HDF5 cannot read the table's own metadata)."""
    try:
        dset = f[name]
        return dset[:trusted_rows(dset, cut)]
    except (OSError, KeyError, ValueError, RuntimeError):
        return np.empty(0, dtype=f[name].dtype) if name in f else np.empty(0)


def proven_prefix(f: h5py.File, cut: int) -> tuple[int, int, int]:
    """(rows, index rows, index rows listed below the cut): the longest prefix of ``f``'s index whose rows lie
    below ``cut``, follow each other from row 0 and match their crc32 (parts written before the checksum column:
    lie below the cut)."""
    index = _readable_rows(f, "index", cut)
    data = f["data"]
    video = "video" in f
    below = trusted_rows(data, cut) if not video else 0
    checked = "crc32" in (index.dtype.names or ())
    row_bytes = max(1, data.dtype.itemsize * int(np.prod(data.shape[1:], dtype=np.int64)))
    end = proven = 0
    block, block_at = np.empty((0, *data.shape[1:]), data.dtype), 0
    for row in index:
        a, b = int(row["file_row"]), int(row["file_row"]) + int(row["n_samples"])
        if a != end or b == a or (not video and b > below):  # a zero-filled row holds no samples
            break
        if not video and checked:
            if b > block_at + len(block):  # read the next block of rows once
                block_at = a
                block = data[a:min(below, max(b, a + _BLOCK_BYTES // row_bytes))]
            if rows_crc32(block[a - block_at:b - block_at]) != int(row["crc32"]):
                break
        end, proven = b, proven + 1
    return end, proven, len(index)


def _keep(f: h5py.File, cut: int, rows: int, index_rows: int) -> dict[str, np.ndarray]:
    """The rows of each table the clean part keeps: the proven index, the rows' timestamps, gaps and video files
    within them, and whatever else lies below the cut (sync edges outside the rows are dropped by finalize)."""
    kept = {name: _readable_rows(f, name, cut) for name in TABLE_NAMES if name in f}
    kept["index"] = kept["index"][:index_rows]
    if "timestamps" in kept:
        kept["timestamps"] = kept["timestamps"][:rows]
    kept["gaps"] = kept["gaps"][kept["gaps"]["file_row"] <= rows] if len(kept["gaps"]) else kept["gaps"]
    if "video" in kept and len(kept["video"]):
        kept["video"] = kept["video"][kept["video"]["first_row"] + kept["video"]["n_frames"] <= rows]
    return kept


def _salvage_in_child(padded: Path, cut: int, out: Path) -> dict:
    """The child's work: read the padded copy, write the clean part if anything is proven."""
    with open_for_read(padded) as f:
        cfg = StreamConfig.model_validate_json(f.attrs["stream_config"])
        rows, index_rows, listed = proven_prefix(f, cut)
        if index_rows:
            write_clean_copy(f, out, cfg, rows, {"salvaged_rows": rows, "salvaged_from_bytes": cut},
                             _keep(f, cut, rows, index_rows))
        return {"rows": rows, "index_rows": index_rows, "listed_index_rows": listed,
                "data_bytes": 0 if cfg.video is not None else rows * cfg.sample_bytes}


def salvage_part(path: Path, out: Path, scratch: Path) -> Salvaged:
    """Salvage the truncated part ``path``: the rows its index proves are written to a new clean part ``out`` (only
    if there are any). ``scratch``: where the padded copy is made (removed before returning; never inside the
    session folder). Never raises for what the part holds; a child that does not finish in time is killed."""
    size, head = read_head(path)
    eof = superblock_eof(head) or size
    scratch.unlink(missing_ok=True)
    out.unlink(missing_ok=True)
    timeout_s = PROBE_TIMEOUT_S + size / SALVAGE_BYTES_PER_S
    try:
        shutil.copyfile(path, scratch, follow_symlinks=False)
        os.truncate(scratch, max(size, eof))  # sparse zeros where the part was cut off
        done = subprocess.run([sys.executable, "-m", __name__, str(scratch), str(size), str(out)],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout_s)
        found = json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else {
            "problem": f"the salvage crashed (exit {done.returncode})"}
    except subprocess.TimeoutExpired:
        found = {"problem": f"no answer within {timeout_s:.0f} s (HDF5 hung reading it)"}
    except OSError as e:
        found = {"problem": f"cannot be copied to salvage it: {e.strerror or e}"}
    finally:
        scratch.unlink(missing_ok=True)
    if not found.get("index_rows"):
        out.unlink(missing_ok=True)
    return Salvaged(size, eof, **found)


def main(argv: list[str] | None = None) -> int:
    padded, cut, out = (sys.argv[1:] if argv is None else argv)
    try:
        found = _salvage_in_child(Path(padded), int(cut), Path(out))
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        found = {"problem": f"HDF5 cannot read what is left of it: {e}"}
    print(json.dumps(found), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

