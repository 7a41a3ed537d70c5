"""The supervisor: the acquisition state machine, the writer processes and their health.

Modes follow the Open Ephys GUI: IDLE (no writers) -> ACQUIRE (writers receive and check, nothing
stored) -> RECORD (writers append to a session's files) -> back to ACQUIRE (the session is closed)
or IDLE. One thread owns every socket and process handle (``serve``); other threads (the HTTP API)
submit work with ``call``, which runs it on that thread, so no lock guards the state.

A writer that dies is reported as an incident; while recording it is restarted into a new part
file (at most ``max_writer_restarts`` times within ``restart_window_s``, so a rare crash never ends a
long acquisition, but a crash loop does), except after a full disk, where the stream stays stopped with
its reason and the session is marked incomplete.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from acqd.config import RigConfig, SessionMetadata, check_name
from acqd.errors import SessionError
from acqd.session import (CLOSED, INTERRUPTED, RECORDING, SESSION_FILE, STREAMS_DIR, create_session_dir,
                          list_sessions, now_iso, read_session, session_name, write_json_atomic)
from acqd.record.streamfile import committed_rows, open_for_read
from acqd.record.writer import EXIT_DISK_FULL, EXIT_WRITE_ERROR, WriterSpec
from acqd.service import live
from acqd.record.preview import is_message as is_preview
from acqd.service.previews import PreviewHub
from acqd.service.snapshot import EventBus, Snapshot

IDLE, ACQUIRE, RECORD = "IDLE", "ACQUIRE", "RECORD"
MAX_INCIDENTS = 1000
START_TIMEOUT_S = 60.0
COMMAND_TIMEOUT_S = 30.0
WRITE_FAILURES = {EXIT_DISK_FULL: ("disk_full", "disk full or file size limit reached"),
                  EXIT_WRITE_ERROR: ("write_error", "writing the stream file failed")}
log = logging.getLogger("acqd")


@dataclass
class WriterHandle:
    """The supervisor's view of one writer process."""

    name: str
    proc: subprocess.Popen
    ready: bool = False
    state: str = "starting"  # starting | acquiring | recording | stopping | stopped | failed
    reason: str | None = None
    stats: dict = field(default_factory=dict)
    part: int = 0
    restarts: tuple[float, ...] = ()
    """When (monotonic s) each restart of this stream's writer happened."""
    record_on_ready: int | None = None  # part to record into once a restarted writer is ready


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


class Supervisor:
    """Owns the mode, the writers and the active session. Use ``call`` from other threads."""

    def __init__(self, cfg: RigConfig):
        self.cfg = cfg
        self.data_root = Path(cfg.daemon.data_root).resolve()
        self.data_root.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_data_root(self.data_root)
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.control_endpoint = f"tcp://127.0.0.1:{port}"
        self.mode = IDLE
        self.writers: dict[str, WriterHandle] = {}
        self.session: dict | None = None
        self.session_dir: Path | None = None
        self.last_session: dict | None = None
        self._saved_at = 0.0
        self._unsaved = False
        self.recording = {"prepend_text": "", "base_text": "", "append_text": ""}
        self.jobs: dict[tuple[str, str], Job] = {}  # (kind, session id) -> the latest run
        self.previews = PreviewHub()  # the console's live preview: writers decimate only while someone watches
        self._calls: queue.Queue = queue.Queue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self.events = EventBus()
        self.live = live.Live()
        self.on_tick: Callable[[], None] | None = None
        """Called from the supervisor loop (and while a command waits): the systemd watchdog ping."""
        self.recovered = self.recover_interrupted()
        self.snapshot: Snapshot = live.publish(self, force=True)

    # -- threading -----------------------------------------------------------------------------
    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 120.0) -> Any:
        """Run ``fn(*args)`` on the supervisor thread and return its result (or raise its error)."""
        fut: Future = Future()
        self._calls.put((fn, args, fut))
        os.write(self._wake_w, b"x")
        return fut.result(timeout)

    def serve(self, stop: threading.Event) -> None:
        """The supervisor thread: pump writer messages, run submitted calls, watch processes."""
        try:
            while not stop.is_set():
                try:
                    self._pump(0.1)
                except Exception:  # noqa: BLE001 - one bad message or write must not stop every stream
                    traceback.print_exc()
                while True:
                    try:
                        fn, args, fut = self._calls.get_nowait()
                    except queue.Empty:
                        break
                    if fut.set_running_or_notify_cancel():
                        try:
                            fut.set_result(fn(*args))
                        except BaseException as e:  # noqa: BLE001 - handed to the caller
                            fut.set_exception(e)
                        live.publish(self, force=True)  # readers see a command's effect at once
        finally:
            self.shutdown()

    def _pump(self, timeout_s: float) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        events = dict(poller.poll(int(timeout_s * 1000)))
        if self._wake_r in events:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
        while self.router.poll(0):
            ident, msg = self.router.recv_multipart()
            if is_preview(msg):  # for the console, as it is: the daemon never parses a preview
                self.previews.publish(msg)
                continue
            self._on_writer_message(ident.decode(), zmq.utils.jsonapi.loads(msg))
        self._check_processes()
        self.previews.sync(self.writers, self._send)
        if self._unsaved:
            self._save_session(now=False)
        live.publish(self)
        if self.on_tick is not None:
            self.on_tick()

    def _wait_for(self, cond: Callable[[], bool], what: str, timeout_s: float = COMMAND_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not cond():
            if time.monotonic() > deadline:
                raise SessionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            self._pump(0.05)

    # -- writer processes ----------------------------------------------------------------------
    def _spawn(self, name: str) -> WriterHandle:
        d = self.cfg.daemon
        spec = WriterSpec(stream=self.cfg.stream(name), lines=self.cfg.edge_lines(name),
                          control=self.control_endpoint, flush_interval_s=d.flush_interval_s,
                          fsync_interval_s=d.fsync_interval_s, stats_interval_s=d.stats_interval_s,
                          clock_pair_interval_s=d.clock_pair_interval_s)
        proc = subprocess.Popen([sys.executable, "-m", "acqd.record.writer", spec.to_json()], stdin=subprocess.DEVNULL)
        return WriterHandle(name, proc)

    def _send(self, name: str, **cmd: Any) -> None:
        self.router.send_multipart([name.encode(), zmq.utils.jsonapi.dumps(cmd)])

    def _on_writer_message(self, name: str, msg: dict) -> None:
        h = self.writers.get(name)
        if h is None:
            return
        match msg.get("type"):
            case "ready":
                if msg.get("pid") != h.proc.pid:
                    return  # a late message from a writer that was replaced
                h.ready, h.state = True, "acquiring"
                if h.record_on_ready is not None and self.session_dir is not None:
                    self._send(name, cmd="record", folder=str(self.session_dir / STREAMS_DIR),
                               session=self._session_attrs(), part=h.record_on_ready)
                    h.record_on_ready = None
            case "stats":
                if msg.get("pid") == h.proc.pid:
                    h.stats = msg
                    self.live.changed = True
            case "recording":
                h.state, h.part = "recording", msg["part"]
                if self.session is not None:
                    parts = self.session["streams"][name]["parts"]
                    parts.append({"part": msg["part"], "path": _rel(msg["path"], self.session_dir), "rows": None})
                    self._save_session()
            case "closed":
                if msg.get("final", True):  # not a size rollover: the writer is back to acquiring
                    h.state = "acquiring"
                if self.session is not None:
                    entry = self.session["streams"][name]
                    for p in entry["parts"]:
                        if p["path"] == _rel(msg["path"], self.session_dir):
                            p["rows"], p["counts"] = msg["rows"], msg["counts"]
                    self._save_session()
            case "event":
                self._on_event(name, msg)

    def _on_event(self, name: str, msg: dict) -> None:
        kind = msg.get("kind")
        if kind in ("disk_full", "write_error"):
            # A restart would fail the same way: the stream stays visibly stopped with its reason.
            h = self.writers[name]
            h.reason = msg.get("detail")
            if h.state != "stopped_failed":  # else its exit code was seen first and recorded
                h.state = "failed"
                self._incident(name, kind, h.reason, incomplete=True)
        elif kind in ("gap", "disconnected", "connected"):  # outside RECORD: an event and a log line only
            self._incident(name, kind, msg.get("detail", ""))
        elif kind == "rejected":  # summarised once a second (live.publish), never one line per message
            self.live.count_reject(name, msg.get("reason", "unknown"))

    def _incident(self, stream: str | None, kind: str, detail: str, incomplete: bool = False) -> None:
        log.log(logging.WARNING if incomplete or kind not in ("connected",) else logging.INFO,
                "%s: %s: %s", stream or "session", kind, detail)
        self.events.publish("incident", {"stream": stream, "kind": kind, "detail": detail, "incomplete": incomplete,
                                         "session": self.session["session_id"] if self.session else None})
        self.live.changed = True
        if self.session is None:
            return
        incidents = self.session["incidents"]
        if len(incidents) < MAX_INCIDENTS:
            incidents.append({"time": now_iso(), "stream": stream, "kind": kind, "detail": detail})
        else:
            self.session["incidents_omitted"] = self.session.get("incidents_omitted", 0) + 1
        if incomplete:
            self.session["incomplete"] = True
        self._save_session(now=incomplete)

    def _check_processes(self) -> None:
        for name, h in list(self.writers.items()):
            rc = h.proc.poll()
            if rc is None or h.state in ("stopping", "stopped", "stopped_failed"):
                continue
            if h.state == "failed":  # it reported its write failure, then exited
                h.state = "stopped_failed"
                continue
            if rc in WRITE_FAILURES:  # exited on a write failure whose report is still in flight
                kind, h.reason = WRITE_FAILURES[rc]
                h.state = "stopped_failed"
                self._incident(name, kind, h.reason, incomplete=True)
                continue
            was_recording = h.state == "recording" or h.record_on_ready is not None
            how = f"killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
            d, now = self.cfg.daemon, time.monotonic()
            if sum(now - t < d.restart_window_s for t in h.restarts) >= d.max_writer_restarts:
                h.state, h.reason = "stopped_failed", (f"writer {how}; not restarted: already restarted "
                                                       f"{d.max_writer_restarts} time(s) within {d.restart_window_s:g} s")
                self._incident(name, "writer_died", h.reason, incomplete=True)
                continue
            new = self._spawn(name)
            new.restarts = (*h.restarts, now)
            new.part = h.part + 1 if was_recording else h.part
            if was_recording and self.mode == RECORD:
                new.record_on_ready = new.part
            self.writers[name] = new
            detail = f"writer (pid {h.proc.pid}) {how}; restarted as pid {new.proc.pid}"
            if new.record_on_ready is not None:
                detail += f", recording into part {new.part}"
            self._incident(name, "writer_died", detail, incomplete=was_recording)

    # -- mode changes (run on the supervisor thread) ---------------------------------------------
    def acquire(self) -> dict:
        """IDLE -> ACQUIRE: start a writer per stream and wait until each is ready. In RECORD: stop recording."""
        if self.mode == RECORD:
            return self.stop_recording()
        if self.mode == ACQUIRE:
            return self.status()
        for s in self.cfg.streams:
            self.writers[s.name] = self._spawn(s.name)
        try:
            self._wait_for(lambda: all(h.ready for h in self.writers.values()), "writers to start", START_TIMEOUT_S)
        except SessionError:
            self._stop_writers()
            raise
        self.mode = ACQUIRE
        return self.status()

    def record(self, metadata: dict | None = None, session: str | None = None) -> dict:
        """ACQUIRE -> RECORD: preflight, create the session folder, tell every writer to open its file."""
        if self.mode == RECORD:
            raise SessionError(f"already recording session {self.session['session_id']!r}")
        meta = _merge(self.cfg.metadata, metadata or {})
        try:
            meta = SessionMetadata.model_validate(meta).model_dump(mode="json")
        except ValueError as e:
            raise SessionError(f"session metadata incomplete or invalid (DANDI needs subject_id, species, sex, "
                               f"age at recording start): {e}") from None
        session_id = session_name(**self.recording) if session is None else session
        if self.mode == IDLE:  # Open Ephys: RECORD from IDLE acquires first, then waits for data
            self.acquire()
            try:
                self._wait_for(lambda: not self.preflight(), "every required stream to deliver data",
                               self.cfg.daemon.silent_after_s)
            except SessionError:
                pass  # refused just below, with the reasons
        problems = self.preflight()
        if problems:
            raise SessionError("refusing to record: " + "; ".join(problems))
        folder = create_session_dir(self.data_root, session_id)
        self.session_dir = folder
        self.session = {
            "session_id": session_id, "state": RECORDING, "created": now_iso(), "stopped": None,
            "incomplete": False, "metadata": meta, "reference": self.cfg.reference,
            "config": self.cfg.model_dump(mode="json"), "incidents": [],
            "streams": {s.name: {"parts": []} for s in self.cfg.streams},
        }
        self._save_session()
        for name, h in self.writers.items():
            if h.state == "acquiring":
                self._send(name, cmd="record", folder=str(folder / STREAMS_DIR), session=self._session_attrs(), part=0)
            elif h.state == "starting":  # a restarted writer records as soon as it is ready
                h.record_on_ready = 0
        self.mode = RECORD
        try:
            self._wait_for(lambda: all(h.state in ("recording", "stopped_failed", "failed")
                                       for h in self.writers.values()), "writers to open their files")
        except SessionError as e:  # close what did open: no session is left half started
            self._incident(None, "record_start_failed", str(e), incomplete=True)
            self.stop_recording()
            raise
        return self.status()

    def preflight(self) -> list[str]:
        """Why RECORD would be refused now: required streams that are down or silent."""
        problems = []
        limit = self.cfg.daemon.silent_after_s
        for s in self.cfg.streams:
            h = self.writers.get(s.name)
            if not s.required:
                continue
            if h is None or not h.ready or h.state in ("failed", "stopped_failed"):
                problems.append(f"stream {s.name!r} has no running writer ({h.reason if h else 'not started'})")
            elif h.stats.get("silent_s") is None:
                problems.append(f"stream {s.name!r} is silent (no message received yet)")
            elif h.stats["silent_s"] > limit:
                problems.append(f"stream {s.name!r} is silent (no message for {h.stats['silent_s']:.1f} s)")
        return problems

    def stop_recording(self) -> dict:
        """RECORD -> ACQUIRE: every writer closes its file; the session is closed."""
        if self.mode != RECORD:
            raise SessionError(f"not recording (mode {self.mode})")
        for name, h in self.writers.items():
            h.record_on_ready = None
            if h.state == "recording":
                self._send(name, cmd="stop")
        self.mode = ACQUIRE  # from here on, a restarted writer is not sent back to recording
        try:
            self._wait_for(lambda: all(h.state != "recording" for h in self.writers.values()),
                           "writers to close their files")
        except SessionError as e:
            self._incident(None, "stop_timeout", str(e), incomplete=True)
        session_id = self.session["session_id"]
        self._close_session(CLOSED)
        if self.cfg.daemon.finalize_on_stop:
            self.start_job("finalize", session_id)
        return self.status()

    def stop(self) -> dict:
        """Back to IDLE from any mode: stop recording, then stop every writer."""
        if self.mode == RECORD:
            self.stop_recording()
        self._stop_writers()
        self.mode = IDLE
        return self.status()

    def set_mode(self, mode: str) -> dict:
        """Open Ephys ``PUT /api/status {"mode": ...}``."""
        match mode.upper():
            case "IDLE":
                return self.stop()
            case "ACQUIRE":
                return self.acquire()
            case "RECORD":
                return self.record()
        raise SessionError(f"unknown mode {mode!r}: use IDLE, ACQUIRE or RECORD")

    def _stop_writers(self) -> None:
        for name, h in self.writers.items():
            if h.proc.poll() is None:
                h.state = "stopping"
                self._send(name, cmd="shutdown")
        deadline = time.monotonic() + COMMAND_TIMEOUT_S
        for h in self.writers.values():
            try:
                h.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                stop_quietly(h.proc)
            h.state = "stopped"
        while self.router.poll(0):  # drain their last words
            self.router.recv_multipart()
        self.writers.clear()

    def shutdown(self) -> None:
        """Leave cleanly (SIGTERM, Ctrl-C): close the session and every file."""
        try:
            if self.mode != IDLE:
                self.stop()
        finally:
            for job in self.jobs.values():  # finalize and export are resumable: a rerun completes them
                stop_quietly(job.proc)
            self.router.close(linger=0)
            self.ctx.term()

    def set_data_root(self, root: Path) -> None:
        """Move where new sessions go (Open Ephys ``parent_directory``); not while recording."""
        if self.mode == RECORD:
            raise SessionError("cannot change the data root while recording")
        root = root.resolve()
        root.mkdir(parents=True, exist_ok=True)
        fd = _lock_data_root(root)
        os.close(self._lock_fd)
        self._lock_fd, self.data_root = fd, root
        self.recovered = self.recover_interrupted()

    # -- finalize and export jobs ----------------------------------------------------------------
    def start_job(self, kind: str, session_id: str, *args: str) -> dict:
        """Run ``acqd <kind> <session folder> *args`` in the background; follow it with ``job_status``."""
        try:
            folder = self.data_root / check_name(session_id, "session name")
        except ValueError as e:
            raise SessionError(str(e)) from None
        if not (folder / SESSION_FILE).is_file():
            raise SessionError(f"no session {session_id!r} under {self.data_root}")
        if self.session is not None and self.session["session_id"] == session_id:
            raise SessionError(f"session {session_id!r} is being recorded: stop the recording first")
        job = self.jobs.get((kind, session_id))
        if job is None or job.state != "running":
            proc = subprocess.Popen([sys.executable, "-m", "acqd.cli", kind, str(folder), *args, "--progress-jsonl"],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
            job = self.jobs[(kind, session_id)] = Job(proc, on_progress=live.job_reporter(self.events, kind, session_id))
            threading.Thread(target=job.follow, name=f"{kind}-{session_id}", daemon=True).start()
        return {"session": session_id, "kind": kind, **job.as_dict()}

    def job_status(self, kind: str, session_id: str | None = None) -> dict:
        if session_id is not None:
            job = self.jobs.get((kind, session_id))
            return {"session": session_id, "kind": kind, **(job.as_dict() if job else {"state": "unknown"})}
        return {"jobs": {sid: job.as_dict(with_report=False) for (k, sid), job in self.jobs.items() if k == kind}}

    # -- the session record --------------------------------------------------------------------
    def _session_attrs(self) -> dict:
        s = self.session
        return {"session_id": s["session_id"], "created": s["created"], "metadata": s["metadata"],
                "reference": s["reference"]}

    def _save_session(self, now: bool = True) -> None:
        """Write session.json. ``now=False`` (routine incidents) writes at most once a second, so a flood of
        gaps costs one write a second; a failed write (full disk) is logged and retried, never fatal."""
        if self.session is None or self.session_dir is None:
            return
        if not now and time.monotonic() - self._saved_at < 1.0:
            self._unsaved = True
            return
        try:
            write_json_atomic(self.session_dir / SESSION_FILE, self.session)
            self._unsaved, self._saved_at = False, time.monotonic()
        except OSError as e:
            self._unsaved = True
            log.error("cannot write %s (%s); retrying", SESSION_FILE, e)

    def _close_session(self, state: str) -> None:
        for name, h in self.writers.items():
            if h.state in ("failed", "stopped_failed"):
                self.session["incomplete"] = True
                self.session["streams"][name]["stopped_reason"] = h.reason
        self.session["state"], self.session["stopped"] = state, now_iso()
        self._save_session()
        self.last_session = {"session_id": self.session["session_id"], "path": str(self.session_dir)}
        self.session = self.session_dir = None

    def recover_interrupted(self) -> list[dict]:
        """At startup: sessions left 'recording' by a dead daemon become 'interrupted', files checked."""
        found = []
        for info in list_sessions(self.data_root):
            if info["state"] != RECORDING:
                continue
            folder = Path(info["path"])
            s = read_session(folder)
            files = {}
            for path in sorted((folder / STREAMS_DIR).glob("*.h5")):
                try:
                    with open_for_read(path) as f:
                        files[path.name] = {"readable": True, "rows": committed_rows(f)}
                except OSError as e:
                    files[path.name] = {"readable": False, "error": str(e)}
            s["state"], s["incomplete"] = INTERRUPTED, True
            s.setdefault("incidents", []).append({"time": now_iso(), "stream": None, "kind": "daemon_interrupted",
                                                  "detail": "the daemon stopped while recording; files checked",
                                                  "files": files})
            write_json_atomic(folder / SESSION_FILE, s)
            found.append({"session_id": s["session_id"], "path": str(folder), "files": files})
            log.warning("found interrupted session %s at %s", s["session_id"], folder)
        return found

    # -- status --------------------------------------------------------------------------------
    def status(self) -> dict:
        streams = {}
        for s in self.cfg.streams:
            h = self.writers.get(s.name)
            st = h.stats if h else {}
            rec = st.get("recording_counts", {})
            streams[s.name] = {
                "state": h.state if h else "stopped", "reason": h.reason if h else None,
                "pid": h.proc.pid if h and h.proc.poll() is None else None, "restarts": len(h.restarts) if h else 0,
                "part": h.part if h else 0, "connected": st.get("connected", False),
                "silent_s": st.get("silent_s"), "messages_per_s": st.get("messages_per_s", 0.0),
                "mb_per_s": st.get("mb_per_s", 0.0), "last_seq": st.get("last_seq"),
                "gaps": rec.get("gaps", 0), "rejected": rec.get("rejected_total", 0),
                "rows": st.get("rows", 0), "bytes_written": st.get("file_bytes", 0),
                "total": st.get("total", {}), "required": s.required,
            }
        session = None
        if self.session is not None:
            session = {"session_id": self.session["session_id"], "path": str(self.session_dir),
                       "state": self.session["state"], "incomplete": self.session["incomplete"],
                       "incidents": len(self.session["incidents"])}
        return {"mode": self.mode, "session": session, "streams": streams,
                "last_session": self.last_session,
                "data_root": str(self.data_root), "disk_free_bytes": shutil.disk_usage(self.data_root).free,
                "recovered": self.recovered}


def stop_quietly(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it must; always reaped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _rel(path: str, folder: Path | None) -> str:
    return os.path.relpath(path, folder) if folder else path


def _lock_data_root(root: Path) -> int:
    """One daemon per data root: a second one would corrupt the first one's session records."""
    fd = os.open(root / ".acqd.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SessionError(f"another acqd is already serving {root}") from None
    return fd
