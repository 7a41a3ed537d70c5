"""The hasher's one read of a part (acqd.finalize.onepass): the same sha256 and the same chunk verdicts as hashing the
file and then checking its chunks through HDF5 (acqd.finalize.integrity), on real parts of a recorded session, intact
or with bytes flipped, and a part that grows or shrinks while it is read is left to finalize."""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

import h5py
import pytest

from acqd.finalize import onepass
from acqd.finalize.hasher import digest_part
from acqd.finalize.integrity import verify_part
from acqd.finalize.seal import _sha256
from acqd.session import read_session
from acqd.sim.simulate import Rig, SimParams
from sessions import Recording, Restart, record_session, small_config, working_copy
from tests.faults.test_rows_finalize import index_row, overwrite, stored_row_bytes

PROBE = "streams/probe.h5"
pytestmark = pytest.mark.xdist_group("onepass")  # one xdist worker: the module-scoped session is built once


class Never:
    def is_set(self) -> bool:
        return False


class Meddler:
    """A stop test that changes the file after the first block was read (as a user or a bad copy might)."""

    def __init__(self, path: Path, how: str):
        self.path, self.how, self.calls = path, how, 0

    def is_set(self) -> bool:
        self.calls += 1
        if self.calls == 1:
            size = self.path.stat().st_size
            with open(self.path, "r+b") as f:
                if self.how == "shrink":
                    f.truncate(size // 2)
                else:
                    f.seek(size)
                    f.write(b"\0" * 4096)
        return False


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    cfg = small_config(tmp_path_factory.mktemp("onepass"), probe_channels=64)
    return record_session(cfg, Rig(cfg, SimParams(seed=11, seconds=20)), "OP", Recording(seconds=3.0))


@pytest.fixture
def session(recorded, tmp_path) -> Iterator[Path]:
    yield from working_copy(recorded, tmp_path)


def parts(folder: Path) -> list[tuple[str, str]]:
    return [(p["path"], name) for name, s in read_session(folder)["streams"].items() for p in s["parts"]]


def two_reads(folder: Path, rel_path: str, stream: str) -> tuple[str, dict]:
    """What the hasher gave before one read did both: sha256 of the file, then the chunk check through HDF5."""
    return _sha256(folder / rel_path), verify_part(stream, folder / rel_path, rel_path).to_dict()


def test_one_read_gives_the_digest_and_the_chunk_verdicts_of_two_reads_on_every_part(session):
    fast = 0
    for rel_path, stream in parts(session):
        entry = digest_part(session, rel_path, stream, Never())
        assert (entry.sha256, entry.chunks) == two_reads(session, rel_path, stream), rel_path
        assert entry.chunks["chunks_checked"] > 0 and not entry.chunks["corrupt"]
        fast += onepass.plan(stream, session / rel_path, rel_path) is not None
    assert fast == len(parts(session))  # every part of this rig is of the layout read in one pass


@pytest.mark.parametrize("k", [0, 5, -1])
def test_a_flipped_byte_is_named_by_the_same_chunk_as_through_hdf5(session, k):
    probe = session / PROBE
    with h5py.File(probe, "r") as f:
        k = k % f["index"].shape[0]
    a, b, seq = index_row(probe, k)
    offset, row_bytes = stored_row_bytes(probe, b - 1)  # the last row of index row k: the end of its range
    overwrite(probe, offset + row_bytes - 1, 1)
    entry = digest_part(session, PROBE, "probe", Never())
    assert (entry.sha256, entry.chunks) == two_reads(session, PROBE, "probe")
    assert [(c["rows"], c["seq"], c["problem"]) for c in entry.chunks["corrupt"]] == [
        ((a, b), seq, "checksum mismatch")]


def test_ranges_that_cross_blocks_and_chunks_give_the_same_crcs(session, monkeypatch):
    """Blocks much smaller than a chunk: every index row's crc is fed from several reads."""
    monkeypatch.setattr(onepass, "BLOCK_BYTES", 8192)
    monkeypatch.setattr(onepass, "_buffer", lambda: mmap.mmap(-1, 8192))
    probe = session / PROBE
    a, b, seq = index_row(probe, 3)
    offset, _ = stored_row_bytes(probe, a)
    overwrite(probe, offset, 1)  # the first byte of index row 3
    layout = onepass.plan("probe", probe, PROBE)
    sha, crcs = onepass.read_once(probe, layout, Never())
    assert (sha, onepass.verdicts(layout, crcs).to_dict()) == two_reads(session, PROBE, "probe")


@pytest.mark.parametrize("how", ["grow", "shrink"])
def test_a_part_that_changes_while_it_is_read_is_left_to_finalize(session, monkeypatch, how):
    monkeypatch.setattr(onepass, "BLOCK_BYTES", 65536)
    monkeypatch.setattr(onepass, "_buffer", lambda: mmap.mmap(-1, 65536))
    meddler = Meddler(session / PROBE, how)
    assert digest_part(session, PROBE, "probe", meddler) is None
    assert meddler.calls >= 1


def test_a_short_read_before_the_end_is_an_error_never_a_prefix_digest(session, monkeypatch):
    """A file system may return fewer bytes than asked before the end of the file (network, FUSE): the loop's end test
    would then take a prefix's sha256 as the part's, and the scrub would later call the sealed part rotten."""
    monkeypatch.setattr(onepass, "BLOCK_BYTES", 65536)
    monkeypatch.setattr(onepass, "_buffer", lambda: mmap.mmap(-1, 65536))
    real = onepass.os.preadv
    monkeypatch.setattr(onepass.os, "preadv", lambda fd, bufs, pos: min(real(fd, bufs, pos), 4096))
    with pytest.raises(OSError, match="read 4096 of"):
        onepass.read_once(session / PROBE, None, Never())


def test_a_part_of_another_layout_is_checked_through_hdf5(tmp_path):
    """A compressed part (and a part its writer never closed) has no one-pass plan; the verdicts stay HDF5's."""
    cfg = small_config(tmp_path / "data")
    cfg = cfg.model_copy(update={"streams": tuple(
        s.model_copy(update={"compression": "gzip"}) if s.name == "sensor" else s for s in cfg.streams)})
    folder = record_session(cfg, Rig(cfg, SimParams(seed=5, seconds=12)), "GZ",
                            Recording(seconds=3.0, restart=Restart("probe", at_s=3.5, crash=True)))
    killed = read_session(folder)["streams"]["probe"]["parts"][0]["path"]  # left open: SWMR flag still set
    checked = 0
    for rel_path, stream in parts(folder):
        path = folder / rel_path
        if stream == "sensor" or rel_path == killed:
            assert onepass.plan(stream, path, rel_path) is None, rel_path
            entry = digest_part(folder, rel_path, stream, Never())
            assert (entry.sha256, entry.chunks) == two_reads(folder, rel_path, stream)
            checked += 1
    assert checked == 2
