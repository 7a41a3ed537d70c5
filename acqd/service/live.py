"""The supervisor's live view: the status snapshot it publishes, and the events derived from it.

Runs on the supervisor thread (``publish`` is called from its loop and after every command). It owns the
snapshot's shape (docs/control-api.md "Status snapshot"): the supervisor's ``status()`` plus what an operator
page needs and the supervisor does not keep itself (elapsed time, disk time left, silent time, rejects by
reason, recent incidents, one verdict). It also emits the ``mode`` events (on a change of mode or session),
summarises rejected messages once a second (one ``rejects`` incident and one log line, never one per message)
and raises ``disk_low`` when the disk would fill within ``DISK_LOW_S`` at the current write rate. It asks the live
sync lock (acqd.service.synclock) for its alarms and puts each stream's lock in the snapshot.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Protocol

from acqd.config import RigConfig
from acqd.service.jobs import Jobs
from acqd.service.previews import PreviewHub
from acqd.service.snapshot import SNAPSHOT_INTERVAL_S, EventBus, Snapshot
from acqd.service.synclock import BAD as BAD_SYNC
from acqd.service.synclock import SyncLock
from acqd.service.writers import WriterHandle, liveness

log = logging.getLogger("acqd")
MIN_SPACING_S = 0.05
"""A change (an incident, a stream's state) is published at most this often."""
REJECT_SUMMARY_S = 1.0
DISK_LOW_S = 600.0
"""Recording with less than this many seconds of disk left at the current rate raises ``disk_low``."""
RECENT_INCIDENTS = 20


@dataclass
class Live:
    """What ``publish`` remembers between snapshots (owned by the supervisor thread)."""

    changed: bool = True
    seq: int = 0
    published_at: float = 0.0
    mode: str | None = None
    session_id: str | None = None
    rejects: Counter = field(default_factory=Counter)
    rejects_at: float = field(default_factory=time.monotonic)
    disk_low: bool = False
    annotations: Counter = field(default_factory=Counter)
    """Annotations per session id (written off the supervisor thread; counted for the snapshot)."""
    started: float = field(default_factory=time.monotonic)
    headlines: dict[str, tuple] = field(default_factory=dict)
    """Per stream, what the verdict reads of its last stats message (``headline``)."""

    def count_reject(self, stream: str, reason: str, n: int) -> None:
        self.rejects[(stream, reason)] += n

    def note(self, stream: str, msg: dict, state: str) -> None:
        """A writer's stats or closing message (``state``: its stream's state after it). Stats come from every stream
        twice a second, unaligned: a snapshot per message would be rebuilt at 1/MIN_SPACING_S with a hundred streams.
        Their counters (rates, rows, bytes) wait for the periodic snapshot (SNAPSHOT_INTERVAL_S); a change of what the
        verdict and an operator act on is published at once."""
        if msg.get("type") != "stats":
            self.changed = True  # a camera's encoder finishing: progress a stop shows
            return
        key = headline(msg, state)
        if self.headlines.get(stream) != key:
            self.headlines[stream], self.changed = key, True


class Supervised(Protocol):
    """What the live view reads from the supervisor (``acqd.service.supervisor.Supervisor``), and the one thing
    it does there: report an incident. A protocol, so that this module never imports the supervisor."""

    cfg: RigConfig
    live: Live
    events: EventBus
    snapshot: Snapshot
    writers: Mapping[str, WriterHandle]
    jobs: Jobs
    synclock: SyncLock
    previews: PreviewHub

    @property
    def session(self) -> dict | None: ...

    def status(self) -> dict: ...

    def incident(self, stream: str | None, kind: str, detail: str, incomplete: bool = False) -> None: ...


def publish(sup: Supervised, force: bool = False) -> Snapshot:
    """Swap in a new snapshot if something changed (or it is due); emit the events derived from it."""
    lv, now = sup.live, time.monotonic()
    if now - lv.rejects_at >= REJECT_SUMMARY_S:
        _summarise_rejects(sup, now)
    for stream, kind, detail in sup.synclock.update(sup.session["session_id"] if sup.session else None, now):
        sup.incident(stream, kind, detail)
    due = now - lv.published_at >= SNAPSHOT_INTERVAL_S
    if not (force or due or (lv.changed and now - lv.published_at >= MIN_SPACING_S)):
        return sup.snapshot
    status = build_status(sup)
    session_id = status["session"]["session_id"] if status["session"] else None
    if (status["mode"], session_id) != (lv.mode, lv.session_id):
        sup.events.publish("mode", {"mode": status["mode"], "previous": lv.mode, "session": status["session"],
                                    "last_session": status["last_session"]})
        log.info("mode %s%s", status["mode"], f" (session {session_id})" if session_id else "")
        lv.mode, lv.session_id = status["mode"], session_id
        sup.previews.origin = timebase_origin(status)
    _check_disk(sup, status)
    lv.seq += 1
    snap = Snapshot.of(lv.seq, {"snapshot_seq": lv.seq, **status})
    sup.snapshot = snap  # one reference assignment: readers see the old or the new snapshot, whole
    lv.published_at, lv.changed = now, False
    return snap


def headline(stats: dict, state: str) -> tuple:
    """What a stats message says that the verdict and an operator act on: state, driver connected, gaps and rejects,
    overload."""
    counts = stats.get("recording_counts") or {}
    return (state, stats.get("connected"), stats.get("recording"), counts.get("gaps"), counts.get("rejected_total"),
            bool((stats.get("load") or {}).get("overloaded")), tuple(stats.get("shedding") or ()))


def timebase_origin(status: dict) -> float | None:
    """Host monotonic seconds of the live session timebase's zero: the session's start in RECORD (its ``created``
    time, within a few tens of ms of the NWB's zero, the reference's first recorded sample), now on entering
    ACQUIRE (the live view's "seconds since ACQUIRE"), none in IDLE."""
    now_mono, now_wall = time.monotonic(), time.time()
    if status["session"] is not None and status["session"].get("started"):
        return now_mono - (now_wall - _parse(status["session"]["started"]).timestamp())
    return now_mono if status["mode"] == "ACQUIRE" else None


def build_status(sup: Supervised) -> dict:
    """``Supervisor.status()`` plus the operator's view (the snapshot's documented fields)."""
    status = sup.status()
    now = time.time()
    if status["session"] is not None and sup.session is not None:
        started = _parse(sup.session["created"])
        status["session"]["started"] = sup.session["created"]
        status["session"]["elapsed_s"] = round(now - started.timestamp(), 1)
        status["session"]["annotations"] = sup.live.annotations[sup.session["session_id"]]
    write_rate = 0.0
    for name, s in status["streams"].items():
        h = sup.writers.get(name)
        s["rejected_by_reason"] = (h.stats.get("recording_counts") or {}).get("rejected", {}) if h else {}
        s["sync"] = sup.synclock.status(name)
        write_rate += s["mb_per_s"] * 1e6 if s["state"] == "recording" else 0.0
    incidents = [e.data for e in sup.events.recent("incident")][-RECENT_INCIDENTS:]
    status.update(
        time=round(now, 3), uptime_s=round(time.monotonic() - sup.live.started, 1),
        reference=sup.cfg.reference, write_bytes_per_s=round(write_rate),
        disk_time_left_s=(round(status["disk_free_bytes"] / write_rate)
                          if write_rate > 0 and status["disk_free_bytes"] is not None else None),
        recent_incidents=incidents, incident_count=sup.events.counts["incident"], sync_lock=sup.synclock.summary(),
        jobs=sup.jobs.listed(),
    )
    status["verdict"] = verdict(status, sup.cfg.daemon.silent_after_s)
    return status


def verdict(status: dict, silent_after_s: float) -> dict:
    """One line for people: OK, or the problems, the most serious first."""
    problems: list[str] = []
    acquiring = status["mode"] != "IDLE"
    for name, s in status["streams"].items():
        alive = liveness(s["state"] == "hung", s["silent_s"], silent_after_s)  # as RECORD's preflight judges
        if s["state"] in ("failed", "stopped_failed") or alive == "hung":
            problems.append(f"{name}: {s['state']}" + (f" ({s['reason']})" if s.get("reason") else ""))
        elif acquiring and s["required"] and not s["connected"]:
            problems.append(f"{name}: no driver connected")
        elif acquiring and s["required"] and alive == "silent":
            problems.append(f"{name}: silent" + (f" for {s['silent_s']:.0f} s" if s["silent_s"] else ""))
        elif (s.get("load") or {}).get("overloaded"):
            problems.append(f"{name}: writer behind (shedding {', '.join(s.get('shedding') or []) or 'nothing yet'})")
    for name, s in status["streams"].items():
        sync = s.get("sync")
        if sync and sync["state"] in BAD_SYNC:
            problems.append(f"{name}: sync {sync['state']}" + (f" ({sync['reason']})" if sync["reason"] else ""))
    for name, s in status["streams"].items():
        if s["gaps"] or s["rejected"]:
            problems.append(f"{name}: {s['gaps']} gaps, {s['rejected']} rejected")
    problems.extend(f"node {name}: unreachable" for name, n in (status.get("nodes") or {}).items()
                    if n["reachable"] is False)  # a rig's leader (acqd.service.rig)
    left = status.get("disk_time_left_s")
    if left is not None and left < DISK_LOW_S:
        problems.insert(0, f"disk full in {left / 60:.0f} min")
    if status["session"] and status["session"]["incomplete"]:
        problems.append("session incomplete (see incidents)")
    return {"ok": not problems, "problems": problems,
            "line": "OK" if not problems else f"PROBLEM: {problems[0]}"
            + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")}


def _summarise_rejects(sup: Supervised, now: float) -> None:
    lv = sup.live
    window, lv.rejects_at = now - lv.rejects_at, now
    if not lv.rejects:
        return
    per_stream: dict[str, Counter] = {}
    for (stream, reason), n in lv.rejects.items():
        per_stream.setdefault(stream, Counter())[reason] = n
    lv.rejects.clear()
    for stream, reasons in per_stream.items():
        detail = (f"{sum(reasons.values())} messages rejected in the last {window:.1f} s ("
                  + ", ".join(f"{r}: {n}" for r, n in reasons.most_common()) + ")")
        sup.incident(stream, "rejects", detail)


def _check_disk(sup: Supervised, status: dict) -> None:
    left = status["disk_time_left_s"]
    low = left is not None and left < DISK_LOW_S
    if low and not sup.live.disk_low:
        sup.incident(None, "disk_low", f"{status['disk_free_bytes'] / 1e9:.1f} GB free: full in "
                                        f"{left / 60:.0f} min at {status['write_bytes_per_s'] / 1e6:.1f} MB/s")
    sup.live.disk_low = low


def _parse(iso: str) -> datetime:
    t = datetime.fromisoformat(iso)
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)
