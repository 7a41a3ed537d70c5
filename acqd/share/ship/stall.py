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
  of its threads over it (``/proc/PID/task/*/schedstat``), so a starved rclone is never called stalled.

A system without these ``/proc`` files (not Linux) has no stall detection; rclone's own timeout still applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MOVED_STEP = 64 * 1024
"""Reads smaller than this in total are no progress (a stalled rclone reads about a byte every two seconds)."""


@dataclass(frozen=True, slots=True)
class Sample:
    """What /proc says about an rclone process at one moment."""

    rchar: int
    """Bytes it has read (all files, pipes and sockets)."""
    run_delay_s: dict[int, float]
    """Per thread id: seconds it has spent waiting on a run queue."""


def sample(pid: int) -> Sample | None:
    """The process's counters now; None if /proc does not have them (or the process is gone)."""
    proc = Path(f"/proc/{pid}")
    try:
        rchar = next(int(line.split()[1]) for line in (proc / "io").read_text().splitlines()
                     if line.startswith("rchar:"))
        delays = {}
        for task in (proc / "task").iterdir():
            try:
                delays[int(task.name)] = int((task / "schedstat").read_text().split()[1]) / 1e9
            except (OSError, IndexError, ValueError):
                continue  # a thread that just ended
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return Sample(rchar, delays)


@dataclass
class StallClock:
    """Fed one ``Sample`` per check; says how long the process has moved nothing while it could run."""

    stall_s: float
    stalled_s: float = 0.0
    _moved_at: int = 0
    """``rchar`` when it last moved a step."""
    _last: Sample | None = None
    _last_t: float = 0.0

    def feed(self, now: float, s: Sample) -> bool:
        """Take the sample taken at ``now`` (monotonic seconds); True once the process counts as stalled."""
        if self._last is None or s.rchar - self._moved_at >= MOVED_STEP:
            self._moved_at = s.rchar
            self.stalled_s = 0.0
        else:
            dt = now - self._last_t
            before = self._last.run_delay_s
            waited = max((d - before[t] for t, d in s.run_delay_s.items() if t in before), default=0.0)
            self.stalled_s += max(0.0, dt - max(0.0, waited))
        self._last, self._last_t = s, now
        return self.stalled_s >= self.stall_s
