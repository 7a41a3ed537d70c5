"""A group writer keeps its batch path while a page watches the preview, and previews what it would one by one.

Two real writers (real ZeroMQ control sockets; recording to real HDF5 files or not, as in ACQUIRE) take the same
messages with the same receive times while previewing: one message at a time, and through ``handle_batch`` in
drains of uneven sizes. The batch writer must handle nearly all of them in runs (a watched stream used to fall back
to one message at a time, which cost more than the preview itself), and the traces both send must be the same rows.
"""

from __future__ import annotations

import itertools
import json
import time

import numpy as np
import pytest

from acqd.config import StreamConfig
from acqd.record.batch import handle_batch
from acqd.record.preview import TRACE_POINTS_PER_S, is_message
from tests.record.livewriter import message
from tests.record.test_batch import Rig, frames_of

RATE = 1000.0


def previews(rig: Rig) -> list[dict]:
    """Every preview message the writer sent on its control socket so far."""
    out = []
    while rig.router.poll(200):
        raw = rig.router.recv_multipart()[1]
        if is_message(raw):
            out.append(json.loads(raw))
    return out


def traces(msgs: list[dict]) -> tuple[list[int], list[list[int]]]:
    """(sample indices, rows of the shown channels) of every trace point sent, in order."""
    samples, rows = [], []
    for m in msgs:
        if "traces" in m:
            samples += m["traces"]["samples"]
            rows += np.array(m["traces"]["y"]).T.tolist()
    return samples, rows


@pytest.mark.parametrize("record", [True, False])
def test_a_watched_group_writer_keeps_its_batch_path_and_previews_the_same_rows(tmp_path, record):
    cfg = StreamConfig.model_validate({"name": "s", "endpoint": "ipc:///unused", "socket": "pull", "dtype": "int16",
                                       "shape": (4,), "rate": RATE, "sync": {"source": "frame"}})
    msgs = [message(seq, seq * 10) for seq in range(300)]  # 3 s of 10-row messages
    one, batch = Rig(tmp_path, "o", cfg, []), Rig(tmp_path, "b", cfg, [])
    try:
        for r in (one, batch):
            if not record:
                r.w.close_file()
            r.w.on_command({"cmd": "preview", "on": True, "channels": [0, 1, 2, 3]})
        # Receive times from after both previews began (each paces itself from its start, on the host clock): a
        # preview that began after the first receive times would be due fewer times, by how slow the setup was
        m0 = time.monotonic_ns()
        items = [(time.time_ns(), m0 + i * 10_000_000, p) for i, (p, _) in enumerate(msgs)]
        singles = [0]
        real = batch.w.on_message
        batch.w.on_message = lambda *a: (singles.__setitem__(0, singles[0] + 1), real(*a))[1]
        for wall, mono, parts in items:
            one.w.handle(frames_of(parts), (wall, mono))
        at, sizes = 0, itertools.cycle([1, 7, 50, 3, 64, 11, 20])
        while at < len(items):  # drains of uneven sizes, as the receiver queued them (bytes)
            size = next(sizes)
            handle_batch(batch.w, [(wall, mono, [bytes(f.buffer) for f in frames_of(p)])
                                   for wall, mono, p in items[at:at + size]])
            at += size
        # Watching does not send the stream back to one message at a time (only its first message goes that way).
        assert singles[0] <= 2, singles
        assert one.w.total.as_dict() == batch.w.total.as_dict()
        sent = [previews(r) for r in (one, batch)]
    finally:
        one.close()
        batch.close()
    assert all(len(s) >= 4 for s in sent), [len(s) for s in sent]  # about 2 a second over 3 s
    (s_one, y_one), (s_batch, y_batch) = traces(sent[0]), traces(sent[1])
    stride = round(RATE / TRACE_POINTS_PER_S)
    data = np.concatenate([d for _, d in msgs])
    # Both carry the rows on the device counter's fixed grid, as sent; the batch writer's last run may still be
    # waiting for its next message, so compare what both sent
    assert s_one == list(range(0, len(s_one) * stride, stride)) and len(s_batch) >= len(s_one) - 50
    n = min(len(s_one), len(s_batch))
    assert s_batch[:n] == s_one[:n] and y_batch[:n] == y_one[:n] == data[::stride][:n].tolist()
    assert all(m["dropped"] == 0 for s in sent for m in s)
