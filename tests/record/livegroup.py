"""A real group writer process (acqd.record.group) driven the way the supervisor drives it.

``LiveGroup`` binds the control ROUTER and one PUSH (or PUB) driver socket per stream on ``ipc://`` endpoints in
the test's folder, writes the group's spec, starts ``python -m acqd.record.launch`` with it, and collects what
every stream reports, by stream. Waits poll with a deadline; the process is always reaped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import zmq

from acqd.config import StreamConfig
from acqd.record.group import GroupSpec
from acqd.record.writer import WriterSpec
from acqd.service.procs import stop_process
from tests import zygote


class LiveGroup:
    """One group writer process hosting ``names``, its control channel and a driver socket per stream."""

    def __init__(self, tmp: Path, names: list[str], *, driver: str = "push", env: dict | None = None,
                 timing: dict | None = None, **stream: object):
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.bind(f"ipc://{tmp}/c")
        self.cfgs = {n: StreamConfig.model_validate({
            "name": n, "endpoint": f"ipc://{tmp}/d{i}", "socket": "pull" if driver == "push" else "sub",
            "dtype": "int16", "shape": (4,), "rate": 1000.0, **stream}) for i, n in enumerate(names)}
        self.drivers = {}
        for n, cfg in self.cfgs.items():
            self.drivers[n] = self.ctx.socket(zmq.PUSH if driver == "push" else zmq.PUB)
            self.drivers[n].setsockopt(zmq.LINGER, 0)
            self.drivers[n].bind(cfg.endpoint)
        timing = {"flush_interval_s": 0.1, "fsync_interval_s": None, "stats_interval_s": 0.1,
                  "clock_pair_interval_s": 0.5, **(timing or {})}  # ``timing``: e.g. the daemon's defaults
        specs = [WriterSpec(stream=cfg, lines=[], control=f"ipc://{tmp}/c", **timing) for cfg in self.cfgs.values()]
        arg = GroupSpec("g", specs).write(tmp / "group.json")
        self.proc = zygote.popen([sys.executable, "-m", "acqd.record.launch", arg], stdin=subprocess.DEVNULL,
                                 env={**os.environ, **(env or {})})
        self.msgs: list[tuple[str, dict]] = []
        self.folder = tmp / "streams"
        self.folder.mkdir(exist_ok=True)
        try:
            for n in names:
                self.wait_for(n, lambda m: m["type"] == "ready", "the stream to start", timeout_s=60)
        except BaseException:  # a context left to the garbage collector could block its thread in term(), for good
            self.close()
            raise

    def pump(self, timeout_ms: int = 20) -> None:
        while self.router.poll(timeout_ms):
            ident, raw = self.router.recv_multipart()
            self.msgs.append((ident.decode(), zmq.utils.jsonapi.loads(raw)))
            timeout_ms = 0

    def wait_for(self, name: str, pred: Callable[[dict], bool], what: str, timeout_s: float = 20.0,
                 since: int = 0) -> dict:
        """The first report of stream ``name`` from index ``since`` on that satisfies ``pred``."""
        deadline, seen = time.monotonic() + timeout_s, since
        while True:
            for n, m in self.msgs[seen:]:
                if n == name and pred(m):
                    return m
            seen = len(self.msgs)
            if time.monotonic() > deadline:
                raise TimeoutError(f"waiting for {what} of {name}")
            if self.proc.poll() is not None:
                raise AssertionError(f"the group writer exited ({self.proc.returncode}) while waiting for {what}")
            self.pump(50)

    def wait_connected(self) -> None:
        """Until every stream's driver is connected."""
        for name in self.cfgs:
            self.wait_for(name, lambda m: m["type"] == "event" and m["kind"] == "connected", "its driver")

    def command(self, name: str, **cmd: object) -> None:
        self.router.send_multipart([name.encode(), zmq.utils.jsonapi.dumps(cmd)])

    def record_all(self) -> None:
        self.pump(0)
        n = len(self.msgs)
        for name in self.cfgs:
            self.command(name, cmd="record", folder=str(self.folder), session={"session_id": "t"}, part=0)
        for name in self.cfgs:
            self.wait_for(name, lambda m: m["type"] == "recording", "recording", since=n)

    def stats(self, name: str) -> dict:
        self.pump(0)
        return self.wait_for(name, lambda m: m["type"] == "stats", "stats", since=len(self.msgs))

    def wait_handled(self, name: str, n: int, timeout_s: float = 20.0) -> None:
        """Until ``n`` messages of ``name`` were accepted or rejected."""
        deadline = time.monotonic() + timeout_s
        while (t := self.stats(name)["total"])["messages"] + t["rejected_total"] < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n} messages of {name} handled; stats {t}")

    def stop_all(self) -> None:
        self.pump(0)
        n = len(self.msgs)
        for name in self.cfgs:
            self.command(name, cmd="stop")
        for name in self.cfgs:
            self.wait_for(name, lambda m: m["type"] == "closed" and m.get("final", True), "the file to close", since=n)

    def close(self) -> int:
        if self.proc.poll() is None:
            for name in self.cfgs:
                self.command(name, cmd="shutdown")
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                stop_process(self.proc, 10)
        self.ctx.destroy(linger=0)
        return self.proc.returncode
