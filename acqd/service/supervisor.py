"""The supervisor: the acquisition state machine, the writer processes and their health.

Modes follow the Open Ephys GUI: IDLE (no writers) -> ACQUIRE (writers receive and check, nothing
stored) -> RECORD (writers append to a session's files) -> back to ACQUIRE (the session is closed)
or IDLE. One thread owns every socket and process handle (``serve``); other threads (the HTTP API)
submit work with ``call``, which runs it on that thread, so no lock guards the state.

A writer that dies is reported as an incident; while recording it is restarted into a new part
file (at most ``max_writer_restarts`` times within ``restart_window_s``, so a rare crash never ends a
long acquisition, but a crash loop does), except after a full disk, where the stream stays stopped with
its reason and the session is marked incomplete.

Every writer message carries the writer's pid and the id of the last command it handled, and its stats say
whether (and where) it is recording. A writer that sends nothing for ``heartbeat_timeout_s`` is ``hung``
(an incident; RECORD is refused); once it has handled every command sent to it, its real state is compared
with what the session expects and corrected, with an incident, so a command that timed out never leaves a
stream silently unrecorded. Free disk below ``disk_reserve_bytes`` stops the recording cleanly.
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
from acqd.metadata import merge, to_acqd
from acqd.errors import SessionError
from acqd.service.runtime import lock_endpoints, make_daemon_dir, release, runtime_base
from acqd.images import check_stimulus_images, register_stimulus_images
from acqd.session import (CLOSED, INTERRUPTED, RECORDING, SESSION_FILE, STREAMS_DIR, create_session_dir,
                          ensure_data_root, list_sessions, now_iso, read_session, session_name, write_json_atomic)
from acqd.record.streamfile import committed_rows, open_for_read
from acqd.record.writer import EXIT_DISK_FULL, EXIT_WRITE_ERROR, WriterSpec
from acqd.service import live
from acqd.service.hashing import Hashers
from acqd.record.preview import is_message as is_preview
from acqd.service.previews import PreviewHub
from acqd.service.snapshot import EventBus, Snapshot
from acqd.service.lslbridges import LslBridges
from acqd.service.sessionlog import SessionLog
from acqd.service.synclock import SyncLock

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
    heard: float = field(default_factory=time.monotonic)
    """When (monotonic s) the last message from this writer process arrived."""
    hung_since: float | None = None
    """Set while the writer sends nothing for longer than heartbeat_timeout_s: the time it was last heard."""
    stats_at: float = 0.0
    """When (monotonic s) ``stats`` arrived, to age its ``silent_s``."""
    sent: int = 0
    """Id of the last command sent to this writer."""
    acked: int = 0
    """Id of the last command the writer reports it has handled."""


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
        self.data_root = ensure_data_root(cfg.daemon.data_root)
        self._lock_fd = _lock_data_root(self.data_root)
        base = runtime_base()
        self._endpoint_locks = lock_endpoints(base, ((s.name, s.endpoint) for s in cfg.streams))
        self.runtime_dir = make_daemon_dir(base)
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.control_endpoint = f"ipc://{self.runtime_dir}/control"
        self.router.bind(self.control_endpoint)
        self.junk_messages = 0
        self._disk_low = False
        self._closed_unsaved: list[tuple[Path, dict]] = []  # closed sessions whose last write failed
        self.lsl = LslBridges(cfg, self.control_endpoint)
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
        self.hashers = Hashers()  # closed parts are hashed in the background (acqd.finalize.digests)
        self.session_log = SessionLog()  # the daemon's lines while a session records, into its folder
        log.addHandler(self.session_log)
        self._calls: queue.Queue = queue.Queue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self.events = EventBus()
        self.live = live.Live()
        self.synclock = SyncLock(cfg)  # the live sync lock, fed with the writers' stats (acqd.service.synclock)
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
            frames = self.router.recv_multipart()
            try:
                ident, raw = frames
                if is_preview(raw):  # for the console, as it is: the daemon never parses a preview
                    self.previews.publish(raw)
                    continue
                name, msg = ident.decode(), zmq.utils.jsonapi.loads(raw)
                if not isinstance(msg, dict):
                    raise ValueError("not a JSON object")
                if name not in self.writers and not self.lsl.owns(name):
                    raise ValueError(f"no writer {name!r}")
            except ValueError as e:  # not from a writer of ours: counted, one line, never a traceback
                self.junk_messages += 1
                if self.junk_messages <= 10 or self.junk_messages % 1000 == 0:  # a flood must not flood the log
                    log.warning("ignored a malformed message on the writer control socket (%s); %d so far", e,
                                self.junk_messages)
                continue
            self._on_writer_message(name, msg)
        self._check_processes()
        self._check_heartbeats()
        self._check_disk()
        self.previews.sync(self.writers, self._send)
        self.hashers.poll()
        if self._unsaved:
            self._save_session(now=False)
        for folder, session in list(self._closed_unsaved):
            if _write_session(folder, session):
                self._closed_unsaved.remove((folder, session))
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
                          clock_pair_interval_s=d.clock_pair_interval_s, parent_pid=os.getpid())
        proc = subprocess.Popen([sys.executable, "-m", "acqd.record.launch", spec.to_json()], stdin=subprocess.DEVNULL)
        return WriterHandle(name, proc)

    def _send(self, name: str, **cmd: Any) -> int:
        """Send a command to a writer; returns its id (the writer reports the last id it handled as ``acked``)."""
        h = self.writers[name]
        h.sent += 1
        self.router.send_multipart([name.encode(), zmq.utils.jsonapi.dumps({**cmd, "id": h.sent})])
        return h.sent

    def _on_writer_message(self, name: str, msg: dict) -> None:
        if self.lsl.owns(name):
            return self._lsl_incidents([self.lsl.on_message(name, msg)])
        h = self.writers.get(name)
        if h is None or msg.get("pid") != h.proc.pid:
            return  # not one of ours, or a late message from a writer that was replaced
        h.heard = time.monotonic()
        h.acked = max(h.acked, int(msg.get("acked") or 0))
        if h.hung_since is not None:
            self._incident(name, "writer_recovered", f"writer (pid {h.proc.pid}) answers again after "
                                                     f"{h.heard - h.hung_since:.1f} s")
            h.hung_since = None
        match msg.get("type"):
            case "ready":
                h.ready, h.state = True, "acquiring"
                if h.record_on_ready is not None and self.session_dir is not None:
                    self._send(name, cmd="record", folder=str(self.session_dir / STREAMS_DIR),
                               session=self._session_attrs(), part=h.record_on_ready)
                    h.record_on_ready = None
            case "stats":
                h.stats, h.stats_at = msg, h.heard
                self.synclock.feed(name, msg, h.heard)
                self._reconcile(name, h)
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
                if self.session is not None and Path(msg["path"]).parent == self.session_dir / STREAMS_DIR:
                    entry = self.session["streams"][name]
                    for p in entry["parts"]:
                        if p["path"] == _rel(msg["path"], self.session_dir):
                            p["rows"], p["counts"] = msg["rows"], msg["counts"]
                            p.update({"suspect": msg["suspect"]} if msg.get("suspect") else {})
                    self._save_session()
                    self.hashers.queue(self.session_dir, name, Path(msg["path"]))
                else:  # a writer that was hung at stop closed its file late: complete that session's record
                    _record_late_close(name, msg)
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
        elif kind in ("suspect_part", "clock_step", "part_name_taken", "peer_refused"):
            self._incident(name, kind, msg.get("detail", ""), incomplete=kind == "suspect_part")
        elif kind in ("gap", "disconnected", "connected"):  # outside RECORD: an event and a log line only
            self._incident(name, kind, msg.get("detail", ""))
        elif kind == "rejected":  # summarised once a second (live.publish), never one line per message
            self.live.count_reject(name, msg.get("reason", "unknown"))

    def _incident(self, stream: str | None, kind: str, detail: str, incomplete: bool = False) -> None:
        log.log(logging.WARNING if incomplete or kind not in ("connected",) else logging.INFO,
                "%s: %s: %s", stream or "session", kind, detail,
                extra={"fields": {"incident": kind, "stream": stream, "incomplete": incomplete}})
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

    def _lsl_incidents(self, found: list[tuple[str, str, str] | None]) -> None:
        for stream, kind, detail in filter(None, found):
            if self.mode == RECORD:
                self._incident(stream, kind, detail)

    def _check_processes(self) -> None:
        self._lsl_incidents(self.lsl.check())
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

    def _check_heartbeats(self) -> None:
        """A live writer that has said nothing (stats come every stats_interval_s) for heartbeat_timeout_s is hung:
        stopped by a signal, deadlocked, or stuck in a system call. It is reported, not killed."""
        now, limit = time.monotonic(), self.cfg.daemon.heartbeat_timeout_s
        for name, h in self.writers.items():
            if (h.ready and h.hung_since is None and now - h.heard > limit and h.proc.poll() is None
                    and h.state not in ("failed", "stopping", "stopped", "stopped_failed")):
                h.hung_since = h.heard
                self._incident(name, "writer_hung", f"writer (pid {h.proc.pid}) sent nothing for {now - h.heard:.1f} s "
                                                    f"(heartbeat_timeout_s {limit:g}); data it misses meanwhile shows "
                                                    f"as gaps (sub) or waits in the driver (pull)")

    def _reconcile(self, name: str, h: WriterHandle) -> None:
        """Compare what a writer reports (its stats) with what the session expects, once it has handled every
        command sent to it, and correct it: a command that timed out (a stalled writer) is never silently lost."""
        if h.acked < h.sent or h.state in ("failed", "stopping", "stopped", "stopped_failed"):
            return  # commands still in flight, or nothing to correct
        st = h.stats
        file = st.get("file")
        h.state = "recording" if st.get("recording") else "acquiring"
        want = self.mode == RECORD and self.session_dir is not None
        here = file is not None and Path(file).parent == self.session_dir / STREAMS_DIR if want else False
        if want and not here:
            parts = self.session["streams"][name]["parts"]
            h.part = 1 + max((p["part"] for p in parts), default=-1)
            self._send(name, cmd="record", folder=str(self.session_dir / STREAMS_DIR), session=self._session_attrs(),
                       part=h.part)
            was = f"recording into {file}" if file else "not recording"
            self._incident(name, "writer_reconciled", f"writer (pid {h.proc.pid}) was {was} although this session "
                                                      f"records it (an earlier command did not reach it in time); "
                                                      f"told to record into part {h.part}", incomplete=True)
        elif want and not any(p["path"] == _rel(file, self.session_dir) for p in self.session["streams"][name]["parts"]):
            h.part = st.get("part", h.part)  # its `recording` report was lost (a full send queue): list the part
            self.session["streams"][name]["parts"].append({"part": h.part, "path": _rel(file, self.session_dir),
                                                           "rows": None})
            self._save_session()
        elif not want and file is not None:
            self._send(name, cmd="stop")
            self._incident(name, "writer_reconciled", f"writer (pid {h.proc.pid}) was still recording into {file} "
                                                      f"after its session was closed; told to close it")

    def _check_disk(self) -> None:
        """Warn at twice ``disk_reserve_bytes`` of free space; at the reserve, stop recording cleanly, before a
        writer meets ENOSPC (which would leave its last chunk unusable)."""
        if self.mode != RECORD:
            return
        reserve = self.cfg.daemon.disk_reserve_bytes
        try:
            free = shutil.disk_usage(self.data_root).free
        except OSError:
            return  # the data root vanished: the writers' own write errors say so
        if free < reserve:
            self._incident(None, "disk_full", f"{free} bytes free on {self.data_root}, below daemon.disk_reserve_bytes "
                                              f"({reserve}): recording stopped", incomplete=True)
            self.session["stopped_reason"] = "disk reserve reached"
            self.stop_recording()
        elif free < 2 * reserve and not self._disk_low:
            self._disk_low = True
            self._incident(None, "disk_low", f"{free} bytes free on {self.data_root}: recording stops at "
                                             f"daemon.disk_reserve_bytes ({reserve})")
        elif free >= 2 * reserve:
            self._disk_low = False

    # -- mode changes (run on the supervisor thread) ---------------------------------------------
    def acquire(self) -> dict:
        """IDLE -> ACQUIRE: start a writer per stream and wait until each is ready. In RECORD: stop recording."""
        if self.mode == RECORD:
            return self.stop_recording()
        if self.mode == ACQUIRE:
            return self.status()
        for s in self.cfg.streams:
            self.writers[s.name] = self._spawn(s.name)
        self.lsl.start()
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
        meta = merge(to_acqd(self.cfg.metadata), metadata or {})  # the config may use neuroconv's layout
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
        check_stimulus_images(self.cfg)  # before the folder exists: a missing image set refuses RECORD cleanly
        folder = create_session_dir(self.data_root, session_id)
        register_stimulus_images(folder, self.cfg)  # once per session, so finalize never needs the rig's folders
        self.session_dir = folder
        self.session_log.open(folder)
        self.session = {
            "session_id": session_id, "state": RECORDING, "created": now_iso(), "stopped": None,
            "incomplete": False, "metadata": meta, "reference": self.cfg.reference,
            "config": self.cfg.model_dump(mode="json"), "incidents": [],
            "streams": {s.name: {"parts": []} for s in self.cfg.streams},
        }
        self._save_session()
        self._disk_low = False
        for name, h in self.writers.items():
            h.part = 0
            if h.state in ("acquiring", "recording"):  # "recording" may be stale; the writer closes any open file
                self._send(name, cmd="record", folder=str(folder / STREAMS_DIR), session=self._session_attrs(), part=0)
            elif h.state == "starting":  # a restarted writer records as soon as it is ready
                h.record_on_ready = 0
        self.mode = RECORD
        try:
            self._wait_for(lambda: self.mode != RECORD or all(  # (a full disk may stop it meanwhile)
                (h.state == "recording" and h.acked >= h.sent) or h.hung_since is not None
                or h.state in ("stopped_failed", "failed") for h in self.writers.values()), "writers to open their files")
        except SessionError as e:  # close what did open: no session is left half started
            self._incident(None, "record_start_failed", str(e), incomplete=True)
            self.stop_recording()
            raise
        for name, h in self.writers.items():
            if h.hung_since is not None and h.state != "recording":
                self._incident(name, "record_start_failed", f"writer (pid {h.proc.pid}) hung before opening its file; "
                                                            f"it records when it answers again", incomplete=True)
        return self.status()

    def preflight(self) -> list[str]:
        """Why RECORD would be refused now: required streams that are down or silent."""
        problems = []
        limit = self.cfg.daemon.silent_after_s
        for s in self.cfg.streams:
            h = self.writers.get(s.name)
            if h is not None and h.hung_since is not None:
                problems.append(f"stream {s.name!r} has a hung writer (pid {h.proc.pid}: nothing heard for "
                                f"{time.monotonic() - h.hung_since:.1f} s)")
                continue
            if not s.required:
                continue
            if h is None or not h.ready or h.state in ("failed", "stopped_failed"):
                problems.append(f"stream {s.name!r} has no running writer ({h.reason if h else 'not started'})")
            elif s.lsl is not None and not s.lsl_rate:
                continue  # markers come when they come; the bridge reports whether the outlet is there
            elif _silent_s(h) is None:
                problems.append(f"stream {s.name!r} is silent (no message received yet)")
            elif _silent_s(h) > limit:
                problems.append(f"stream {s.name!r} is silent (no message for {_silent_s(h):.1f} s)")
        if self.cfg.daemon.disk_reserve_bytes and (free := shutil.disk_usage(self.data_root).free) < \
                self.cfg.daemon.disk_reserve_bytes:
            problems.append(f"{self.data_root} has {free} bytes free, below daemon.disk_reserve_bytes "
                            f"({self.cfg.daemon.disk_reserve_bytes})")
        return problems + self.lsl.problems()

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
            self._wait_for(lambda: all(h.state != "recording" or h.hung_since is not None
                                       for h in self.writers.values()), "writers to close their files")
        except SessionError as e:
            self._incident(None, "stop_timeout", str(e), incomplete=True)
        still_open = [name for name, h in self.writers.items() if h.state == "recording" and h.hung_since is not None]
        for name in still_open:  # it closes its file when it answers again
            self._incident(name, "stop_timeout", f"writer (pid {self.writers[name].proc.pid}) is hung and did not close "
                                                 f"its file; its rows reach session.json when it does"
                                                 + ("; not finalized on stop" if self.cfg.daemon.finalize_on_stop else ""),
                           incomplete=True)
        session_id = self.session["session_id"]
        self._close_session(CLOSED)
        if self.cfg.daemon.finalize_on_stop and not still_open:  # never finalize a file still open for writing
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
        self.lsl.stop()
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
            self.hashers.stop()
            log.removeHandler(self.session_log)
            self.router.close(linger=0)
            self.ctx.term()
            release(self._endpoint_locks)
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
            for folder, session in self._closed_unsaved:
                _write_session(folder, session)

    def set_data_root(self, root: Path) -> None:
        """Move where new sessions go (Open Ephys ``parent_directory``); not while recording."""
        if self.mode == RECORD:
            raise SessionError("cannot change the data root while recording")
        root = ensure_data_root(root)
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
        self._unsaved = not _write_session(self.session_dir, self.session)
        self.session_log.sync()
        self._saved_at = time.monotonic()

    def _close_session(self, state: str) -> None:
        for name, h in self.writers.items():
            if h.state in ("failed", "stopped_failed"):
                self.session["incomplete"] = True
                self.session["streams"][name]["stopped_reason"] = h.reason
        self.session["state"], self.session["stopped"] = state, now_iso()
        log.info("session %s %s", self.session["session_id"], state)
        self.session_log.close()
        if not _write_session(self.session_dir, self.session):  # e.g. a full disk: retried until it succeeds
            self._closed_unsaved.append((self.session_dir, self.session))
        self._unsaved = False
        self.hashers.finish(self.session_dir)
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
        streams, now = {}, time.monotonic()
        for s in self.cfg.streams:
            h = self.writers.get(s.name)
            st = h.stats if h else {}
            rec = st.get("recording_counts", {})
            hung = h is not None and h.hung_since is not None
            streams[s.name] = {
                "state": "hung" if hung else h.state if h else "stopped", "reason": h.reason if h else None,
                "pid": h.proc.pid if h and h.proc.poll() is None else None, "restarts": len(h.restarts) if h else 0,
                "part": h.part if h else 0, "connected": st.get("connected", False),
                "silent_s": _silent_s(h) if h else None, "heard_s": round(now - h.heard, 3) if h else None,
                "messages_per_s": 0.0 if hung else st.get("messages_per_s", 0.0),
                "mb_per_s": 0.0 if hung else st.get("mb_per_s", 0.0), "last_seq": st.get("last_seq"),
                "gaps": rec.get("gaps", 0), "rejected": rec.get("rejected_total", 0),
                "rows": st.get("rows", 0), "bytes_written": st.get("file_bytes", 0),
                "total": st.get("total", {}), "required": s.required, "lsl": self.lsl.status(s.name),
            }
        session = None
        if self.session is not None:
            session = {"session_id": self.session["session_id"], "path": str(self.session_dir),
                       "state": self.session["state"], "incomplete": self.session["incomplete"],
                       "incidents": len(self.session["incidents"])}
        return {"mode": self.mode, "session": session, "streams": streams,
                "last_session": self.last_session,
                "data_root": str(self.data_root), "disk_free_bytes": shutil.disk_usage(self.data_root).free,
                "disk_reserve_bytes": self.cfg.daemon.disk_reserve_bytes, "recovered": self.recovered,
                "control_junk_messages": self.junk_messages, "hash_backlog_bytes": self.hashers.backlog_bytes()}


def stop_quietly(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it must; always reaped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def _silent_s(h: WriterHandle) -> float | None:
    """Seconds since the writer last received a message, aged by the time since its stats were sent, so a
    writer that stopped reporting never shows a frozen value."""
    silent = h.stats.get("silent_s")
    return None if silent is None else round(silent + time.monotonic() - h.stats_at, 3)


def _write_session(folder: Path, session: dict) -> bool:
    """Write session.json; a failure (full disk) is logged, never fatal: the caller retries."""
    try:
        write_json_atomic(folder / SESSION_FILE, session)
        return True
    except OSError as e:
        log.error("cannot write %s (%s); retrying", folder / SESSION_FILE, e)
        return False


def _record_late_close(stream: str, msg: dict) -> None:
    """Put the rows of a part closed after its session was closed into that session's session.json."""
    folder = Path(msg["path"]).parent.parent
    try:
        s = read_session(folder)
    except SessionError:
        return
    rel = _rel(msg["path"], folder)
    parts = [p for p in s.get("streams", {}).get(stream, {}).get("parts", []) if p["path"] == rel]
    if s.get("state") != CLOSED or not parts:
        return
    for p in parts:
        p["rows"], p["counts"] = msg["rows"], msg["counts"]
    s["incidents"].append({"time": now_iso(), "stream": stream, "kind": "late_close",
                           "detail": f"{rel} was closed by its writer after the session closed ({msg['rows']} rows)"})
    _write_session(folder, s)


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
