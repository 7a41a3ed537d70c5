"""A real writer process driven the way the supervisor drives it, for tests of the wire and record side.

``LiveWriter`` binds the control ROUTER and (by default) a PUSH driver socket on ``ipc://`` endpoints in
the test's folder, starts ``python -m acqd.record.writer`` with a spec, and collects everything the writer
reports (ready, stats, events, recording, closed). Waits poll with a deadline; the process is always reaped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zmq

from acqd.config import StreamConfig
from acqd.record.writer import WriterSpec
from acqd.service.procs import stop_process
from acqd.wire.protocol import Header, encode
from tests import zygote


class LiveWriter:
    """One writer process, its control channel and a driver socket feeding it."""

    def __init__(self, tmp: Path, *, env: dict | None = None, driver: str = "push", timing: dict | None = None,
                 **stream: object):
        self.tmp = tmp
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.bind(f"ipc://{tmp}/c")
        fields = {"name": "s", "endpoint": f"ipc://{tmp}/d", "socket": "pull" if driver == "push" else "sub",
                  "dtype": "int16", "shape": (4,), "rate": 1000.0, **stream}
        self.cfg = StreamConfig.model_validate(fields)
        self.driver = None
        if driver in ("push", "pub"):
            self.driver = self.ctx.socket(zmq.PUSH if driver == "push" else zmq.PUB)
            self.driver.setsockopt(zmq.LINGER, 0)
            self.driver.bind(self.cfg.endpoint)
        spec = WriterSpec(stream=self.cfg, lines=[], control=f"ipc://{tmp}/c", **{
            "flush_interval_s": 0.05, "fsync_interval_s": 0.0, "stats_interval_s": 0.1, "clock_pair_interval_s": 0.5,
            **(timing or {})})  # ``timing``: the daemon's intervals, when a test needs the defaults' cadence
        self.proc = zygote.popen([sys.executable, "-m", "acqd.record.writer", spec.to_json()],
                                 stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})
        self.msgs: list[dict] = []
        self.folder = tmp / "streams"
        self.folder.mkdir(exist_ok=True)
        try:
            self.wait_for(lambda m: m["type"] == "ready", "the writer to start")
        except BaseException:  # a context left to the garbage collector could block its thread in term(), for good
            self.close()
            raise

    # -- what the writer reports ----------------------------------------------------------------
    def pump(self, timeout_ms: int = 20) -> None:
        while self.router.poll(timeout_ms):
            _, raw = self.router.recv_multipart()
            self.msgs.append(zmq.utils.jsonapi.loads(raw))
            timeout_ms = 0

    def wait_for(self, pred: Callable[[dict], bool], what: str, timeout_s: float = 20.0, since: int = 0) -> dict:
        """The first report from index ``since`` on that satisfies ``pred``, waiting for it if need be."""
        deadline, seen = time.monotonic() + timeout_s, since
        while True:
            for m in self.msgs[seen:]:
                if pred(m):
                    return m
            seen = len(self.msgs)
            if time.monotonic() > deadline:
                raise TimeoutError(f"waiting for {what}; the writer sent {self.msgs[-5:]}")
            if self.proc.poll() is not None:
                self.pump(0)
                if not any(pred(m) for m in self.msgs[seen:]):
                    raise AssertionError(f"the writer exited ({self.proc.returncode}) while waiting for {what}")
            self.pump(50)

    def events(self, kind: str) -> list[dict]:
        self.pump(0)
        return [m for m in self.msgs if m["type"] == "event" and m["kind"] == kind]

    def stats(self) -> dict:
        """The writer's next stats report (sent after everything it received before was handled)."""
        self.pump(0)
        return self.wait_for(lambda m: m["type"] == "stats", "stats", since=len(self.msgs))

    def wait_handled(self, n: int, timeout_s: float = 20.0) -> dict:
        """Wait until ``n`` messages were accepted or rejected since the writer started; returns the stats."""
        deadline = time.monotonic() + timeout_s
        while True:
            st = self.stats()
            if st["total"]["messages"] + st["total"]["rejected_total"] >= n:
                return st
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n} messages handled; stats {st['total']}")

    def peak_rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):  # the peak: a buffered message is freed again right after
                return int(line.split()[1])
        raise AssertionError("no VmHWM")

    # -- commands --------------------------------------------------------------------------------
    def command(self, **cmd: object) -> None:
        self.router.send_multipart([self.cfg.name.encode(), zmq.utils.jsonapi.dumps(cmd)])

    def record(self, part: int = 0, session_id: str = "t", folder: Path | None = None) -> dict:
        if folder is not None:
            self.folder = folder
            folder.mkdir(parents=True, exist_ok=True)
        self.pump(0)
        n = len(self.msgs)
        self.command(cmd="record", folder=str(self.folder), session={"session_id": session_id}, part=part)
        return self.wait_for(lambda m: m["type"] == "recording", "recording", since=n)

    def stop(self) -> dict:
        self.pump(0)
        n = len(self.msgs)
        self.command(cmd="stop")
        return self.wait_for(lambda m: m["type"] == "closed" and m.get("final", True), "the file to close", since=n)

    def rebind_driver(self, timeout_s: float = 20.0) -> None:
        """Close the driver socket and bind a fresh one on the same endpoint, as a driver restarting its socket does.
        The old listener has removed its ipc file (its CLOSED event) before the new one binds, so it cannot remove
        the new one's."""
        monitor = self.driver.get_monitor_socket(zmq.EVENT_CLOSED)
        self.driver.unbind(self.cfg.endpoint)
        if not monitor.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"the driver socket still listens on {self.cfg.endpoint}")
        self.driver.disable_monitor()
        monitor.close(linger=0)
        kind = self.driver.type
        self.driver.close(linger=0)
        self.driver = self.ctx.socket(kind)
        self.driver.setsockopt(zmq.LINGER, 0)
        self.driver.bind(self.cfg.endpoint)

    def connected(self, count: int = 1) -> None:
        self.wait_for(lambda m: m["type"] == "event" and m["kind"] == "connected"
                      and len(self.events("connected")) >= count, f"{count} driver connection(s)")

    def close(self) -> int:
        if self.proc.poll() is None:
            self.command(cmd="shutdown")
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                stop_process(self.proc, 10)
        self.ctx.destroy(linger=0)
        return self.proc.returncode


def message(seq: int, first: int, *, n: int = 10, epoch: int = 7, stream: str = "s", dtype: str = "<i2",
            shape: tuple[int, ...] = (4,), edges: np.ndarray | None = None) -> tuple[list, np.ndarray]:
    """A valid message's frames and its data (values derived from the sample index, so each is unique)."""
    data = ((np.arange(first, first + n, dtype=np.uint64)[:, None] * 7 + np.arange(int(np.prod(shape))))
            % 30011).astype(dtype).reshape((n, *shape))
    h = Header(stream, seq, epoch, first, n, np.dtype(dtype).str, shape)
    return [bytes(memoryview(f)) if not isinstance(f, bytes) else f for f in encode(h, data, edges=edges)], data
