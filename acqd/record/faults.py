"""Fault injection for tests: the writer's ``ACQD_FAULT`` hook (parsed once at writer start).

``ACQD_FAULT=stream:kind:N[,stream:kind:N...]`` makes the writer of ``stream`` fail on purpose:

- ``eio_on_write:N``  the Nth append (counted across parts) fails with EIO, as a failing disk does;
- ``eio_on_fsync:N``  the Nth fsync fails with EIO;
- ``dead_disk:N``  from the Nth append on, the disk fails every write for good: the descriptor HDF5 writes the
  part through is replaced by a read-only one of the same file, so HDF5's own writes fail at the OS level
  (EBADF), and so do those of every part opened afterwards (reads still work, as on a disk that fails writes);
- ``crash_after_write:N``  the process ends with ``os._exit(137)`` right after the Nth append (a crash at
  the Nth write, SQLite style: nothing is closed or flushed), only while recording part 0: the writer the
  supervisor restarts (part 1 on) inherits the variable and must run clean, as after a one-off crash;
- ``wall_step:N``  from the Nth message on, the host wall clock reads one hour later (a wall-clock step;
  CLOCK_MONOTONIC is untouched);
- ``slow_write:N``  every append takes N ms longer (a slow disk or a starved CPU: the writer falls behind);
- ``slow_encode:N``  a camera's video encoder takes N ms longer per frame (an encoder that cannot keep up);
- ``slow_fsync:N``  every fsync takes N ms longer (a disk whose journal is busy with a fat rig's writes).

Each fault fires once, except ``dead_disk`` (it stays) and the ``slow_`` ones, which slow every call. Nothing reads the variable outside ``Faults.from_env``, which only the writer's
(and the group writer's) ``main`` calls: users cannot trip these paths by accident, tests set the variable on the daemon they start.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

FAULT_ENV = "ACQD_FAULT"
KINDS = ("eio_on_write", "eio_on_fsync", "dead_disk", "crash_after_write", "wall_step", "slow_write", "slow_encode",
         "slow_fsync")
WALL_STEP_NS = 3600 * 10**9
CRASH_EXIT = 137


@dataclass
class Faults:
    """The faults armed for one writer, and how many appends, fsyncs and messages it has seen."""

    at: dict[str, int] = field(default_factory=dict)
    """kind -> N (1-based) of the event that fails."""
    seen: dict[str, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, stream: str) -> Faults:
        """Faults of ``stream`` in an ``ACQD_FAULT`` value; a malformed item is an error (tests only)."""
        at = {}
        for item in filter(None, (x.strip() for x in text.split(","))):
            name, kind, n = item.rsplit(":", 2)
            if kind not in KINDS or int(n) < 1:
                raise ValueError(f"{FAULT_ENV}: {item!r}: kind must be one of {', '.join(KINDS)}, N >= 1")
            if name == stream:
                at[kind] = int(n)
        return cls(at)

    @classmethod
    def from_env(cls, stream: str) -> Faults:
        return cls.parse(os.environ.get(FAULT_ENV, ""), stream)

    def _count(self, kind: str) -> bool:
        """Count one event of ``kind``; True when it is the armed one."""
        if kind not in self.at:
            return False
        self.seen[kind] = self.seen.get(kind, 0) + 1
        return self.seen[kind] == self.at[kind]

    def before_append(self) -> None:
        if "slow_write" in self.at:
            time.sleep(self.at["slow_write"] / 1000)
        if self._count("eio_on_write"):
            raise OSError(errno.EIO, "Input/output error (write; injected by ACQD_FAULT)")

    def disk_dead(self, append: bool) -> bool:
        """``dead_disk``: whether the disk fails writes now (``append``: this call counts as an append)."""
        if append:
            self._count("dead_disk")
        return self.seen.get("dead_disk", 0) >= self.at.get("dead_disk", 0) > 0

    def after_append(self, part: int) -> None:
        if part == 0 and self._count("crash_after_write"):
            os._exit(CRASH_EXIT)

    def encode_delay_s(self) -> float:
        """Seconds added to each frame a camera's encoder encodes (``slow_encode``)."""
        return self.at.get("slow_encode", 0) / 1000

    def wall_offset_ns(self) -> int:
        """Added to the host wall clock from the armed message on."""
        self._count("wall_step")
        return WALL_STEP_NS if self.seen.get("wall_step", 0) >= self.at.get("wall_step", 0) > 0 else 0

    def fsync(self) -> Callable[[int], None]:
        """``os.fsync``, failing with EIO on the armed call, each call ``slow_fsync`` ms longer."""
        def fsync(fd: int) -> None:
            time.sleep(self.at.get("slow_fsync", 0) / 1000)
            if self._count("eio_on_fsync"):
                raise OSError(errno.EIO, "Input/output error (fsync; injected by ACQD_FAULT)")
            os.fsync(fd)
        return fsync


def fail_writes(path: str | os.PathLike, fd: int) -> None:
    """Make every later write through ``fd`` (a part's HDF5 descriptor) fail: it becomes a read-only descriptor of
    the same file (``dead_disk``)."""
    ro = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.dup2(ro, fd)
    finally:
        os.close(ro)
