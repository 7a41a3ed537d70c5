"""Process sampling from /proc: CPU ticks and RSS of labelled processes, the machine's busy time, waiting
for a quiet machine before a run."""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path

from bench.common import log

CLK_TCK = os.sysconf("SC_CLK_TCK")
QUIET_LIMIT_PCT = 25.0
"""Before each run, wait until the machine uses less than this (% of one core) for 3 s."""
RSS_LIMIT_MB = 4096
"""A run is cut short if any watched process grows past this: a receiver that falls far behind makes
the simulator's send queues (100k messages per stream) grow without bound."""


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of a process, in clock ticks; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])


def children_running(parent: int, module: str) -> list[int]:
    """Pids of ``parent``'s child processes started as ``python -m module``."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent \
                    and (d / "cmdline").read_bytes().split(b"\0")[1:3] == [b"-m", module.encode()]:
                out.append(int(d.name))
        except (OSError, IndexError, ValueError):  # gone meanwhile, or not a python -m child
            continue
    return out


def status_kb(pid: int, key: str) -> int | None:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def machine_ticks() -> int:
    """Busy clock ticks of the whole machine so far (every core; idle and iowait excluded)."""
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return user + nice + system + irq + softirq + steal


def wait_quiet(max_wait_s: float, limit_pct: float = QUIET_LIMIT_PCT) -> dict:
    """Wait (up to ``max_wait_s``) until the machine is nearly idle: other people's work skews every figure."""
    t0 = time.monotonic()
    while True:
        a = machine_ticks()
        time.sleep(3.0)
        busy = round(100 * (machine_ticks() - a) / CLK_TCK / 3.0, 1)
        waited = time.monotonic() - t0
        if busy <= limit_pct or waited >= max_wait_s:
            if busy > limit_pct:
                log(f"  machine still busy ({busy}% of a core) after {waited:.0f} s; measuring anyway")
            return {"busy_pct": busy, "waited_s": round(waited, 1), "quiet": busy <= limit_pct}


def is_acqd(label: str) -> bool:
    """Whether a ProcWatch label is one of acqd's processes (the supervisor and its writers)."""
    return label not in ("simulator", "bench")


class ProcWatch:
    """CPU over a window and RSS every ``every_s`` seconds, for a set of labelled processes.

    Also the whole machine's CPU over the same window, so that what other processes took is known.
    """

    def __init__(self, pids: dict[str, int], every_s: float, rss_limit_mb: int = RSS_LIMIT_MB):
        self.pids, self.every_s, self.rss_limit_mb = {**pids, "bench": os.getpid()}, every_s, rss_limit_mb
        self.rss: dict[str, list[tuple[float, int]]] = {k: [] for k in self.pids}
        self.acqd_ticks: list[tuple[float, int]] = []
        """(seconds into the window, CPU ticks of acqd's processes so far): CPU over time."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.t0 = time.monotonic()
        self.cpu0 = {k: cpu_ticks(p) for k, p in self.pids.items()}
        self.machine0 = machine_ticks()
        self.machine1 = self.machine0
        self.cpu1: dict[str, int | None] = {}
        self.hwm: dict[str, int | None] = {}
        self.seconds = 0.0
        self.overflow: str | None = None

    def __enter__(self) -> ProcWatch:
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic() - self.t0
            self.acqd_ticks.append((t, sum(cpu_ticks(p) or 0 for k, p in self.pids.items() if is_acqd(k))))
            for k, p in self.pids.items():
                kb = status_kb(p, "VmRSS")
                if kb is not None:
                    self.rss[k].append((t, kb))
                    if kb > self.rss_limit_mb * 1024 and not self.overflow:
                        self.overflow = (f"{k} RSS {kb / 1024:.0f} MB > {self.rss_limit_mb} MB after {t:.0f} s "
                                         "(send or receive queues growing)")
            self._stop.wait(self.every_s)

    def sleep(self, seconds: float) -> None:
        """Sleep, but return early if a process outgrew RSS_LIMIT_MB."""
        end = time.monotonic() + seconds
        while not self.overflow and time.monotonic() < end:
            time.sleep(min(0.5, max(0.0, end - time.monotonic())))

    def __exit__(self, *exc) -> None:
        self.cpu1 = {k: cpu_ticks(p) for k, p in self.pids.items()}
        self.machine1 = machine_ticks()
        self.hwm = {k: status_kb(p, "VmHWM") for k, p in self.pids.items()}
        self.seconds = time.monotonic() - self.t0
        self._stop.set()
        self._thread.join(10)

    def cpu_pct(self) -> dict[str, float | None]:
        """Per process: % of one core over the window."""
        return {k: None if self.cpu0[k] is None or self.cpu1.get(k) is None
                else round(100 * (self.cpu1[k] - self.cpu0[k]) / CLK_TCK / self.seconds, 1) for k in self.pids}

    def acqd_cpu_timeline(self, step_s: float = 30.0) -> list[float]:
        """acqd's CPU (% of one core) in each ``step_s`` of the window: does the cost grow as files grow?"""
        out, start = [], self.acqd_ticks[0] if self.acqd_ticks else None
        for t, ticks in self.acqd_ticks:
            if start is not None and t - start[0] >= step_s:
                out.append(round(100 * (ticks - start[1]) / CLK_TCK / (t - start[0]), 1))
                start = (t, ticks)
        return out

    def others_pct(self) -> float:
        """% of one core used by processes other than the watched ones (other people's work, the kernel)."""
        ours = sum((self.cpu1.get(k) or 0) - (self.cpu0[k] or 0) for k in self.pids if self.cpu0[k] is not None)
        return round(100 * (self.machine1 - self.machine0 - ours) / CLK_TCK / self.seconds, 1)

    def rss_summary(self) -> dict[str, dict]:
        """First- vs last-minute median RSS (a third of the window when it is shorter than 3 minutes), peak."""
        edge = min(60.0, self.seconds / 3)
        out = {}
        for k, samples in self.rss.items():
            if not samples:
                continue
            first = [kb for t, kb in samples if t <= edge] or [samples[0][1]]
            last = [kb for t, kb in samples if t >= self.seconds - edge] or [samples[-1][1]]
            out[k] = {"first_mb": round(statistics.median(first) / 1024, 1),
                      "last_mb": round(statistics.median(last) / 1024, 1),
                      "peak_mb": round(max(self.hwm.get(k) or 0, max(kb for _, kb in samples)) / 1024, 1),
                      "samples": len(samples), "window_s": round(edge, 1)}
            out[k]["growth_mb"] = round(out[k]["last_mb"] - out[k]["first_mb"], 1)
        return out
