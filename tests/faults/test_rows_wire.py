"""Fault-matrix rows on the wire and record side (/work/shared/fault-matrix.md), against a live writer process.

Each test is named after its row. The writer is a real process fed over a real ZeroMQ socket
(tests/record/livewriter.py); the stream file it writes is read back with h5py.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import zmq

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


def raw_header(seq: int = 0, first: int = 0, n: int = 10, epoch: int = 7, ndim: int = 1,
               shape: tuple[int, int, int, int] = (4, 0, 0, 0), dtype: bytes = b"<i2") -> bytes:
    return HEADER.pack(b"ACQD", 1, HEADER.size, 0, epoch, seq, first, n, ndim, *shape, dtype, 0, b"s")


def test_row33_hostile_well_formed_values_never_poison_later_messages(live):
    # Issue 10 item 5: seq 2^64-1 made every later message LATE; first_sample 2^64-5 raised OverflowError
    # (the next valid message was counted accepted and rejected, its gap row missing).
    w = live()
    w.connected()
    w.record()
    sent: dict[int, np.ndarray] = {}
    seq = 0

    def valid() -> None:
        nonlocal seq
        frames, sent[seq] = message(seq, 10 * seq)
        w.driver.send_multipart(frames)
        seq += 1

    payload = np.zeros((10, 4), "<i2").tobytes()
    hostile = {  # frames -> the rule that must refuse it
        "seq 2^64-1": ([b"s", raw_header(seq=2**64 - 1), payload], Reject.RANGE),
        "seq 2^63": ([b"s", raw_header(seq=2**63), payload], Reject.RANGE),
        "seq jump 2^40": ([b"s", raw_header(seq=2**40), payload], Reject.SEQ_JUMP),
        "first_sample 2^64-5": ([b"s", raw_header(seq=3, first=2**64 - 5), payload], Reject.RANGE),
        "n_samples 2^32-1": ([b"s", raw_header(n=2**32 - 1), payload], Reject.MALFORMED),
        "n_samples 0": ([b"s", raw_header(n=0), b""], Reject.MALFORMED),
        "ndim 0": ([b"s", raw_header(ndim=0), payload], Reject.MALFORMED),
        "ndim 5": ([b"s", raw_header(ndim=5), payload], Reject.MALFORMED),
        "shape 2^16 x4": ([b"s", raw_header(ndim=4, shape=(2**16,) * 4), b""], Reject.MALFORMED),
        "shape 2^32-1": ([b"s", raw_header(shape=(2**32 - 1, 0, 0, 0)), payload], Reject.MALFORMED),
        "shape 0": ([b"s", raw_header(shape=(0, 0, 0, 0)), b""], Reject.MALFORMED),
    }
    valid()
    valid()
    for frames, _ in hostile.values():
        w.driver.send_multipart(frames)
        valid()  # each hostile message is followed by a valid one, which must be stored
    # epoch 0: a well-formed message from "another run" of the driver: stored, recorded as two restarts
    frames, sent_epoch0 = message(seq, 10 * seq, epoch=0)
    w.driver.send_multipart(frames)
    seq += 1
    valid()
    st = w.wait_handled(seq + len(hostile))
    assert w.proc.poll() is None
    assert st["total"]["messages"] == len(sent) + 1 and st["total"]["rejected_total"] == len(hostile)
    assert Counter(st["total"]["rejected"]) == Counter(r.name.lower() for _, r in hostile.values())
    w.stop()
    index, gaps, rejects, data = stored(w.folder / "s.h5")
    assert index["seq"].tolist() == list(range(seq))  # nothing LATE, nothing lost
    sent[seq - 2] = sent_epoch0
    for row in index:
        a, n = int(row["file_row"]), int(row["n_samples"])
        assert np.array_equal(data[a:a + n], sent[int(row["seq"])])
    assert [Gap(int(g["kind"])) for g in gaps] == [Gap.RESTART, Gap.RESTART]
    assert Counter(Reject(int(r)) for r in rejects["reason"]) == Counter(r for _, r in hostile.values())
    assert int(index["first_sample"].max()) < 2**63 and int(index["seq"].max()) < 2**63


def test_row33_a_real_seq_jump_is_followed_after_two_messages_that_agree(live):
    w = live()
    w.connected()
    w.record()
    sent = {}
    for seq in (0, 1, 2**30, 2**30 + 1, 2**30 + 2):
        frames, sent[seq] = message(seq, 10 * seq)
        w.driver.send_multipart(frames)
    st = w.wait_handled(5)
    assert st["total"]["rejected"] == {"seq_jump": 1}
    w.stop()
    del sent[2**30]  # refused once (a single message is not believed), then followed
    assert_stored_exactly(w.folder / "s.h5", sent)
    _, gaps, _, _ = stored(w.folder / "s.h5")
    assert [(Gap(int(g["kind"])), int(g["seq_from"]), int(g["seq_to"])) for g in gaps] == [
        (Gap.RESYNC, 2, 2**30 + 1)]


@pytest.mark.parametrize("mib", [64])
def test_row15_row36_oversized_message_is_dropped_before_it_is_buffered(live, mib):
    # Issue 10 item 10: a 512 MiB message was received whole before being rejected (writer RSS +525 MB).
    w = live(max_message_bytes=1 << 20)
    w.connected()
    w.record()
    sent = {}
    for seq in (0, 1):
        frames, sent[seq] = message(seq, 10 * seq)
        w.driver.send_multipart(frames)
    w.wait_handled(2)
    before = w.peak_rss_kb()
    huge = np.zeros(((mib << 20) // 8, 4), "<i2")  # mib MiB in one payload frame, well-formed otherwise
    frames, _ = message(2, 20)
    w.driver.send_multipart([frames[0], raw_header(seq=2, first=20, n=len(huge)), huge], copy=False)
    # ZeroMQ drops the connection as soon as it reads the frame's length: a link event; the writer reconnects.
    w.wait_for(lambda m: m["type"] == "event" and m["kind"] == "disconnected", "the oversized sender to be dropped")
    w.connected(2)
    # The driver's PUSH retires the dropped link through two round trips between its own threads, after its monitor
    # has reported the drop: a message sent meanwhile is queued on the dead link and lost with it, whatever the
    # writer does. A driver socket opened afresh has only the live link.
    w.rebind_driver()
    w.connected(3)
    for seq in (3, 4):
        frames, sent[seq] = message(seq, 10 * seq)
        w.driver.send_multipart(frames)
    st = w.wait_handled(4)
    after = w.peak_rss_kb()
    print(f"writer peak RSS before {before} kB, after a {mib} MiB message {after} kB")
    assert after - before < 16 << 10, f"RSS grew {after - before} kB"
    assert st["total"]["rejected_total"] == 0  # never received: dropped by ZeroMQ, seen as the gap below
    w.stop()
    assert_stored_exactly(w.folder / "s.h5", sent)
    _, gaps, _, _ = stored(w.folder / "s.h5")
    assert [(Gap(int(g["kind"])), int(g["seq_from"]), int(g["seq_to"])) for g in gaps] == [(Gap.SEQ, 2, 3)]


def send_range(w: LiveWriter, seqs, **kw) -> dict[int, np.ndarray]:
    sent = {}
    for seq in seqs:
        frames, sent[seq] = message(seq, 10 * seq, **kw)
        w.driver.send_multipart(frames)
    return sent


def parts_of(w: LiveWriter) -> list[Path]:
    return sorted(w.folder.glob("s*.h5"))


def test_row07_eio_on_write_marks_the_part_suspect_and_continues_in_a_new_part(live):
    # Issue 10 item 11: after EIO the stream stayed stopped until IDLE -> ACQUIRE.
    w = live(env={"ACQD_FAULT": "s:eio_on_write:3"})
    w.connected()
    w.record()
    sent = send_range(w, range(6))
    st = w.wait_handled(6)
    assert w.proc.poll() is None and st["total"]["messages"] == 6 and st["total"]["rejected_total"] == 0
    (event,) = w.events("suspect_part")
    assert "s.h5 is suspect" in event["detail"] and "Input/output error" in event["detail"]
    closed = w.wait_for(lambda m: m["type"] == "closed" and m.get("suspect"), "the suspect part's report")
    assert closed["final"] is False and closed["path"].endswith("s.h5")
    w.stop()
    first, second = parts_of(w)
    assert second.name == "s.part001.h5"
    with open_for_read(first) as f:
        assert b"Input/output error (write" in f["suspect"]["reason"][0]
        committed = f["index"]["seq"][:].tolist()
    index, gaps, _, data = stored(second)
    # The suspect part committed a prefix of 0, 1 (rows reach the file a whole chunk at a time: here none);
    # the new part holds 2.. and, as a gap with exact seqs, what the suspect part did not commit.
    assert committed == list(range(len(committed))) and len(committed) <= 2
    assert index["seq"].tolist() == list(range(2, 6))
    for row in index:
        a, n = int(row["file_row"]), int(row["n_samples"])
        assert np.array_equal(data[a:a + n], sent[int(row["seq"])])
    assert [(int(g["seq_from"]), int(g["seq_to"]), int(g["sample_from"])) for g in gaps] == (
        [] if committed == [0, 1] else [(len(committed), 2, 10 * len(committed))])


def test_row07_eio_on_fsync_is_never_retried_and_recording_continues(live):
    w = live(env={"ACQD_FAULT": "s:eio_on_fsync:1"})  # the first fsync: at the first flush of the recording
    w.connected()
    w.record()
    w.wait_for(lambda m: m["type"] == "recording" and m["part"] == 1, "the next part")
    sent = send_range(w, range(4))
    w.wait_handled(4)
    w.stop()
    first, second = parts_of(w)
    with open_for_read(first) as f:
        assert f["index"].shape[0] == 0 and b"Input/output error (fsync" in f["suspect"]["reason"][0]
    assert_stored_exactly(second, sent)


def test_row07_a_failed_fsync_closes_the_file_without_another_fsync(tmp_path):
    # "Never retry fsync on the same file": after a failed fsync the kernel may have dropped the dirty pages.
    import errno

    from acqd.config import StreamConfig
    from acqd.errors import WriterError
    from acqd.record.streamfile import StreamFile
    cfg = StreamConfig(name="s", endpoint="ipc:///x", dtype="int16", shape=(4,), rate=1000.0, chunk_rows=10)
    calls = []

    def failing_fsync(fd: int) -> None:
        calls.append(fd)
        raise OSError(errno.EIO, "Input/output error")

    sf = StreamFile.create(tmp_path / "s.h5", cfg, session={}, lines=[])
    sf.fsync = failing_fsync
    sf.append(np.ones((10, 4), np.int16), (0, 1, 10, 0, 0, 0, 0))
    with pytest.raises(WriterError, match="Input/output"):
        sf.flush(fsync=True)
    sf.abandon("fsync failed: EIO")
    assert len(calls) == 1
    with open_for_read(tmp_path / "s.h5") as f:
        assert f["suspect"]["reason"][0] == b"fsync failed: EIO" and f["index"]["seq"].tolist() == [0]


def test_row07_a_part_name_that_is_taken_moves_to_the_next_part_number(live):
    # Issue 10 item 11: an EEXIST on the part file ended the stream.
    w = live()
    victim = w.tmp / "victim"
    victim.write_bytes(b"keep")
    (w.folder / "s.h5").symlink_to(victim)
    w.connected()
    assert w.record()["part"] == 1
    sent = send_range(w, range(3))
    w.wait_handled(3)
    w.stop()
    assert victim.read_bytes() == b"keep" and w.events("part_name_taken")
    assert_stored_exactly(w.folder / "s.part001.h5", sent)


@pytest.mark.e2e
@pytest.mark.parametrize("n", [120])  # ~1.2 s into the recording: several flushes committed
def test_row02_crash_at_nth_write_resumes_in_a_new_part_with_the_loss_as_an_exact_gap(tmp_path, daemon_factory, n):
    # Row 2 (crash at the Nth append: os._exit(137), nothing flushed or closed) and issue 10 item 12: a writer
    # restart's loss had no /gaps row; the new writer now continues after the last committed message.
    from acqd.service.procs import wait_until
    from tests.conftest import SMALL_RIG, assert_bit_exact, recording, rig_for, write_rig

    rig_file = write_rig(tmp_path, stream_overrides=SMALL_RIG)  # the sensor's crash is the subject
    daemon = daemon_factory(rig_file, env={"ACQD_FAULT": f"sensor:crash_after_write:{n}"})
    with recording(daemon, rig_file, "crashn", seed=4) as (_, folder):
        wait_until(lambda: (s := daemon.command("status")["streams"]["sensor"])["part"] == 1
                   and s["state"] == "recording" and s["rows"] > 0, "the restarted writer to record part 1")
        daemon.command("stop")
    daemon.command("stop", idle=True)
    cfg, rig = rig_for(rig_file, seed=4)
    streams = folder / "streams"
    with open_for_read(streams / "sensor.h5") as f:
        last = f["index"][-1] if f["index"].shape[0] else None
        assert assert_bit_exact(f, rig, "sensor") == (int(f["index"]["n_samples"].sum()) if last is not None else 0)
    with h5py.File(streams / "sensor.part001.h5", "r") as f:
        assert assert_bit_exact(f, rig, "sensor") == f["data"].shape[0] > 0
        first = f["index"][0]
        gaps = f["gaps"][:]
    assert last is not None  # both sides' seqs are known: the gap is exactly what the crash lost
    assert int(last["epoch"]) == int(first["epoch"])
    assert [(int(g["seq_from"]), int(g["seq_to"]), int(g["sample_from"]), int(g["sample_to"])) for g in gaps][0] == (
        int(last["seq"]) + 1, int(first["seq"]), int(last["first_sample"]) + int(last["n_samples"]),
        int(first["first_sample"]))
    session = json.loads((folder / "session.json").read_text())
    assert any(i["kind"] == "writer_died" and "code 137" in i["detail"] for i in session["incidents"])


def test_driver_edges_out_of_range_are_rejected_one_by_one_and_the_rest_kept(live):
    # Issue 10 item 12: one edge with line > 65535 or rising > 255 dropped every edge of the message.
    from acqd.wire.protocol import EDGE_DTYPE
    w = live(sync={"source": "frame"})
    w.connected()
    w.record()
    edges = np.array([(3, 0, 1), (4, 70000, 1), (5, 0, 300), (6, 1, 0), (2**63, 0, 1)], dtype=EDGE_DTYPE)
    sent = send_range(w, [0], edges=edges)
    sent |= send_range(w, [1])
    st = w.wait_handled(2 + 3)
    assert st["total"]["messages"] == 2 and st["total"]["rejected"] == {"edge": 3}
    w.stop()
    assert_stored_exactly(w.folder / "s.h5", sent)  # the message's data is written
    with open_for_read(w.folder / "s.h5") as f:
        assert f["sync/edges"][:].tolist() == [(3, 0, 1), (6, 1, 0)]
        rejects = f["rejects"][:]
    assert [Reject(int(r)) for r in rejects["reason"]] == [Reject.EDGE] * 3 and set(rejects["seq"].tolist()) == {0}
    assert [d.decode().split(":")[0] for d in rejects["detail"]] == [
        "edge sample 4 line 70000 rising 1", "edge sample 5 line 0 rising 300", f"edge sample {2**63} line 0 rising 1"]


def test_row25_wall_clock_step_is_an_event_and_bracketed_in_the_host_clock_table(live):
    w = live(env={"ACQD_FAULT": "s:wall_step:4"})  # from the 4th message on, wall time reads +1 h
    w.connected()
    w.record()
    sent = send_range(w, range(6))
    w.wait_handled(6)
    (step,) = w.events("clock_step")
    assert 3599e9 < step["step_ns"] < 3601e9 and "CLOCK_MONOTONIC" in step["detail"]
    w.stop()
    assert_stored_exactly(w.folder / "s.h5", sent)
    with open_for_read(w.folder / "s.h5") as f:
        clock, index = f["sync/clock"][:], f["index"][:]
    # The pair before and the pair after the step, back to back: the step is located to one message.
    steps = np.diff(clock["host_wall_ns"]) - np.diff(clock["host_mono_ns"])
    (at,) = np.flatnonzero(steps > 1e9)
    assert (int(clock["device_sample"][at]), int(clock["device_sample"][at + 1])) == (20, 30)
    assert np.all(np.diff(index["host_mono_ns"]) >= 0)  # sample timing never used the wall clock


def test_row11_duplicated_seq_is_dropped_and_counted(live):
    w = live()
    w.connected()
    w.record()
    sent = send_range(w, [0, 1])
    send_range(w, [1, 1])  # the same seq twice more
    sent |= send_range(w, [2])
    st = w.wait_handled(5)
    assert st["total"]["rejected"] == {"duplicate": 2}
    w.stop()
    assert_stored_exactly(w.folder / "s.h5", sent)  # exactly one copy
    _, gaps, rejects, _ = stored(w.folder / "s.h5")
    assert len(gaps) == 0 and rejects["seq"].tolist() == [1, 1]


def test_row12_out_of_order_is_not_reordered_the_late_message_is_recorded_and_flagged(live):
    # acqd does not reorder: a message older than the last written one is rejected as LATE (flagged in /rejects
    # with its seq and what it came after); the gap its absence left stays in /gaps. /index stays monotonic.
    w = live()
    w.connected()
    w.record()
    sent = send_range(w, [0, 1, 3, 4])
    late = send_range(w, [2])
    sent |= send_range(w, [5])
    st = w.wait_handled(6)
    assert st["total"]["rejected"] == {"late": 1} and st["total"]["gaps"] == 1
    w.stop()
    assert_stored_exactly(w.folder / "s.h5", sent)
    _, gaps, rejects, _ = stored(w.folder / "s.h5")
    assert [(Gap(int(g["kind"])), int(g["seq_from"]), int(g["seq_to"]), int(g["sample_from"]), int(g["sample_to"]))
            for g in gaps] == [(Gap.SEQ, 2, 3, 20, 30)]
    (r,) = rejects
    assert (Reject(int(r["reason"])), int(r["seq"]), int(r["nbytes"])) == (Reject.LATE, 2, 1 + HEADER.size + late[2].nbytes)
    assert r["detail"] == b"seq 2 arrived after seq 4"


def test_row13_gapped_seq_is_an_exact_gap_and_no_samples_are_fabricated(live):
    w = live()
    w.connected()
    w.record()
    sent = send_range(w, [0, 1, 5, 6])
    w.wait_handled(4)
    (event,) = [e for e in w.events("gap")]
    assert "seq [2, 5) samples [20, 50)" in event["detail"]
    w.stop()
    assert_stored_exactly(w.folder / "s.h5", sent)
    index, gaps, _, data = stored(w.folder / "s.h5")
    assert len(data) == 40 and [(int(g["seq_from"]), int(g["seq_to"]), int(g["file_row"])) for g in gaps] == [(2, 5, 20)]


def test_row16_dtype_or_shape_change_mid_stream_is_rejected_never_coerced(live):
    # The policy acqd picked: reject (the config declares dtype and shape; a file never changes layout).
    w = live()
    w.connected()
    w.record()
    sent = send_range(w, [0, 1])
    w.driver.send_multipart(message(2, 20, dtype="<f4")[0])
    w.driver.send_multipart(message(3, 30, shape=(5,))[0])
    sent |= send_range(w, [4])
    st = w.wait_handled(5)
    assert st["total"]["rejected"] == {"dtype": 1, "shape": 1}
    w.stop()
    assert_stored_exactly(w.folder / "s.h5", sent)
    _, gaps, rejects, _ = stored(w.folder / "s.h5")
    assert rejects["detail"].tolist() == [b"dtype <f4, expected <i2", b"shape (5,), expected (4,)"]
    assert [(int(g["seq_from"]), int(g["seq_to"])) for g in gaps] == [(2, 4)]


def test_row09_publisher_restart_is_a_link_event_and_a_restart_gap(live):
    import zmq
    w = live(driver="pub")
    w.connected()
    w.record()
    sent: dict[int, np.ndarray] = {}

    def publish_until_seen(epoch: int, start: int, want: int) -> int:
        """PUB drops until the subscription arrives: publish until the writer has taken ``want`` messages."""
        seq = start
        while w.stats()["total"]["messages"] < want:
            frames, data = message(seq, 10 * seq, epoch=epoch)
            w.driver.send_multipart(frames)
            sent[seq] = data
            seq += 1
        return seq

    publish_until_seen(7, 0, 3)
    w.rebind_driver()  # the driver restarted: new epoch, seq from 0, its counter carries on
    w.wait_for(lambda m: m["type"] == "event" and m["kind"] == "disconnected", "the link-down event")
    w.connected(2)
    before = w.stats()["total"]["messages"]
    old = dict(sent)
    sent.clear()
    end = publish_until_seen(8, 1000, before + 3)
    w.wait_handled(0)
    w.stop()
    index, gaps, _, data = stored(w.folder / "s.h5")
    epochs = index["epoch"].tolist()
    assert set(epochs) == {7, 8} and epochs == sorted(epochs)
    first_new = int(index["seq"][epochs.index(8)])
    last_old = index[epochs.index(8) - 1]
    assert [(Gap(int(g["kind"])), int(g["seq_from"]), int(g["seq_to"]), int(g["sample_from"]), int(g["sample_to"]))
            for g in gaps] == [(Gap.RESTART, 0, first_new, int(last_old["first_sample"]) + 10, 10 * first_new)]
    for row in index:
        a = int(row["file_row"])
        src = old if int(row["epoch"]) == 7 else sent
        assert np.array_equal(data[a:a + 10], src[int(row["seq"])])
    assert end > first_new


def test_row10_slow_joiner_push_queues_and_pub_reports_a_gap_from_seq_0(tmp_path, live):
    import threading
    w = live(driver="none", socket="pull")  # the writer connects to a driver that is not there yet
    import zmq
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.bind(w.cfg.endpoint)
    # PUSH/PULL: a driver that starts first blocks until acqd is there; nothing is lost.
    sender = threading.Thread(target=lambda: [push.send_multipart(message(s, 10 * s)[0]) for s in range(5)])
    sender.start()
    sender.join(20)
    st = w.wait_handled(5)
    assert st["total"]["messages"] == 5 and st["last_seq"] == 4 and not w.events("gap")
    push.close(0)
    w.close()
    # PUB/SUB: what was published before acqd connected is gone; acqd says so, from seq 0.
    tmp2 = tmp_path / "p"
    tmp2.mkdir()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(f"ipc://{tmp2}/d")
    for s in range(3):
        pub.send_multipart(message(s, 10 * s)[0])  # no subscriber yet: dropped by ZeroMQ
    w2 = live(driver="none", endpoint=f"ipc://{tmp2}/d", socket="sub")
    w2.connected()
    seq = 3
    while not w2.events("gap"):
        pub.send_multipart(message(seq, 10 * seq)[0])
        seq += 1
        w2.pump(20)
    (gap,) = w2.events("gap")
    assert gap["gap"] == "JOIN" and "seq [0, " in gap["detail"]
    pub.close(0)


def test_row27_a_bound_tcp_stream_takes_data_only_from_allow_listed_peers(live):
    # Issue 10 item 9: a stream bound with bind: true on tcp accepted any publisher (a rogue PUB got 500 rows in).
    import zmq
    w = live(driver="none", socket="pull", bind=True, endpoint="tcp://127.0.0.1:*", allow_from=["127.0.0.2"])
    endpoint = w.wait_for(lambda m: m["type"] == "event" and m["kind"] == "bound", "the bound endpoint")["endpoint"]
    port = endpoint.rsplit(":", 1)[1]
    w.record()
    ctx = zmq.Context.instance()
    rogue = ctx.socket(zmq.PUSH)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.connect(f"tcp://127.0.0.1:{port}")  # from 127.0.0.1: not on the list
    refused = w.wait_for(lambda m: m["type"] == "event" and m["kind"] == "peer_refused", "the rogue to be refused")
    assert refused["address"] == "127.0.0.1" and "not in allow_from ['127.0.0.2']" in refused["detail"]
    for seq in range(3):
        try:
            rogue.send_multipart(message(seq, 10 * seq)[0], zmq.NOBLOCK)
        except zmq.Again:
            pass
    friend = ctx.socket(zmq.PUSH)
    friend.setsockopt(zmq.LINGER, 0)
    friend.connect(f"tcp://127.0.0.2:0;127.0.0.1:{port}")  # source address 127.0.0.2: allowed
    w.connected()
    sent = {}
    for seq in range(100, 103):
        frames, sent[seq] = message(seq, 10 * seq, epoch=9)
        friend.send_multipart(frames)
    st = w.wait_handled(3)
    assert st["refused_peers"] >= 1 and st["peers"] == 1 and st["total"]["messages"] == 3
    w.stop()
    rogue.close(0)
    friend.close(0)
    assert_stored_exactly(w.folder / "s.h5", sent)  # nothing from the rogue
    assert w.close() == 0  # the authenticator thread does not hold the writer up


def test_row27_a_bound_tcp_stream_with_curve_keys_takes_data_only_from_listed_keys(tmp_path, live):
    # Issue 22: allow_from is loopback by default, so any local process could send into a bound stream.
    import zmq
    from zmq.auth import create_certificates, load_certificate
    keys, listed = tmp_path / "keys", tmp_path / "drivers"
    listed.mkdir()
    keys.mkdir()
    create_certificates(keys, "acqd")
    create_certificates(keys, "friend")
    create_certificates(keys, "rogue")
    (listed / "friend.key").write_bytes((keys / "friend.key").read_bytes())  # only the friend's public key
    server_public, _ = load_certificate(keys / "acqd.key")
    w = live(driver="none", socket="pull", bind=True, endpoint="tcp://127.0.0.1:*",
             curve={"secret_key_file": str(keys / "acqd.key_secret"), "client_keys_dir": str(listed)})
    port = w.wait_for(lambda m: m["type"] == "event" and m["kind"] == "bound", "the bound endpoint")["endpoint"]
    port = port.rsplit(":", 1)[1]
    w.record()
    ctx = zmq.Context.instance()

    def driver(name: str | None) -> zmq.Socket:
        s = ctx.socket(zmq.PUSH)
        s.setsockopt(zmq.LINGER, 0)
        if name:
            s.curve_publickey, s.curve_secretkey = load_certificate(keys / f"{name}.key_secret")
            s.curve_serverkey = server_public
        s.connect(f"tcp://127.0.0.1:{port}")
        return s

    def refused(what: str, text: str) -> dict:
        return w.wait_for(lambda m: m["type"] == "event" and m["kind"] == "peer_refused" and text in m["detail"], what)

    rogue = driver("rogue")  # a local process with a key of its own: loopback is allowed, its key is not
    rogue_public = (keys / "rogue.key").read_text().split('public-key = "')[1].split('"')[0]
    r = refused("the rogue's key to be refused", rogue_public)
    assert r["address"] == "127.0.0.1" and "is not in client_keys_dir" in r["detail"], r
    plain = driver(None)  # no CURVE at all: its handshake fails (counted when libzmq reports it)
    for seq in range(3):
        for s in (rogue, plain):
            try:
                s.send_multipart(message(seq, 10 * seq)[0], zmq.NOBLOCK)
            except zmq.Again:
                pass
    friend = driver("friend")
    w.connected()
    sent = {}
    for seq in range(100, 103):
        frames, sent[seq] = message(seq, 10 * seq, epoch=9)
        friend.send_multipart(frames)
    st = w.wait_handled(3)
    assert st["refused_peers"] >= 1 and st["total"]["messages"] == 3, st
    w.stop()
    for s in (rogue, plain, friend):
        s.close(0)
    assert_stored_exactly(w.folder / "s.h5", sent)  # nothing from the rogue or the keyless driver
    assert w.close() == 0
