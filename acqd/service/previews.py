"""The live preview's fan-out: writers' preview messages to the browsers watching, and preview on/off.

This module owns who is watching and what the writers are told. Writers decimate their own data
(``acqd.record.preview``) only while at least one console page holds the preview stream open; the supervisor
calls ``sync`` on its thread every loop, which sends ``preview`` on (with the chosen channels) to each ready
writer that has not been told yet (a restarted writer included) and off to all once the last watcher leaves.
Messages are never parsed here: each is the JSON its writer encoded (``acqd.record.preview.encode_message``),
and reaches each watcher through a bounded queue: a slow browser loses old previews (counted), never
holds up the supervisor.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

MAX_QUEUED = 64
"""Preview messages queued per watcher; older ones are dropped for a browser that does not keep up."""


class _Writer(Protocol):
    ready: bool
    proc: Any


@dataclass
class Watcher:
    """One open preview stream (a browser tab); ``get`` awaits the next message."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(MAX_QUEUED))
    dropped: int = 0

    def put(self, item: bytes) -> None:
        """On the watcher's event loop: queue ``item``, dropping the oldest message when full."""
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(item)

    async def get(self, timeout_s: float) -> list[bytes]:
        """What has queued (waiting up to ``timeout_s`` for the first), oldest first; [] on a timeout."""
        try:
            out = [await asyncio.wait_for(self.queue.get(), timeout_s)]
        except TimeoutError:
            return []
        while not self.queue.empty():
            out.append(self.queue.get_nowait())
        return out


class PreviewHub:
    """Shared by the supervisor thread (``publish``, ``sync``) and the HTTP layer (``watch``, ``select``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._watchers: dict[int, Watcher] = {}
        self._channels: dict[str, tuple[int, ...]] = {}
        self._told: dict[str, tuple] = {}  # stream -> (writer pid, on, channels) last sent
        self.received = 0
        """Preview messages received from writers since the daemon started (watched or not: none, unwatched)."""

    @property
    def watching(self) -> bool:
        return bool(self._watchers)

    def watch(self, loop: asyncio.AbstractEventLoop) -> tuple[int, Watcher]:
        w = Watcher(loop)
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

    def state(self) -> dict:
        """Who watches, which writers were told to preview, how many messages came: for the page and for tests."""
        told = dict(self._told)
        return {"watchers": len(self._watchers), "previewing": sorted(n for n, t in told.items() if t[1]),
                "received": self.received}

    def channels(self, stream: str) -> tuple[int, ...]:
        return self._channels.get(stream, ())

    def publish(self, item: bytes) -> None:
        """Supervisor thread: hand a writer's preview message (JSON, as the writer encoded it) to every watcher."""
        self.received += 1
        with self._lock:
            watchers = list(self._watchers.values())
        for w in watchers:
            try:
                w.loop.call_soon_threadsafe(w.put, item)
            except RuntimeError:  # that watcher's event loop has closed; it is leaving
                pass

    def sync(self, writers: Mapping[str, _Writer], send: Callable[..., None]) -> None:
        """Supervisor thread: tell each ready writer whether to preview, when that changed (or it is new)."""
        on = self.watching
        for name, h in writers.items():
            if not h.ready:
                continue
            want = (h.proc.pid, on, self.channels(name) if on else ())
            told = self._told.get(name)
            if told != want and (on or (told is not None and told[0] == want[0])):  # a new writer starts off
                send(name, cmd="preview", on=on, channels=list(want[2]))
            self._told[name] = want
        for name in set(self._told) - set(writers):
            del self._told[name]
