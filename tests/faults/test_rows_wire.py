"""Fault-matrix rows on the wire and record side (/work/shared/fault-matrix.md), against a live writer process.

Each test is named after its row. The writer is a real process fed over a real ZeroMQ socket
(tests/record/livewriter.py); the stream file it writes is read back with h5py.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest

from acqd.record.ingest import Gap, Reject
from acqd.record.streamfile import open_for_read
from acqd.wire.protocol import HEADER
from tests.record.livewriter import LiveWriter, message


@pytest.fixture
def live(tmp_path: Path):
    writers: list[LiveWriter] = []

    def start(**kw) -> LiveWriter:
        w = LiveWriter(tmp_path, **kw)
        writers.append(w)
        return w

    yield start
    for w in writers:
        w.close()


def stored(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(index, gaps, rejects, data) of a stream file."""
    with open_for_read(path) as f:
        return f["index"][:], f["gaps"][:], f["rejects"][:], f["data"][:]


def assert_stored_exactly(path: Path, sent: dict[int, np.ndarray]) -> None:
    """The file's index lists exactly the seqs in ``sent``, in order, and their data bit-exact."""
    index, _, _, data = stored(path)
    assert index["seq"].tolist() == sorted(sent), (index["seq"].tolist(), sorted(sent))
    for row in index:
        a, n = int(row["file_row"]), int(row["n_samples"])
        assert np.array_equal(data[a:a + n], sent[int(row["seq"])])


def with_dtype_field(frames: list[bytes], dtype: bytes) -> list[bytes]:
    raw = bytearray(frames[1])
    raw[56:64] = dtype.ljust(8, b"\0")
    return [frames[0], bytes(raw), *frames[2:]]


def test_row14_malformed_header_is_rejected_and_the_writer_keeps_running(live):
    # Issue 10 item 1: a one-bit flip of "<f4" (or any dtype text numpy cannot parse) killed the writer.
    w = live()
    w.connected()
    w.record()
    sent, bad = {}, [b",", b"((1,)),", b"<f\xb4", b"i,i", b"O"]
    seq = 0
    for dtype in bad:
        frames, data = message(seq, 10 * seq)
        w.driver.send_multipart(frames)
        sent[seq] = data
        w.driver.send_multipart(with_dtype_field(message(seq + 1, 10 * seq + 10)[0], dtype))
        seq += 2
    frames, data = message(seq, 10 * seq)  # the seq after each bad one is a gap of one message
    w.driver.send_multipart(frames)
    sent[seq] = data
    w.driver.send_multipart([b"s", HEADER.size * b"\xff", b""])  # junk of the right size
    w.driver.send_multipart([b"s"])  # one frame
    st = w.wait_handled(len(sent) + len(bad) + 2)
    assert w.proc.poll() is None, "the writer died"
    assert st["total"]["rejected"] == {"malformed": len(bad) + 2} and st["total"]["messages"] == len(sent)
    w.stop()
    assert_stored_exactly(w.folder / "s.h5", sent)
    _, gaps, rejects, _ = stored(w.folder / "s.h5")
    assert Counter(Reject(int(r)) for r in rejects["reason"]) == Counter({Reject.MALFORMED: len(bad) + 2})
    assert all(b"dtype" in d for d in rejects["detail"][:len(bad)]), rejects["detail"]
    assert sorted(rejects["seq"][:len(bad)].tolist()) == [2 * i + 1 for i in range(len(bad))]
    assert [(int(g["seq_from"]), int(g["seq_to"])) for g in gaps] == [(2 * i + 1, 2 * i + 2) for i in range(len(bad))]
