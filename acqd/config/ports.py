"""The tcp ports a rig config makes acqd (or the simulated drivers) bind, and one clear line when one is taken.

A port clash otherwise surfaces as a ZeroMQ or socket traceback ("Address already in use") from deep
inside the HTTP server, a writer or the simulator. ``check_ports_free`` tries each port before anything
starts (``acqd serve``, ``acqd simulate``, ``acqd demo``) and names the port and the config key that sets it.
"""

from __future__ import annotations

import errno
import re
import socket
from typing import Literal

from acqd.config import RigConfig
from acqd.errors import ConfigError

Binder = Literal["acqd", "drivers"]


def bound_ports(cfg: RigConfig, by: tuple[Binder, ...] = ("acqd",), control: bool = True
                ) -> list[tuple[str, str, int]]:
    """(config key, host, port) of every tcp port bound by ``by``: acqd binds the control port and streams
    with ``bind: true``; the drivers (or ``acqd simulate``) bind the other streams' endpoints."""
    out = []
    if control and "acqd" in by and cfg.daemon.control.port:
        out.append(("daemon.control.port", cfg.daemon.control.host, cfg.daemon.control.port))
    for i, s in enumerate(cfg.streams):
        binder: Binder = "acqd" if s.bind else "drivers"
        m = re.fullmatch(r"tcp://(.+):(\d+)", s.endpoint)
        if binder in by and m and int(m.group(2)):
            out.append((stream_key(i, s.name), m.group(1), int(m.group(2))))
    return out


def stream_key(index: int, name: str) -> str:
    return f"streams[{index}] {name!r}.endpoint"


def busy_message(port: int, key: str) -> str:
    return f"port {port} is already in use: stop what holds it, or change {key} in the rig config"


def check_ports_free(cfg: RigConfig, by: tuple[Binder, ...] = ("acqd",), control: bool = True) -> None:
    """Raise ConfigError naming each port that ``by`` would bind and that something else holds."""
    busy = [busy_message(port, key) for key, host, port in bound_ports(cfg, by, control) if not _free(host, port)]
    if busy:
        raise ConfigError("; ".join(busy))


def _free(host: str, port: int) -> bool:
    """Can this port be bound now? (SO_REUSEADDR, as ZeroMQ and http.server bind, so TIME_WAIT is no clash.)"""
    host = "" if host in ("*", "0.0.0.0") else host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return e.errno != errno.EADDRINUSE
    return True
