"""The live preview's fan-out: writers' preview messages to the browsers watching, and preview on/off.

This module owns who is watching and what the writers are told. Writers decimate their own data
(``acqd.record.preview``) only while at least one console page holds the preview stream open; the supervisor
calls ``sync`` on its thread every loop, which sends ``preview`` on (with the chosen channels) to each ready
writer that has not been told yet (a restarted writer included) and off to all once the last watcher leaves.
Messages are never parsed here: each is the JSON its writer encoded (``acqd.record.preview.encode_message``),
and is appended to each watcher's bounded queue: a slow browser loses old previews (counted), never holds up
the supervisor. Nothing wakes the HTTP side per message (a wake-up costs more than the message): each open
stream takes what queued every ``FLUSH_S`` and writes it at once.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from acqd.record.preview import MESSAGE_PREFIX

MAX_QUEUED = 256
"""Preview messages queued per watcher; older ones are dropped for a browser that does not keep up."""
FLUSH_S = 0.25
"""How often an open preview stream writes what queued (the writers send about this often)."""
ROUNDS_S = 0.1
"""The supervisor's rounds (processes, heartbeats, disk, snapshot) run after a wake-up that brought previews alone
at most this often: its poll's own timeout, so an open page does not make them run more often than a closed one.
They ran per wake-up before: an open page woke the bench rig's supervisor ~12 more times a second (33 against 21,
measured)."""


class _Writer(Protocol):
    ready: bool
    proc: Any
    acked: int


@dataclass
class Watcher:
    """One open preview stream (a browser tab): the supervisor thread appends, the stream takes."""

    queue: deque = field(default_factory=lambda: deque(maxlen=MAX_QUEUED))
    dropped: int = 0

    def put(self, item: bytes) -> None:
        """Supervisor thread: queue ``item``; a full queue drops its oldest message (counted)."""
        if len(self.queue) == MAX_QUEUED:
            self.dropped += 1
        self.queue.append(item)

    def take(self) -> list[bytes]:
        """What has queued, oldest first (deque appends and pops are atomic: no lock)."""
        out = []
        while self.queue:
            out.append(self.queue.popleft())
        return out


class PreviewHub:
    """Shared by the supervisor thread (``publish``, ``sync``) and the HTTP layer (``watch``, ``select``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._watchers: dict[int, Watcher] = {}
        self._channels: dict[str, tuple[int, ...]] = {}
        self._blocks: dict[str, dict] = {}  # stream -> the probe view's trace block {"channels", "band"}
        self._last: dict[str, tuple[float, bytes]] = {}  # stream -> (host monotonic s, its latest message)
        self.origin: float | None = None
        """Host monotonic seconds of the session timebase's zero (RECORD's start; ACQUIRE's before), set by the live
        view on each change of mode; writers put their previews' times on it (``t_offset``)."""
        self._told: dict[str, tuple] = {}  # stream -> (writer pid, on, channels) last sent
        # stream -> (writer pid, id of the "preview off" command it has not acknowledged yet): until it does, previews
        # it sent before handling it may still be on their way (they share its control socket, so they come first)
        self._stopping: dict[str, tuple[int, int]] = {}
        self.received = 0
        """Preview messages received from writers since the daemon started (watched or not: none, unwatched)."""
        self._rounds_at = -ROUNDS_S

    @property
    def watching(self) -> bool:
        return bool(self._watchers)

    def watch(self) -> tuple[int, Watcher]:
        w = Watcher()
        with self._lock:
            key = next(self._ids)
            self._watchers[key] = w
        return key, w

    def leave(self, key: int) -> None:
        with self._lock:
            self._watchers.pop(key, None)

    def select(self, stream: str, channels: list[int]) -> None:
        """Which channels of ``stream`` are drawn as traces (shared by every watcher; the latest choice wins)."""
        with self._lock:
            self._channels[stream] = tuple(channels)

    def select_block(self, stream: str, channels: list[int], band: str) -> None:
        """The probe view's trace block of ``stream`` (at most 64 channels, one band; the latest choice wins)."""
        with self._lock:
            self._blocks[stream] = {"channels": list(channels), "band": band}

    def block(self, stream: str) -> dict | None:
        return self._blocks.get(stream)

    def latest(self, stream: str) -> tuple[float, bytes] | None:
        """(host monotonic seconds it came, the message) of ``stream``'s latest preview, unparsed."""
        return self._last.get(stream)

    def state(self) -> dict:
        """Who watches, which writers were told to preview, how many messages came: for the page and for tests."""
        told, stopping = dict(self._told), set(self._stopping)
        return {"watchers": len(self._watchers),
                "previewing": sorted({n for n, t in told.items() if t[1]} | stopping), "received": self.received}

    def channels(self, stream: str) -> tuple[int, ...]:
        return self._channels.get(stream, ())

    def publish(self, item: bytes) -> None:
        """Supervisor thread: hand a writer's preview message (JSON, as the writer encoded it) to every watcher."""
        self.received += 1
        start = len(MESSAGE_PREFIX) + len(b'"stream":"')  # the writer encodes the stream's name first
        self._last[item[start:item.index(b'"', start)].decode()] = (time.monotonic(), item)
        with self._lock:
            watchers = list(self._watchers.values())
        for w in watchers:
            w.put(item)

    def rounds_due(self, other: bool) -> bool:
        """Supervisor thread, after a wake-up: whether its rounds run now; ``other``: it brought more than previews
        (a writer's report, a call), which is handled at once as before."""
        now = time.monotonic()
        if other or now - self._rounds_at >= ROUNDS_S:
            self._rounds_at = now
            return True
        return False

    def sync(self, writers: Mapping[str, _Writer], send: Callable[..., int]) -> None:
        """Supervisor thread: tell each ready writer whether to preview, when that changed (or it is new).

        ``send`` returns the command's id; a writer has handled it once its ``acked`` reaches that id."""
        on = self.watching
        for name, h in writers.items():
            if not h.ready:
                continue
            want = (h.proc.pid, on, self.channels(name) if on else (), self.block(name) if on else None,
                     self.origin if on else None)
            told = self._told.get(name)
            if told != want and (on or (told is not None and told[0] == want[0])):  # a new writer starts off
                cmd_id = send(name, cmd="preview", on=on, channels=list(want[2]), probe=want[3], origin=want[4])
                if on:
                    self._stopping.pop(name, None)
                else:
                    self._stopping[name] = (h.proc.pid, cmd_id)
            self._told[name] = want
        for name in set(self._told) - set(writers):
            del self._told[name]
        for name, (pid, cmd_id) in list(self._stopping.items()):
            h = writers.get(name)
            if h is None or h.proc.pid != pid or h.acked >= cmd_id:  # handled, or that writer is gone
                del self._stopping[name]
