"""What the daemon's background readers share (the hasher, the scrub, shipping): a low priority, and leaving the
page cache to others."""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
from pathlib import Path

_IOPRIO_SET = {"x86_64": 251, "aarch64": 30, "i686": 289, "armv7l": 314}  # syscall numbers (asm/unistd.h)
_IOPRIO_IDLE = 3 << 13  # IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT


def lower_priority() -> str | None:
    """nice 19 and the idle I/O class (ioprio_set, or the ionice binary): None, or why the I/O class is not set."""
    os.nice(19)
    nr = _IOPRIO_SET.get(platform.machine())
    if nr is not None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall(nr, 1, 0, _IOPRIO_IDLE) == 0:  # IOPRIO_WHO_PROCESS, this process
            return None
    if shutil.which("ionice"):
        done = subprocess.run(["ionice", "-c3", "-p", str(os.getpid())], capture_output=True, timeout=10)
        if done.returncode == 0:
            return None
    return "idle I/O priority not available (no ioprio_set, no ionice)"


def drop_from_cache(path: Path) -> None:
    """Read once, not needed again: leave memory to others, as the writers do with what
    they fsynced (acqd.record.streamfile.durable)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
