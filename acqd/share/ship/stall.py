"""When an rclone run is stalled: it moved no byte for ``stall_s`` seconds of the time it could have run.

rclone's own I/O timeout (``--timeout``, 5 minutes by default) is what ends a transfer over a connection that went
silent (an SFTP server that came back half-alive, a network that drops packets without a reset). It cannot simply
be lowered: it is a wall-clock deadline on every socket read, and acqd runs rclone at nice 19, so on a busy machine
a healthy rclone waiting for a CPU misses a short deadline and fails with ``i/o timeout`` (measured: 6 busy loops
on rclone's CPU, ``--contimeout 2s --timeout 2s``: ``dial tcp: i/o timeout`` and ``connection lost`` on a healthy
loopback SFTP server; 10 s passed). So acqd watches rclone from outside instead:

* **moved** is what rclone read (``rchar`` of ``/proc/PID/io``: files it sends or hashes, sockets it receives from),
  counted only in steps of ``MOVED_STEP`` bytes, so that the few bytes the Go runtime reads now and then are not
  taken for progress;
* the stall clock runs only while rclone was not waiting for a CPU: each interval minus the longest run-queue wait
  of its threads over it (``/proc/PID/task/*/schedstat``, read only while nothing moves), so a starved rclone is
  never called stalled.

A system without these ``/proc`` files (not Linux) has no stall detection; rclone's own timeout still applies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MOVED_STEP = 64 * 1024
"""Reads smaller than this in total are no progress (a stalled rclone reads about a byte every two seconds)."""


def read_chars(pid: int) -> int | None:
    """Bytes the process has read so far (all files, pipes and sockets); None if /proc does not say."""
    try:
        return next(int(line.split()[1]) for line in Path(f"/proc/{pid}/io").read_text().splitlines()
                    if line.startswith("rchar:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def run_delays(pid: int) -> dict[int, float]:
    """Per thread id: seconds it has spent waiting on a run queue (empty if /proc does not say)."""
    delays = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return delays
    for task in tasks:
        try:
            delays[int(task.name)] = int((task / "schedstat").read_text().split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            continue  # a thread that just ended
    return delays


@dataclass
class StallClock:
    """Fed what a process read at each check; says how long it has moved nothing while it could run."""

    stall_s: float
    stalled_s: float = 0.0
    _moved_at: int = 0
    """What it had read when it last moved a step."""
    _t: float | None = None
    _delays: dict[int, float] | None = None
    """Run-queue waits at the last check, while it is not moving (not read while it moves: that is the common case)."""

    def feed(self, now: float, rchar: int, delays: Callable[[], dict[int, float]]) -> bool:
        """Take what the process had read at ``now`` (monotonic seconds); ``delays()`` gives its threads' run-queue
        waits (``run_delays``). True once it counts as stalled."""
        if self._t is None or rchar - self._moved_at >= MOVED_STEP:
            self._moved_at, self.stalled_s, self._delays = rchar, 0.0, None
        else:
            waits = delays()
            if self._delays is not None:  # the first still interval has no baseline: not counted
                waited = max((d - self._delays[t] for t, d in waits.items() if t in self._delays), default=0.0)
                self.stalled_s += max(0.0, now - self._t - max(0.0, waited))
            self._delays = waits
        self._t = now
        return self.stalled_s >= self.stall_s
