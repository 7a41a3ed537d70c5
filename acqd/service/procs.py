"""Running acqd's own processes: the daemon and the simulated rig as real subprocesses.

Shared by ``acqd demo``, ``scripts/bench`` and the integration tests. Every wait has a deadline,
every process is reaped, and readiness is a signal (a ready file, a line on stdout), never a sleep.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from acqd.client import Client
from acqd.record.forkserver import pid_alive  # noqa: F401 - the tests' too

T = TypeVar("T")

popen: Callable[..., subprocess.Popen] = subprocess.Popen
"""How acqd starts ``python -m acqd.cli`` processes (``Daemon``, ``Simulator``, the daemon's finalize and export
jobs). The tests fork them from a process that has imported acqd already (``tests/zygote.py``)."""


def wait_until(cond: Callable[[], T], what: str, timeout_s: float = 60.0, every_s: float = 0.05) -> T:
    """Poll ``cond`` until it returns something truthy (returned), or raise TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


def stop_process(proc: subprocess.Popen, timeout_s: float = 60.0, sig: int = signal.SIGTERM) -> int:
    """Send ``sig``, wait, then SIGKILL if it must: the process is always reaped."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


class Daemon:
    """``acqd serve`` on a free port, with a client once its API is up."""

    def __init__(self, config: Path, data_root: Path, workdir: Path, env: dict | None = None, log: Path | None = None,
                 *, port: int = 0, token: str | None = None, wrap: tuple[str, ...] = ()):
        """``wrap``: a command the daemon runs under (``ip netns exec NS`` for a PC of a multi-PC test rig); it must
        exec the daemon, so that ``pid`` is the daemon's own."""
        ready = workdir / f"daemon-{time.monotonic_ns()}.json"
        err = open(log, "ab") if log else None  # its stderr goes to ``log`` if given
        try:
            self.proc = popen(
                [*wrap, sys.executable, "-m", "acqd.cli", "serve", "--config", str(config), "--data-root",
                 str(data_root), "--port", str(port), "--ready-file", str(ready)],
                stdin=subprocess.DEVNULL, stderr=err, env={**os.environ, **(env or {})})
        finally:
            if err:
                err.close()
        wait_until(lambda: ready.exists() or self.proc.poll() is not None, "the daemon to start")
        if self.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with code {self.proc.returncode}")
        info = json.loads(ready.read_text())
        self.url, self.pid, self.info = info["url"], info["pid"], info
        self.client = Client(self.url, token)

    def command(self, name: str, **body: object) -> dict:
        return self.client.command(name, **body)

    def stop(self, timeout_s: float = 60.0) -> int:
        return stop_process(self.proc, timeout_s)


class Simulator:
    """``acqd simulate`` as a subprocess; ready once it has printed that it is publishing."""

    def __init__(self, config: Path, seconds: float, *, seed: int = 0, faults: tuple[str, ...] = (),
                 truth: Path | None = None, timeout_s: float = 60.0, extra: tuple[str, ...] = (),
                 wrap: tuple[str, ...] = ()):
        args = [*wrap, sys.executable, "-m", "acqd.cli", "simulate", "--config", str(config), "--seconds", str(seconds),
                "--seed", str(seed), *extra]
        for f in faults:
            args += ["--fault", f]
        if truth:
            args += ["--truth", str(truth)]
        self.proc = popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                stop_process(self.proc)
                raise RuntimeError("the simulator did not start publishing")
            if select.select([self.proc.stdout], [], [], left)[0] and "publishing" in self.proc.stdout.readline():
                return

    def wait(self, timeout_s: float = 120.0) -> int:
        try:
            return self.proc.wait(timeout_s)
        finally:
            stop_process(self.proc)

    def stop(self) -> int:
        return stop_process(self.proc)
