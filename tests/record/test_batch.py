"""The group writer's batch path (acqd.record.batch) against the per-message path it replaces (Writer.handle).

Two real writers (real ZeroMQ sockets, real HDF5 files) take the same messages with the same receive times: one
through ``handle_batch`` in drains of uneven sizes, the other one message at a time. Their part files, counters,
cursors and reports must be identical: every row bit-exact, every reject with its reason, every gap, every edge.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from acqd.config import EdgeLine, StreamConfig
from acqd.record.batch import handle_batch
from acqd.record.ingest import Gap, Reject
from acqd.record.schedule import Due
from acqd.record.streamfile import StreamFile, open_for_read, part_filename
from acqd.record.writer import Writer, WriterSpec
from acqd.wire.protocol import EDGE_DTYPE, Header, encode
from tests.faults.test_wire_fuzz import KINDS, MAX_MESSAGE_BYTES, Driver, Plan
from tests.record.livewriter import message

TABLES = ("data", "index", "gaps", "sync/edges", "sync/clock", "timestamps")


class Rig:
    """One in-process Writer recording into ``folder``, its control ROUTER collecting what it reports."""

    def __init__(self, tmp: Path, tag: str, cfg: StreamConfig, lines: list[EdgeLine]):
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.bind(f"ipc://{tmp}/c{tag}")
        spec = WriterSpec(stream=cfg.model_copy(update={"endpoint": f"ipc://{tmp}/d{tag}"}), lines=lines,
                          control=f"ipc://{tmp}/c{tag}", flush_interval_s=0.1, fsync_interval_s=None,
                          stats_interval_s=1.0, clock_pair_interval_s=0.5)
        self.w = Writer(spec, self.ctx)
        self.folder = tmp / tag
        self.folder.mkdir()
        self.w.start_recording(str(self.folder), {"session_id": "t"}, 0)

    def reports(self) -> list[tuple]:
        out = []
        while self.router.poll(200):
            m = zmq.utils.jsonapi.loads(self.router.recv_multipart()[1])
            if m["type"] in ("event", "recording", "closed"):
                out.append((m["type"], m.get("kind"), m.get("detail"), m.get("reason"), m.get("seq"), m.get("part")))
        return out

    def close(self) -> list[tuple]:
        """Close the part; returns every report the writer sent."""
        self.w.close_file()
        sent = self.reports()
        for s in (self.w.ctrl, self.w.data, self.w.monitor):
            s.close(linger=0)
        self.ctx.destroy(linger=0)
        return sent


def frames_of(parts: list) -> list[zmq.Frame]:
    return [zmq.Frame(bytes(memoryview(np.ascontiguousarray(p)) if isinstance(p, np.ndarray) else p)) for p in parts]


def mixed_messages(sync: str) -> list[tuple[list, np.ndarray | None]]:
    """(frames, data if accepted) in sending order: plain runs broken by a seq gap, a shape and a dtype reject, a
    duplicate, a late message, a garbled dtype, junk in a header's unused shape fields (accepted), a timestamps
    frame, an unstorable driver edge (rejected, its message kept), and a publisher restart."""
    out: list[tuple[list, np.ndarray | None]] = []

    def plain(seq: int, first: int, epoch: int = 7, edges: np.ndarray | None = None) -> None:
        if edges is None and sync == "frame" and seq % 3 == 0:  # a driver edge on every third message
            edges = np.array([(first + seq % 10, 0, seq % 2)], EDGE_DTYPE)
        out.append(message(seq, first, epoch=epoch, edges=edges))

    for seq in [*range(40), *range(42, 60)]:  # seq 40 and 41 never arrive: a gap
        plain(seq, seq * 10)
    out.append((message(60, 600, shape=(5,))[0], None))  # another shape
    out.append((message(60, 600, dtype="<f4")[0], None))  # another dtype
    out.append((out[-3][0], None))  # seq 59 again: a duplicate
    for seq in range(60, 75):
        plain(seq, seq * 10)
    out.append((message(50, 500)[0], None))  # late
    garbled, _ = message(75, 750)
    out.append(([garbled[0], garbled[1][:56] + b"\xff" * 4 + garbled[1][60:], garbled[2]], None))  # dtype field
    frames, data = message(75, 750)
    out.append(([frames[0], frames[1][:48] + b"\x01" * 8 + frames[1][56:], frames[2]], data))  # unused shape dims
    data = message(76, 760)[1]
    out.append((encode(Header("s", 76, 7, 760, 10, "<i2", (4,)), data, timestamps=np.arange(10) * 1000), data))
    plain(77, 770, edges=np.array([(775, 70_000, 1)], EDGE_DTYPE))  # line 70000 cannot be stored
    for seq in range(78, 130):
        plain(seq, seq * 10)
    for seq in range(30):  # the publisher restarted
        plain(seq, 1300 + seq * 10, epoch=8)
    return out


def record_both(tmp: Path, cfg: StreamConfig, lines: list[EdgeLine], items: list[tuple], sizes: list[int]) -> tuple:
    """``items`` (wall ns, monotonic ns, frames) through a writer one message at a time and through another in
    batches of ``sizes`` (repeated); asserts that both left the same counters, cursors, reports and part files.
    Returns the last part number, the reports, how many messages the batch path stored and how many it left to the
    per-message path, and the batch writer's rows, gaps and rejects over all its parts."""
    one, batch = Rig(tmp, "o", cfg, lines), Rig(tmp, "b", cfg, lines)
    singles, stored = [0], [0]
    real = batch.w.on_message
    batch.w.on_message = lambda *a: (singles.__setitem__(0, singles[0] + 1), real(*a))[1]
    appended = StreamFile.append_batch

    def count(self, data, index):
        stored[0] += len(index)
        return appended(self, data, index)

    try:
        StreamFile.append_batch = count
        for wall, mono, parts in items:
            one.w.handle(frames_of(parts), (wall, mono))
        at, k = 0, 0
        while at < len(items):
            size = sizes[k % len(sizes)]
            handle_batch(batch.w, [(wall, mono, [bytes(f.buffer) for f in frames_of(p)])  # as the receiver queues
                                   for wall, mono, p in items[at:at + size]])
            at, k = at + size, k + 1
        for r in (one, batch):
            r.w.on_due(Due(flush=True))
        assert one.w.total.as_dict() == batch.w.total.as_dict() and one.w.rec.as_dict() == batch.w.rec.as_dict()
        assert (one.w.cursor, one.w.last_seq, one.w.last_chunk, one.w.levels, one.w.live_edges) == (
            batch.w.cursor, batch.w.last_seq, batch.w.last_chunk, batch.w.levels, batch.w.live_edges)
        parts = one.w.part
        reports = one.close(), batch.close()
    finally:
        StreamFile.append_batch = appended
    assert reports[0] == reports[1]
    rows, gaps, rejects = [], [], []
    for part in range(parts + 1):
        if not (one.folder / part_filename("s", part)).exists():  # never opened: nothing was accepted for it
            assert not (batch.folder / part_filename("s", part)).exists()
            continue
        with open_for_read(one.folder / part_filename("s", part)) as a, \
                open_for_read(batch.folder / part_filename("s", part)) as b:
            for table in TABLES:
                x, y = a[table][:], b[table][:]
                if table == "index":
                    x, y = x[[n for n in x.dtype.names if n != "committed_wall_ns"]], y[[
                        n for n in y.dtype.names if n != "committed_wall_ns"]]
                assert np.array_equal(x, y), (part, table)
            ra, rb = a["rejects"][:], b["rejects"][:]
            assert np.array_equal(ra[["reason", "seq", "nbytes", "detail"]], rb[["reason", "seq", "nbytes", "detail"]])
            rows.append(b["data"][:])
            gaps += [(Gap(int(g["kind"])), int(g["seq_from"]), int(g["seq_to"])) for g in b["gaps"][:]]
            rejects += [Reject(int(r)) for r in rb["reason"]]
    return parts, reports[0], stored[0], singles[0], rows, gaps, rejects


@pytest.mark.parametrize("sync", ["frame", "channel"])
def test_a_batch_records_exactly_what_message_by_message_handling_records(tmp_path, sync):
    fields = {"name": "s", "endpoint": "ipc:///unused", "socket": "pull", "dtype": "int16", "shape": (4,),
              "rate": 1000.0, "max_file_seconds": 0.53}  # a part per 530 rows: runs split across rollovers
    if sync == "frame":
        fields["sync"] = {"source": "frame"}
        lines = []
    else:
        fields["sync"] = {"source": "channel", "channel": 3, "bit": 0}
        lines = [EdgeLine(label="sync", channel=3, bit=0)]
    cfg = StreamConfig.model_validate(fields)
    msgs = mixed_messages(sync)
    t0 = time.time_ns()
    items = [(t0 + i * 10_000_000, i * 10_000_000, p) for i, (p, _) in enumerate(msgs)]
    assert msgs[100][1] is not None and msgs[99][1] is not None  # a plain run, where the clock steps
    items[100] = (items[100][0] + 5 * 10**9, items[100][1], items[100][2])  # the host wall clock stepped 5 s
    items[101:] = [(wall + 5 * 10**9, mono, p) for wall, mono, p in items[101:]]

    parts, reports, stored, singles, rows, gaps, rejects = record_both(tmp_path, cfg, lines, items,
                                                                       [1, 7, 50, 3, 64, 11, 1000])
    # The batch path took most messages (else this test would compare the per-message path with itself).
    assert stored > 0.8 * len(items) and singles < 0.2 * len(items), (stored, singles)
    assert any(r[1] == "clock_step" for r in reports)
    assert parts >= 2  # the runs crossed two part boundaries
    sent = np.concatenate([d for _, d in msgs if d is not None])
    assert np.array_equal(np.concatenate(rows), sent)  # every accepted row, bit-exact, in order
    assert gaps == [(Gap.SEQ, 40, 42), (Gap.RESTART, 0, 0)], gaps
    expected = [Reject.SHAPE, Reject.DTYPE, Reject.DUPLICATE, Reject.LATE, Reject.MALFORMED]
    assert rejects == expected + ([Reject.EDGE] if sync == "frame" else []), rejects


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kinds=st.lists(st.sampled_from(sorted(KINDS)), min_size=5, max_size=80), data=st.data())
def test_fuzzed_traffic_is_recorded_by_batches_exactly_as_one_message_at_a_time(tmp_path_factory, kinds, data):
    """The wire fuzzer's hostile plans (tests/faults/test_wire_fuzz.py: garbled, short, oversized, replayed, foreign,
    out-of-range messages among valid ones with good and bad driver edges), with a host clock step somewhere and
    parts that roll over, through a batched and a per-message writer in batches of drawn sizes: the same files,
    counters, cursors and reports, and every valid message stored bit-exact."""
    cfg = StreamConfig.model_validate({
        "name": "s", "endpoint": "ipc:///unused", "socket": "pull", "dtype": "int16", "shape": (4,), "rate": 1000.0,
        "sync": {"source": "frame"}, "max_message_bytes": MAX_MESSAGE_BYTES,
        "max_file_seconds": data.draw(st.sampled_from([None, 0.13, 0.31]))})
    driver, plan = Driver(), Plan()
    msgs = [driver.build(kind, data, plan) for kind in ["valid", *kinds]]
    t0, step_at = time.time_ns(), data.draw(st.integers(0, len(msgs)))  # the wall clock steps 5 s there
    items = [(t0 + i * 10_000_000 + (5 * 10**9 if i >= step_at else 0), i * 10_000_000, m) for i, m in enumerate(msgs)]
    sizes = data.draw(st.lists(st.integers(1, 40), min_size=1, max_size=6))
    _, _, _, _, rows, _, _ = record_both(tmp_path_factory.mktemp("fz"), cfg, [], items, sizes)
    stored = np.concatenate(rows) if rows else np.empty((0, 4), "<i2")
    assert np.array_equal(stored, np.concatenate([plan.valid[s] for s in sorted(plan.valid)]))
