"""Fault-matrix row 39: a writer that falls behind (a slow disk, a starved CPU, a slow video encoder).

Real writer processes (tests/record/livewriter.py) slowed through the ``ACQD_FAULT`` hook (acqd.record.faults), fed
over real ZeroMQ sockets at about twice what they can sustain; the stream file and the video files are read back.
Every message sent is either stored bit-exact or inside a gap row that says why it is missing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import av
import numpy as np
import pytest
import zmq

from acqd.record.streamfile import gap_reasons, open_for_read
from acqd.record.video import VIDEO_DIR
from acqd.service.procs import wait_until
from tests.conftest import recording, write_rig
from tests.record.livewriter import LiveWriter, message

ROWS = 32
SHAPE = (64,)


def lost_by_reason(gaps: np.ndarray) -> dict[int, str]:
    """seq -> the reason of the gap row that covers it."""
    return {seq: why for g, why in zip(gaps, gap_reasons(gaps)) for seq in range(int(g["seq_from"]), int(g["seq_to"]))}


def message_gaps(msgs: list[dict]) -> float:
    """The longest silence between two reports of the writer (its heartbeat), from their arrival order."""
    times = [m["t"] for m in msgs]
    return max(np.diff(times), default=0.0)


class Timed(LiveWriter):
    """A LiveWriter that notes when each report arrived (to check the writer never went quiet)."""

    def pump(self, timeout_ms: int = 20) -> None:
        n = len(self.msgs)
        super().pump(timeout_ms)
        now = time.monotonic()
        for m in self.msgs[n:]:
            m["t"] = now


def test_row39_a_writer_at_twice_its_speed_loses_only_what_its_gaps_record(tmp_path: Path):
    # Each append sleeps 4 ms (<= 250 messages/s); the driver sends 500/s for 14 s through a PUB socket whose
    # high-water mark is small, so once the writer's receive queue is full ZeroMQ drops whole messages.
    w = Timed(tmp_path, driver="none", env={"ACQD_FAULT": "s:slow_write:4"}, shape=SHAPE, rate=16_000.0,
              socket="sub", timing={"stats_interval_s": 0.1, "flush_interval_s": 0.25})
    pub = w.ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 50)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(w.cfg.endpoint)
    try:
        w.connected()
        w.record()
        sent: dict[int, np.ndarray] = {}
        seq, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < 14.0:
            for _ in range(5):  # 5 every 10 ms: 500/s
                frames, sent[seq] = message(seq, seq * ROWS, n=ROWS, shape=SHAPE)
                pub.send_multipart(frames)
                seq += 1
            w.pump(0)
            time.sleep(max(0.0, t0 + seq / 500 - time.monotonic()))
        # Then slowly (one per stats report), until the writer has caught up; the last message arrives, so no loss hides at the end.
        deadline = time.monotonic() + 25
        while (latest := w.stats())["load"]["overloaded"] or latest["last_seq"] != seq - 1:
            assert time.monotonic() < deadline, f"the writer did not catch up: {latest['load']}"
            if latest["load"]["overloaded"]:
                frames, sent[seq] = message(seq, seq * ROWS, n=ROWS, shape=SHAPE)
                pub.send_multipart(frames)
                seq += 1
        w.stop()
    finally:
        pub.close(0)
    stats = [m for m in w.msgs if m["type"] == "stats"]
    behind = [m for m in stats if m["load"]["overloaded"]]
    assert behind, "the writer never said it was behind"
    assert max(m["load"]["backlog_messages"] for m in behind) > 100
    assert any(m["shedding"][:2] == ["previews", "live_sync"] for m in behind), "non-data work was not shed in order"
    assert [e["kind"] for e in w.events("overload")], "no overload incident"
    assert message_gaps(w.msgs) < 1.5, "the writer went quiet (the daemon reports it hung after 2 s)"
    with open_for_read(w.folder / "s.h5") as f:
        index, gaps, data = f["index"][:], f["gaps"][:], f["data"]
        for row in index:  # everything stored is exactly what was sent
            a, n = int(row["file_row"]), int(row["n_samples"])
            assert np.array_equal(data[a:a + n], sent[int(row["seq"])])
    lost = lost_by_reason(gaps)
    stored = set(index["seq"].tolist())
    assert stored | set(lost) == set(range(seq)) and not stored & set(lost)
    assert set(lost.values()) <= {"overload", "hwm"} and "overload" in lost.values(), set(lost.values())
    gap_events = w.events("gap")
    assert sum(e["reason"] == "overload" for e in gap_events) == sum(why == "overload" for why in gap_reasons(gaps))
    final = stats[-1]["total"]["lost"]
    assert sum(final.values()) == len(lost), (final, len(lost))
    print(f"row39: sent {seq}, stored {len(stored)}, lost {len(lost)} in {len(gaps)} gap rows {final}; "
          f"peak backlog {max(m['load']['backlog_messages'] for m in behind)} messages, "
          f"flush max {max(m['load']['flush_max_s'] for m in stats):.3f} s")
    w.close()


def test_row39_a_slow_video_encoder_never_holds_the_receive_path(tmp_path: Path):
    # The encoder takes 30 ms more per frame (<= 33 fps) and the camera sends 100 fps for 6 s; it may hold 0.5 s of
    # frames. Frames beyond that are lost with reason encoder, everything else is encoded bit-exact, the writer keeps
    # reporting, and a stop waits for the encoder's backlog with progress.
    shape = (48, 64)
    w = Timed(tmp_path, env={"ACQD_FAULT": "cam:slow_encode:30"}, name="cam", kind="video", dtype="|u1", shape=shape,
              rate=100.0, video={"codec": "ffv1", "frames_per_file": 40, "max_backlog_s": 0.5})
    w.connected()
    w.record()
    sent: dict[int, np.ndarray] = {}
    t0 = time.monotonic()
    for seq in range(600):
        frames, sent[seq] = message(seq, seq, n=1, stream="cam", dtype="|u1", shape=shape)
        w.driver.send_multipart(frames)
        w.pump(0)
        time.sleep(max(0.0, t0 + (seq + 1) / 100 - time.monotonic()))
    st = w.wait_handled(600)
    assert st["load"]["encoder_backlog"] > 0 and st["load"]["encoder_limit"] == 50
    t_stop = time.monotonic()
    closed = w.stop()
    print(f"row39 camera: stop took {time.monotonic() - t_stop:.1f} s, {len(w.msgs)} reports")
    assert w.events("overload"), "the encoder's backlog was not reported"
    assert any(m["type"] == "closing" for m in w.msgs), "no progress while the stop waited for the encoder"
    assert message_gaps(w.msgs) < 1.5, "the writer went quiet (the daemon reports it hung after 2 s)"
    with open_for_read(w.folder / "cam.h5") as f:
        index, gaps, video = f["index"][:], f["gaps"][:], f["video"][:]
    lost = lost_by_reason(gaps)
    stored = set(index["seq"].tolist())
    assert stored | set(lost) == set(range(600)) and not stored & set(lost), (len(stored), len(lost))
    assert set(lost.values()) == {"encoder"} and closed["counts"]["lost"] == {"encoder": len(lost)}
    frames = []
    for v in video:
        with av.open(str(tmp_path / VIDEO_DIR / bytes(v["file"]).decode())) as c:
            frames += [fr.to_ndarray(format="gray") for fr in c.decode(video=0)]
    assert len(frames) == len(index)
    for row in index:
        assert np.array_equal(frames[int(row["file_row"])], sent[int(row["seq"])][0])
    print(f"row39 camera: {len(stored)} frames encoded, {len(lost)} lost with reason encoder in {len(gaps)} gap rows")
    w.close()


@pytest.mark.slow
def test_row39_camera_encoder_behind_in_the_daemon_is_never_hung_and_qc_lists_its_losses(tmp_path: Path,
                                                                                         daemon_factory):
    # The case in the whole daemon: the camera's encoder cannot keep up (40 ms more per 640x480 frame at
    # 60 fps). The stream says so in status, is never reported hung, stop waits for the encoder, and finalize's QC
    # lists the frames lost by reason.
    video = {"codec": "ffv1", "frames_per_file": 120, "max_backlog_s": 1.0}
    rig_file = write_rig(tmp_path, stream_overrides={"camera": {"video": video}})
    daemon = daemon_factory(rig_file, env={"ACQD_FAULT": "camera:slow_encode:40"})
    with recording(daemon, rig_file, "overload", seed=7) as (_, folder):
        cam = wait_until(lambda: (s := daemon.command("status")["streams"]["camera"])["lost"].get("encoder") and s,
                         "frames lost by the encoder", 60)
        assert cam["state"] == "recording" and cam["load"]["encoder_limit"] == 60 and "previews" in cam["shedding"]
        daemon.command("stop")
    session = json.loads((folder / "session.json").read_text())
    kinds = [i["kind"] for i in session["incidents"] if i["stream"] == "camera"]
    assert "overload" in kinds and "writer_hung" not in kinds and "stop_timeout" not in kinds, kinds
    assert any(i["kind"] == "gap" and "(encoder)" in i["detail"] for i in session["incidents"])
    daemon.command("finalize", session="overload")
    job = wait_until(lambda: (j := daemon.command("finalize_status", session="overload"))["state"] != "running"
                     and j, "finalize to finish", 300, every_s=0.25)
    assert job["state"] == "done", job["error"]
    qc = job["report"]["streams"]["camera"]["qc"]
    assert qc["gaps_by_reason"].get("encoder", 0) >= 1 and any("encoder" in r for r in qc["reasons"]), qc


def test_row39_a_stop_waits_as_long_as_the_writers_make_progress(tmp_path: Path):
    # stop_recording waits for writers to close with a timeout that runs from their last progress (a camera's
    # encoder finishing its backlog reports ``closing``): progress for 3x the timeout is waited for; none is not.
    from acqd.config import load_config
    from acqd.errors import SessionError
    from acqd.service.supervisor import Supervisor

    sup = Supervisor(load_config(write_rig(tmp_path)))
    try:
        t0 = time.monotonic()
        sup._wait_for(lambda: time.monotonic() - t0 > 1.5, "the encoder", timeout_s=0.5,
                      progress=lambda: int((time.monotonic() - t0) / 0.2))
        assert time.monotonic() - t0 > 1.5
        t0 = time.monotonic()
        with pytest.raises(SessionError, match="timed out after"):
            sup._wait_for(lambda: False, "a stuck encoder", timeout_s=0.5, progress=lambda: 7)
        assert time.monotonic() - t0 < 1.5
    finally:
        sup.shutdown()
