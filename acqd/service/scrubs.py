"""The daemon's side of the scrub: after a finalize job has sealed a session, every sealed byte is read again.

The scrub itself (``python -m acqd.finalize.scrub``: low CPU and idle I/O priority, dies with the daemon) and its
record (``scrub.json``) belong to finalize. This module starts a session's scrub when a finalize job of the daemon
has succeeded, turns every mismatch it prints into an incident (a log line and an ``incident`` event naming the file
and the chunk: the sealed ``session.json`` cannot take it, ``scrub.json`` keeps it), and keeps each scrub's state
for status (``scrubs``).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from acqd.service.hashing import read_json_lines

log = logging.getLogger("acqd")


class Scrubs:
    """The scrub of every session a finalize job of this daemon sealed: one low-priority process each, started
    when the job is done; ``states`` (session id -> running | verified | failed | error) is shown in status."""

    def __init__(self, publish: Callable[[str, dict], None]):
        self.publish = publish
        """The daemon's event publisher (``events.publish``): each mismatch goes out as an ``incident`` event."""
        self.running: dict[str, tuple[subprocess.Popen, bytes]] = {}
        self.states: dict[str, str] = {}
        self._seen: set[int] = set()

    def poll(self, jobs: dict) -> None:
        """Start the scrub of each finalize job that has just succeeded; read what the running ones print."""
        for (kind, sid), job in jobs.items():
            if kind == "finalize" and job.state == "done" and id(job) not in self._seen:
                self._seen.add(id(job))
                self._start(sid, Path(job.report["folder"]))
        for sid, (proc, inbox) in list(self.running.items()):
            lines, inbox = read_json_lines(proc, inbox)
            self.running[sid] = proc, inbox
            for line in lines:
                if "incident" in line:
                    self._incident(sid, line["incident"])
                elif "scrub" in line:
                    self.states[sid] = line["scrub"]["state"]
                    if line["scrub"].get("not_recorded"):
                        log.warning("the scrub of %s: %s", sid, line["scrub"]["not_recorded"])
                elif "error" in line:
                    self.states[sid] = "error"
                    log.warning("the scrub of %s: %s", sid, line["error"])
            if proc.poll() is not None:
                proc.stdout.close()
                del self.running[sid]
                if self.states[sid] == "running":
                    self.states[sid] = "error"
                    log.warning("the scrub of %s exited with code %s; `acqd verify` scrubs it", sid, proc.returncode)

    def _incident(self, sid: str, found: dict) -> None:
        log.warning("session %s: %s: %s", sid, found["kind"], found["detail"])
        self.publish("incident", {"stream": (found.get("chunk") or {}).get("stream"), "kind": found["kind"],
                                  "detail": found["detail"], "incomplete": False, "session": sid,
                                  "file": found["file"], "chunk": found.get("chunk")})

    def _start(self, sid: str, folder: Path) -> None:
        if sid in self.running:  # a finalize rerun on a session being scrubbed: the running scrub covers it
            return
        proc = subprocess.Popen([sys.executable, "-m", "acqd.finalize.scrub", str(folder), str(os.getpid())],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        os.set_blocking(proc.stdout.fileno(), False)
        self.running[sid] = proc, b""
        self.states[sid] = "running"

    def stop(self) -> None:
        """The daemon leaves: scrubs stop (the session stays unverified until ``acqd verify``)."""
        for proc, _ in self.running.values():
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        self.running.clear()
