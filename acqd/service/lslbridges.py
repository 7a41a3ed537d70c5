"""The supervisor's LSL bridges: one ``acqd.wire.lsl`` process per LSL stream, started and stopped with the writers.

This module owns the bridges' processes and what they report (docs/lsl.md): their state (resolving, not_found,
mismatch, streaming), the outlet they found, why RECORD must wait for them (``problems``), and their restart
when one dies. The supervisor calls it from its own thread only, like everything else it owns.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

from acqd.config import RigConfig, StreamConfig

PREFIX = "lsl:"
"""Identity prefix of a bridge's control socket (``lsl:<stream>``), beside the writers' ``<stream>``."""


@dataclass
class BridgeHandle:
    """One bridge process and the last state it reported."""

    proc: subprocess.Popen
    state: str = "starting"
    detail: str = ""
    outlet: dict | None = None
    restarts: int = 0


class LslBridges:
    """Every LSL stream's bridge process."""

    def __init__(self, cfg: RigConfig, control: str):
        self.streams = {s.name: s for s in cfg.streams if s.lsl is not None}
        self.control = control
        self.bridges: dict[str, BridgeHandle] = {}

    def _spawn(self, s: StreamConfig) -> subprocess.Popen:
        spec = json.dumps({"stream": s.model_dump(mode="json"), "control": self.control})
        return subprocess.Popen([sys.executable, "-m", "acqd.wire.lsl", spec], stdin=subprocess.DEVNULL)

    def start(self) -> None:
        for name, s in self.streams.items():
            if name not in self.bridges:
                self.bridges[name] = BridgeHandle(self._spawn(s))

    def owns(self, identity: str) -> bool:
        return identity.startswith(PREFIX)

    def on_message(self, identity: str, msg: dict) -> tuple[str, str, str] | None:
        """Take a bridge's report; returns (stream, kind, detail) when it is an incident worth recording."""
        name = identity.removeprefix(PREFIX)
        h = self.bridges.get(name)
        if h is None:
            return None
        if msg.get("type") == "state":
            changed = msg.get("state") != h.state
            h.state, h.detail = msg.get("state", h.state), msg.get("detail", "")
            h.outlet = msg.get("outlet", h.outlet)
            return (name, f"lsl_{h.state}", h.detail) if changed and h.state != "resolving" else None
        if msg.get("type") == "event":
            return name, msg.get("kind", "lsl_event"), msg.get("detail", "")
        return None

    def check(self) -> list[tuple[str, str, str]]:
        """Restart bridges that died; returns the incidents."""
        out = []
        for name, h in self.bridges.items():
            rc = h.proc.poll()
            if rc is None:
                continue
            new = BridgeHandle(self._spawn(self.streams[name]), restarts=h.restarts + 1)
            self.bridges[name] = new
            out.append((name, "lsl_bridge_died", f"LSL bridge (pid {h.proc.pid}) exited with {rc}; restarted as "
                                                 f"pid {new.proc.pid}"))
        return out

    def problems(self) -> list[str]:
        """Why RECORD must wait: a required LSL stream whose outlet is not found or does not match the config."""
        return [f"stream {n!r}: {h.detail or h.state}" for n, h in self.bridges.items()
                if self.streams[n].required and h.state != "streaming"]

    def status(self, name: str) -> dict | None:
        h = self.bridges.get(name)
        if name not in self.streams:
            return None
        if h is None:
            return {"state": "stopped", "detail": "", "outlet": None, "pid": None, "restarts": 0}
        return {"state": h.state, "detail": h.detail, "outlet": h.outlet,
                "pid": h.proc.pid if h.proc.poll() is None else None, "restarts": h.restarts}

    def stop(self, timeout_s: float = 10.0) -> None:
        for h in self.bridges.values():
            if h.proc.poll() is None:
                h.proc.terminate()
        for h in self.bridges.values():
            try:
                h.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                h.proc.kill()
                h.proc.wait()
        self.bridges.clear()
