"""A group writer (acqd.record.group): many slow streams in one process, each recorded exactly as in a process of
its own (its data bit-exact, its own gaps and rejects), none disturbed by another's hostile traffic."""

from __future__ import annotations

import time

import numpy as np
import pytest

from acqd.config import RigConfig, StreamConfig
from acqd.record.group import SLOW_GROUP, writer_groups
from acqd.record.ingest import Gap, Reject
from acqd.record.streamfile import open_for_read
from acqd.wire.protocol import Header, encode
from tests.record.livegroup import LiveGroup
from tests.record.livewriter import message


def timed_message(name: str, seq: int) -> tuple[list, np.ndarray]:
    """A valid 10-sample message whose device_time_ns is the host wall time it is sent at."""
    data = (np.arange(seq * 40, seq * 40 + 40) % 30011).astype("<i2").reshape(10, 4)
    return encode(Header(name, seq, 7, seq * 10, 10, "<i2", (4,), device_time_ns=time.time_ns()), data), data


def read(path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    with open_for_read(path) as f:
        return f["data"][:], f["index"][:], f["gaps"][:], f["rejects"][:]


def test_twenty_streams_in_one_group_are_each_bit_exact_with_their_own_gaps_and_rejects(tmp_path):
    names = [f"s{i:02d}" for i in range(20)]
    g = LiveGroup(tmp_path, names)
    try:
        assert len({m.get("pid") for _, m in g.msgs if m["type"] == "ready"}) == 1  # one process for all
        for n in names:
            g.wait_for(n, lambda m: m["type"] == "event" and m["kind"] == "connected", "its driver")
        g.record_all()
        sent: dict[str, list[np.ndarray]] = {n: [] for n in names}
        expected_rejects: dict[str, list[Reject]] = {n: [] for n in names}
        for i, n in enumerate(names):
            skipped = 3 + i % 7  # each stream loses a different message: its own gap
            for seq in range(30):
                if seq == skipped:
                    continue
                frames, data = message(seq, seq * 10, stream=n)
                g.drivers[n].send_multipart(frames)
                sent[n].append(data)
                if seq == 10 and i % 3 == 0:
                    g.drivers[n].send_multipart(frames)  # sent twice: rejected as a duplicate
                    expected_rejects[n].append(Reject.DUPLICATE)
                if seq == 12 and i % 4 == 1:  # another stream's dtype: rejected, never coerced
                    bad, _ = message(seq + 1, seq * 10 + 10, stream=n, dtype="<f4")
                    g.drivers[n].send_multipart(bad)
                    expected_rejects[n].append(Reject.DTYPE)
        for n in names:
            g.wait_handled(n, 29 + len(expected_rejects[n]))
        g.stop_all()
        for i, n in enumerate(names):
            data, index, gaps, rejects = read(g.folder / f"{n}.h5")
            assert np.array_equal(data, np.concatenate(sent[n])), n
            assert len(index) == 29
            skipped = 3 + i % 7
            assert [(int(r["kind"]), int(r["seq_from"]), int(r["seq_to"])) for r in gaps] == [
                (Gap.SEQ, skipped, skipped + 1)], n
            assert [Reject(int(r["reason"])) for r in rejects] == expected_rejects[n], n
    finally:
        assert g.close() == 0


def test_a_malformed_flood_on_one_stream_leaves_the_others_data_and_latency_intact(tmp_path):
    good = [f"ok{i}" for i in range(4)]
    g = LiveGroup(tmp_path, ["bad", *good])
    try:
        for n in ["bad", *good]:
            g.wait_for(n, lambda m: m["type"] == "event" and m["kind"] == "connected", "its driver")
        g.record_all()
        rng = np.random.default_rng(3)
        valid, _ = message(0, 0, stream="bad")
        junk = [[rng.bytes(int(k))] for k in rng.integers(0, 300, 2000)]  # random frames
        junk += [[valid[0], rng.bytes(len(valid[1])), valid[2]] for _ in range(2000)]  # a garbled header
        junk += [[valid[0], valid[1], valid[2][:-2]] for _ in range(2000)]  # a short payload
        junk += [[valid[0], valid[1]] for _ in range(2000)] + [[b""] for _ in range(2000)]
        sent: dict[str, list[np.ndarray]] = {n: [] for n in good}
        flood = iter(junk)
        for seq in range(150):  # 1.5 s of 100 messages/s per good stream, the flood interleaved
            for n in good:
                frames, data = timed_message(n, seq)
                g.drivers[n].send_multipart(frames)
                sent[n].append(data)
            for _ in range(len(junk) // 150 + 1):
                if (frames := next(flood, None)) is not None:
                    g.drivers["bad"].send_multipart(frames)
            time.sleep(0.01)
        for n in good:
            g.wait_handled(n, 150)
        g.wait_handled("bad", len(junk), timeout_s=30)
        g.stop_all()
        for n in good:
            data, index, gaps, rejects = read(g.folder / f"{n}.h5")
            assert np.array_equal(data, np.concatenate(sent[n])) and len(gaps) == 0 and len(rejects) == 0, n
            received_ms = (index["host_wall_ns"] - index["device_time_ns"]) / 1e6
            committed_ms = (index["committed_wall_ns"] - index["device_time_ns"]) / 1e6
            # Receive times stay true (stamped as messages arrive), and every message reached the file within the
            # flush interval (0.1 s) plus a drain: the flood never held a good stream back.
            assert np.percentile(received_ms, 99) < 50, (n, np.percentile(received_ms, [50, 99]))
            assert np.percentile(committed_ms, 99) < 1000, (n, np.percentile(committed_ms, [50, 99]))
        _, index, _, rejects = read(g.folder / "bad.h5")
        assert len(index) == 0 and len(rejects) == len(junk)  # every hostile message counted, with its reason
        assert set(Reject(int(r)) for r in rejects["reason"]) <= {Reject.MALFORMED, Reject.WRONG_STREAM}
        assert g.stats("bad")["recording_counts"]["rejected_total"] == len(junk)
    finally:
        assert g.close() == 0


@pytest.mark.parametrize("group, expected", [(None, SLOW_GROUP), ("own", None), ("valves", "valves")])
def test_slow_streams_are_grouped_unless_the_config_says_otherwise(group, expected):
    base = {"endpoint": "ipc:///tmp/x", "dtype": "float32", "sync": {"source": "frame"}}
    streams = [StreamConfig(name="probe", shape=(385,), rate=30000.0, dtype="int16", endpoint="ipc:///tmp/p",
                            sync={"source": "channel", "channel": 384}),
               StreamConfig.model_validate({**base, "name": "lick", "shape": (4,), "rate": 1000.0,
                                            **({"writer_group": group} if group else {})})]
    cfg = RigConfig(daemon={"data_root": "/tmp"}, reference="probe", streams=streams)
    assert writer_groups(cfg) == {"probe": None, "lick": expected}
    below = RigConfig(daemon={"data_root": "/tmp", "group_below_bytes_per_s": 0}, reference="probe", streams=streams)
    assert writer_groups(below)["lick"] == (None if group is None else expected)
