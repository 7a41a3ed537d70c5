"""What readers see of the supervisor without waiting for it: the status snapshot and the event bus.

The supervisor thread builds a new ``Snapshot`` (an immutable value, already serialised) at least every
``SNAPSHOT_INTERVAL_S`` and on every change, and swaps it in with one reference assignment; the HTTP API,
``/metrics`` and the event stream read ``Supervisor.snapshot`` from any thread and never queue behind a command
(the double-buffered status of circus' stats stream). ``EventBus`` carries what happened (mode changes,
incidents, job progress, annotations) to any number of listeners, each with its own bounded queue, so a slow
listener loses its own oldest events (counted) and never slows the supervisor.

The shape of both is the contract of docs/control-api.md ("Status snapshot", "Events").
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import orjson

SNAPSHOT_INTERVAL_S = 0.25
EVENT_HISTORY = 256
"""Events kept for a listener that reconnects with ``Last-Event-ID``."""
LISTENER_QUEUE = 1000


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One status, frozen: ``status`` is read-only and ``body`` is its JSON, encoded once for every reader."""

    seq: int
    monotonic: float
    status: MappingProxyType
    body: bytes

    @classmethod
    def of(cls, seq: int, status: dict) -> Snapshot:
        return cls(seq, time.monotonic(), MappingProxyType(status), encode(status))

    def to_dict(self) -> dict:
        """A private deep copy (the snapshot itself stays untouched)."""
        return json.loads(self.body)


def encode(status: dict) -> bytes:
    """The snapshot's JSON, one line (an SSE ``data:`` line carries it as it is). orjson: the status of a hundred
    streams is ~110 kB, encoded 4 times a second and on every change, ~7x faster than the json module; what it cannot
    encode is written as it was by ``json.dumps(default=str)`` (a float subclass, numpy's float64, as a number,
    anything else as its ``str``), NaN as null."""
    return orjson.dumps(status, default=_as_json, option=orjson.OPT_NON_STR_KEYS)


def _as_json(value: Any) -> Any:
    return float(value) if isinstance(value, float) else str(value)


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened: ``type`` is mode | incident | job | annotation; ``data`` its JSON object."""

    id: int
    type: str
    data: dict

    def sse(self) -> bytes:
        return f"id: {self.id}\nevent: {self.type}\ndata: {json.dumps(self.data, default=str)}\n\n".encode()


@dataclass
class Listener:
    """One subscriber's queue; ``wake`` is called (from the publishing thread) after each event."""

    wake: Any
    queue: deque = field(default_factory=lambda: deque(maxlen=LISTENER_QUEUE))
    dropped: int = 0


class EventBus:
    """Publish from any thread; each listener drains its own bounded queue."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._history: deque[Event] = deque(maxlen=EVENT_HISTORY)
        self._listeners: list[Listener] = []
        self.counts: Counter = Counter()
        """Events published per type since the daemon started."""

    def publish(self, type_: str, data: dict) -> Event:
        with self._lock:
            event = Event(next(self._ids), type_, {"time": time.time(), **data})
            self._history.append(event)
            self.counts[type_] += 1
            listeners = list(self._listeners)
        for ls in listeners:
            if len(ls.queue) == ls.queue.maxlen:
                ls.dropped += 1  # the listener is too slow: its oldest event goes, and it is told how many
            ls.queue.append(event)
            ls.wake()
        return event

    def subscribe(self, wake: Any, after_id: int | None = None) -> Listener:
        """A new listener; with ``after_id`` it first gets the kept events after that id (a reconnect)."""
        ls = Listener(wake)
        with self._lock:
            if after_id is not None:
                ls.queue.extend(e for e in self._history if e.id > after_id)
            self._listeners.append(ls)
        return ls

    def unsubscribe(self, ls: Listener) -> None:
        with self._lock:
            if ls in self._listeners:
                self._listeners.remove(ls)

    def recent(self, type_: str | None = None) -> list[Event]:
        with self._lock:
            return [e for e in self._history if type_ is None or e.type == type_]
