"""The writer processes as the supervisor sees them: spawn, command, hear, restart, reconcile, stop.

One writer process per stream, or per group of slow streams (acqd.record.group: one handle per stream, sharing the
process and its pid), forked by the writer fork server (acqd.record.forkserver), talks to the daemon over one
ZeroMQ ROUTER socket, the control socket this module binds. Every writer message carries the writer's pid and
the id of the last command it handled (``acked``); its stats say whether (and where) it is recording. A writer
that sends nothing for ``heartbeat_timeout_s`` is ``hung`` (an incident; RECORD is refused); once it has handled
every command sent to it, its real state is compared with what the session expects and corrected, with an
incident, so a command that timed out never leaves a stream silently unrecorded. A writer that dies is reported;
while recording it is restarted into a new part file (at most ``max_writer_restarts`` times within
``restart_window_s``), except after a write failure (a full disk), where the stream stays stopped with its reason
and the session is marked incomplete.
``liveness`` is the one rule for "hung" and "silent", shared by the status verdict and RECORD's preflight.
Runs on the supervisor thread only.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import zmq

from acqd.config import RigConfig, StreamConfig
from acqd.record.forkserver import LOST, ForkServer, ForkServerError, Forked
from acqd.record.group import GroupSpec, writer_groups
from acqd.record.preview import is_message as is_preview
from acqd.record.writer import EXIT_DISK_FULL, EXIT_WRITE_ERROR, WriterSpec
from acqd.service.hangs import Hangs
from acqd.service.overload import overload_status
from acqd.service.procs import stop_process
from acqd.service.sessionrecord import SessionRecord, record_late_close

COMMAND_TIMEOUT_S = 30.0
WRITE_FAILURES = {EXIT_DISK_FULL: ("disk_full", "disk full or file size limit reached"),
                  EXIT_WRITE_ERROR: ("write_error", "writing the stream file failed")}
ENDED = ("failed", "stopping", "stopped", "stopped_failed")
"""States of a writer that is going or gone: nothing to watch or correct."""
log = logging.getLogger("acqd")


class Incident(Protocol):
    def __call__(self, stream: str | None, kind: str, detail: str, incomplete: bool = False) -> None: ...


@dataclass
class WriterHandle:
    """The supervisor's view of one writer process."""

    name: str
    proc: Forked | subprocess.Popen
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
    closing: dict = field(default_factory=dict)
    """While it closes a camera's file: its encoder's progress (``closing`` messages), which a stop waits on."""

    @property
    def failed(self) -> bool:
        return self.state in ("failed", "stopped_failed")


def silent_s(h: WriterHandle) -> float | None:
    """Seconds since the writer last received a message, aged by the time since its stats were sent, so a
    writer that stopped reporting never shows a frozen value."""
    silent = h.stats.get("silent_s")
    return None if silent is None else round(silent + time.monotonic() - h.stats_at, 3)


def new_rejects(before: dict, after: dict) -> dict[str, int]:
    """Messages rejected between two stats reports of one writer process, by reason: the counts in ``total`` only
    grow within a process (its handle, and so ``before``, is new with each process)."""
    was = (before.get("total") or {}).get("rejected") or {}
    now = (after.get("total") or {}).get("rejected") or {}
    return {reason: n - was.get(reason, 0) for reason, n in now.items() if n > was.get(reason, 0)}


def liveness(hung: bool, silent: float | None, silent_after_s: float) -> Literal["hung", "silent"] | None:
    """The one rule for a stream that is not alive: ``hung`` (its writer process says nothing), ``silent`` (its
    driver delivers nothing: no message yet, or none for longer than ``silent_after_s``), else None."""
    if hung:
        return "hung"
    if silent is None or silent > silent_after_s:
        return "silent"
    return None


class Writers(dict[str, WriterHandle]):
    """Stream name -> its writer's handle, with the control socket they all talk to."""

    def __init__(self, cfg: RigConfig, runtime_dir: Path, incident: Incident,
                 count_reject: Callable[[str, str, int], None]):
        super().__init__()
        self.cfg, self.incident, self.count_reject = cfg, incident, count_reject
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        # A writer's identity is its stream's name. A restarted writer (forked in milliseconds) can connect before
        # this socket has seen its dead predecessor's connection close: without handover the ROUTER keeps the old
        # connection under that name, and drops whatever the new writer sends and whatever is sent to it.
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.control_endpoint = f"ipc://{runtime_dir}/control"
        self.router.bind(self.control_endpoint)
        self.junk_messages = 0
        self.runtime_dir = runtime_dir
        self.groups = writer_groups(cfg)  # stream -> the group writer hosting it (None: a process of its own)
        self.hangs = Hangs()  # hung writer processes: one writer_hung / writer_recovered incident each
        self.forks = ForkServer()

    # -- processes and commands ------------------------------------------------------------------
    def spawn(self, name: str) -> dict[str, WriterHandle]:
        """Start the writer process of ``name``: its own, or its group's (acqd.record.group), which hosts every stream
        of the group; one handle per stream, sharing the process."""
        d, group = self.cfg.daemon, self.groups.get(name)
        names = [n for n, g in self.groups.items() if g == group] if group else [name]
        specs = [WriterSpec(stream=self.cfg.stream(n), lines=self.cfg.edge_lines(n),
                            control=self.control_endpoint, flush_interval_s=d.flush_interval_s,
                            fsync_interval_s=d.fsync_interval_s, stats_interval_s=d.stats_interval_s,
                            clock_pair_interval_s=d.clock_pair_interval_s) for n in names]
        arg = (GroupSpec(group, specs).write(self.runtime_dir / f"group-{group}.json")
               if len(specs) > 1 else specs[0].to_json())  # a group of one is a plain writer
        proc = self.forks.fork(arg)
        return {n: WriterHandle(n, proc) for n in names}

    def start(self) -> None:
        for s in self.cfg.streams:
            if s.name not in self:
                self.update(self.spawn(s.name))

    def send(self, name: str, **cmd: Any) -> int:
        """Send a command to a writer; returns its id (the writer reports the last id it handled as ``acked``)."""
        h = self[name]
        h.sent += 1
        self.router.send_multipart([name.encode(), zmq.utils.jsonapi.dumps({**cmd, "id": h.sent})])
        return h.sent

    def stop_all(self) -> None:
        """Tell every writer to shut down, wait (then kill), and forget them."""
        for name, h in self.items():
            if h.proc.poll() is None:
                h.state = "stopping"
                self.send(name, cmd="shutdown")
        deadline = time.monotonic() + COMMAND_TIMEOUT_S
        for h in self.values():
            try:
                h.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                stop_process(h.proc, timeout_s=10.0)
            h.state = "stopped"
        while self.router.poll(0):  # drain their last words
            self.router.recv_multipart()
        self.clear()
        self.hangs.clear()

    def close(self) -> None:
        self.forks.close()
        self.router.close(linger=0)
        self.ctx.term()

    # -- what writers say --------------------------------------------------------------------------
    def receive(self, known: Callable[[str], bool], preview: Callable[[bytes], None]) -> Iterator[tuple[str, dict]]:
        """Every message waiting on the control socket from a ``known`` sender; previews go to ``preview`` as they
        are (the daemon never parses one); anything else is counted and logged in one line, never a traceback."""
        while self.router.poll(0):
            frames = self.router.recv_multipart()
            try:
                ident, raw = frames
                if is_preview(raw):
                    preview(raw)
                    continue
                name, msg = ident.decode(), zmq.utils.jsonapi.loads(raw)
                if not isinstance(msg, dict):
                    raise ValueError("not a JSON object")
                if not known(name):
                    raise ValueError(f"no writer {name!r}")
            except ValueError as e:
                self.junk_messages += 1
                if self.junk_messages <= 10 or self.junk_messages % 1000 == 0:  # a flood must not flood the log
                    log.warning("ignored a malformed message on the writer control socket (%s); %d so far", e,
                                self.junk_messages)
                continue
            yield name, msg

    def on_message(self, name: str, msg: dict, session: SessionRecord | None, recording: bool,
                   on_part_closed: Callable[[str, Path], None]) -> WriterHandle | None:
        """One message of a writer: ``session`` is the open session (None when none is), ``recording`` whether
        the session wants writers recording (False from the moment a stop begins). Returns the writer's handle,
        or None for a message to ignore."""
        h = self.get(name)
        if h is None or msg.get("pid") != h.proc.pid:
            return None  # not one of ours, or a late message from a writer that was replaced
        h.heard = time.monotonic()
        h.acked = max(h.acked, int(msg.get("acked") or 0))
        if h.hung_since is not None:
            if (hang := self.hangs.answered(h.proc.pid, name)) is not None:  # one incident per process
                self.incident(hang.stream, "writer_recovered", f"writer (pid {h.proc.pid}) answers again after "
                                                               f"{h.heard - hang.since:.1f} s")
            h.hung_since = None
        match msg.get("type"):
            case "ready":
                h.ready, h.state = True, "acquiring"
                if h.record_on_ready is not None and session is not None:
                    self.send(name, **session.record_command(h.record_on_ready))
                    h.record_on_ready = None
            case "stats":
                for reason, n in new_rejects(h.stats, msg).items():
                    self.count_reject(name, reason, n)
                h.stats, h.stats_at = msg, h.heard
                if not msg.get("leaving"):  # a leaving writer is past correcting: its exit says what comes next
                    self.reconcile(name, h, session if recording else None)
            case "recording":
                h.state, h.part = "recording", msg["part"]
                if session is not None:
                    session.add_part(name, msg["part"], msg["path"])
            case "closed":
                h.closing = {}
                if msg.get("final", True) and not msg.get("leaving"):  # not a rollover, not its last part: acquiring
                    h.state = "acquiring"
                if session is not None and session.holds(msg["path"]):
                    session.close_part(name, msg)
                    on_part_closed(name, Path(msg["path"]))
                else:  # a writer that was hung at stop closed its file late: complete that session's record
                    record_late_close(name, msg)
            case "event":
                self.on_event(name, msg)
            case "closing":  # a camera's encoder finishing its backlog: progress a stop waits on
                h.closing = {"encoder_backlog": msg.get("encoder_backlog"), "encoded": msg.get("encoded")}
        return h

    def on_event(self, name: str, msg: dict) -> None:
        kind = msg.get("kind")
        if kind in ("disk_full", "write_error"):
            # A restart would fail the same way: the stream stays visibly stopped with its reason.
            h = self[name]
            h.reason = msg.get("detail")
            if h.state != "stopped_failed":  # else its exit code was seen first and recorded
                h.state = "failed"
                self.incident(name, kind, h.reason, incomplete=True)
        elif kind in ("suspect_part", "clock_step", "part_name_taken", "peer_refused", "overload", "overload_cleared"):
            self.incident(name, kind, msg.get("detail", ""), incomplete=kind == "suspect_part")
        elif kind in ("gap", "disconnected", "connected"):  # outside RECORD: an event and a log line only
            self.incident(name, kind, msg.get("detail", ""))

    def reconcile(self, name: str, h: WriterHandle, session: SessionRecord | None) -> None:
        """Compare what a writer reports (its stats) with what the session expects (``session``: the one it should
        record into, or None), once it has handled every command sent to it, and correct it: a command that timed
        out (a stalled writer) is never silently lost."""
        if h.acked < h.sent or h.state in ENDED:
            return  # commands still in flight, or nothing to correct
        file = h.stats.get("file")
        h.state = "recording" if h.stats.get("recording") else "acquiring"
        if session is not None and (file is None or not session.holds(file)):
            h.part = 1 + max((p["part"] for p in session.parts(name)), default=-1)
            self.send(name, **session.record_command(h.part))
            was = f"recording into {file}" if file else "not recording"
            self.incident(name, "writer_reconciled", f"writer (pid {h.proc.pid}) was {was} although this session "
                                                     f"records it (an earlier command did not reach it in time); "
                                                     f"told to record into part {h.part}", incomplete=True)
        elif session is not None and not session.listed(name, file):
            h.part = h.stats.get("part", h.part)  # its `recording` report was lost (a full send queue): list it
            session.add_part(name, h.part, file)
        elif session is None and file is not None:
            self.send(name, cmd="stop")
            self.incident(name, "writer_reconciled", f"writer (pid {h.proc.pid}) was still recording into {file} "
                                                     f"after its session was closed; told to close it")

    # -- watching ----------------------------------------------------------------------------------
    def check_processes(self, recording: bool) -> None:
        """Report writers that exited; restart them (into a new part while ``recording``) unless they crash-loop."""
        polled: set[int] = set()  # a group writer's streams share its process: one waitpid for them all
        for name, h in list(self.items()):
            rc = h.proc.returncode if id(h.proc) in polled else h.proc.poll()
            polled.add(id(h.proc))
            if rc is None or h.state in ("stopping", "stopped", "stopped_failed") or self.get(name) is not h:
                continue  # (or restarted with its group already)
            if h.state == "failed":  # it reported its write failure, then exited
                h.state = "stopped_failed"
                continue
            if rc in WRITE_FAILURES:  # exited on a write failure whose report is still in flight
                kind, h.reason = WRITE_FAILURES[rc]
                h.state = "stopped_failed"
                self.incident(name, kind, h.reason, incomplete=True)
                continue
            how = ("ended with the writer fork server, which died" if rc == LOST
                   else f"killed by signal {-rc}" if rc < 0 else f"exited with code {rc}")
            d, now = self.cfg.daemon, time.monotonic()
            if sum(now - t < d.restart_window_s for t in h.restarts) >= d.max_writer_restarts:
                h.state, h.reason = "stopped_failed", (f"writer {how}; not restarted: already restarted "
                                                       f"{d.max_writer_restarts} time(s) within {d.restart_window_s:g} s")
                self.incident(name, "writer_died", h.reason, incomplete=True)
                continue
            try:
                spawned = self.spawn(name)
            except ForkServerError as e:  # a pid or memory limit, or a server that cannot start: not a crash loop
                for n, o in list(self.items()):  # every stream of its process (a group writer's)
                    if o.proc is h.proc and o.state not in ENDED:
                        o.state, o.reason = "stopped_failed", f"writer {how}; not restarted: {e}"
                        self.incident(n, "writer_died", o.reason, incomplete=True)
                continue
            for n, new in spawned.items():  # a group writer: every stream it hosted, each with its gap
                old = self[n]
                if old is h or (old.proc is h.proc and old.state not in ENDED):
                    self.restarted(n, old, new, how, now, recording)

    def restarted(self, name: str, h: WriterHandle, new: WriterHandle, how: str, now: float, recording: bool) -> None:
        """``new`` replaces the dead writer ``h`` of stream ``name``: it records into the next part while recording."""
        was_recording = h.state == "recording" or h.record_on_ready is not None
        new.restarts = (*h.restarts, now)
        new.part = h.part + 1 if was_recording else h.part
        if was_recording and recording:
            new.record_on_ready = new.part
        self[name] = new
        self.hangs.pop(h.proc.pid, None)  # (a later process may get its pid)
        detail = f"writer (pid {h.proc.pid}) {how}; restarted as pid {new.proc.pid}"
        if new.record_on_ready is not None:
            detail += f", recording into part {new.part}"
        self.incident(name, "writer_died", detail, incomplete=was_recording)

    def check_heartbeats(self) -> None:
        """A live writer that has said nothing (stats come every stats_interval_s) for heartbeat_timeout_s is hung:
        stopped by a signal, deadlocked, or stuck in a system call. It is reported, not killed."""
        now, limit = time.monotonic(), self.cfg.daemon.heartbeat_timeout_s
        for name, h in self.items():
            if h.ready and h.hung_since is None and now - h.heard > limit and h.proc.poll() is None \
                    and h.state not in ENDED:
                h.hung_since = h.heard
                if not self.hangs.went_hung(h.proc.pid, name, h.heard):
                    continue  # its group writer's hang is reported already (acqd.service.hangs)
                hosts = sum(o.proc is h.proc for o in self.values())
                self.incident(name, "writer_hung", f"writer (pid {h.proc.pid}) sent nothing for {now - h.heard:.1f} s "
                                                   f"(heartbeat_timeout_s {limit:g}); data it misses meanwhile shows "
                                                   f"as gaps (sub) or waits in the driver (pull)"
                                                   + (f"; it hosts {hosts} streams, each shown hung in the status "
                                                      f"while it is" if hosts > 1 else ""))

    def problems(self) -> list[str]:
        """Why RECORD would be refused now, per stream: a hung writer, or a required stream down or silent."""
        problems = []
        for s in self.cfg.streams:
            h = self.get(s.name)
            silent = silent_s(h) if h else None
            state = liveness(h is not None and h.hung_since is not None, silent, self.cfg.daemon.silent_after_s)
            if state == "hung":
                problems.append(f"stream {s.name!r} has a hung writer (pid {h.proc.pid}: nothing heard for "
                                f"{time.monotonic() - h.hung_since:.1f} s)")
            elif not s.required:
                continue
            elif h is None or not h.ready or h.failed:
                problems.append(f"stream {s.name!r} has no running writer ({h.reason if h else 'not started'})")
            elif s.lsl is not None and not s.lsl_rate:
                continue  # markers come when they come; the bridge reports whether the outlet is there
            elif state == "silent":
                problems.append(f"stream {s.name!r} is silent (" + ("no message received yet)" if silent is None
                                                                    else f"no message for {silent:.1f} s)"))
        return problems

    def stream_status(self, s: StreamConfig) -> dict:
        """One stream's part of the status (``lsl`` is added by the supervisor)."""
        h = self.get(s.name)
        st = h.stats if h else {}
        rec = st.get("recording_counts", {})
        hung = h is not None and h.hung_since is not None
        # "pid": alive as of the last check_processes (returncode), not a waitpid per stream per snapshot
        return {
            "state": "hung" if hung else h.state if h else "stopped", "reason": h.reason if h else None,
            "pid": h.proc.pid if h and h.proc.returncode is None else None, "restarts": len(h.restarts) if h else 0,
            "part": h.part if h else 0, "connected": st.get("connected", False),
            "silent_s": silent_s(h) if h else None, "heard_s": round(time.monotonic() - h.heard, 3) if h else None,
            "messages_per_s": 0.0 if hung else st.get("messages_per_s", 0.0),
            "mb_per_s": 0.0 if hung else st.get("mb_per_s", 0.0), "last_seq": st.get("last_seq"),
            "gaps": rec.get("gaps", 0), "rejected": rec.get("rejected_total", 0),
            "rows": st.get("rows", 0), "bytes_written": st.get("file_bytes", 0),
            "total": st.get("total", {}), "required": s.required, "first_recorded_ns": st.get("first_recorded_ns"),
            **overload_status(st, rec, h.closing if h else {}),
        }
