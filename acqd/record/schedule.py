"""A writer loop's timers: when to flush, fsync, store a clock pair and report stats.

One ``Schedule`` per process: a single-stream writer keeps its own, a group writer (acqd.record.group) keeps one
for all its streams, so every stream of the group flushes in the same wake-up (one flush timer). ``due`` says what
is due now, each stream acts on it (``Writer.on_due``), then ``advance`` sets the next deadlines.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from acqd.record.load import STATS_SHED_FACTOR


@dataclass(frozen=True, slots=True)
class Due:
    """What the streams of one wake-up do."""

    pair: bool = False
    """Store a (device counter, host time) pair in /sync/clock."""
    flush: bool = False
    """Flush what was appended since the last flush (a kill -9 loses at most one flush interval)."""
    fsync: bool = False
    """And fsync it (with the flush)."""
    stats: bool = False
    """Report stats to the supervisor (the heartbeat)."""


@dataclass
class Schedule:
    """The deadlines (monotonic s) of a writer process's periodic work."""

    flush_interval_s: float
    fsync_interval_s: float | None
    stats_interval_s: float
    pair_interval_s: float
    next_flush: float
    next_stats: float
    next_pair: float
    last_fsync: float

    @classmethod
    def start(cls, flush_interval_s: float, fsync_interval_s: float | None, stats_interval_s: float,
              pair_interval_s: float, now: float) -> Schedule:
        return cls(flush_interval_s, fsync_interval_s, stats_interval_s, pair_interval_s, now, now, now, now)

    def wake_at(self, recording: bool, paired: bool) -> float:
        """The next deadline: stats always; flush and clock pair only while recording (a pair once a chunk came)."""
        timers = (self.next_flush, self.next_pair if paired else self.next_flush) if recording else ()
        return min((self.next_stats, *timers))

    def due(self, now: float, recording: bool, paired: bool) -> Due:
        """What is due at ``now``. A flush takes along the timers that fall due within half a flush interval of it:
        each wake-up handles every stream's batch, and the stats, the clock pair and the flush on phases of their
        own woke a recording writer 4.6 times a second instead of 2 (a group writer of 96 slow streams paid each
        stream's batch overhead at every one). So a timer comes up to half a flush interval early, never late;
        the fsync likewise (counted from the last one, it came 1.5 s apart whenever a wake-up was a little earlier
        than the one before)."""
        flush = recording and now >= self.next_flush
        soon = now + self.flush_interval_s / 2 if flush else now
        return Due(pair=recording and paired and soon >= self.next_pair, flush=flush,
                   fsync=flush and self.fsync_interval_s is not None and soon - self.last_fsync >= self.fsync_interval_s,
                   stats=soon >= self.next_stats)

    def advance(self, due: Due, now: float, shed_stats: bool) -> None:
        """After the streams acted on ``due`` (at ``now``): the next deadlines, counted from when that work ended (the
        flush: from its own deadline)."""
        if due.pair:
            self.next_pair = now + self.pair_interval_s
        if due.fsync:
            self.last_fsync = now
        done = time.monotonic()
        if due.flush:
            # On the flush's own cadence, not an interval after the work ended: a group writer's work at a flush grows
            # with its streams (96 slow streams: ~0.3 s on a busy machine), and counted from its end, every period
            # grew by it, each flush then had more to do, and a message waited up to ~2 s for its flush (p99 publish
            # -> flushed, measured). At least half an interval after the work, so that a writer behind still drains.
            self.next_flush = max(self.next_flush + self.flush_interval_s, done + self.flush_interval_s / 2)
        if due.stats:
            self.next_stats = done + self.stats_interval_s * (STATS_SHED_FACTOR if shed_stats else 1.0)
