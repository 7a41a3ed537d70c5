"""Each rule docs/protocol.md and docs/file-format.md state for driver authors, against a real writer process.

The test is the driver: it binds a PUSH socket (the stream uses ``socket: pull``, so nothing is lost to a
late subscriber), plays the supervisor on a ROUTER socket, and reads the stream file the writer wrote.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import zmq

from acqd.config import ChannelSync, FrameSync, StreamConfig
from acqd.errors import ProtocolError
from acqd.finalize.clock import split_counter_resets
from acqd.finalize.streams import read_stream
from acqd.record.ingest import Gap, Reject
from acqd.record.writer import WriterSpec
from acqd.service.procs import stop_process
from acqd.wire.protocol import EDGE_DTYPE, Header, encode, encode_header

RATE = 1000.0
N = 10  # samples per message


class Writer:
    """One real writer process recording one stream into ``tmp_path/streams``."""

    def __init__(self, tmp_path: Path, **stream: object):
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.bind(f"ipc://{tmp_path}/ctl")
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.bind(f"ipc://{tmp_path}/data")
        self.cfg = StreamConfig(**{"name": "sensor", "endpoint": f"ipc://{tmp_path}/data", "socket": "pull",
                                   "dtype": "float32", "shape": (3,), "rate": RATE, "sync": FrameSync(), **stream})
        spec = WriterSpec(self.cfg, [], f"ipc://{tmp_path}/ctl", flush_interval_s=0.05, fsync_interval_s=None,
                          stats_interval_s=0.05, clock_pair_interval_s=1.0)
        self.proc = subprocess.Popen([sys.executable, "-m", "acqd.record.writer", spec.to_json()],
                                     stdin=subprocess.DEVNULL)
        self.sent = 0
        self.expect("ready")
        self.folder = tmp_path / "streams"
        self.folder.mkdir()
        self.command(cmd="record", folder=str(self.folder), session={}, part=0)
        self.expect("recording")

    def command(self, **cmd: object) -> None:
        self.router.send_multipart([self.cfg.name.encode(), json.dumps(cmd).encode()])

    def expect(self, kind: str, until=lambda msg: True, timeout_s: float = 20.0) -> dict:
        """The next report of ``kind`` for which ``until`` holds (other reports are skipped)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.router.poll(100):
                msg = json.loads(self.router.recv_multipart()[1])
                if msg["type"] == kind and until(msg):
                    return msg
            else:
                assert self.proc.poll() is None, f"the writer exited with {self.proc.returncode}"
        raise TimeoutError(f"no {kind!r} report from the writer")

    def send(self, seq: int, first_sample: int, *, epoch: int = 7, dtype: str = "<f4", edges=None, stream="sensor",
             frames: list | None = None) -> None:
        data = np.full((N, 3), seq, dtype=dtype)
        h = Header(stream, seq, epoch, first_sample, N, dtype, (3,))
        self.push.send_multipart(frames if frames is not None else encode(h, data, edges=edges))
        self.sent += 1

    def close(self) -> h5py.File:
        """Wait until every sent message was handled, stop recording, shut the writer down; the file, open."""
        handled = lambda m: m["total"]["messages"] + m["total"]["rejected_total"] >= self.sent  # noqa: E731
        self.expect("stats", handled)
        self.command(cmd="stop")
        closed = self.expect("closed")
        self.command(cmd="shutdown")
        assert self.proc.wait(20) == 0
        return h5py.File(closed["path"], "r")

    def stop(self) -> None:
        stop_process(self.proc, 10)
        self.ctx.destroy(linger=0)


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[Writer]:
    w = Writer(tmp_path)
    yield w
    w.stop()


def edges(*rows: tuple[int, int, int]) -> np.ndarray:
    return np.array(list(rows), dtype=EDGE_DTYPE)


# -- seq ---------------------------------------------------------------------------------------------------------


def test_a_rejected_message_consumes_its_seq(writer):
    """Rejected seq 1, then seq 2: a reject row and a one-message SEQ gap [1, 2); seq 1 is not written."""
    writer.send(0, 0)
    writer.send(1, N, dtype="<i2")  # the wrong dtype: rejected
    writer.send(2, 2 * N)
    with writer.close() as f:
        assert [(r["reason"], r["seq"]) for r in f["rejects"][:]] == [(Reject.DTYPE, 1)]
        assert [(g["kind"], g["seq_from"], g["seq_to"], g["sample_from"], g["sample_to"]) for g in f["gaps"][:]] == [
            (Gap.SEQ, 1, 2, N, 2 * N)]
        assert f["index"]["seq"].tolist() == [0, 2]


def test_a_rejected_seq_resent_correctly_is_accepted_without_a_gap(writer):
    writer.send(0, 0)
    writer.send(1, N, dtype="<i2")
    writer.send(1, N)  # the same seq, now right
    writer.send(2, 2 * N)
    with writer.close() as f:
        assert len(f["rejects"]) == 1 and len(f["gaps"]) == 0
        assert f["index"]["seq"].tolist() == [0, 1, 2]


def test_epoch_zero_is_an_ordinary_epoch(writer):
    writer.send(0, 0, epoch=0)
    writer.send(1, N, epoch=0)
    writer.send(0, 5 * N, epoch=1)  # a new epoch: the driver restarted
    with writer.close() as f:
        assert f["index"]["epoch"].tolist() == [0, 0, 1] and len(f["rejects"]) == 0
        assert [g["kind"] for g in f["gaps"][:]] == [Gap.RESTART]


# -- edges -------------------------------------------------------------------------------------------------------


def test_falling_edges_are_kept(writer):
    writer.send(0, 0, edges=edges((3, 0, 1), (6, 0, 0)))
    with writer.close() as f:
        assert f["sync/edges"][:].tolist() == [(3, 0, 1), (6, 0, 0)]


def test_edges_are_stored_in_the_order_sent(writer):
    writer.send(0, 0, edges=edges((8, 0, 1), (2, 0, 1)))
    writer.send(1, N, edges=edges((1, 0, 1)))
    with writer.close() as f:
        assert f["sync/edges"]["sample"].tolist() == [8, 2, 1]


def test_an_edge_earlier_than_the_one_before_starts_a_new_counter_segment():
    """Finalize reads a step back in the edge samples as a device counter reset."""
    assert split_counter_resets(np.array([10, 20, 15, 30])) == [slice(0, 2), slice(2, 4)]


def test_an_empty_edges_frame_is_allowed(writer):
    writer.send(0, 0, edges=edges())
    with writer.close() as f:
        assert len(f["rejects"]) == 0 and len(f["sync/edges"]) == 0 and f["index"]["seq"].tolist() == [0]


def test_edge_line_and_rising_must_fit_the_stored_columns(writer):
    """line is stored as uint16 and rising as uint8: a larger value is never stored wrapped; only that edge is
    dropped (rejected with the rule `edge`), the message's data and its other edges are written."""
    writer.send(0, 0, edges=edges((3, 70_000, 1), (4, 0, 1)))
    writer.send(1, N, edges=edges((13, 0, 300)))
    with writer.close() as f:
        assert f["sync/edges"][:].tolist() == [(4, 0, 1)]
        assert f["index"]["seq"].tolist() == [0, 1]
        assert [(r["reason"], r["seq"]) for r in f["rejects"][:]] == [(Reject.EDGE, 0), (Reject.EDGE, 1)]


def test_finalize_uses_rising_edges_on_line_0_inside_committed_chunks(writer):
    writer.send(0, 0, edges=edges((2, 0, 1), (4, 0, 0), (5, 1, 1), (999, 0, 1)))
    writer.send(1, N, edges=edges((12, 0, 1)))
    with writer.close() as f:
        assert len(f["sync/edges"]) == 5  # everything sent is stored
        path = Path(f.filename)
    stream = read_stream(writer.folder, writer.cfg, [path])
    assert {k: v.tolist() for k, v in stream.edges.items()} == {"sync": [2, 12]}


def test_an_edges_frame_is_ignored_unless_the_stream_syncs_by_frame(tmp_path):
    w = Writer(tmp_path, dtype="int16", sync=ChannelSync(channel=0, bit=0))
    try:
        w.send(0, 0, dtype="<i2", edges=edges((3, 0, 1)))  # data 0: no rising edge on channel 0
        with w.close() as f:
            assert len(f["rejects"]) == 0 and f["sync/edges"][:].tolist() == []
    finally:
        w.stop()


# -- names and file attributes ---------------------------------------------------------------------------------


def test_a_stream_name_is_at_most_32_bytes():
    encode_header(Header("s" * 32, 0, 0, 0, 1, "<f4", (3,)))
    with pytest.raises(ProtocolError, match="longer than 32 bytes"):
        encode_header(Header("s" * 33, 0, 0, 0, 1, "<f4", (3,)))
    with pytest.raises(ValueError, match="33 bytes; the wire header's stream field holds 32"):
        StreamConfig(name="s" * 33, endpoint="ipc:///x", dtype="float32", rate=RATE)


def test_channel_names_is_absent_when_the_config_gives_none(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    named = Writer(tmp_path / "a", channel_names=("x", "y", "z"))
    plain = Writer(tmp_path / "b")
    try:
        for w in (named, plain):
            w.send(0, 0)
        with named.close() as f:
            assert json.loads(f["data"].attrs["channel_names"]) == ["x", "y", "z"]
        with plain.close() as f:
            assert "channel_names" not in f["data"].attrs
    finally:
        named.stop()
        plain.stop()


def test_a_frame_synced_stream_has_an_empty_lines_attribute(writer):
    """Its edges' ``line`` is the driver's own line number (0 = the shared sync line), not an index into ``lines``."""
    writer.send(0, 0, edges=edges((1, 0, 1), (2, 3, 1)))
    with writer.close() as f:
        assert json.loads(f["sync/edges"].attrs["lines"]) == []
        assert f["sync/edges"]["line"].tolist() == [0, 3]
