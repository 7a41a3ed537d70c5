"""systemd's notify protocol (sd_notify), without a dependency: a datagram to ``$NOTIFY_SOCKET``.

``READY=1`` once the API listens (and the writers run, with ``--acquire``), ``WATCHDOG=1`` from the
supervisor loop at half ``$WATCHDOG_USEC``, ``STOPPING=1`` on shutdown. Outside systemd (no
``NOTIFY_SOCKET``) every call is a no-op. configs/acqd.service is the unit that uses it.
"""

from __future__ import annotations

import os
import socket
import time


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to the service manager; False when not run under one."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address[0] == "@":  # an abstract socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.sendto(state.encode(), address)
        except OSError:
            return False
    return True


def watchdog_interval_s() -> float | None:
    """Half the watchdog timeout systemd asked for (None: no watchdog, or meant for another process)."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6


class Watchdog:
    """Pings ``WATCHDOG=1`` at most every ``interval_s``; ``ping`` is cheap enough for every loop turn."""

    def __init__(self, interval_s: float | None):
        self.interval_s = interval_s
        self._next = 0.0

    def ping(self) -> None:
        if self.interval_s is None:
            return
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.interval_s
            notify("WATCHDOG=1")
