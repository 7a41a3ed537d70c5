"""A writer that stops on a dead disk leaves cleanly while its receiver thread is blocked in a receive.

A stream drained at its timers (a slow stream with its own sync edges) has a receiver thread that owns its data
socket. ``Writer.abandon`` destroyed the ZeroMQ context under it: libzmq aborted (``Assertion failed: _term_acks >
0``, SIGABRT) or the process hung, 1 run in 3 of row 7's dead disk under the daemon, which the supervisor then saw as
a crash (or a writer that never reported). Each run here fails its disk while messages keep arriving."""

from __future__ import annotations

import time

import pytest
import zmq

from acqd.record.writer import EXIT_WRITE_ERROR
from tests.record.livewriter import LiveWriter, message


@pytest.mark.parametrize("run", range(4))
def test_a_writer_whose_disk_dies_under_a_busy_receiver_exits_with_its_reason(tmp_path, run):
    w = LiveWriter(tmp_path, env={"ACQD_FAULT": "s:dead_disk:21"}, chunk_rows=10, sync={"source": "frame"})
    try:
        w.connected()
        w.record()
        seq, deadline = 0, time.monotonic() + 20
        while w.proc.poll() is None and time.monotonic() < deadline:  # the receiver is never idle long
            try:
                w.driver.send_multipart(message(seq, 10 * seq)[0], zmq.NOBLOCK)
                seq += 1
            except zmq.Again:  # the writer is gone or behind: PUSH holds the rest
                pass
            time.sleep(0.002)
        assert w.proc.poll() == EXIT_WRITE_ERROR, f"exit {w.proc.poll()} (SIGABRT is -6; None: still running)"
        w.pump(0)
        assert w.events("write_error")
    finally:
        w.close()
