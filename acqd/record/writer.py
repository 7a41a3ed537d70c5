"""A writer process: one stream's socket, checks and HDF5 file.

Started as ``python -m acqd.record.launch SPEC_JSON`` by the supervisor (one process per stream, because h5py
serialises every call through one global lock). The writer owns its data socket, so a chunk is
never copied between processes. It receives and checks chunks from the moment it starts
(ACQUIRE: counted, not stored) and appends them to a stream file while recording (RECORD).

It talks to the supervisor over one DEALER socket (JSON frames): it sends ``ready``, ``stats``,
``event`` and ``closed``, each with its pid and the id of the last command it handled (``acked``);
stats also say whether and where it records, so the supervisor can reconcile its real state. It obeys
``record``, ``stop`` and ``shutdown``. SIGTERM, or the
supervisor's death, closes the file cleanly. A full disk stops the stream with a reason and an exit
code of ``EXIT_DISK_FULL``; committed data (per the chunk index) stays readable.
While the console watches (the ``preview`` command) it also sends ``preview`` messages (acqd.record.preview).
How far behind it is (acqd.record.load) is in its stats (``load``, ``shedding``); every message it loses is a
gap row with its reason (ingest.Loss) and an event. While a camera's encoder finishes its backlog at a stop it
sends ``closing`` messages with its progress.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import zmq

from acqd.config import ChannelSync, EdgeLine, FrameSync, StreamConfig
from acqd.errors import DiskFullError, ProtocolError, WriterError
from acqd.record.faults import Faults, fail_writes
from acqd.record.ingest import (SOURCE_GAPS, Cursor, Gap, GapRecord, Loss, Reject, Verdict, advance,
                                check_continuity, check_edges, check_format, rising_edges, wall_step_ns)
from acqd.record.load import Load
from acqd.record.peerauth import authenticate
from acqd.record.preview import Preview, encode_message
from acqd.record.schedule import Due, Schedule
from acqd.wire.monitor import recv_monitor_message
from acqd.wire.protocol import Chunk, Header, decode, peek_seq
from acqd.record.streamfile import (UNKNOWN_SEQ, StreamFile, io_errors, last_committed, part_filename, part_image,
                                   raise_if)

WAKE_INTERVAL_S = 0.05
"""Wake at most this often and take what has queued: one wake-up per message (~100/s per stream) costs
more CPU than the data; latency is bounded by the flush interval anyway. Only for streams that carry their
own sync edges: a strobed stream (a camera) is paired with its strobes by host receive time, and a stream
without sync is timed by it, and a message that waited in the queue would carry it late by up to this much
(more than half a frame period at 60 fps)."""
SLOW_BYTES_PER_S = 1_000_000
"""A stream whose configured data rate is at most this, and that carries its own sync edges (and no camera's
strobes: see ``Writer.drains_at_deadlines``), is not woken per message: its queue is drained whenever a timer is due (stats every stats_interval_s, then the flush), so it costs
a few wake-ups a second whatever its message rate. What it received is flushed in the same wake-up, so the data a
kill -9 loses stays bounded by flush_interval_s (plus what ZeroMQ still held, as for any stream). Its host receive
times are those of the drain; the last message of each drain arrived at most a message period earlier, and the
host-time fit (acqd.finalize.clock.fit_host_clock) follows exactly those fastest deliveries (the lower envelope).
Its receive times are still true ones: a receiver thread (``Writer.receive``) takes each message off the socket as it
arrives and stamps it, which costs a thread wake-up and a recv, not the decode and the HDF5 append; a drain read
time, up to 0.5 s late, made a host-timed fallback of such a stream 4.8 ms off with a residual of 14,980 samples."""
DRAIN_LIMIT = 256
"""Messages handled per wake-up before control and timers get their turn."""
DRAIN_BUDGET_S = 0.1
"""Nor longer than this: a writer that cannot keep up still flushes, reports and obeys on time."""
BATCH_LIMIT = 4096
"""The same for a stream drained only when a timer is due (~50 messages queue between two at 100/s)."""
EXIT_DISK_FULL = 3
EXIT_WRITE_ERROR = 4
FSIZE_LIMIT_ENV = "ACQD_WRITER_FSIZE_LIMIT"
"""Fault injection for tests: ``stream=bytes[,stream=bytes]`` sets RLIMIT_FSIZE in those writers."""
# The other fault-injection hook for tests is FAULT_ENV, ``ACQD_FAULT=stream:kind:N[,...]`` (eio_on_write,
# eio_on_fsync, crash_after_write, wall_step): parsed once in ``main``, documented in acqd.record.faults.
OVERSIZE_ALLOWANCE = 1 << 20
"""Bytes a frame may exceed max_message_bytes by and still be received (then rejected as oversized, counted with
its seq); larger frames are dropped by ZeroMQ (ZMQ_MAXMSGSIZE) unbuffered: a link event, and a gap."""
PART_SEARCH = 1000
"""Part numbers tried past a name that is taken (EEXIST, e.g. a planted file or link) before the stream stops."""
LEAVE_LINGER_MS = 1000
"""How long a leaving writer waits for its last reports to reach the supervisor (gone: they never will)."""
LIVE_EDGES_MAX = 500
"""Own-sync-line edges sent with one stats message (the live sync lock: acqd.service.synclock); more are counted
as cut. One stats interval holds a handful at any sane pulse rate; the bound keeps a wild line cheap."""


@dataclass(frozen=True, slots=True)
class WriterSpec:
    """Everything a writer process needs, serialised as JSON (a line to the fork server, or launch's argument)."""

    stream: StreamConfig
    lines: list[EdgeLine]
    control: str
    """Endpoint of the supervisor's ROUTER socket."""
    flush_interval_s: float
    fsync_interval_s: float | None
    stats_interval_s: float
    clock_pair_interval_s: float
    parent_pid: int = 0
    """For a writer started by hand (``python -m acqd.record.launch``): the pid it must be the child of (see launch).
    0 for a forked writer: the fork server checked that it is the parent."""

    def to_json(self) -> str:
        plain = {f.name: getattr(self, f.name) for f in fields(self)}
        return json.dumps({**plain, "stream": self.stream.model_dump(mode="json"),
                           "lines": [ln.model_dump() for ln in self.lines]})

    @classmethod
    def from_json(cls, text: str) -> WriterSpec:
        d = json.loads(text)
        return cls(stream=StreamConfig.model_validate(d.pop("stream")),
                   lines=[EdgeLine.model_validate(x) for x in d.pop("lines")], **d)


@dataclass
class Counts:
    """Counters since the writer started (acquire) or since the recording started (record)."""

    messages: int = 0
    samples: int = 0
    bytes: int = 0
    gaps: int = 0
    rejected: Counter = field(default_factory=Counter)
    lost: Counter = field(default_factory=Counter)
    """Messages lost in gaps, by reason (ingest.Loss), where the gap's seqs say how many."""

    def as_dict(self) -> dict:
        return {"messages": self.messages, "samples": self.samples, "bytes": self.bytes, "gaps": self.gaps,
                "lost": {r.name.lower(): n for r, n in self.lost.items()},
                "rejected": {r.name.lower(): n for r, n in self.rejected.items()},
                "rejected_total": sum(self.rejected.values())}


class Writer:
    """The state of one writer process; ``run`` is its event loop."""

    def __init__(self, spec: WriterSpec, ctx: zmq.Context | None = None):
        self.spec = spec
        self.cfg = spec.stream
        self.acked = 0  # id of the last supervisor command handled; reported with every message (from the first)
        self.leaving = False
        """Set once it leaves (shutdown, SIGTERM): its last reports say so, so the supervisor takes them as a writer's
        last words (a process about to end) rather than as a writer back to acquiring."""
        self.pool: Executor | None = None  # a group writer's fsync threads: parts close and open without waiting
        self.outbox: deque[dict | tuple[Future, Callable[[OSError | None], None]]] = deque()  # reports held (after)
        self.ctx = ctx or zmq.Context()  # a group writer (acqd.record.group) shares one among its streams
        self.ctrl = self.ctx.socket(zmq.DEALER)
        self.ctrl.setsockopt(zmq.IDENTITY, self.cfg.name.encode())
        self.ctrl.setsockopt(zmq.LINGER, 1000)
        self.ctrl.setsockopt(zmq.SNDHWM, 10_000)
        self.ctrl.connect(spec.control)
        self.data = self.ctx.socket(zmq.SUB if self.cfg.socket == "sub" else zmq.PULL)
        self.data.setsockopt(zmq.LINGER, 0)
        # ZeroMQ limits each frame; no frame of an acceptable message exceeds the whole message's limit. A peer
        # sending a frame over it (plus OVERSIZE_ALLOWANCE) is disconnected as soon as the frame's length is read,
        # before it is buffered; a message only a little too large is still received and rejected, with its seq.
        self.data.setsockopt(zmq.MAXMSGSIZE, self.cfg.max_message_bytes + OVERSIZE_ALLOWANCE)
        if self.cfg.socket == "sub":
            # Exact-topic filtering: ZeroMQ matches prefixes, so "probe" would also take "probe2";
            # the header check below rejects those as WRONG_STREAM.
            self.data.setsockopt(zmq.SUBSCRIBE, self.cfg.name.encode())
        self.refused_total = self.refused_unmatched = 0
        self.auth, self.refusals = (authenticate(self.ctx, self.data, self.cfg) if self.cfg.bind
                                    and self.cfg.endpoint.startswith("tcp://") else (None, None))
        # With an allow-list a peer counts once its handshake succeeded (a refused one is accepted first).
        connected = zmq.EVENT_HANDSHAKE_SUCCEEDED if self.auth else zmq.EVENT_CONNECTED | zmq.EVENT_ACCEPTED
        self.monitor = self.data.get_monitor_socket(connected | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                                    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
        (self.data.bind if self.cfg.bind else self.data.connect)(self.cfg.endpoint)
        if self.cfg.bind:
            endpoint = self.data.getsockopt_string(zmq.LAST_ENDPOINT)
            self.event("bound", f"listening on {endpoint}", endpoint=endpoint)
        self.peers = 0
        self.cursor: Cursor | None = None
        self.total = Counts()
        self.rec = Counts()
        self.file: StreamFile | None = None
        self.folder = Path()
        self.session: dict = {}
        # A new part of this stream, as bytes (streamfile.part_image), laid out once, before the writer is ready: a
        # group writer's hundred streams then start recording without laying out a hundred files at RECORD.
        self.image = part_image(self.cfg, self.spec.lines)
        self.part = 0
        self.levels: list[bool | None] = []
        self.last_seq: int | None = None
        self.last_message_mono = 0.0
        self.last_chunk: tuple[int, int, int] | None = None  # (first_sample, mono_ns, wall_ns)
        self.first_recorded_ns: int | None = None  # host wall time of this session's first stored message (rig skew)
        self.last_offset: np.ndarray | None = None  # the driver's latest clock offset, stored first in a new file
        self.stop_requested = False
        self.unsent_reports = 0
        self.faults = Faults()
        self.held: Cursor | None = None  # after the last LATE / SEQ_JUMP reject: what would continue it
        self.part_cursor: Cursor | None = None  # the cursor when the current part was opened
        self.retry_part: int | None = None  # the part opened after a write failure (row 7)
        self.preview: Preview | None = None  # only while the console watches (the ``preview`` command)
        self.load = Load(spec.flush_interval_s)
        self.next_gap_reason: Loss | None = None  # the cause of the next seq gap, when the writer knows it (EIO, restart)
        self.link_dropped = False  # a driver disconnected since the last message: a seq gap then is the link's
        self.dropped: GapRecord | None = None  # messages received but not stored (encoder behind), not yet recorded
        self.lost_before_overload: Counter = Counter()  # total.lost when the current overload started
        self._window = (time.monotonic(), 0, 0)
        # A stream drained at timers: messages stamped on arrival by the receiver thread, which then owns self.data.
        self.inbox: deque[tuple[int, int, list[zmq.Frame]]] = deque()
        self.receiving = threading.Event()
        self.receiver: threading.Thread | None = None
        self.reconnect_wanted = False
        self.live_edges: list[int] = []  # own sync line edges (device samples) since the last stats message
        self.live_edges_cut = 0
        self.flushes = 0  # flushes so far, and what part_full last saw: (file, chunks written, flushes), full or not
        self.size_mark: tuple | None = None
        self.size_full = False

    # -- messages to the supervisor ------------------------------------------------------------
    def send(self, msg_type: str, **body) -> None:
        """Report to the supervisor without ever blocking the data path (a flood is counted, not queued); after the
        reports ``after`` holds, in order."""
        msg = {"type": msg_type, "stream": self.cfg.name, "pid": os.getpid(), "acked": self.acked, **body}
        if self.leaving:
            msg["leaving"] = True
        if self.outbox:
            self.outbox.append(msg)
        else:
            self.deliver(msg)

    def deliver(self, msg: dict) -> None:
        try:
            self.ctrl.send_json(msg, zmq.NOBLOCK)
        except zmq.Again:
            self.unsent_reports += 1

    def after(self, fsync: Future | None, then: Callable[[OSError | None], None]) -> None:
        """``then(outcome)`` once the ``fsync`` running on the pool is done (at once without one), and every report
        from now on after it: a part is reported open, or closed, only once it is durable, and the supervisor hears
        of a stream's parts in their order (``release``)."""
        if fsync is None and not self.outbox:
            then(None)
        else:
            self.outbox.append((fsync, then))

    def release(self, wait: bool = False) -> None:
        """Send the reports held behind fsyncs that are done (``wait``: behind all of them, waiting)."""
        while self.outbox:
            item = self.outbox[0]
            if isinstance(item, dict):
                self.deliver(self.outbox.popleft())
                continue
            fsync, then = item
            if fsync is not None and not (wait or fsync.done()):
                return
            self.outbox.popleft()
            held, self.outbox = self.outbox, deque()  # what ``then`` reports comes before what waited behind it
            then(fsync.result() if fsync is not None else None)
            self.outbox.extend(held)

    def event(self, kind: str, detail: str, **extra) -> None:
        self.send("event", kind=kind, detail=detail, **extra)

    def stats(self) -> dict:
        now = time.monotonic()
        t0, m0, b0 = self._window
        dt = max(now - t0, 1e-9)
        self._window = (now, self.total.messages, self.total.bytes)
        return {"pid": os.getpid(), "connected": self.peers > 0, "peers": self.peers,
                "unsent_reports": self.unsent_reports, "refused_peers": self.refused_total,
                "recording": self.file is not None, "part": self.part, "last_seq": self.last_seq,
                "silent_s": None if not self.last_message_mono else round(now - self.last_message_mono, 3),
                "messages_per_s": round((self.total.messages - m0) / dt, 2),
                "mb_per_s": round((self.total.bytes - b0) / dt / 1e6, 3),
                "total": self.total.as_dict(), "recording_counts": self.rec.as_dict(),
                "last_chunk": self.last_chunk,  # (first_sample, mono_ns, wall_ns): where annotations are placed
                "first_recorded_ns": self.first_recorded_ns,
                "rows": self.file.rows if self.file else 0,
                "file": str(self.file.path) if self.file else None,
                "file_bytes": self.file.size_bytes if self.file else 0,
                "load": {**self.load.stats(now), "rcvhwm": self.data.getsockopt(zmq.RCVHWM),
                         "pending_messages": len(self.file.pending_index) if self.file else 0},
                "shedding": self.load.shedding(now), **self.take_live_edges()}

    def take_live_edges(self) -> dict:
        """The sync edges since the last stats message, for the supervisor's live sync lock (then forgotten)."""
        edges, cut = self.live_edges, self.live_edges_cut
        self.live_edges, self.live_edges_cut = [], 0
        return {"sync_edges": edges, "sync_edges_cut": cut}

    def keep_live_edges(self, samples: list[int]) -> None:
        room = LIVE_EDGES_MAX - len(self.live_edges)
        self.live_edges.extend(samples[:max(room, 0)])
        self.live_edges_cut += max(len(samples) - max(room, 0), 0)

    # -- recording -----------------------------------------------------------------------------
    def start_recording(self, folder: str, session: dict, part: int) -> None:
        self.close_file()
        self.folder, self.session = Path(folder), session
        self.rec = Counts()
        self.first_recorded_ns = None
        # The recording starts at the next accepted chunk, with no gap before it; a restarted writer continues
        # after the last message its predecessor committed, so what the restart lost is a gap with both seqs.
        self.cursor = self.previous_part_cursor(part) if part else None
        self.next_gap_reason = Loss.WRITER if self.cursor is not None else None  # what the dead writer held
        self.dropped = None
        self.held = None
        self.levels = [None] * len(self.spec.lines)
        self.retry_part = None
        self.open_part(part)

    def previous_part_cursor(self, part: int) -> Cursor | None:
        """Where the last committed message of this stream's previous part (of this session) left off."""
        for p in range(part - 1, -1, -1):
            path = self.folder / part_filename(self.cfg.name, p)
            try:
                found = last_committed(path, self.cfg.name, self.session.get("session_id"))
            except (OSError, KeyError, ValueError):  # a name taken by something else, or a part that never wrote
                continue
            if found is not None:
                return Cursor(*found)
        return None

    def open_part(self, part: int) -> None:
        for n in range(part, part + PART_SEARCH):
            path = self.folder / part_filename(self.cfg.name, n)
            try:
                with io_errors(path):  # a full disk stops the stream with its reason
                    self.file = StreamFile.create(path, self.cfg, session=self.session, lines=self.spec.lines,
                                                  part=n, encode_delay_s=self.faults.encode_delay_s(),
                                                  durable=self.spec.fsync_interval_s is not None, pool=self.pool,
                                                  image=self.image)
                break
            except WriterError as e:
                if not isinstance(e.__cause__, FileExistsError):
                    raise
                self.event("part_name_taken", f"{path.name} exists (not ours; never opened): trying the next part")
        else:
            raise WriterError(f"{self.folder}: part names {part}..{n} of {self.cfg.name} are all taken")
        self.file.fsync = self.faults.fsync()
        if self.faults.disk_dead(append=False):
            fail_writes(path, self.file.f.id.get_vfd_handle())
        self.part, self.part_cursor = n, self.cursor
        if self.last_offset is not None:  # the clock offset in force when the part opens (LSL: docs/lsl.md)
            self.file.add("sync/offsets", self.last_offset)
        # Reported once on disk; if its fsync failed, the report of the part's failure (``synced``) follows this one.
        self.after(self.file.syncing, lambda _: self.send("recording", path=str(path), part=n))

    def part_full(self) -> bool:
        """Whether the current part reached ``max_file_bytes`` or ``max_file_seconds``. A part's duration is its rows
        over the stream's rate (its own samples), not host time: where parts split then depends on the data alone,
        the same on every run and in tests, and a driver that stalls never cuts a part with nothing new in it."""
        c = self.cfg
        if c.max_file_seconds and self.file.rows >= c.max_file_seconds * c.rate:
            return True
        if not c.max_file_bytes:
            return False
        # The file grows when a chunk or a flush is written, not per message: its size (an fstat, 13 % of a slow
        # stream's CPU when read per message) is read again only after one was.
        mark = (id(self.file), self.file.written, self.flushes)
        if mark != self.size_mark:
            self.size_mark, self.size_full = mark, self.file.size_bytes >= c.max_file_bytes
        return self.size_full

    def roll_over(self) -> None:
        """Continue in the next part file; continuity (cursor, edge levels) carries on, nothing is lost."""
        self.close_file(final=False)
        self.open_part(self.part + 1)

    def close_file(self, final: bool = True, failure: WriterError | None = None) -> None:
        """Close the part file; ``final`` is False when the recording continues in the next part.

        A failed write or fsync (``failure``, or one while closing) leaves the part suspect: it is kept, never
        fsynced again, and reported with its committed rows (what its index proves) and the reason.
        """
        if self.file is None:
            return
        if failure is None and self.dropped is not None:  # frames lost at the very end: their gap closes the part
            self.guarded(self.record_dropped)
            if self.file is None:
                return
        f, self.file = self.file, None
        suspect = str(failure) if failure is not None else None
        if failure is None:
            try:
                fsync = f.close(fsync=self.spec.fsync_interval_s is not None, progress=self.closing, pool=self.pool)
            except DiskFullError:
                raise
            except WriterError as e:
                suspect = str(e)
            else:  # the counts as the part closed, not as they are when its fsync is done
                counts = self.rec.as_dict()
                self.after(fsync, lambda error: self.report_closed(f, final, fsync_failure(f.path, error), counts))
                return
        self.report_closed(f, final, suspect, self.rec.as_dict())

    def report_closed(self, f: StreamFile, final: bool, suspect: str | None, counts: dict) -> None:
        """Report a closed part: a suspect one with what its index proves, its reason, and an event."""
        if suspect is None:
            self.send("closed", path=str(f.path), rows=f.rows, counts=counts, final=final)
            return
        f.abandon(suspect)
        rows = f.last_index[4] + f.last_index[2] if f.last_index else 0
        lost = f"{len(f.pending_index)} message(s) after the last committed one not proven written"
        self.send("closed", path=str(f.path), rows=rows, counts=counts, final=final, suspect=suspect)
        self.event("suspect_part", f"{f.path.name} is suspect ({suspect}); {lost}"
                   + ("" if final else "; recording continues in the next part"), path=str(f.path))

    def part_failed(self, failure: WriterError) -> None:
        """A write or fsync failed (EIO): keep that part as suspect and continue in a new one.

        The cursor goes back to the last message the suspect part committed, so whatever it may not hold
        is a gap in the new part, with exact seqs.
        """
        f = self.file
        if self.retry_part == self.part and f.last_index is None:
            # The part opened after the last failure failed too before it committed anything: the disk fails every
            # write. The stream stops with the reason (``run``: write_error) rather than open a part per flush.
            raise failure
        self.close_file(final=False, failure=failure)
        # Index rows are (seq, epoch, n_samples, first_sample, ...). Resume just before the first message the
        # suspect part did not commit, else after the last one it did.
        if f.pending_index:
            seq, epoch, _, first = f.pending_index[0][:4]
            self.cursor = Cursor(epoch, seq - 1, first)
        elif f.last_index:
            seq, epoch, n, first = f.last_index[:4]
            self.cursor = Cursor(epoch, seq, first + n)
        else:
            self.cursor = self.part_cursor
        self.held = None
        self.next_gap_reason = Loss.DISK
        self.open_part(self.part + 1)
        self.retry_part = self.part

    def closing(self, backlog: int, encoded: int) -> None:
        """While a stop waits for the camera's encoder: progress, which the supervisor waits on (and a heartbeat)."""
        self.send("closing", encoder_backlog=backlog, encoded=encoded)

    # -- the data path -------------------------------------------------------------------------
    def reject(self, reason: Reject, detail: str, seq: int, nbytes: int) -> None:
        self.total.rejected[reason] += 1
        if self.file is not None:
            self.rec.rejected[reason] += 1
            # At the next flush, as the sync edges: an HDF5 append per reject was most of a reject's cost, and
            # a flood of junk on one stream took its group's CPU from the other streams.
            self.file.queue("rejects", [(reason, seq, nbytes, time.time_ns(), detail.encode()[:160])])
        # No report per reject: the supervisor counts them from the stats (``total.rejected``). A report each cost a
        # quarter of a reject, and a flood of them filled the send queue that the part reports share.

    def on_message(self, frames: list[zmq.Frame], arrived: tuple[int, int] | None = None) -> None:
        """Check and store one message; ``arrived``: (wall ns, monotonic ns) it was received at, if not now."""
        wall_ns, mono_ns = arrived or (time.time_ns(), time.monotonic_ns())
        wall_ns += self.faults.wall_offset_ns()
        self.last_message_mono = mono_ns / 1e9
        nbytes = sum(len(f.buffer) for f in frames)
        if nbytes > self.cfg.max_message_bytes:
            return self.reject(Reject.OVERSIZED, f"{nbytes} bytes > max_message_bytes {self.cfg.max_message_bytes}",
                               _seq_or_unknown(frames), nbytes)
        try:
            chunk = decode(frames)
        except ProtocolError as e:
            return self.reject(Reject.MALFORMED, str(e), _seq_or_unknown(frames), nbytes)
        h = chunk.header
        verdict = check_format(h, self.cfg.name, self.cfg.dtype, self.cfg.shape)
        if verdict.accepted:
            verdict = check_continuity(self.cursor, h, self.held)
        if not verdict.accepted:
            if verdict.reject in (Reject.LATE, Reject.SEQ_JUMP):
                self.held = advance(h)
            return self.reject(verdict.reject, verdict.detail, h.seq, nbytes)
        self.held = None
        if self.last_seq is None and h.seq > 0 and self.file is None:  # row 10: a slow joiner, reported once
            self.event("gap", f"joined late: seq [0, {h.seq}) of epoch {h.epoch} was sent before this writer "
                              f"received anything (before any recording)", gap="JOIN")
        previous, self.cursor = self.cursor, advance(h)
        self.last_seq = h.seq
        step = wall_step_ns(self.last_chunk, mono_ns, wall_ns)
        clock_pairs = [self.last_chunk, (h.first_sample, mono_ns, wall_ns)] if step else []
        self.last_chunk = (h.first_sample, mono_ns, wall_ns)
        if step:
            self.event("clock_step", f"host wall clock stepped {step / 1e9:+.3f} s against CLOCK_MONOTONIC "
                                     f"(seq {h.seq}); sample times do not use it", step_ns=step)
        if verdict.gap is not None:
            verdict = replace(verdict, gap=replace(verdict.gap, reason=self.loss_reason(verdict.gap)))
            self.gap_event(verdict.gap)
        self.next_gap_reason, self.link_dropped = None, False
        if self.file is not None:
            try:
                self.store(h, chunk, verdict, wall_ns, mono_ns, clock_pairs)
            except WriterError:
                self.cursor = previous  # not stored: the next part (after EIO) must see it as not accepted
                raise
        # Counted only once nothing can fail any more: a message is either accepted or rejected, never both.
        for counts in (self.total, self.rec) if self.file is not None else (self.total,):
            counts.messages += 1
            counts.samples += h.n_samples
            counts.bytes += nbytes
            counts.gaps += verdict.gap is not None
            if verdict.gap is not None and verdict.gap.kind == Gap.SEQ:
                counts.lost[verdict.gap.reason] += verdict.gap.seq_to - verdict.gap.seq_from
        if chunk.offsets is not None and len(chunk.offsets):
            self.last_offset = chunk.offsets[-1:].copy()
        self.show(chunk.data, h.first_sample, mono_ns)

    def show(self, data: np.ndarray, first_sample: int, mono_ns: int) -> None:
        """Accepted rows (one message's, or a group writer's run of them, acqd.record.batch) to the preview while a
        page watches, and its message when one is due; shed first when behind."""
        if self.preview is not None and not self.load.overloaded and (
                shown := self.preview.take(data, first_sample, mono_ns / 1e9)):
            try:  # encoded once here; the supervisor forwards it to the page unparsed
                self.ctrl.send(encode_message(self.cfg.name, shown), zmq.NOBLOCK)
            except zmq.Again:
                self.unsent_reports += 1

    def loss_reason(self, gap: GapRecord) -> Loss:
        """Why the messages of a gap are missing, as far as this writer can tell."""
        if gap.kind in SOURCE_GAPS:
            return Loss.SOURCE
        if self.next_gap_reason is not None:
            return self.next_gap_reason
        if self.load.overloaded:
            return Loss.OVERLOAD
        if self.link_dropped or self.cfg.socket != "sub":
            return Loss.TRANSPORT
        return Loss.HWM  # a SUB socket with its driver connected and this writer keeping up: a high-water mark

    def gap_event(self, gap: GapRecord) -> None:
        self.event("gap", f"{gap.kind.name.lower()} ({gap.reason.name.lower()}): seq [{gap.seq_from}, {gap.seq_to}) "
                          f"samples [{gap.sample_from}, {gap.sample_to})", gap=gap.kind.name,
                   reason=gap.reason.name.lower())

    def drop(self, h: Header) -> None:
        """A message received but not stored (the camera's encoder is too far behind): one gap row per run of them,
        written before the next message that is stored (``record_dropped``), so its file row is where they are missing."""
        d = self.dropped
        if d is None:
            self.dropped = GapRecord(Gap.DROPPED, h.seq, h.seq + 1, h.first_sample, h.first_sample + h.n_samples,
                                     Loss.ENCODER)
        else:
            self.dropped = replace(d, seq_to=h.seq + 1, sample_to=h.first_sample + h.n_samples)

    def record_dropped(self) -> None:
        gap, self.dropped = self.dropped, None
        self.file.add_gap(gap, time.time_ns())
        for counts in (self.total, self.rec):
            counts.gaps += 1
            counts.lost[gap.reason] += gap.seq_to - gap.seq_from
        self.gap_event(gap)

    def store(self, h: Header, chunk: Chunk, verdict: Verdict, wall_ns: int, mono_ns: int, clock_pairs: list) -> None:
        """Write an accepted chunk, its gap, its edges and any clock-step pairs to the current part."""
        if self.part_full():
            self.roll_over()
        if verdict.gap is not None and self.dropped is not None:
            self.record_dropped()
        if verdict.gap is not None:
            self.file.add_gap(verdict.gap, wall_ns)
            self.levels = [None] * len(self.levels)  # the line's level before the gap says nothing after it
        if clock_pairs:  # bracket the step in /sync/clock, so the host-clock table shows exactly where it was
            self.file.add("sync/clock", clock_pairs)
        with io_errors(self.file.path):
            self.faults.before_append()
        if self.faults.disk_dead(append=True):
            fail_writes(self.file.path, self.file.f.id.get_vfd_handle())
        if not self.file.has_room(h.n_samples):
            return self.drop(h)
        if self.dropped is not None:  # the first message stored after a run of lost ones: their gap ends here
            self.record_dropped()
        self.file.append(chunk.data, (h.seq, h.epoch, h.n_samples, h.first_sample, wall_ns, mono_ns,
                                      h.device_time_ns))
        if self.first_recorded_ns is None:
            self.first_recorded_ns = wall_ns
        self.faults.after_append(self.part)
        self.store_edges(chunk.data, chunk.edges, h.first_sample, h.seq)
        if chunk.timestamps is not None:
            self.file.add_timestamps(chunk.timestamps, h.n_samples)
        if chunk.offsets is not None and len(chunk.offsets):
            self.file.queue("sync/offsets", chunk.offsets)  # at the next flush, as the edges

    def store_edges(self, data: np.ndarray, driver_edges: np.ndarray | None, first_sample: int, seq: int) -> None:
        rows = []
        for i, line in enumerate(self.spec.lines):
            idx, self.levels[i] = rising_edges(data[:, line.channel], line.bit, self.levels[i])
            rows.extend((first_sample + int(k), i, 1) for k in idx)
            if line.label == "sync" and len(idx):
                self.keep_live_edges([first_sample + int(k) for k in idx])
        if driver_edges is not None and isinstance(self.cfg.sync, FrameSync):
            driver_edges, bad = check_edges(driver_edges)
            for v in bad:  # only the edges that cannot be stored are dropped, each counted with its rule
                self.reject(v.reject, v.detail, seq, 0)
            rows.extend(zip(driver_edges["sample"].tolist(), driver_edges["line"].tolist(),
                            driver_edges["rising"].tolist()))
            own = (driver_edges["line"] == 0) & (driver_edges["rising"] == 1)  # what finalize pairs (streams.py)
            if own.any():
                self.keep_live_edges(driver_edges["sample"][own].tolist())
        if rows:  # appended at the next flush with every message's edges since: one HDF5 append, not one per message
            self.file.queue("sync/edges", rows)

    # -- the loop ------------------------------------------------------------------------------
    def on_command(self, msg: dict) -> None:
        self.acked = msg.get("id", self.acked)
        match msg.get("cmd"):
            case "record":
                self.start_recording(msg["folder"], msg["session"], int(msg.get("part", 0)))
            case "stop":
                self.close_file()
            case "shutdown":
                self.stop_requested = True
            case "preview":  # someone watches the console (or stopped): a few rows per message, see acqd.record.preview
                self.preview = Preview.start(self.cfg, msg.get("channels"), time.monotonic(), msg.get("origin"),
                                             msg.get("probe")) if msg.get("on") else None
            case other:
                self.event("error", f"unknown command {other!r}")

    def on_control(self, events: dict) -> None:
        """The commands and the data socket's monitor events that ``events`` (of a poll) say are waiting."""
        if self.ctrl in events:
            while self.ctrl.poll(0):
                self.on_command(self.ctrl.recv_json())
        if self.monitor in events:
            while self.monitor.poll(0):
                self.on_monitor()

    def on_monitor(self) -> None:
        evt = recv_monitor_message(self.monitor)
        if evt["event"] in (zmq.EVENT_CONNECTED, zmq.EVENT_ACCEPTED, zmq.EVENT_HANDSHAKE_SUCCEEDED):
            self.peers += 1
            self.event("connected", f"driver connected ({evt['endpoint'].decode(errors='replace')})")
        elif evt["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            self.refused_total += 1
            self.refused_unmatched += 1
            who, why = self.refusals.next()
            self.event("peer_refused", f"refused a driver connection from {who}: {why}", address=who)
        elif evt["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:  # e.g. no CURVE keys where CURVE is required
            self.refused_total += 1
            self.refused_unmatched += 1
            self.event("peer_refused", "refused a driver connection: its handshake failed"
                                       f"{' (it does not speak CURVE?)' if self.cfg.curve else ''}", address="")
        elif evt["event"] == zmq.EVENT_DISCONNECTED and self.refused_unmatched:
            self.refused_unmatched -= 1  # the refused peer's connection closing: it never counted as a peer
        elif evt["event"] == zmq.EVENT_DISCONNECTED:
            self.peers = max(0, self.peers - 1)
            self.link_dropped = True
            self.event("disconnected", "driver disconnected (it went away, or sent a frame larger than "
                                       f"max_message_bytes {self.cfg.max_message_bytes}: a gap follows if data was lost)")
            if not self.cfg.bind:
                self.reconnect()

    def reconnect(self) -> None:
        """Connect again. ZeroMQ retries a lost connection by itself, but not one it dropped for a protocol
        error (an oversized frame): without this, one such message would cut the stream off for good."""
        if self.receiver is not None and self.receiver.is_alive():
            self.reconnect_wanted = True  # the receiver thread owns the socket: it reconnects
        else:
            self.reconnect_socket()

    def reconnect_socket(self) -> None:
        try:
            self.data.disconnect(self.cfg.endpoint)
        except zmq.ZMQError:
            pass  # the session is already gone (the protocol-error case)
        self.data.connect(self.cfg.endpoint)

    def run(self) -> int:
        # Sleep until something arrives or the next timer (stats, flush, clock pair) is due, never on a fixed tick:
        # an idle writer wakes ~2 times a second. A slow stream with its own sync edges does not even wake per
        # message: it drains its queue when a timer is due, just before flushing (see SLOW_BYTES_PER_S).
        poller = zmq.Poller()
        batched = self.drains_at_deadlines()
        if batched:
            self.receiving.set()
            self.receiver = threading.Thread(target=self.receive, name="receiver", daemon=True)
            self.receiver.start()
        for s in (self.ctrl, self.monitor) if batched else (self.data, self.ctrl, self.monitor):
            poller.register(s, zmq.POLLIN)
        parent = self.spec.parent_pid or os.getppid()
        schedule = self.schedule()
        last_wake = 0.0
        wake_interval_s = WAKE_INTERVAL_S if isinstance(self.cfg.sync, (ChannelSync, FrameSync)) else 0.0
        self.send("ready", pid=os.getpid())
        try:
            while not self.stop_requested:
                pause = 0.0 if batched else last_wake + wake_interval_s - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                due = schedule.wake_at(self.file is not None, self.last_chunk is not None)
                events = dict(poller.poll(max(0, math.ceil((due - time.monotonic()) * 1000))))
                last_wake = now = time.monotonic()
                # A command (stop, record) applies after what arrived before it, as for a stream woken per message.
                if self.data in events or (batched and (now >= due or self.ctrl in events)):
                    self.drain(BATCH_LIMIT if batched else DRAIN_LIMIT)
                self.on_control(events)
                now = time.monotonic()
                due_now = schedule.due(now, self.file is not None, self.last_chunk is not None)
                self.on_due(due_now)
                schedule.advance(due_now, now, self.sheds_stats())
                if os.getppid() != parent:
                    break  # the supervisor died; PR_SET_PDEATHSIG normally got here first
            self.leaving = True
            if batched:
                self.stop_receiver()
                self.drain(BATCH_LIMIT, math.inf)  # SIGTERM: what had arrived goes into the file it closes
            self.close_file()
            self.send("stats", **self.stats())
            return 0
        except DiskFullError as e:
            self.event("disk_full", str(e))
            return self.abandon(EXIT_DISK_FULL)
        except WriterError as e:
            self.event("write_error", str(e))
            return self.abandon(EXIT_WRITE_ERROR, e)

    def schedule(self) -> Schedule:
        """This writer's timers, from now (a group writer keeps one for all its streams)."""
        s = self.spec
        return Schedule.start(s.flush_interval_s, s.fsync_interval_s, s.stats_interval_s, s.clock_pair_interval_s,
                              time.monotonic())

    def on_due(self, due: Due) -> None:
        """The periodic work of one wake-up: a clock pair, the flush (and fsync), the load, the stats."""
        if self.file is not None and due.pair and self.last_chunk is not None:
            self.guarded(self.file.add, "sync/clock", [self.last_chunk])
        if self.file is not None and due.flush:
            started = time.monotonic()
            self.guarded(self.file.flush, due.fsync)
            self.flushes += 1
            self.load.flushed(time.monotonic() - started)
        self.check_load(time.monotonic())
        if due.stats:
            self.send("stats", **self.stats())

    def sheds_stats(self) -> bool:
        return "stats" in self.load.shedding(time.monotonic())

    def drains_at_deadlines(self) -> bool:
        """Whether this stream's queue is drained only when a timer is due: a slow stream with its own sync edges,
        unless a camera strobes one of its lines (the frames pair with those strobes through this stream's host
        receive times, which a drain makes late by up to a message period)."""
        synced = isinstance(self.cfg.sync, (ChannelSync, FrameSync))
        strobed = any(line.label.startswith("strobe:") for line in self.spec.lines)
        return synced and not strobed and self.cfg.rate * self.cfg.sample_bytes <= SLOW_BYTES_PER_S

    def receive(self) -> None:
        """The receiver thread of a stream drained at timers: takes each message off the data socket as it arrives,
        with its receive time, into ``inbox`` (at most BATCH_LIMIT: beyond, ZeroMQ holds the rest and a PULL driver
        feels the back-pressure as before). It owns ``data`` until ``stop_receiver``; the decode, the checks and
        the HDF5 appends stay in the main thread, at its timers."""
        self.data.setsockopt(zmq.RCVTIMEO, 100)  # a blocking receive (one call per message); the timeout only lets
        while self.receiving.is_set():          # it see ``receiving`` cleared
            if self.reconnect_wanted:
                self.reconnect_wanted = False
                self.reconnect_socket()
            if len(self.inbox) >= BATCH_LIMIT:
                time.sleep(0.01)
                continue
            try:
                frames = self.data.recv_multipart(copy=False)
            except zmq.Again:
                continue
            self.inbox.append((time.time_ns(), time.monotonic_ns(), frames))

    def stop_receiver(self) -> None:
        """End the receiver thread; the main thread owns the data socket again (``drain`` reads it directly)."""
        self.receiving.clear()
        if self.receiver is not None:
            self.receiver.join()
            self.receiver = None

    def next_message(self) -> tuple[list[zmq.Frame], tuple[int, int] | None] | None:
        """The next message and its receive time: from the receiver's inbox, else from the socket when this thread
        owns it; None when nothing is queued."""
        if self.inbox:
            wall_ns, mono_ns, frames = self.inbox.popleft()
            return frames, (wall_ns, mono_ns)
        if self.receiver is not None:
            return None
        try:
            return self.data.recv_multipart(zmq.NOBLOCK, copy=False), None
        except zmq.Again:
            return None

    def check_load(self, now: float) -> None:
        """Follow the overload state (acqd.record.load) and say when it starts and ends."""
        video = self.file.video if self.file is not None else None
        self.load.encoder(video.backlog if video else 0, video.max_backlog if video else 0)
        match self.load.update(now):
            case "started":
                self.lost_before_overload = self.total.lost.copy()
                self.event("overload", f"writer behind: {self.load.describe(now)}; shedding previews first, then "
                                       f"live sync, then stats cadence; any message lost is a gap with its reason")
            case "ended":
                lost = {r.name.lower(): n for r, n in (self.total.lost - self.lost_before_overload).items()}
                self.event("overload_cleared", f"writer caught up; {sum(lost.values())} message(s) lost in gaps while "
                                               f"it was behind (by reason: {lost})", lost=lost)

    def drain(self, limit: int, budget_s: float = DRAIN_BUDGET_S) -> None:
        """Handle what is queued (the receiver's inbox, or the data socket), but bounded in count and time, so
        control, flushing and stats are never starved; tells ``self.load`` whether the queue ran empty (else the
        writer is working a backlog)."""
        started = time.monotonic()
        deadline = started + budget_s
        for handled in range(limit):
            if handled and time.monotonic() > deadline:
                break
            got = self.next_message()
            if got is None:
                self.load.drained(started, True, handled)
                return
            self.handle(*got)
        else:
            handled = limit
        self.load.drained(started, False, handled)

    def handle(self, frames: list[zmq.Frame], arrived: tuple[int, int] | None) -> None:
        """``on_message``, where a failed write moves to the next part and anything else is a MALFORMED reject."""
        try:
            self.on_message(frames, arrived)
        except DiskFullError:
            raise
        except WriterError as e:  # EIO: this part is suspect; the message goes to the next one
            self.part_failed(e)
            self.on_message(frames, arrived)
        except Exception as e:  # noqa: BLE001 - a message must never end a recording
            self.reject(Reject.MALFORMED, f"could not be handled: {e!r}", _seq_or_unknown(frames),
                        sum(len(f.buffer) for f in frames))

    def guarded(self, write, *args) -> None:
        """A periodic write; if it fails with EIO, the part becomes suspect and recording continues in the next."""
        try:
            write(*args)
        except DiskFullError:
            raise
        except WriterError as e:
            self.part_failed(e)

    def abandon(self, code: int, failure: WriterError | None = None) -> int:
        """After a write failure the stream cannot go on with (a full disk; a write error in the part opened after
        one, as on a disk that fails every write): the part is closed (as suspect, reported with what its index
        proves, after a write error), then the process leaves without HDF5's exit handlers."""
        try:
            if failure is not None:
                self.close_file(failure=failure)
            elif self.file is not None:
                self.file.release()
        except Exception:  # noqa: BLE001 - the file is already known bad; the index says what is valid
            pass
        # The receiver thread owns the data socket: closing it under a blocked receive (ctx.destroy) aborted libzmq
        # (``_term_acks > 0``) or hung the process, 1 run in 3 of row 7's dead disk; the supervisor then saw a crash.
        leave([self])  # deliver the queued reason before leaving
        os._exit(code)  # h5py's atexit after ENOSPC/EFBIG segfaults; the supervisor has our reason


def fsync_failure(path: Path, error: OSError | None) -> str | None:
    """What a failed fsync of a closed part makes it: suspect, with the reason ``io_errors`` gives (a full disk too:
    the part is closed, and the next part's creation then stops the stream if the disk is still full)."""
    try:
        with io_errors(path):
            raise_if(error)
    except WriterError as e:
        return str(e)
    return None


def _seq_or_unknown(frames: list[zmq.Frame]) -> int:
    """The seq of a message that is being rejected, if its header can be read; else UNKNOWN_SEQ."""
    try:
        seq = peek_seq(frames[1].buffer)
    except Exception:  # noqa: BLE001 - labelling a rejected message must never fail, whatever the frames
        return UNKNOWN_SEQ
    return UNKNOWN_SEQ if seq is None else seq


def limit_file_size(streams: list[str]) -> None:
    """The FSIZE_LIMIT_ENV test hook: RLIMIT_FSIZE for this process, the smallest given for any of ``streams``."""
    limits = dict(item.split("=") for item in os.environ.get(FSIZE_LIMIT_ENV, "").split(",") if item)
    mine = [int(limits[n]) for n in streams if n in limits]
    if mine:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (min(mine), min(mine)))


def leave(writers: list[Writer]) -> None:
    """Deliver what the writers queued for the supervisor (a part's ``closed`` report, the last stats) before the
    process exits: a forked writer exits through ``os._exit`` (acqd.record.forkserver), and ZeroMQ's I/O thread
    would go with what it had not sent yet."""
    for w in writers:
        w.stop_receiver()
        if w.auth is not None:
            w.auth.stop()  # its thread owns sockets of the context
        # A leaving writer owes its driver nothing; left to the context's linger, a subscription queued for a
        # publisher that had already gone held every exit for the whole linger.
        w.data.close(linger=0)
        w.monitor.close(linger=0)
    for ctx in {id(w.ctx): w.ctx for w in writers}.values():
        ctx.destroy(linger=LEAVE_LINGER_MS)


def main(argv: list[str] | None = None) -> int:
    spec = WriterSpec.from_json((argv or sys.argv[1:])[0])
    limit_file_size([spec.stream.name])
    writer = Writer(spec)
    writer.faults = Faults.from_env(spec.stream.name)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    signal.signal(signal.SIGTERM, lambda *_: setattr(writer, "stop_requested", True))
    code = writer.run()
    leave([writer])
    return code


if __name__ == "__main__":
    sys.exit(main())
