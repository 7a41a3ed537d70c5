"""Finalize and export jobs: each run an ``acqd <kind> <session> --progress-jsonl`` subprocess, followed on a
thread of its own, its progress published as ``job`` events.

This module owns starting a run (one at a time per kind and session: asking again while it runs answers with the
running one), reading its progress lines, the ``job`` events (at most 4 a second, and the end) and stopping every
run when the daemon leaves (finalize and export are resumable: a rerun completes them). Which sessions may be
finalized is the supervisor's decision; a crash of the run spares the daemon.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from acqd.service import procs
from acqd.service.snapshot import EventBus

JOB_EVENT_SPACING_S = 0.25


@dataclass
class Job:
    """A finalize or export run: an ``acqd <kind> ... --progress-jsonl`` subprocess, so a crash there
    spares the daemon. Its stdout carries progress lines, then the report (or the error)."""

    proc: subprocess.Popen
    state: str = "running"  # running | done | failed
    stage: str = "start"
    fraction: float = 0.0
    report: dict | None = None
    error: str | None = None
    on_progress: Callable[[Job], None] | None = None
    """Called (on the job's thread) after each progress line and at the end: the ``job`` event."""

    def follow(self) -> None:
        """Read the run's progress lines until it exits (on a thread of its own)."""
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "report" in msg:
                self.report = msg["report"]
            elif "error" in msg:
                self.error = msg["error"]
            else:
                self.stage, self.fraction = msg.get("stage", self.stage), msg.get("fraction", self.fraction)
            if self.on_progress:
                self.on_progress(self)
        rc = self.proc.wait()
        if rc == 0 and self.report is not None:
            self.state, self.fraction = "done", 1.0
        else:
            self.state, self.error = "failed", self.error or f"exited with code {rc}"
        if self.on_progress:
            self.on_progress(self)

    def as_dict(self, with_report: bool = True) -> dict:
        out = {"state": self.state, "stage": self.stage, "fraction": round(self.fraction, 4), "error": self.error}
        return out | ({"report": self.report} if with_report else {})


class Jobs(dict[tuple[str, str], Job]):
    """(kind, session id) -> the latest run of that kind on that session."""

    def __init__(self, events: EventBus):
        super().__init__()
        self.events = events

    def start(self, kind: str, session_id: str, folder: Path, *args: str) -> dict:
        """Run ``acqd <kind> <folder> *args`` in the background, unless that run is already running."""
        job = self.get((kind, session_id))
        if job is None or job.state != "running":
            proc = procs.popen([sys.executable, "-m", "acqd.cli", kind, str(folder), *args, "--progress-jsonl"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
            job = self[(kind, session_id)] = Job(proc, on_progress=job_reporter(self.events, kind, session_id))
            threading.Thread(target=job.follow, name=f"{kind}-{session_id}", daemon=True).start()
        return {"session": session_id, "kind": kind, **job.as_dict()}

    def status(self, kind: str, session_id: str | None = None) -> dict:
        """One run (with its report), or every run of ``kind`` (without)."""
        if session_id is not None:
            job = self.get((kind, session_id))
            return {"session": session_id, "kind": kind, **(job.as_dict() if job else {"state": "unknown"})}
        return {"jobs": {sid: job.as_dict(with_report=False) for (k, sid), job in self.items() if k == kind}}

    def listed(self) -> list[dict]:
        """Every run, for the status snapshot and the console (any thread: list() copies the runs at once, while
        the supervisor thread may add one)."""
        return [{"kind": k, "session": sid, **job.as_dict(with_report=False),
                 "master_sha256": (job.report or {}).get("master_sha256")}  # an export is stale once amended
                for (k, sid), job in list(self.items())]

    def stop(self) -> None:
        for job in self.values():
            procs.stop_process(job.proc, timeout_s=10.0)


def job_reporter(events: EventBus, kind: str, session: str) -> Callable[[Job], None]:
    """The ``job`` events of one finalize or export run: progress at most 4 a second, and the end."""
    last = [0.0]

    def report(job: Job) -> None:
        now = time.monotonic()
        if job.state == "running" and now - last[0] < JOB_EVENT_SPACING_S:
            return
        last[0] = now
        events.publish("job", {"kind": kind, "session": session, **job.as_dict(with_report=False)})

    return report
