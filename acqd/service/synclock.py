"""The live sync lock: whether each synced stream's clock is locked to the reference's while it records.

Owns the sliding windows of sync edges the writers send with their stats (device sample indices of their own
sync line, stamped with the host time they reached the daemon), the verdict per synced stream and the
transitions that make an alarm. ``judge`` is pure: it runs finalize's own pairing and fit
(``acqd.finalize.clock.pair_edges`` and ``fit_clock``) on the window, so the live verdict and finalize's can
never disagree on what pairs. ``SyncLock`` is fed by the supervisor (``feed``) and asked for its alarms once
per ``daemon.sync_lock.interval_s`` (``update``); it never touches a socket or a file.

States (docs/clock-alignment.md "Live sync lock"): ``locked``; ``searching`` (fewer edges than a fit needs: after
RECORD, or while edges come back after a gap; for a whole window after RECORD whatever pairs); ``no edges`` (none
for ``edge_timeout_s``: cable pulled, line not wired); ``not pairing`` (edges, but not with the reference's: a
regular train, another line, the reference silent); ``drift out of range`` (paired, but the clock runs further off
nominal than ``qc.max_drift_ppm``).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

from acqd.config import ChannelSync, FrameSync, RigConfig
from acqd.errors import ClockFitError
from acqd.finalize.clock import MIN_PAIRS, fit_clock, pair_edges
from acqd.record.group import writer_groups

LOCKED, SEARCHING, NO_EDGES, NOT_PAIRING, DRIFT = "locked", "searching", "no edges", "not pairing", "drift out of range"
BAD = (NO_EDGES, NOT_PAIRING, DRIFT)
PAIR_MAX_PPM = 1000.0
"""Rate difference the live pairing searches over. Wider than the QC limit on purpose: a clock 300 ppm off is then
measured and reported as ``drift out of range`` rather than refused as not pairing; over a window of seconds the
wider search costs a few more slope steps (acqd.finalize.clock._vote)."""
LOOP_BEHIND_S = 0.5
"""The supervisor loop calls ``update`` at least every 0.1 s; a longer pause means it is behind (overload): the
lock computation is skipped (shed) that round, before anything that touches data."""
KEEP_EDGES = 2 * MIN_PAIRS
"""A window keeps at least this many newest edges (up to ``KEEP_WINDOWS`` windows old): after a cable was out for
longer than the window, the lock is back as soon as the edges that return pair, instead of after a fit's worth."""
KEEP_WINDOWS = 3
ARRIVAL_SLACK_S = 2.0
"""Edges of two streams latched at the same pulse reach the daemon this far apart at most (stats cadence, a slow
stream's drain): the reference's edges are taken from this much before a stream's oldest."""
HISTORY = 60
"""Drift values kept per stream for the console's sparkline (one per pairing: two minutes at 2 s, eight for a stream
paired every GROUPED_EVERY-th round). Every snapshot carries them, so they are few and short (0.01 ppm)."""
GROUPED_EVERY = 4
"""A stream hosted by a group writer with others (acqd.record.group: a slow stream) is paired every GROUPED_EVERY-th
round, a GROUPED_EVERY-th of them each round: with a hundred slow streams the pairing was most of what the lock cost
the supervisor. Its silence is still checked every SILENCE_CHECK_S, and edges coming back after a silence, or a
stream not judged yet, are paired at once."""
SILENCE_CHECK_S = 0.5
"""How often the lines' silence is checked: cheap, and what a pulled cable needs to be reported in seconds, while
the pairing (the cost) runs every ``interval_s``."""


@dataclass(frozen=True, slots=True)
class Lock:
    """One stream's live sync verdict."""

    state: str
    edges: int
    """The stream's own sync edges in the window (the last ``window_s``, and at least the newest ``KEEP_EDGES``)."""
    paired: int
    """Of those, paired with a reference edge (finalize's pairing)."""
    drift_ppm: float | None = None
    """Rate error against nominal, on the reference's clock (positive: the device runs fast); None until fitted."""
    offset_s: float | None = None
    """Reference seconds minus device seconds (sample / nominal rate) at the newest paired edge."""
    reason: str = ""


def judge(dev: np.ndarray, dev_rate: float, ref: np.ndarray, ref_rate: float, *, dev_silent_s: float,
          ref_silent_s: float, searching: bool, edge_timeout_s: float, max_drift_ppm: float) -> Lock:
    """The verdict on one synced stream's window of edges (strictly increasing device and reference sample
    indices), given how long each line has shown no edge and whether the lock may still be ``searching``."""
    n = len(dev)
    quiet = silence(n, dev_silent_s, ref_silent_s, edge_timeout_s)
    if quiet is not None:
        return quiet
    p = pair_edges(dev, dev_rate, ref, ref_rate, max_ppm=PAIR_MAX_PPM)
    if p.ambiguous:
        return Lock(NOT_PAIRING, n, 0, reason=p.reason)
    try:
        fit = fit_clock(dev[p.dev_index] - 0.5, (ref[p.ref_index] - 0.5) / ref_rate, dev_rate, bounds=False)
    except ClockFitError as e:  # too few pairs: normal early in a recording, or while edges come back after a gap
        few = searching or n < MIN_PAIRS  # not enough edges yet (after RECORD, or coming back after a gap)
        return Lock(SEARCHING if few else NOT_PAIRING, n, len(p.dev_index), reason=p.reason or str(e))
    newest = dev[p.dev_index[-1]] - 0.5
    offset = float(fit.to_reference(np.array([newest]))[0] - newest / dev_rate)
    lock = Lock(LOCKED, n, len(p.dev_index), round(fit.drift_ppm, 2), round(offset, 6))
    if abs(fit.drift_ppm) > max_drift_ppm:
        return Lock(DRIFT, lock.edges, lock.paired, lock.drift_ppm, lock.offset_s,
                    f"drift {fit.drift_ppm:+.1f} ppm beyond qc.max_drift_ppm {max_drift_ppm:g}")
    if p.unmatched_dev > len(p.dev_index):
        return Lock(NOT_PAIRING, lock.edges, lock.paired, lock.drift_ppm, lock.offset_s,
                    f"{p.unmatched_dev} of the stream's edges have no reference partner, {len(p.dev_index)} paired")
    return lock


def silence(n: int, dev_silent_s: float, ref_silent_s: float, edge_timeout_s: float) -> Lock | None:
    """The verdict when the stream's line (``no edges``) or the reference's has shown no edge for
    ``edge_timeout_s``; None when both carry edges (the pairing decides)."""
    if dev_silent_s >= edge_timeout_s:
        return Lock(NO_EDGES, n, 0, reason=f"no sync edge for {dev_silent_s:.0f} s")
    if ref_silent_s >= edge_timeout_s:
        return Lock(NOT_PAIRING, n, 0, reason=f"the reference shows no sync edge for {ref_silent_s:.0f} s")
    return None


@dataclass
class Window:
    """One stream's sync edges of the last ``window_s`` (at least ``KEEP_EDGES``): (arrival time, device sample),
    oldest first."""

    edges: deque = field(default_factory=deque)
    last_edge_at: float | None = None
    heard_at: float | None = None
    """When the writer's last stats arrived: a line is silent only for as long as its writer says so."""
    pid: int | None = None
    """The writer's process: a restarted writer's line is silent from its restart, not from before it died."""
    cut: int = 0
    """Edges the writer could not send (over its per-message bound), since RECORD."""
    resets: int = 0

    def add(self, samples: list[int], now: float) -> None:
        for s in samples:
            if self.edges and s <= self.edges[-1][1]:
                if s == self.edges[-1][1]:
                    continue  # the same edge twice (a restarted writer): not news
                self.edges.clear()  # the device counter went back (it restarted): pair the new counter alone
                self.resets += 1
            self.edges.append((now, int(s)))
        if samples:
            self.last_edge_at = now

    def prune(self, oldest: float, floor: float) -> None:
        """Drop edges that arrived before ``oldest`` but keep the newest ``KEEP_EDGES``; none before ``floor``."""
        while self.edges and (self.edges[0][0] < floor or len(self.edges) > KEEP_EDGES and self.edges[0][0] < oldest):
            self.edges.popleft()

    def samples(self, since: float = -np.inf) -> np.ndarray:
        """Device sample indices of the edges that arrived at or after ``since``."""
        return np.fromiter((s for t, s in self.edges if t >= since), dtype=np.int64)

    def oldest(self, default: float) -> float:
        return self.edges[0][0] if self.edges else default


class SyncLock:
    """Live sync lock of every synced stream of a rig while a session records (supervisor thread only)."""

    def __init__(self, cfg: RigConfig):
        self.settings = cfg.daemon.sync_lock
        self.reference = cfg.reference
        self.max_drift_ppm = cfg.qc.max_drift_ppm
        rates = {s.name: s.rate for s in cfg.streams if isinstance(s.sync, (ChannelSync, FrameSync))}
        self.rates = rates if cfg.reference in rates else {}  # nothing to lock to without the reference's edges
        groups = writer_groups(cfg)
        size = Counter(groups.values())
        grouped = [n for n in self.rates if groups.get(n) is not None and size[groups[n]] > 1 and n != cfg.reference]
        self.phase = {n: i % GROUPED_EVERY for i, n in enumerate(grouped)}
        """Grouped streams: the round (modulo GROUPED_EVERY) each is paired in; every other stream pairs each round."""
        self.rounds = 0
        self.session: str | None = None
        self.started = 0.0
        self.windows: dict[str, Window] = {}
        self.locks: dict[str, Lock] = {}
        self.since: dict[str, float] = {}
        self.alarmed: dict[str, str] = {}
        self.history: dict[str, deque] = {}
        self.next_at = self.next_pairing = 0.0
        self.quiet: set[str] = set()
        """Streams whose lock was last set by ``silence``: edges coming back need a pairing at once."""
        self.last_call = 0.0
        self.shed_total = 0
        self.shed = False
        self.cost_s = 0.0
        """CPU seconds the lock has cost the supervisor thread since the daemon started (all streams)."""

    def feed(self, stream: str, stats: dict, now: float) -> None:
        """A writer's stats message: its sync edges since the previous one."""
        w = self.windows.get(stream)
        if w is None or self.session is None:
            return
        pid = stats.get("pid")
        if w.pid is not None and pid != w.pid and w.last_edge_at is not None:
            w.last_edge_at = now  # a new writer: the time it was down is the restart's gap, not a silent line
        w.pid = pid
        w.add(stats.get("sync_edges") or [], now)
        w.cut += int(stats.get("sync_edges_cut") or 0)
        w.heard_at = now

    def update(self, session: str | None, now: float | None = None) -> list[tuple[str, str, str]]:
        """Recompute when due; returns the alarms to raise, as (stream, incident kind, detail)."""
        now = time.monotonic() if now is None else now
        behind, self.last_call = self.last_call and now - self.last_call > LOOP_BEHIND_S, now
        if not self.settings.enabled or session != self.session:
            self._restart(session if self.settings.enabled else None, now)
            return []
        if session is None or now < self.next_at:
            return []
        self.next_at = now + SILENCE_CHECK_S
        self.shed = bool(behind)
        if self.shed:  # the loop is late: data first, the lock at the next round
            self.shed_total += 1
            return []
        t0 = time.thread_time()  # this thread's CPU only: what the lock costs the supervisor
        pairing = now >= self.next_pairing
        if pairing:
            self.next_pairing, self.rounds = now + self.settings.interval_s, self.rounds + 1
            self._prune(now)
        alarms = [a for name in self.rates for a in self._judge(name, now, pairing)]
        self.cost_s += time.thread_time() - t0
        return alarms

    def _prune(self, now: float) -> None:
        horizon, floor = now - self.settings.window_s, now - KEEP_WINDOWS * self.settings.window_s
        for name, w in self.windows.items():
            if name != self.reference:
                w.prune(horizon, floor)
        # The reference keeps what every stream's window needs to pair with.
        needed = min((w.oldest(now) for n, w in self.windows.items() if n != self.reference), default=now)
        self.windows[self.reference].prune(min(horizon, needed - ARRIVAL_SLACK_S), floor - ARRIVAL_SLACK_S)

    def _restart(self, session: str | None, now: float) -> None:
        self.session, self.started, self.next_at = session, now, now
        self.windows = {n: Window() for n in self.rates} if session else {}
        self.locks, self.since, self.alarmed, self.history = {}, {}, {}, {n: deque(maxlen=HISTORY) for n in self.rates}
        self.next_pairing, self.quiet = now, set()

    def _silent(self, w: Window, now: float) -> float:
        """Seconds the line has shown no edge, up to its writer's last report: a writer that stops reporting
        (hung, overloaded) is the heartbeat's incident (writer_hung), not a pulled cable."""
        heard = w.heard_at if w.heard_at is not None else self.started
        return max(0.0, heard - (w.last_edge_at if w.last_edge_at is not None else self.started))

    def _judge(self, name: str, now: float, pairing: bool) -> list[tuple[str, str, str]]:
        """Check the lines' silence; pair too when ``pairing`` is due (or edges came back after a silence)."""
        s = self.settings
        w, ref = self.windows[name], self.windows[self.reference]
        n, silent = len(w.edges), self._silent(w, now)
        quiet = silence(n, silent, self._silent(ref, now), s.edge_timeout_s)
        if name == self.reference:
            lock = quiet if silent >= s.edge_timeout_s else (
                Lock(LOCKED, n, n, 0.0, 0.0, "the reference clock") if n else Lock(SEARCHING, 0, 0))
        elif quiet is not None:
            lock = quiet
        elif pairing and self.rounds % GROUPED_EVERY == self.phase.get(name, self.rounds % GROUPED_EVERY) \
                or name in self.quiet or name not in self.locks:
            lock = judge(w.samples(), self.rates[name], ref.samples(w.oldest(now) - ARRIVAL_SLACK_S),
                         self.rates[self.reference], dev_silent_s=silent, ref_silent_s=self._silent(ref, now),
                         searching=now - self.started < s.window_s, edge_timeout_s=s.edge_timeout_s,
                         max_drift_ppm=self.max_drift_ppm)
        else:
            return []  # the last pairing stands until the next one
        (self.quiet.add if quiet is not None else self.quiet.discard)(name)
        previous = self.locks.get(name)
        self.locks[name] = lock
        if previous is None or previous.state != lock.state:
            self.since[name] = time.time()
        if lock.drift_ppm is not None:
            self.history[name].append(lock.drift_ppm)
        return self._alarm(name, lock)

    def _alarm(self, name: str, lock: Lock) -> list[tuple[str, str, str]]:
        """``sync_lost`` when a stream turns bad (or bad another way), ``sync_restored`` when it locks again."""
        was = self.alarmed.get(name)
        if lock.state in BAD and lock.state != was:
            self.alarmed[name] = lock.state
            return [(name, "sync_lost", f"sync {lock.state}: {lock.reason} ({lock.edges} edges in the window, "
                                        f"{lock.paired} paired)")]
        if lock.state == LOCKED and was is not None:
            del self.alarmed[name]
            drift = "" if lock.drift_ppm is None else f", drift {lock.drift_ppm:+.1f} ppm"
            return [(name, "sync_restored", f"sync locked again after {was} ({lock.paired} edges paired{drift})")]
        return []

    def status(self, stream: str) -> dict | None:
        """The snapshot's ``sync`` of one stream (None: not a synced stream, or not recording)."""
        lock = self.locks.get(stream)
        if lock is None:
            return None
        w = self.windows[stream]
        return {"state": lock.state, "edges": lock.edges, "paired": lock.paired, "drift_ppm": lock.drift_ppm,
                "offset_s": lock.offset_s, "since": self.since.get(stream), "reason": lock.reason,
                "edges_cut": w.cut, "counter_resets": w.resets, "drift_history": list(self.history[stream])}

    def summary(self) -> dict:
        """The snapshot's ``sync_lock``: whether it runs, and whether it was shed because the loop was behind."""
        return {"enabled": self.settings.enabled, "active": self.session is not None, "shed": self.shed,
                "shed_total": self.shed_total, "cpu_s": round(self.cost_s, 4),
                "window_s": self.settings.window_s, "interval_s": self.settings.interval_s}
