"""A group writer: one process hosting several streams' writers (issue 27), and which streams share one.

A slow stream (a lick sensor, a wheel, a valve: kB/s) costs a writer process ~100 MB of memory and a few wake-ups
per message; dozens of them would take a core and gigabytes to record kB/s. Streams whose configured data rate is
at most ``daemon.group_below_bytes_per_s`` (or that the config assigns a ``writer_group``) are hosted by one
process per group instead (``writer_groups``). Each stream keeps everything it had in a process of its own: its
``Writer`` (acqd.record.writer) with its data socket, checks, stream file, index, gaps, sync, previews, and its
own control socket (so the supervisor talks to each stream exactly as before; messages carry the group's pid).
What the group shares: one ZeroMQ context, one receiver thread that takes every stream's messages off their
sockets with one poller and stamps their receive times (``Receiver``), one loop that handles them in batches per
stream when a timer is due, and one flush timer (acqd.record.schedule). Fat streams keep a process each (h5py
serialises every call through one global lock, so streams in one process never write in parallel).

The trade-off: a crash of the group writer (a bug, kill -9) stops all its streams until it is restarted; each
then records a gap with reason ``writer`` (what the dead process held, at most the flush interval). A stream that
must not share that fate gets ``writer_group: own``. A write failure of one stream (a full disk, EIO twice) stops
that stream only, with its reason; the others go on.

Started with ``{"group_file": PATH}`` as its spec (acqd.record.launch): the group's spec is a JSON file
(``GroupSpec``; a hundred stream configs would make a long command line for ``python -m acqd.record.launch``).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import zmq

from acqd.config import RigConfig, StreamConfig
from acqd.errors import DiskFullError, WriterError
from acqd.record.batch import drain_batch
from acqd.record.faults import Faults
from acqd.record.schedule import Due
from acqd.record.writer import BATCH_LIMIT, LEAVE_LINGER_MS, Writer, WriterSpec, leave, limit_file_size

FSYNC_THREADS = 16
"""fsyncs a group writer runs at once (the journal commits concurrent fsyncs together)."""
HELD_REPORTS_MS = 10
"""How soon reports held behind an fsync (a part closed or opened: ``Writer.after``) are looked at again."""

SLOW_GROUP = "slow"
"""The group a slow stream joins unless its config names another (or ``own``)."""
OWN = "own"
RECEIVE_INTERVAL_S = 0.002
"""The receiver thread sleeps this long after each batch it took: the group's sockets are polled at most ~500 times
a second, however many streams send 100 messages a second each. A message that arrives during the sleep is stamped
up to this late; a host-timed stream's fit follows its earliest deliveries (acqd.finalize.clock), which this
does not delay."""

# Plain ints: pyzmq's enum arithmetic cost more than the query itself.
POLLIN, EVENTS, RCVMORE, NOBLOCK = int(zmq.POLLIN), int(zmq.EVENTS), int(zmq.RCVMORE), int(zmq.NOBLOCK)
LOOK_INTERVAL_S = 0.05
"""How often the receiver thread looks for a stream to reconnect or to stop reading."""


def writer_groups(cfg: RigConfig) -> dict[str, str | None]:
    """Stream name -> the group whose process hosts it, or None for a process of its own."""
    limit = cfg.daemon.group_below_bytes_per_s
    out: dict[str, str | None] = {}
    for s in cfg.streams:
        if s.writer_group is not None:
            out[s.name] = None if s.writer_group == OWN else s.writer_group
        else:
            slow = s.video is None and s.rate * s.sample_bytes <= limit
            out[s.name] = SLOW_GROUP if slow else None
    return out


def own_context(cfg: StreamConfig) -> bool:
    """A stream acqd binds on tcp has a ZAP authenticator, which is one per ZeroMQ context: it keeps its own."""
    return cfg.bind and cfg.endpoint.startswith("tcp://")


@dataclass(frozen=True, slots=True)
class GroupSpec:
    """Everything a group writer process needs: its name and one WriterSpec per stream."""

    name: str
    writers: list[WriterSpec]
    parent_pid: int = 0

    def write(self, path: Path) -> str:
        """Write the spec to ``path``; returns the launch argument that points to it."""
        path.write_text(json.dumps({"name": self.name, "parent_pid": self.parent_pid,
                                    "writers": [w.to_json() for w in self.writers]}))
        return json.dumps({"group_file": str(path), "parent_pid": self.parent_pid})

    @classmethod
    def read(cls, path: Path) -> GroupSpec:
        d = json.loads(Path(path).read_text())
        return cls(d["name"], [WriterSpec.from_json(w) for w in d["writers"]], d["parent_pid"])


class Receiver:
    """The group's receiver thread: one poller over every stream's data socket; each message is taken off as it
    arrives, stamped with its receive time and queued in its stream's ``inbox`` (at most BATCH_LIMIT per stream:
    beyond, ZeroMQ holds the rest, and a PULL driver feels the back-pressure). It owns the data sockets while it
    runs, as a single stream's receiver thread does (``Writer.receive``)."""

    def __init__(self, writers: list[Writer]):
        self.writers = writers
        self.running = threading.Event()
        self.gone: set[str] = set()  # streams stopped by a write failure: no longer read
        self.thread = threading.Thread(target=self.run, name="receiver", daemon=True)

    def start(self) -> None:
        self.running.set()
        self.thread.start()
        for w in self.writers:
            w.receiver = self.thread  # its drain takes the inbox; a reconnect is left to this thread

    def stop(self) -> None:
        """End the thread; each stream's main-thread drain reads its socket directly again."""
        self.running.clear()
        self.thread.join()
        for w in self.writers:
            w.receiver = None

    def run(self) -> None:
        poller = zmq.Poller()
        by_socket = {w.data: w for w in self.writers}
        for s in by_socket:
            poller.register(s, zmq.POLLIN)
        look_at = 0.0
        while self.running.is_set():
            if time.monotonic() >= look_at:  # not at every poll: a look at a hundred streams costs more than a poll
                look_at = time.monotonic() + LOOK_INTERVAL_S
                for w in self.writers:
                    if w.reconnect_wanted:
                        w.reconnect_wanted = False
                        w.reconnect_socket()
                    if w.cfg.name in self.gone and w.data in by_socket:
                        poller.unregister(w.data)
                        del by_socket[w.data]
            ready = poller.poll(100)
            for sock, _ in ready:
                self.take(by_socket[sock])
            if ready:
                time.sleep(RECEIVE_INTERVAL_S)

    @staticmethod
    def take(w: Writer) -> None:
        """What ``w``'s socket holds, each message as a list of bytes: for a slow stream's small frames a copy is
        cheaper than a zmq.Frame each (acqd.record.batch reads either); asking whether more is waiting is cheaper
        than the exception of a receive that finds nothing."""
        # Not recv_multipart and get(): they convert enums at every call, 0.85 of the ~4.5 us a message took here.
        recv, option = w.data.recv, w.data.getsockopt
        for _ in range(BATCH_LIMIT - len(w.inbox)):
            try:
                frames = [recv(NOBLOCK)]
            except zmq.Again:
                return
            while option(RCVMORE):
                frames.append(recv(NOBLOCK))
            w.inbox.append((time.time_ns(), time.monotonic_ns(), frames))
            if not option(EVENTS) & POLLIN:
                return


class Group:
    """The loop of a group writer process: every stream's commands, monitor events, batches and timers."""

    def __init__(self, spec: GroupSpec):
        self.spec = spec
        self.ctx = zmq.Context()
        self.writers = [Writer(s, None if own_context(s.stream) else self.ctx) for s in spec.writers]
        self.live = list(self.writers)
        self.receiver = Receiver(self.writers)
        self.poller = zmq.Poller()  # every stream's control and monitor sockets
        self.pool = ThreadPoolExecutor(FSYNC_THREADS, thread_name_prefix="fsync")
        for w in self.writers:  # parts close and open without the group waiting for their fsyncs (``Writer.after``)
            w.pool = self.pool

    def run(self) -> int:
        owner: dict[zmq.Socket, Writer] = {}
        for w in self.writers:
            for s in (w.ctrl, w.monitor):
                self.poller.register(s, zmq.POLLIN)
                owner[s] = w
        self.receiver.start()
        parent = self.spec.parent_pid or os.getppid()
        schedule = self.writers[0].schedule()
        for w in self.writers:
            w.send("ready", pid=os.getpid())
        while self.live and not all(w.stop_requested for w in self.live):
            recording = any(w.file is not None for w in self.live)
            paired = any(w.last_chunk is not None for w in self.live if w.file is not None)
            wake = schedule.wake_at(recording, paired)
            held = [w for w in self.live if w.outbox]  # reports waiting for an fsync: looked at again soon
            timeout_ms = max(0, math.ceil((wake - time.monotonic()) * 1000))
            events = dict(self.poller.poll(min(timeout_ms, HELD_REPORTS_MS) if held else timeout_ms))
            self.each(Writer.release, set(held))
            woken = {owner[s] for s in events}
            now = time.monotonic()
            due = schedule.due(now, recording, paired)
            # A command (stop, record) applies after what arrived before it: every stream's batch is handled first.
            # Each stream's flush (when due) follows its own batch at once: a message waits for its stream's batch,
            # not for every stream's batch and then every file's flush before its own (p99 publish -> flushed).
            if now >= wake or any(w.ctrl in events for w in woken):
                self.each(lambda w: self.turn(w, replace(due, fsync=False)))
                if due.fsync:
                    self.sync()
            self.each(lambda w: w.on_control(events), woken)  # a record command opens a file: it may fail
            schedule.advance(due, now, any(w.sheds_stats() for w in self.live))
            if os.getppid() != parent:
                break  # the supervisor died; PR_SET_PDEATHSIG normally got here first
        self.receiver.stop()
        for w in self.live:
            w.leaving = True
        self.each(lambda w: drain_batch(w, BATCH_LIMIT, math.inf))  # SIGTERM: what had arrived goes into the file
        self.each(lambda w: w.drain(BATCH_LIMIT, math.inf))  # it closes, then what ZeroMQ still held
        self.each(lambda w: w.close_file())
        self.each(lambda w: w.on_due(Due(stats=True)))
        self.each(lambda w: w.release(wait=True))
        self.pool.shutdown()
        return 0

    def sync(self) -> None:
        """Start the fsync of every stream's file at once, on threads (``os.fsync`` releases the GIL), and go on: one
        after the other, 96 small files took 0.3 s of every second on this disk; waiting for them at once, the group
        still waited for the slowest, and under a fat rig's writes that held every stream's messages for up to a
        second (p99 publish -> flushed). Each outcome is taken at a later wake-up (``turn``); a failed fsync is its
        stream's alone, handled as in its own process."""
        self.each(lambda w: w.guarded(w.file.sync_later, self.pool), {w for w in self.live if w.file is not None})

    @staticmethod
    def turn(w: Writer, due: Due) -> None:
        """One stream's part of a wake-up: its batch, then its timers' work (the flush, the stats), after the outcome
        of an fsync started earlier (a failed one moves the stream to its next part first)."""
        drain_batch(w, BATCH_LIMIT)
        if w.file is not None:
            w.guarded(w.file.synced)
        w.on_due(due)

    def each(self, act: Callable[[Writer], None], among: set[Writer] | None = None) -> None:
        """``act`` on every live stream (``among`` those); one whose writes fail stops alone, with its reason."""
        for w in [w for w in self.live if among is None or w in among]:
            try:
                act(w)
            except DiskFullError as e:
                self.fail(w, "disk_full", e)
            except WriterError as e:
                self.fail(w, "write_error", e)

    def fail(self, w: Writer, kind: str, e: WriterError) -> None:
        """What ``Writer.abandon`` does for a process of its own, without ending the others' process."""
        w.event(kind, str(e))
        try:
            if kind == "write_error":
                w.close_file(failure=e)
            elif w.file is not None:
                w.file.release()
        except Exception:  # noqa: BLE001 - the file is already known bad; the index says what is valid
            pass
        w.file = None
        w.release(wait=True)  # its parts' reports held behind fsyncs: it is not looked at again
        self.live.remove(w)
        for s in (w.ctrl, w.monitor):  # it obeys no more commands: the supervisor sees it failed, with the reason
            self.poller.unregister(s)
        self.receiver.gone.add(w.cfg.name)

    def stop(self) -> None:
        for w in self.writers:
            w.stop_requested = True


def main(argv: list[str] | None = None) -> int:
    launch = json.loads((argv or sys.argv[1:])[0])
    spec = GroupSpec.read(Path(launch["group_file"]))
    limit_file_size([w.stream.name for w in spec.writers])  # a test hook: for the whole process
    group = Group(spec)
    for w in group.writers:
        w.faults = Faults.from_env(w.cfg.name)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    signal.signal(signal.SIGTERM, lambda *_: group.stop())
    code = group.run()
    leave(group.writers)
    group.ctx.destroy(linger=LEAVE_LINGER_MS)  # (if no stream used it)
    return code


if __name__ == "__main__":
    sys.exit(main())
