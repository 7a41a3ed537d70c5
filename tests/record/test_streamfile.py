"""The stream file's own contract: exclusive creation, flush = commit, fsync per policy."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from acqd.config import EdgeLine, StreamConfig
from acqd.record.ingest import Gap, GapRecord, Loss
from acqd.record.streamfile import (FILTER_NOTES, GAP_DTYPE, StreamFile, chunk_rows, committed_rows, dataset_options,
                                    durable, gap_reasons, open_for_read, part_image)

CFG = StreamConfig(name="s", endpoint="ipc:///x", dtype="int16", shape=(4,), rate=1000.0)


def test_row18_create_refuses_an_existing_file_and_a_planted_symlink(tmp_path):
    existing = tmp_path / "s.h5"
    existing.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        StreamFile.create(existing, CFG, session={}, lines=[])
    assert existing.read_bytes() == b"precious"
    target = tmp_path / "victim"
    target.write_bytes(b"keep")
    os.symlink(target, tmp_path / "link.h5")
    with pytest.raises(FileExistsError):
        StreamFile.create(tmp_path / "link.h5", CFG, session={}, lines=[])
    assert target.read_bytes() == b"keep"


def test_metadata_is_in_the_file_from_creation(tmp_path):
    sf = StreamFile.create(tmp_path / "s.h5", CFG, session={"session_id": "abc"}, lines=[])
    with h5py.File(tmp_path / "s.h5", "r", libver="latest", swmr=True) as f:  # while still open for writing
        assert '"abc"' in f.attrs["session"] and f["data"].attrs["unit"] == "a.u."
        assert set(f) == {"data", "index", "gaps", "rejects", "sync", "timestamps", "suspect"}
    sf.close()


def layout(path) -> dict:
    """Every group's and dataset's attributes, and each dataset's dtype, shape, chunks, filters, by name."""
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            out[name] = {k: str(v) for k, v in obj.attrs.items()}
            if isinstance(obj, h5py.Dataset):
                out[name] |= {"@": (str(obj.dtype), obj.shape, obj.maxshape, obj.chunks, obj.compression,
                                    sorted(obj.id.get_create_plist().get_filter(i)[0]
                                           for i in range(obj.id.get_create_plist().get_nfilters())))}
        out["/"] = {k: str(v) for k, v in f.attrs.items()}
        f.visititems(visit)
    return out


def test_the_parts_of_a_recording_written_from_one_image_differ_only_in_number_and_creation_time(tmp_path):
    """A writer lays out a part once (``part_image``) and writes each part of every recording from it: the parts are
    the file a fresh layout makes, each with its own session, number and creation time, open for SWMR as before."""
    cfg = CFG.model_copy(update={"compression": "zstd", "channel_names": ("a", "b", "c", "d")})
    session, lines = {"session_id": "abc"}, [EdgeLine(label="sync", channel=1, bit=0)]
    image = part_image(cfg, lines)
    fresh = StreamFile.create(tmp_path / "fresh.h5", cfg, session=session, lines=lines, part=0)
    fresh.close()
    for part in (1, 2):
        sf = StreamFile.create(tmp_path / f"p{part}.h5", cfg, session=session, lines=lines, part=part, image=image)
        with h5py.File(tmp_path / f"p{part}.h5", "r", libver="latest", swmr=True) as f:  # open for writing: SWMR
            assert f.attrs["part"] == part and set(f) == {"data", "index", "gaps", "rejects", "sync", "timestamps",
                                                          "suspect"}
        sf.append(np.ones((10, 4), "int16"), (0, 1, 10, 0, 0, 0, 0))
        sf.close()
    parts = [layout(tmp_path / name) for name in ("fresh.h5", "p1.h5", "p2.h5")]
    assert [p["/"]["part"] for p in parts] == ["0", "1", "2"] and len({p["/"]["created"] for p in parts}) == 3
    for p in parts:
        del p["/"]["part"], p["/"]["created"], p["data"]["@"], p["index"]["@"]  # the data written differ
    assert parts[0] == parts[1] == parts[2] and '"abc"' in parts[0]["/"]["session"]
    assert "sync" in parts[0]["sync/edges"]["lines"] and parts[0]["data"]["channel_names"]
    StreamFile.create(tmp_path / "next.h5", cfg, session={"session_id": "next"}, lines=lines, image=image).close()
    assert json.loads(layout(tmp_path / "next.h5")["/"]["session"]) == {"session_id": "next"}  # the next recording


def test_a_part_whose_creation_fails_is_removed(tmp_path, monkeypatch):
    """``open_stream_file`` created it a moment ago and nothing names it yet: a failure before it is ready (here its
    switch to SWMR) removes it rather than leave a part with a header only for finalize to skip."""
    def refuse(self, value):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(h5py.File, "swmr_mode", property(lambda self: False, refuse))
    with pytest.raises(OSError):
        StreamFile.create(tmp_path / "s.h5", CFG, session={}, lines=[])
    assert not (tmp_path / "s.h5").exists()


def test_gap_reasons_are_stored_and_files_without_the_column_read_as_unknown(tmp_path):
    sf = StreamFile.create(tmp_path / "s.h5", CFG, session={}, lines=[])
    sf.add_gap(GapRecord(Gap.SEQ, 3, 9, 30, 90, Loss.OVERLOAD), 0)
    sf.add_gap(GapRecord(Gap.DROPPED, 12, 13, 120, 130, Loss.ENCODER), 0)
    sf.close()
    with open_for_read(tmp_path / "s.h5") as f:
        assert gap_reasons(f["gaps"][:]) == ["overload", "encoder"]
        assert json.loads(f["gaps"].attrs["reasons"])["HWM"] == Loss.HWM
    old = np.dtype([(n, GAP_DTYPE[n]) for n in GAP_DTYPE.names if n != "reason"])  # format 2 and before
    with h5py.File(tmp_path / "old.h5", "w") as f:
        f.create_dataset("gaps", data=np.zeros(2, old))
    with open_for_read(tmp_path / "old.h5") as f:
        assert gap_reasons(f["gaps"][:]) == ["unknown", "unknown"]


KILL_AFTER_FLUSHES = textwrap.dedent("""
    import os, signal, sys, numpy as np
    from acqd.config import EdgeLine, StreamConfig
    from acqd.record.streamfile import StreamFile
    cfg = StreamConfig(name="s", endpoint="ipc:///x", dtype="int16", shape=(4,), rate=1000.0)
    sf = StreamFile.create(sys.argv[1], cfg, session={}, lines=[])
    for i in range(int(sys.argv[2])):
        block = np.full((100, 4), i, np.int16)
        sf.append(block, (i, 1, 100, 100 * i, 0, 0, 0))
        if i % 3 == 2:
            sf.flush(fsync=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("appends", [1, 3, 6, 10, 17, 30])
def test_kill9_keeps_exactly_what_was_flushed(tmp_path, appends):
    path = tmp_path / "s.h5"
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_FLUSHES, str(path), str(appends)], timeout=60)
    assert proc.returncode == -9
    # Rows reach HDF5 a whole chunk at a time: the index lists exactly the appends that lie within the
    # chunks written by the last flush.
    flushed_rows = (appends // 3) * 3 * 100
    committed_appends = flushed_rows // chunk_rows(CFG) * chunk_rows(CFG) // 100
    assert flushed_rows - 100 * committed_appends < chunk_rows(CFG) <= 0.1 * CFG.rate
    with open_for_read(path) as f:
        assert committed_rows(f) == 100 * committed_appends
        data = f["data"][: committed_rows(f)]
        assert np.array_equal(data[:, 0], np.repeat(np.arange(committed_appends), 100))


def test_flush_fsyncs_the_file_itself_when_due(tmp_path, monkeypatch):
    synced: list[str] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    sf = StreamFile.create(tmp_path / "s.h5", CFG, session={}, lines=[])
    sf.append(np.zeros((10, 4), np.int16), (0, 1, 10, 0, 0, 0, 0))
    sf.flush(fsync=False)
    assert synced == []
    sf.flush(fsync=True)
    assert synced == [str(tmp_path / "s.h5")]
    sf.close(fsync=False)


@pytest.mark.parametrize("compression", ["none", "gzip", "lz4", "blosc-lz4", "zstd"])
def test_every_filter_round_trips(tmp_path, compression):
    cfg = CFG.model_copy(update={"compression": compression})
    opts = dataset_options(cfg)
    assert opts["chunks"][1:] == (4,)
    sf = StreamFile.create(tmp_path / "s.h5", cfg, session={}, lines=[])
    block = (np.arange(4000) % 97).astype(np.int16).reshape(1000, 4)
    sf.append(block, (0, 1, 1000, 0, 0, 0, 0))
    sf.close()
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert np.array_equal(f["data"][:], block)
        assert FILTER_NOTES[compression] in f["data"].attrs["description"]  # readers learn what they need


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(sizes=st.lists(st.integers(1, 700), min_size=1, max_size=12), compression=st.sampled_from(["none", "lz4"]),
       shape=st.sampled_from([(4,), (1,), (3, 2)]), flush_every=st.integers(1, 5))
def test_any_message_sizes_read_back_bit_exact(tmp_path_factory, sizes, compression, shape, flush_every):
    # Messages straddle chunk boundaries, span several chunks, or end mid-chunk at close; unfiltered
    # chunks are written directly, filtered ones through HDF5's pipeline: the file must not tell.
    cfg = CFG.model_copy(update={"compression": compression, "shape": shape, "chunk_rows": 128})
    path = tmp_path_factory.mktemp("s") / "s.h5"
    rng = np.random.default_rng(len(sizes))
    blocks = [rng.integers(-2**15, 2**15, (n, *shape), dtype=np.int16) for n in sizes]
    sf = StreamFile.create(path, cfg, session={}, lines=[])
    first = 0
    for i, block in enumerate(blocks):
        assert sf.append(block, (i, 1, len(block), first, 0, 0, 0)) == first
        first += len(block)
        if i % flush_every == 0:
            sf.flush(fsync=False)
            assert sf.written % 128 == 0  # only whole chunks reach HDF5 while recording
    sf.close(fsync=False)
    with h5py.File(path, "r") as f:
        assert np.array_equal(f["data"][:], np.concatenate(blocks))
        assert committed_rows(f) == first
        assert f["index"]["file_row"].tolist() == np.cumsum([0, *sizes[:-1]]).tolist()


def resident_pages(path, offset: int, length: int) -> list[bool]:
    """Which pages of ``path`` from ``offset`` (page-aligned) for ``length`` bytes are in the page cache (mincore)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
        assert addr != ctypes.c_void_p(-1).value, os.strerror(ctypes.get_errno())
        vec = ctypes.create_string_buffer((length + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
        assert libc.mincore(addr, length, vec) == 0, os.strerror(ctypes.get_errno())
        libc.munmap(addr, length)
        return [b & 1 == 1 for b in vec.raw]
    finally:
        os.close(fd)


def test_an_fsync_drops_the_written_chunks_from_the_page_cache_and_keeps_what_hdf5_writes_again(tmp_path):
    """After its fsync a file's data chunks leave the page cache (a rig writing 130 MB/s would fill memory), but not
    the pages HDF5 rewrites at every flush (superblock, object headers, chunk index, the tables' last chunks):
    a small write into a dropped page first reads it back from the disk, which made a group writer of 96 slow streams
    read 2.6 MB/s in its own thread to write 1.5 MB/s."""
    probe = tmp_path / "probe"
    probe.write_bytes(b"x" * 4 * mmap_page())
    with open(probe, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if any(resident_pages(probe, 0, 4 * mmap_page())):
        pytest.skip("this filesystem keeps every page cached (tmpfs): nothing to drop")
    cfg = CFG.model_copy(update={"chunk_rows": 8192})  # 64 KiB chunks: many whole pages each
    sf = StreamFile.create(tmp_path / "s.h5", cfg, session={}, lines=[])
    for i in range(5):
        sf.append(np.full((8192, 4), i, np.int16), (i, 1, 8192, 8192 * i, 0, 0, 0))
        sf.flush(fsync=True)
    chunks = [sf.dset("data").id.get_chunk_info_by_coord((row, 0)) for row in range(0, 5 * 8192, 8192)]
    page = mmap_page()
    for c in chunks:  # the pages wholly inside each chunk; the kernel keeps a page of a large folio (a block of pages
        # cached together) that reaches outside the range, so a page at either end of a chunk may stay
        first, last = -(-c.byte_offset // page) * page, (c.byte_offset + c.size) // page * page
        assert not any(resident_pages(sf.path, first + page, last - first - 2 * page)), c
    index = sf.dset("index").id.get_chunk_info_by_coord((0,))
    assert resident_pages(sf.path, 0, page) == [True]  # the superblock, rewritten at every flush
    assert resident_pages(sf.path, index.byte_offset // page * page, page) == [True]  # where the next rows go
    sf.close()
    with open_for_read(tmp_path / "s.h5") as f:
        assert committed_rows(f) == 5 * 8192 and np.array_equal(f["data"][::8192, 0], np.arange(5))


def mmap_page() -> int:
    import mmap

    return mmap.PAGESIZE


def test_a_refused_page_cache_hint_after_a_good_fsync_is_not_a_failed_fsync(tmp_path, monkeypatch):
    """``durable`` reports the fsync's failure, and only it: a filesystem that refuses ``posix_fadvise`` (EINVAL, or
    ESPIPE) once the data are on disk must not make the part suspect (it did: the hint's error was returned as the
    fsync's)."""
    def refuse(*_):
        raise OSError(errno.EINVAL, "Invalid argument")
    monkeypatch.setattr(os, "posix_fadvise", refuse)
    synced: list[int] = []
    with open(tmp_path / "f", "wb") as f:
        assert durable(synced.append, f.fileno(), [(0, 4096)]) is None
        assert synced == [f.fileno()]
        failed = OSError(errno.EIO, "Input/output error")
        assert durable(lambda fd: (_ for _ in ()).throw(failed), f.fileno(), [(0, 4096)]) is failed
