"""The supervisor: the acquisition state machine of modes and sessions.

Modes follow the Open Ephys GUI: IDLE (no writers) -> ACQUIRE (writers receive and check, nothing
stored) -> RECORD (writers append to a session's files) -> back to ACQUIRE (the session is closed)
or IDLE. One thread owns every socket and process handle (``serve``); other threads (the HTTP API)
submit work with ``call``, which runs it on that thread, so no lock guards the state.

The parts it drives each have one job: ``writers`` (the writer processes: spawn, heartbeats, restarts,
reconcile), ``sessionrecord`` (session.json), ``jobs`` (finalize and export runs), ``live`` (the published
snapshot and its events), ``lslbridges``, ``hashing`` and ``previews``. What stays here: which mode may follow
which, RECORD's preflight, incidents, and free disk: below ``disk_reserve_bytes`` the recording stops cleanly.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from acqd.config import RigConfig, check_name
from acqd.errors import SessionError
from acqd.record.forkserver import ForkServerError
from acqd.service import live
from acqd.service.calls import Calls
from acqd.service.disk import DiskReserve, free_bytes
from acqd.service.hashing import Hashers
from acqd.service.jobs import Jobs
from acqd.service.scrubs import Scrubs
from acqd.service.lslbridges import LslBridges
from acqd.service.previews import PreviewHub
from acqd.service.preload import preload_nwb
from acqd.service.rig import rig_status
from acqd.service.runtime import lock_data_root, lock_endpoints, make_daemon_dir, release, runtime_base
from acqd.service.sessionlog import SessionLog
from acqd.service.sessionrecord import SessionRecord, recover_interrupted, session_metadata, write_session
from acqd.service.snapshot import EventBus, Snapshot
from acqd.service.synclock import SyncLock
from acqd.service.writers import COMMAND_TIMEOUT_S, Writers
from acqd.session import CLOSED, SESSION_FILE, ensure_data_root, session_name

IDLE, ACQUIRE, RECORD = "IDLE", "ACQUIRE", "RECORD"
START_TIMEOUT_S = 60.0
CHECK_EVERY_S = 0.05
"""The per-stream checks (processes, heartbeats, disk, previews) run at most this often: the loop wakes for every
writer message, hundreds a second with a hundred slow streams, and each check costs a little per stream."""
log = logging.getLogger("acqd")


class Supervisor:
    """Owns the mode, the writers and the active session. Use ``call`` from other threads."""

    def __init__(self, cfg: RigConfig):
        self.cfg = cfg
        self.data_root = ensure_data_root(cfg.daemon.data_root)
        self._lock_fd = lock_data_root(self.data_root)
        base = runtime_base()
        self._endpoint_locks = lock_endpoints(base, ((s.name, s.endpoint) for s in cfg.streams))
        self.runtime_dir = make_daemon_dir(base)
        self.live = live.Live()
        self.writers = Writers(cfg, self.runtime_dir, self.incident, self.live.count_reject)
        self.control_endpoint = self.writers.control_endpoint
        self.disk = DiskReserve(cfg.daemon.disk_reserve_bytes, self.incident)
        self._closed_unsaved: list[tuple[Path, dict]] = []  # closed sessions whose last write failed
        self.lsl = LslBridges(cfg, self.control_endpoint)
        self.mode = IDLE
        self.session_record: SessionRecord | None = None
        self.last_session: dict | None = None
        self.recording = {"prepend_text": "", "base_text": "", "append_text": ""}
        self.shipping: Any = None  # acqd.service.shipping.Shipping, set by the daemon when ship: names destinations
        self.rig: Any = None  # acqd.service.rig.Rig, set by the daemon when the config names followers (a leader)
        self.next_metadata: dict = {}  # for starts that carry none (Open Ephys, LabRecorder): `recording` sets it
        self.previews = PreviewHub()  # the console's live preview: writers decimate only while someone watches
        self.hashers = Hashers()  # closed parts are hashed in the background (acqd.finalize.digests)
        self.session_log = SessionLog()  # the daemon's lines while a session records, into its folder
        log.addHandler(self.session_log)
        self._calls = Calls()
        self.events = EventBus()
        self.jobs = Jobs(self.events)  # (kind, session id) -> the latest finalize or export run
        self.scrubs = Scrubs(self.events.publish)  # finalized sessions are read again (acqd.finalize.scrub)
        self.synclock = SyncLock(cfg)  # the live sync lock, fed with the writers' stats (acqd.service.synclock)
        self._checked_at = 0.0
        self.on_tick: Callable[[], None] | None = None
        """Called from the supervisor loop (and while a command waits): the systemd watchdog ping."""
        self.recovered = recover_interrupted(self.data_root)
        self.snapshot: Snapshot = live.publish(self, force=True)

    @property
    def session(self) -> dict | None:
        """The open session's record (session.json as a dict), or None."""
        return self.session_record.data if self.session_record else None

    @property
    def session_dir(self) -> Path | None:
        return self.session_record.folder if self.session_record else None

    # -- threading -----------------------------------------------------------------------------
    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 120.0) -> Any:
        """Run ``fn(*args)`` on the supervisor thread and return its result (or raise its error)."""
        return self._calls.call(fn, *args, timeout=timeout)

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)`` for the supervisor thread without waiting for it (an incident from a listener)."""
        self._calls.post(fn, *args)

    def serve(self, stop: threading.Event) -> None:
        """The supervisor thread: pump writer messages, run submitted calls, watch processes."""
        try:
            while not stop.is_set():
                try:
                    self._pump(0.1)
                except Exception:  # noqa: BLE001 - one bad message or write must not stop every stream
                    traceback.print_exc()
                self._calls.run_pending(lambda: live.publish(self, force=True))  # readers see a command's effect
        finally:
            self.shutdown()

    def _pump(self, timeout_s: float) -> None:
        poller = zmq.Poller()
        poller.register(self.writers.router, zmq.POLLIN)
        poller.register(self._calls.wake_fd, zmq.POLLIN)
        if (forks := self.writers.forks.fileno()) is not None:  # a writer's end: restarted at once, not at a tick
            poller.register(forks, zmq.POLLIN)
        events = dict(poller.poll(int(timeout_s * 1000)))
        other = self._calls.wake_fd in events
        if other:
            self._calls.woken()
        if forks in events and self.writers.forks.hear():
            self._checked_at, other = 0.0, True
        for name, msg in self.writers.receive(lambda n: n in self.writers or self.lsl.owns(n), self.previews.publish):
            self._on_writer_message(name, msg)
            other = True
        if not self.previews.rounds_due(other):  # woken by previews alone: relayed; the rounds below can wait
            return
        if (now := time.monotonic()) - self._checked_at >= CHECK_EVERY_S:  # O(streams): not on every message
            self._checked_at = now
            self._lsl_incidents(self.lsl.check())
            self.writers.check_processes(self.mode == RECORD)
            self.writers.check_heartbeats()
            self._check_disk()
            self.previews.sync(self.writers, self.writers.send)
        self.hashers.poll()
        self.scrubs.poll(self.jobs)
        if self.session_record is not None:
            self.session_record.flush()
        for folder, session in list(self._closed_unsaved):
            if write_session(folder, session):
                self._closed_unsaved.remove((folder, session))
        live.publish(self)
        if self.on_tick is not None:
            self.on_tick()

    def _wait_for(self, cond: Callable[[], bool], what: str, timeout_s: float = COMMAND_TIMEOUT_S,
                  progress: Callable[[], object] | None = None) -> None:
        """Pump until ``cond``; ``timeout_s`` runs from the last change of ``progress()`` (if given)."""
        deadline, seen = time.monotonic() + timeout_s, progress() if progress else None
        while not cond():
            if progress is not None and (now := progress()) != seen:
                deadline, seen = time.monotonic() + timeout_s, now
            if time.monotonic() > deadline:
                raise SessionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            self._pump(0.05)

    # -- what writers and bridges say ------------------------------------------------------------
    def _on_writer_message(self, name: str, msg: dict) -> None:
        if self.lsl.owns(name):
            return self._lsl_incidents([self.lsl.on_message(name, msg)])
        h = self.writers.on_message(name, msg, self.session_record, self.mode == RECORD, self._part_closed)
        if h is not None and msg.get("type") in ("stats", "closing"):
            if msg["type"] == "stats":
                self.synclock.feed(name, msg, h.heard)
            self.live.note(name, msg, h.state)

    def _part_closed(self, stream: str, path: Path) -> None:
        self.hashers.queue(self.session_record.folder, stream, path)

    def incident(self, stream: str | None, kind: str, detail: str, incomplete: bool = False) -> None:
        """Log it, publish it (the ``incident`` event) and, while a session is open, record it there."""
        log.log(logging.WARNING if incomplete or kind not in ("connected",) else logging.INFO,
                "%s: %s: %s", stream or "session", kind, detail,
                extra={"fields": {"incident": kind, "stream": stream, "incomplete": incomplete}})
        self.events.publish("incident", {"stream": stream, "kind": kind, "detail": detail, "incomplete": incomplete,
                                         "session": self.session["session_id"] if self.session else None})
        self.live.changed = True
        if self.session_record is not None:
            self.session_record.add_incident(stream, kind, detail, incomplete)

    def _lsl_incidents(self, found: list[tuple[str, str, str] | None]) -> None:
        for stream, kind, detail in filter(None, found):
            if self.mode == RECORD:
                self.incident(stream, kind, detail)

    def _check_disk(self) -> None:
        if self.mode == RECORD and self.disk.reached(self.data_root):
            self.session["stopped_reason"] = "disk reserve reached"
            self.stop_recording()

    # -- mode changes (run on the supervisor thread) ---------------------------------------------
    def acquire(self) -> dict:
        """IDLE -> ACQUIRE: start a writer per stream and wait until each is ready. In RECORD: stop recording."""
        if self.mode == RECORD:
            return self.stop_recording()
        if self.mode == ACQUIRE:
            return self.status()
        try:
            self.writers.start()
        except ForkServerError as e:
            self._stop_writers()
            raise SessionError(f"the writers cannot start: {e}") from e
        self.lsl.start()
        preload_nwb()  # pynwb for RECORD's metadata check, imported meanwhile on a thread of its own
        try:
            self._wait_for(lambda: all(h.ready for h in self.writers.values()), "writers to start", START_TIMEOUT_S)
        except SessionError:
            self._stop_writers()
            raise
        self.mode = ACQUIRE
        return self.status()

    def record(self, metadata: dict | None = None, session: str | None = None, leader: dict | None = None) -> dict:
        """ACQUIRE -> RECORD: preflight, create the session folder, tell every writer to open its file.
        ``leader``: {node, session} of the rig's leader that started this follower (acqd.service.rig)."""
        if self.mode == RECORD:
            raise SessionError(f"already recording session {self.session['session_id']!r}")
        meta = session_metadata(self.cfg, metadata)
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
        self.session_record = SessionRecord.create(self.data_root, session_id, self.cfg, meta, self.session_log, leader)
        self.disk.low = False
        for name, h in self.writers.items():
            h.part = 0
            if h.state in ("acquiring", "recording"):  # "recording" may be stale; the writer closes any open file
                self.writers.send(name, **self.session_record.record_command(0))
            elif h.state == "starting":  # a restarted writer records as soon as it is ready
                h.record_on_ready = 0
        self.mode = RECORD
        try:
            self._wait_for(lambda: self.mode != RECORD or all(  # (a full disk may stop it meanwhile)
                (h.state == "recording" and h.acked >= h.sent) or h.hung_since is not None or h.failed
                for h in self.writers.values()), "writers to open their files")
        except SessionError as e:  # close what did open: no session is left half started
            self.incident(None, "record_start_failed", str(e), incomplete=True)
            self.stop_recording()
            raise
        for name, h in self.writers.items():
            if h.hung_since is not None and h.state != "recording":
                self.incident(name, "record_start_failed", f"writer (pid {h.proc.pid}) hung before opening its file; "
                                                           f"it records when it answers again", incomplete=True)
        return self.status()

    def preflight(self) -> list[str]:
        """Why RECORD would be refused now: hung writers, required streams that are down or silent, a low disk."""
        problems = self.writers.problems()
        free = free_bytes(self.data_root)
        if free is None:
            problems.append(f"data root {self.data_root} cannot be read (gone, or its disk unmounted)")
        elif self.cfg.daemon.disk_reserve_bytes and free < self.cfg.daemon.disk_reserve_bytes:
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
                self.writers.send(name, cmd="stop")
        self.mode = ACQUIRE  # from here on, a restarted writer is not sent back to recording
        try:
            self._wait_for(lambda: all(h.state != "recording" or h.hung_since is not None
                                       for h in self.writers.values()), "writers to close their files",
                           progress=lambda: [h.closing.get("encoded") for h in self.writers.values()])
        except SessionError as e:
            self.incident(None, "stop_timeout", str(e), incomplete=True)
        still_open = [name for name, h in self.writers.items() if h.state == "recording" and h.hung_since is not None]
        for name in still_open:  # it closes its file when it answers again
            self.incident(name, "stop_timeout", f"writer (pid {self.writers[name].proc.pid}) is hung and did not close "
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
        self.writers.stop_all()

    def _close_session(self, state: str) -> None:
        record, self.session_record = self.session_record, None
        if not record.close(state, {name: h.reason for name, h in self.writers.items() if h.failed}):
            self._closed_unsaved.append((record.folder, record.data))  # e.g. a full disk: retried until it succeeds
        self.hashers.finish(record.folder)
        self.last_session = {"session_id": record.data["session_id"], "path": str(record.folder)}

    def shutdown(self) -> None:
        """Leave cleanly (SIGTERM, Ctrl-C): close the session and every file."""
        try:
            if self.mode != IDLE:
                self.stop()
        finally:
            self.jobs.stop()  # finalize and export are resumable: a rerun completes them
            self.hashers.stop()
            self.scrubs.stop()
            log.removeHandler(self.session_log)
            self.writers.close()
            release(self._endpoint_locks)
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
            for folder, session in self._closed_unsaved:
                write_session(folder, session)

    def set_data_root(self, root: Path) -> None:
        """Move where new sessions go (Open Ephys ``parent_directory``); not while recording."""
        if self.mode == RECORD:
            raise SessionError("cannot change the data root while recording")
        root = ensure_data_root(root)
        fd = lock_data_root(root)
        os.close(self._lock_fd)
        self._lock_fd, self.data_root = fd, root
        self.recovered = recover_interrupted(root)

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
        return self.jobs.start(kind, session_id, folder, *args)

    def job_status(self, kind: str, session_id: str | None = None) -> dict:
        return self.jobs.status(kind, session_id)

    # -- status --------------------------------------------------------------------------------
    def status(self) -> dict:
        streams = {s.name: {**self.writers.stream_status(s), "lsl": self.lsl.status(s.name)} for s in self.cfg.streams}
        session = self.session_record.summary() if self.session_record is not None else None
        return {"mode": self.mode, "session": session, "streams": streams,
                "last_session": self.last_session,
                "data_root": str(self.data_root), "disk_free_bytes": free_bytes(self.data_root),
                "disk_reserve_bytes": self.cfg.daemon.disk_reserve_bytes, "recovered": self.recovered,
                "control_junk_messages": self.writers.junk_messages, "hash_backlog_bytes": self.hashers.backlog_bytes(),
                "scrubs": dict(self.scrubs.states), **rig_status(self, streams)}
