"""How far behind one writer is, and what it sheds while it is (issue 24 item 2: overload is never silent).

ZeroMQ does not say how many messages wait in a socket, so the writer measures what it can: whether a drain
of its data socket ended with the socket empty. While it does not, the writer is working through a backlog;
``backlog_messages`` counts the messages handled since the socket was last found empty (a lower bound of
what was queued then) and ``behind_s`` how long ago that was. A writer is *behind* when that lasts longer
than BEHIND_AFTER_S, when SLOW_FLUSHES flushes in a row each took longer than the flush interval (one slow
fsync on a busy disk is not), or when its camera's encoder holds more than half of what it may hold. While behind (and until it has caught up for CAUGHT_UP_S) it is
*overloaded*: a seq gap it finds then is recorded with reason ``overload``, and it sheds non-data work in
SHED_ORDER (never a raw sample while the disk keeps up): previews at once, then the live sync computation
(a flag the supervisor reads), then the stats cadence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BEHIND_AFTER_S = 2.0
"""The data socket never found empty for this long: the writer cannot keep up. A writer keeping up finds it empty
at every wake-up (at most WAKE_INTERVAL_S apart); a CPU-starved one that misses a few still catches up in time."""
SLOW_FLUSHES = 3
"""Flushes in a row longer than the flush interval that make a writer behind."""
CAUGHT_UP_S = 2.0
"""Not behind for this long ends an overload (hysteresis: a writer on the edge does not flap)."""
SHED_ORDER = (("previews", 0.0), ("live_sync", 2.0), ("stats", 5.0))
"""What is shed, and after how many seconds of overload: the cheapest to lose first."""
STATS_SHED_FACTOR = 1.5
"""Stats interval multiplier while ``stats`` is shed; the daemon's heartbeat timeout exceeds 2x the interval, so
a writer shedding stats is never reported hung."""
ENCODER_BEHIND = 0.5
"""A camera's encoder holding more than this fraction of its ``max_backlog_s`` counts as behind."""


@dataclass
class Load:
    """One writer's load, fed by its loop (``drained``, ``flushed``, ``encoder``), read by its stats."""

    flush_interval_s: float
    busy_since: float | None = None
    """When the data socket was last found empty, while it has not been since (None: it was, last drain)."""
    backlog_messages: int = 0
    flush_s: float = 0.0
    slow_flushes: int = 0
    """Flushes in a row that took longer than the flush interval."""
    flush_max_s: float = 0.0
    """The longest flush since the last stats report."""
    encoder_backlog: int = 0
    encoder_limit: int = 0
    overloaded_since: float | None = None
    calm_since: float | None = None
    """While overloaded: when the writer last stopped being behind (None while it is)."""
    episodes: list[float] = field(default_factory=list)
    """Start times of every overload so far (monotonic s)."""

    def drained(self, started: float, empty: bool, handled: int) -> None:
        """A drain that began at ``started`` handled ``handled`` messages and ended with the socket ``empty`` or not."""
        if empty:
            self.busy_since, self.backlog_messages = None, 0
            return
        if self.busy_since is None:
            self.busy_since = started
        self.backlog_messages += handled

    def flushed(self, seconds: float) -> None:
        self.flush_s = seconds
        self.slow_flushes = self.slow_flushes + 1 if seconds > self.flush_interval_s else 0
        self.flush_max_s = max(self.flush_max_s, seconds)

    def encoder(self, backlog: int, limit: int) -> None:
        self.encoder_backlog, self.encoder_limit = backlog, limit

    def behind_s(self, now: float) -> float:
        return 0.0 if self.busy_since is None else now - self.busy_since

    def behind(self, now: float) -> bool:
        return (self.behind_s(now) > BEHIND_AFTER_S or self.slow_flushes >= SLOW_FLUSHES
                or bool(self.encoder_limit) and self.encoder_backlog > ENCODER_BEHIND * self.encoder_limit)

    def update(self, now: float) -> str | None:
        """Advance the overload state; returns ``"started"`` or ``"ended"`` when it changes."""
        if self.behind(now):
            self.calm_since = None
            if self.overloaded_since is None:
                self.overloaded_since = now
                self.episodes.append(now)
                return "started"
        elif self.overloaded_since is not None:
            self.calm_since = self.calm_since if self.calm_since is not None else now
            if now - self.calm_since >= CAUGHT_UP_S:
                self.overloaded_since = self.calm_since = None
                return "ended"
        return None

    @property
    def overloaded(self) -> bool:
        return self.overloaded_since is not None

    def shedding(self, now: float) -> list[str]:
        if self.overloaded_since is None:
            return []
        return [what for what, after in SHED_ORDER if now - self.overloaded_since >= after]

    def stats(self, now: float) -> dict:
        """The ``load`` entry of the writer's stats; resets the window's maximum."""
        out = {"overloaded": self.overloaded, "behind_s": round(self.behind_s(now), 3),
               "backlog_messages": self.backlog_messages, "flush_s": round(self.flush_s, 4),
               "flush_max_s": round(self.flush_max_s, 4), "encoder_backlog": self.encoder_backlog,
               "encoder_limit": self.encoder_limit, "overloads": len(self.episodes)}
        self.flush_max_s = self.flush_s
        return out

    def describe(self, now: float) -> str:
        """Why the writer is behind, in words (for the overload incident)."""
        why = []
        if self.behind_s(now) > BEHIND_AFTER_S:
            why.append(f"its socket has not been empty for {self.behind_s(now):.1f} s "
                       f"({self.backlog_messages} messages handled since)")
        if self.slow_flushes >= SLOW_FLUSHES:
            why.append(f"{self.slow_flushes} flushes in a row took longer than the flush interval "
                       f"{self.flush_interval_s:g} s (the last {self.flush_s:.2f} s)")
        if self.encoder_limit and self.encoder_backlog > ENCODER_BEHIND * self.encoder_limit:
            why.append(f"its video encoder is {self.encoder_backlog} frames behind (holds at most {self.encoder_limit})")
        return "; ".join(why) or "behind"
