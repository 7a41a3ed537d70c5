"""Free disk while recording: a warning at twice ``daemon.disk_reserve_bytes``, a clean stop at the reserve.

The stop comes before a writer meets ENOSPC (which would leave its last chunk unusable); the supervisor stops the
recording when ``reached`` says so. The warning by write rate (the disk fills within ``DISK_LOW_S`` at the current
rate) is the live view's (``acqd.service.live``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path


def free_bytes(root: Path) -> int | None:
    """Free bytes under ``root``, or None when it cannot be read (the data root vanished or its disk went away):
    status and preflight say so rather than fail with a traceback."""
    try:
        return shutil.disk_usage(root).free
    except OSError:
        return None


class DiskReserve:
    """The reserve of one recording: ``incident(stream, kind, detail, incomplete=...)`` reports what it sees."""

    def __init__(self, reserve: int, incident: Callable[..., None]):
        self.reserve, self.incident = reserve, incident
        self.low = False

    def reached(self, root: Path) -> bool:
        """Check the free space under ``root``: True once it is below the reserve (stop recording now)."""
        if (free := free_bytes(root)) is None:
            return False  # the data root vanished: the writers' own write errors say so
        if free < self.reserve:
            self.incident(None, "disk_full", f"{free} bytes free on {root}, below daemon.disk_reserve_bytes "
                                             f"({self.reserve}): recording stopped", incomplete=True)
            return True
        if free < 2 * self.reserve and not self.low:
            self.low = True
            self.incident(None, "disk_low", f"{free} bytes free on {root}: recording stops at "
                                            f"daemon.disk_reserve_bytes ({self.reserve})")
        elif free >= 2 * self.reserve:
            self.low = False
        return False
