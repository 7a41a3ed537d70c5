#!/usr/bin/env python3
"""Benchmark acqd: the real daemon, the real simulated drivers, real sockets, real files.

    .venv/bin/python scripts/bench --quick --doc /tmp/perf.md     # ~20 minutes: proves every scenario runs
    .venv/bin/python scripts/bench --repeat 3                      # the figures in docs/performance.md
    .venv/bin/python scripts/bench --scenarios reference --seconds 600
    .venv/bin/python scripts/bench --scenarios naive --update full.json --out full.json   # rerun one scenario

Scenarios (``--scenarios``, comma-separated; default all):
  reference  configs/bench-rig.yaml (4 probes, 2 cameras, NIDAQ, 2 sensors) recorded for ``--seconds``:
             messages lost, acqd CPU (supervisor + writers), RSS over time, publish->flushed latency, MB/s.
  ramp       N probes (1, 2, 4, 6, ...) for ``--step-seconds`` each until the first loss, uncompressed
             and with blosc-lz4: the highest aggregate MB/s acqd keeps up with.
  naive      the same ramp into a naive single-process receiver (scripts/bench_baselines.py).
  disk       the disk's sequential write rate with fdatasync (``--disk-gib``, 4 MiB blocks).
  pynwb      pynwb DataChunkIterator writing probe-like data, file to file (``--pynwb-gib``).
  finalize   time ``acqd finalize`` on a short session and one with 10x the data (skipped if absent).

A ramp step "keeps up" when no message is lost or rejected, the simulator stayed on its real-time
schedule, and the receiver has no growing backlog (p99 publish->receive under BACKLOG_LIMIT_MS).
PUB/SUB with the simulator's 100k-message send queue buffers rather than drops within a short
window, so a backlog is the first sign of a receiver that cannot keep up.

Prints a JSON result (also to ``--out``) and a Markdown table, and rewrites the generated part of
``--doc`` (default docs/performance.md; a ``--quick`` run writes it only if ``--doc`` is given).
Never part of ``make test``. Every subprocess has a deadline and is reaped (acqd.service.procs).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import bench_baselines as baselines  # noqa: E402

from acqd.service.procs import Daemon, Simulator, stop_process, wait_until  # noqa: E402
from acqd.record.streamfile import open_for_read  # noqa: E402

BENCH_RIG = ROOT / "configs" / "bench-rig.yaml"
DOC = ROOT / "docs" / "performance.md"
SCENARIOS = ("reference", "ramp", "naive", "disk", "pynwb", "finalize")
PROBE_STEPS = (1, 2, 4, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48)
CLK_TCK = os.sysconf("SC_CLK_TCK")
SIM_BEHIND_LIMIT_S = 0.25
"""A ramp step fails if the simulator ran this much later than its real-time schedule."""
BACKLOG_LIMIT_MS = 500.0
"""A ramp step fails if p99 publish->receive exceeds this: the receiver is not keeping up."""
QUIET_LIMIT_PCT = 25.0
"""Before each run, wait until the machine uses less than this (% of one core) for 3 s."""
RSS_LIMIT_MB = 4096
"""A run is cut short if any watched process grows past this: a receiver that falls far behind makes
the simulator's send queues (100k messages per stream) grow without bound."""
SETTLE_S = 2.0
"""Seconds after RECORD starts before CPU and RSS are measured (files being created)."""


# -- processes: CPU and memory from /proc ------------------------------------------------------------
def cpu_ticks(pid: int) -> int | None:
    """utime + stime of a process, in clock ticks; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])


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


# -- rig configs ----------------------------------------------------------------------------------
def rig_file(raw: dict, workdir: Path, name: str, daemon: dict | None = None) -> Path:
    """Write a rig with ipc endpoints under ``workdir``, its data root there and any free control port.

    ``daemon`` overrides daemon settings (``--flush-interval``)."""
    raw = copy.deepcopy(raw)
    ipc = workdir / "ipc"
    ipc.mkdir(parents=True, exist_ok=True)
    raw["daemon"].update(data_root=str(workdir / "data"), control={"host": "127.0.0.1", "port": 0}, **(daemon or {}))
    for s in raw["streams"]:
        s["endpoint"] = f"ipc://{ipc}/{s['name']}"
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def probe_rig(n: int, compression: str) -> dict:
    """``n`` copies of the bench rig's probe; probe0 is the reference clock."""
    base = yaml.safe_load(BENCH_RIG.read_text())
    probe = next(s for s in base["streams"] if s["name"] == "probe0")
    streams = [{**probe, "name": f"probe{i}", "compression": compression} for i in range(n)]
    return {"daemon": base["daemon"], "reference": "probe0", "metadata": base["metadata"], "streams": streams}


def rig_mb_per_s(raw: dict) -> float:
    total = 0.0
    for s in raw["streams"]:
        total += float(np.prod(s["shape"])) * np.dtype(s["dtype"]).itemsize * float(s["rate"])
    return total / 1e6


# -- reading what was recorded --------------------------------------------------------------------
def read_session(folder: Path) -> dict[str, dict]:
    """Per stream (all part files): the /index rows, gap and reject counts, bytes received and on disk."""
    out: dict[str, dict] = {}
    for path in sorted((folder / "streams").glob("*.h5")):
        with open_for_read(path) as f:
            name = str(f.attrs["stream"])
            s = out.setdefault(name, {"index": [], "gaps": 0, "rejected": 0, "file_bytes": 0, "sample_bytes": 0,
                                      "rate": json.loads(f.attrs["stream_config"])["rate"]})
            s["index"].append(f["index"][:])
            s["gaps"] += int(f["gaps"].shape[0])
            s["rejected"] += int(f["rejects"].shape[0])
            s["file_bytes"] += path.stat().st_size
            d = f["data"]
            s["sample_bytes"] = int(np.prod(d.shape[1:])) * d.dtype.itemsize
    for s in out.values():
        s["index"] = np.concatenate(s["index"])
    return out


def stream_metrics(index: np.ndarray, rate: float, sample_bytes: int, window_s: float) -> dict:
    """Loss, rate and latency of one stream from its index rows (acqd's /index or the naive receiver's)."""
    if len(index) == 0:
        return {"messages": 0, "missing": 0, "mb_per_s": 0.0, "recv_ms": np.empty(0), "commit_ms": np.empty(0),
                "behind_s": 0.0, "stall_s": 0.0}
    seq = index["seq"].astype(np.int64)
    missing = int(seq.max() - seq.min() + 1 - len(np.unique(seq)))
    dev = index["device_time_ns"].astype(np.int64)
    recv_ms = (index["host_wall_ns"].astype(np.int64) - dev) / 1e6
    commit_ms = ((index["committed_wall_ns"].astype(np.int64) - dev) / 1e6
                 if "committed_wall_ns" in index.dtype.names else np.empty(0))
    # The simulator stamps each message with its send time; on schedule, send time follows the sample counter.
    order = np.argsort(seq)
    first = index["first_sample"][order].astype(np.int64)
    lag = (dev[order] - dev[order][0]) / 1e9 - (first - first[0]) / rate
    nbytes = int(index["n_samples"].astype(np.int64).sum()) * sample_bytes
    # Bytes over the span in which they arrived: a drained backlog must not count as extra throughput.
    wall = index["host_wall_ns"].astype(np.int64)
    span_s = (wall.max() - wall.min()) / 1e9 + int(index["n_samples"][order[-1]]) / rate
    return {"messages": int(len(index)), "missing": missing, "mb_per_s": nbytes / min(span_s, window_s) / 1e6,
            "recv_ms": recv_ms, "commit_ms": commit_ms,
            # Behind = still late at the end of the window; a stall it recovered from is reported apart.
            "behind_s": float(np.median(lag[-50:]) - lag.min()), "stall_s": float(lag.max() - lag.min())}


def pct(a: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(a, q)), 1) if len(a) else None


def summarize_streams(streams: dict[str, dict], window_s: float) -> dict:
    """Totals over every stream, plus a row per stream."""
    per, recv, commit = {}, [], []
    lost = rejected = 0
    behind = stall = 0.0
    for name, s in streams.items():
        m = stream_metrics(s["index"], s["rate"], s["sample_bytes"], window_s)
        recv.append(m["recv_ms"])
        commit.append(m["commit_ms"])
        lost += m["missing"] + s.get("gaps", 0)
        rejected += s.get("rejected", 0)
        behind, stall = max(behind, m["behind_s"]), max(stall, m["stall_s"])
        per[name] = {"messages": m["messages"], "lost": m["missing"] + s.get("gaps", 0),
                     "rejected": s.get("rejected", 0), "mb_per_s": round(m["mb_per_s"], 2),
                     "file_mb": round(s.get("file_bytes", 0) / 1e6, 1),
                     "recv_p99_ms": pct(m["recv_ms"], 99), "commit_p50_ms": pct(m["commit_ms"], 50),
                     "commit_p99_ms": pct(m["commit_ms"], 99), "sim_behind_s": round(m["behind_s"], 3),
                     "sim_stall_s": round(m["stall_s"], 3)}
    recv_all, commit_all = np.concatenate(recv), np.concatenate(commit)
    return {"lost": lost, "rejected": rejected, "mb_per_s": round(sum(p["mb_per_s"] for p in per.values()), 1),
            "recv_p50_ms": pct(recv_all, 50), "recv_p99_ms": pct(recv_all, 99),
            "commit_p50_ms": pct(commit_all, 50), "commit_p99_ms": pct(commit_all, 99),
            "commit_max_ms": round(float(commit_all.max()), 1) if len(commit_all) else None,
            "sim_behind_s": round(behind, 3), "sim_stall_s": round(stall, 3), "streams": per}


# -- running the daemon and the simulated rig -----------------------------------------------------
def record(config: Path, workdir: Path, seconds: float, sample_s: float, quiet_wait_s: float,
           rss_limit_mb: int = RSS_LIMIT_MB) -> dict:
    """Daemon + simulator: ACQUIRE, RECORD for ``seconds``, stop. Returns measurements; the session stays."""
    quiet = wait_quiet(quiet_wait_s)
    daemon = Daemon(config, workdir / "data", workdir)
    sim = None
    try:
        daemon.command("acquire")
        sim = Simulator(config, seconds + 900, timeout_s=300)
        wait_until(lambda: not daemon.command("preflight")["problems"], "every stream to deliver data", 120, 0.5)
        started = daemon.command("record", session=f"bench-{time.strftime('%H%M%S')}")
        folder = Path(started["session"]["path"])
        writers = {f"writer:{n}": s["pid"] for n, s in started["streams"].items() if s["pid"]}
        time.sleep(SETTLE_S)
        pids = {"supervisor": daemon.pid, **writers, "simulator": sim.proc.pid}
        with ProcWatch(pids, sample_s, rss_limit_mb) as watch:
            watch.sleep(seconds)
        status = daemon.command("status")
        daemon.command("stop")
        daemon.command("stop", idle=True)
    finally:
        if sim is not None:
            sim.stop()
        daemon.stop()
    cpu = watch.cpu_pct()
    acqd_cpu = sum(v or 0.0 for k, v in cpu.items() if is_acqd(k))
    return {"folder": folder, "window_s": round(watch.seconds + SETTLE_S, 2), "cpu_pct": cpu,
            "acqd_cpu_pct": round(acqd_cpu, 1), "acqd_cpu_per_30s": watch.acqd_cpu_timeline(), "sim_cpu_pct": cpu["simulator"], "others_cpu_pct": watch.others_pct(),
            "quiet_before": quiet, "rss": watch.rss_summary(),
            "error": watch.overflow, "status_gaps": sum(s["gaps"] for s in status["streams"].values()),
            "status_rejected": sum(s["rejected"] for s in status["streams"].values()),
            "writers_failed": [n for n, s in status["streams"].items() if s["state"] != "recording"]}


def measure_session(config: Path, workdir: Path, seconds: float, args: argparse.Namespace) -> dict:
    """``record`` plus what the files say; the session folder is deleted unless ``--keep``."""
    run = record(config, workdir, seconds, args.sample_s, args.quiet_wait, args.rss_limit_mb)
    keep = args.keep
    folder = run.pop("folder")
    try:
        files = summarize_streams(read_session(folder), run["window_s"])
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    run.update(files)
    run["lost"] = max(files["lost"], run["status_gaps"])
    run["rejected"] = max(files["rejected"], run["status_rejected"])
    return run


def keeps_up(run: dict) -> list[str]:
    """Why a ramp step does not count as sustained (empty: it does)."""
    why = []
    if run.get("error"):
        why.append(run["error"])
    if run.get("lost"):
        why.append(f"{run['lost']} messages lost")
    if run.get("rejected"):
        why.append(f"{run['rejected']} rejected")
    if run.get("writers_failed"):
        why.append(f"writers not recording: {', '.join(run['writers_failed'])}")
    if (run.get("sim_behind_s") or 0) > SIM_BEHIND_LIMIT_S:
        why.append(f"simulator {run['sim_behind_s']:.2f} s behind real time")
    if (run.get("recv_p99_ms") or 0) > BACKLOG_LIMIT_MS:
        why.append(f"receiver backlog (p99 publish->receive {run['recv_p99_ms']:.0f} ms)")
    return why


# -- scenarios --------------------------------------------------------------------------------------
def scenario_reference(args: argparse.Namespace, workdir: Path) -> dict:
    raw = yaml.safe_load(BENCH_RIG.read_text())
    need = rig_mb_per_s(raw) * 1e6 * (args.seconds + 30) * 1.1
    free = shutil.disk_usage(workdir).free
    if free < need + (5 << 30):
        return {"skipped": f"needs {need / 1e9:.0f} GB of disk, {free / 1e9:.0f} GB free"}
    config = rig_file(raw, workdir, "bench-rig", args.daemon)
    runs = []
    for i in range(args.repeat_reference):
        log(f"reference rig: run {i + 1}/{args.repeat_reference}, {args.seconds:.0f} s")
        runs.append(measure_session(config, workdir, args.seconds, args))
        log(f"  lost {runs[-1]['lost']}, acqd CPU {runs[-1]['acqd_cpu_pct']}%, "
            f"p99 publish->flushed {runs[-1]['commit_p99_ms']} ms, {runs[-1]['mb_per_s']} MB/s; "
            f"acqd CPU per 30 s: {runs[-1]['acqd_cpu_per_30s']}")
    return {"seconds": args.seconds, "rig_mb_per_s": round(rig_mb_per_s(raw), 1), "runs": runs,
            "median": medians(runs, ("lost", "rejected", "acqd_cpu_pct", "sim_cpu_pct", "others_cpu_pct", "mb_per_s",
                                     "commit_p50_ms", "commit_p99_ms", "recv_p50_ms", "recv_p99_ms"))}


def acqd_step(n: int, compression: str, args: argparse.Namespace, workdir: Path) -> dict:
    """One ramp step: ``n`` probes into acqd for ``--step-seconds``."""
    raw = probe_rig(n, compression)
    try:
        run = measure_session(rig_file(raw, workdir, f"ramp-{n}", args.daemon), workdir, args.step_seconds, args)
    except (RuntimeError, TimeoutError, OSError) as e:
        run = {"error": f"{type(e).__name__}: {e}"}
    run.pop("rss", None)
    return {"probes": n, "offered_mb_per_s": round(rig_mb_per_s(raw), 1), **run}


def naive_step(n: int, args: argparse.Namespace, workdir: Path) -> dict:
    """One ramp step: ``n`` probes into the naive single-process receiver."""
    raw = probe_rig(n, "none")
    config = rig_file(raw, workdir, f"naive-{n}")
    out = workdir / f"naive-{n}"
    out.mkdir(exist_ok=True)
    result_file = workdir / f"naive-{n}.json"
    result_file.unlink(missing_ok=True)  # an earlier run's result must never be read as this one's
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_baselines.py"), "naive", "--out-dir", str(out),
           "--seconds", str(args.step_seconds), "--result", str(result_file)]
    for s in yaml.safe_load(config.read_text())["streams"]:
        cmd += ["--endpoint", s["endpoint"]]
    quiet = wait_quiet(args.quiet_wait)
    receiver = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    sim = None
    try:
        sim = Simulator(config, args.step_seconds + 900, timeout_s=300)
        with ProcWatch({"receiver": receiver.pid, "simulator": sim.proc.pid}, args.sample_s,
                       args.rss_limit_mb) as watch:
            wait_until(lambda: result_file.exists() or receiver.poll() is not None or watch.overflow,
                       "the naive receiver", args.step_seconds + 120, 0.2)
        if watch.overflow:
            return {"probes": n, "offered_mb_per_s": round(rig_mb_per_s(raw), 1), "error": watch.overflow}
        result = json.loads(result_file.read_text())
    except (RuntimeError, OSError, TimeoutError, ValueError) as e:
        return {"probes": n, "offered_mb_per_s": round(rig_mb_per_s(raw), 1), "error": f"{type(e).__name__}: {e}"}
    finally:
        stop_process(receiver)
        if sim is not None:
            sim.stop()
        shutil.rmtree(out, ignore_errors=True)
    streams = {name: {"index": np.array([tuple(r) for r in rows], dtype=baselines.INDEX_FIELDS),
                      "rate": 30000.0, "sample_bytes": 385 * 2} for name, rows in result["streams"].items()}
    run = summarize_streams(streams, result["wall_s"])
    if len(streams) < n:
        run["error"] = f"only {len(streams)} of {n} streams arrived"
    return {"probes": n, "offered_mb_per_s": round(rig_mb_per_s(raw), 1), **run,
            "receiver_cpu_pct": round(100 * result["cpu_s"] / max(result["wall_s"], 1e-9), 1),
            "sim_cpu_pct": watch.cpu_pct()["simulator"], "others_cpu_pct": watch.others_pct(), "quiet_before": quiet,
            "receiver_rss_mb": round(result["max_rss_kb"] / 1024, 1)}


def ramp(step, args: argparse.Namespace, label: str) -> dict:
    """Run ``step(n)`` for growing probe counts until one does not keep up; repeated ``--repeat`` times."""
    runs = []
    for i in range(args.repeat):
        steps = []
        for n in [k for k in PROBE_STEPS if k <= args.max_probes]:
            log(f"{label}: run {i + 1}/{args.repeat}, {n} probes, {args.step_seconds:.0f} s")
            r = step(n)
            r["keeps_up"] = not (why := keeps_up(r))
            r["why_not"] = why
            r.pop("streams", None)
            steps.append(r)
            cpu = r.get("acqd_cpu_pct", r.get("receiver_cpu_pct"))
            log(f"  {r.get('mb_per_s', 0)} MB/s, acqd/receiver CPU {cpu}%, simulator CPU {r.get('sim_cpu_pct')}%, "
                f"others {r.get('others_cpu_pct')}%: {'; '.join(why) or 'keeps up'}")
            if why:
                break
        ok = [s for s in steps if s["keeps_up"]]
        runs.append({"steps": steps, "max_ok_mb_per_s": max((s["mb_per_s"] for s in ok), default=0.0),
                     "max_ok_probes": max((s["probes"] for s in ok), default=0),
                     "first_failure": None if steps[-1]["keeps_up"] else
                     {"probes": steps[-1]["probes"], "why": steps[-1]["why_not"]}})
    return {"step_seconds": args.step_seconds, "runs": runs,
            "median": medians(runs, ("max_ok_mb_per_s", "max_ok_probes"))}


def scenario_ramp(args: argparse.Namespace, workdir: Path) -> dict:
    return {c: ramp(lambda n, c=c: acqd_step(n, c, args, workdir), args, f"ramp acqd ({c})")
            for c in args.ramp_compression}


def scenario_naive(args: argparse.Namespace, workdir: Path) -> dict:
    return ramp(lambda n: naive_step(n, args, workdir), args, "ramp naive receiver")


def scenario_disk(args: argparse.Namespace, workdir: Path) -> dict:
    runs = []
    for i in range(args.repeat):
        log(f"disk: run {i + 1}/{args.repeat}, {args.disk_gib:g} GiB with fdatasync")
        quiet = wait_quiet(args.quiet_wait)
        runs.append({**baselines.disk_write(workdir / "disk.bin", args.disk_gib), "quiet_before": quiet})
        log(f"  {runs[-1]['mb_per_s']} MB/s")
    return {"gib": args.disk_gib, "runs": runs, "median": medians(runs, ("mb_per_s",))}


def scenario_pynwb(args: argparse.Namespace, workdir: Path) -> dict:
    runs = []
    for i in range(args.repeat):
        log(f"pynwb: run {i + 1}/{args.repeat}, {args.pynwb_gib:g} GiB through DataChunkIterator")
        quiet = wait_quiet(args.quiet_wait)
        runs.append({**baselines.pynwb_write(workdir, args.pynwb_gib), "quiet_before": quiet})
        log(f"  {runs[-1]['mb_per_s']} MB/s")
    return {"gib": args.pynwb_gib, "runs": runs, "median": medians(runs, ("mb_per_s",))}


def finalize_help() -> str | None:
    """``acqd finalize --help`` output, or None if there is no such command."""
    try:
        proc = subprocess.run([sys.executable, "-m", "acqd.cli", "finalize", "--help"], capture_output=True,
                              text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None
    return proc.stdout if proc.returncode == 0 else None


def time_finalize(folder: Path, timeout_s: float, jsonl: bool) -> dict:
    """Wall time of ``acqd finalize FOLDER``; with ``--progress-jsonl``, also when each stage started."""
    cmd = [sys.executable, "-m", "acqd.cli", "finalize", str(folder), *(["--progress-jsonl"] if jsonl else [])]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    stages: dict[str, float] = {}
    try:
        deadline = t0 + timeout_s
        while True:  # until stdout closes (the process exited) or the deadline
            left = deadline - time.perf_counter()
            if left <= 0:
                raise subprocess.TimeoutExpired(cmd, timeout_s)
            if not select.select([proc.stdout], [], [], min(left, 1.0))[0]:
                continue
            line = proc.stdout.readline()
            if not line:
                break
            try:
                stage = json.loads(line).get("stage")
            except ValueError:
                continue
            if stage and stage not in stages:
                stages[stage] = round(time.perf_counter() - t0, 2)
        rc = proc.wait(max(1.0, deadline - time.perf_counter()))
    finally:
        stop_process(proc)
    stderr = proc.stderr.read() if proc.stderr else ""
    return {"seconds": round(time.perf_counter() - t0, 2), "returncode": rc, "stage_started_s": stages,
            "stderr_tail": stderr[-500:] if rc else ""}


def scenario_finalize(args: argparse.Namespace, workdir: Path) -> dict:
    help_text = finalize_help()
    if help_text is None:
        return {"skipped": "`acqd finalize` does not exist yet (`acqd finalize --help` fails)"}
    config = rig_file(yaml.safe_load(BENCH_RIG.read_text()), workdir, "bench-rig", args.daemon)
    runs = []
    for i in range(args.repeat_finalize):
        run = {}
        for label, seconds in (("1x", args.finalize_seconds), ("10x", 10 * args.finalize_seconds)):
            log(f"finalize: run {i + 1}/{args.repeat_finalize}, {label} session ({seconds:.0f} s recorded)")
            rec = record(config, workdir, seconds, args.sample_s, args.quiet_wait, args.rss_limit_mb)
            try:
                run[label] = time_finalize(rec["folder"], 120 + 10 * seconds, "--progress-jsonl" in help_text)
            finally:
                if not args.keep:
                    from acqd.finalize import unseal_session  # finalized files are immutable (chattr +i)

                    unseal_session(Path(rec["folder"]))
                    shutil.rmtree(rec["folder"], ignore_errors=True)
            log(f"  {run[label]['seconds']} s (exit {run[label]['returncode']})")
        run["ratio"] = round(run["10x"]["seconds"] / max(run["1x"]["seconds"], 1e-9), 2)
        runs.append(run)
    return {"seconds_1x": args.finalize_seconds, "runs": runs,
            "median": {"1x_s": med([r["1x"]["seconds"] for r in runs]),
                       "10x_s": med([r["10x"]["seconds"] for r in runs]), "ratio": med([r["ratio"] for r in runs])}}


# -- results ----------------------------------------------------------------------------------------
def med(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 2) if values else None


def medians(runs: list[dict], keys: tuple[str, ...]) -> dict:
    return {k: med([r.get(k) for r in runs]) for k in keys}


def machine_info(workdir: Path) -> dict:
    import h5py
    import hdf5plugin
    import pynwb
    import zmq

    mem_kb = int(next(ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
                      if ln.startswith("MemTotal")))
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return {"nproc": os.cpu_count(), "memory_gib": round(mem_kb / (1 << 20), 1), "cpu": cpu,
            "kernel": platform.release(), "disk_free_gb": round(shutil.disk_usage(workdir).free / 1e9, 1),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "numpy": np.__version__, "h5py": h5py.version.version,
            "hdf5": h5py.version.hdf5_version, "hdf5plugin": hdf5plugin.version, "pyzmq": zmq.__version__,
            "libzmq": zmq.zmq_version(), "pynwb": pynwb.__version__}


def code_fingerprint() -> str:
    """A short hash of the acqd package the subprocesses import: other people edit it while a run goes on."""
    import hashlib

    out = subprocess.run([sys.executable, "-c", "import acqd; print(acqd.__path__[0])"], capture_output=True,
                         text=True, timeout=60).stdout.strip()
    h = hashlib.sha256()
    for path in sorted(Path(out).rglob("*.py")):
        h.update(path.read_bytes())
    return f"{out} sha256:{h.hexdigest()[:12]}"


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def targets(res: dict) -> list[dict]:
    """Every figure the issue sets a target for: value (median of runs), target, met or not."""
    rows = []
    ref = res.get("reference", {})
    if ref.get("median"):
        m, n = ref["median"], len(ref["runs"])
        rows.append(row("reference rig: messages lost + rejected", (m["lost"] or 0) + (m["rejected"] or 0), n,
                        "0", lambda v: v == 0))
        rows.append(row("reference rig: acqd CPU (supervisor + writers), % of one core", m["acqd_cpu_pct"], n,
                        "<= 50", lambda v: v <= 50))
        growth = [max((v["growth_mb"] for k, v in r["rss"].items() if k.startswith("writer:")), default=0)
                  for r in ref["runs"]]
        rows.append(row("reference rig: largest writer RSS growth, first vs last minute (MB)", med(growth), n,
                        "flat (<= 5)", lambda v: v <= 5))
        rows.append(row("reference rig: publish->flushed p50 (ms)", m["commit_p50_ms"], n, "-", None))
        rows.append(row("reference rig: publish->flushed p99 (ms)", m["commit_p99_ms"], n, "<= 1000",
                        lambda v: v <= 1000))
        rows.append(row("reference rig: MB/s recorded (all streams)", m["mb_per_s"], n,
                        f"{ref['rig_mb_per_s']} offered",
                        None))
        rows.append(row("reference rig: simulator CPU, % of one core (not acqd)", m["sim_cpu_pct"], n, "-", None))
        rows.append(row("reference rig: other processes' CPU in the window, % of one core", m["others_cpu_pct"], n,
                        "-", None))

    def best(r: dict) -> tuple[float | None, int]:
        return r.get("median", {}).get("max_ok_mb_per_s"), len(r.get("runs", []))

    acqd, n_acqd = best(res.get("ramp", {}).get("none", {}))
    naive, n_naive = best(res.get("naive", {}))
    for comp, r in res.get("ramp", {}).items():
        rows.append(row(f"highest sustained ingest, acqd, {comp} (MB/s)", *best(r), "-", None))
    if "naive" in res:
        rows.append(row("highest sustained ingest, naive receiver (MB/s)", naive, n_naive, "-", None))
    disk = res.get("disk", {}).get("median", {}).get("mb_per_s")
    pyn = res.get("pynwb", {}).get("median", {}).get("mb_per_s")
    if disk is not None:
        rows.append(row("disk sequential write with fdatasync (MB/s)", disk, len(res["disk"]["runs"]), "-", None))
    if pyn is not None:
        rows.append(row("pynwb DataChunkIterator, file to file (MB/s)", pyn, len(res["pynwb"]["runs"]), "-", None))
    if acqd is not None and naive:
        rows.append(row("acqd / naive receiver", ratio(acqd, naive), n_acqd, ">= 1.0", lambda v: v >= 1.0))
    if acqd is not None and disk:
        rows.append(row("acqd / disk fdatasync rate", ratio(acqd, disk), n_acqd, ">= 0.7", lambda v: v >= 0.7))
    if acqd is not None and pyn:
        rows.append(row("acqd / pynwb DataChunkIterator", ratio(acqd, pyn), n_acqd, "-", None))
    fin = res.get("finalize", {})
    if fin.get("skipped"):
        rows.append({"figure": "finalize 10x / 1x time", "value": "skipped: " + fin["skipped"], "runs": 0,
                     "target": "<= 1.2", "met": None})
    elif fin.get("median"):
        n = len(fin["runs"])
        rows.append(row(f"finalize 1x session ({fin['seconds_1x']:.0f} s recorded) (s)", fin["median"]["1x_s"], n,
                        "-", None))
        rows.append(row(f"finalize 10x session ({10 * fin['seconds_1x']:.0f} s recorded) (s)", fin["median"]["10x_s"],
                        n, "-", None))
        rows.append(row("finalize 10x / 1x time", fin["median"]["ratio"], n, "<= 1.2", lambda v: v <= 1.2))
    return rows


def row(figure: str, value, runs: int, target: str, test) -> dict:
    met = None if test is None or value is None else bool(test(value))
    return {"figure": figure, "value": value, "runs": runs, "target": target, "met": met}


def markdown(res: dict) -> str:
    lines = ["| figure | value (median) | runs | target | met |", "|---|---|---|---|---|"]
    for t in res["targets"]:
        met = {True: "yes", False: "**no**", None: ""}[t["met"]]
        lines.append(f"| {t['figure']} | {t['value']} | {t['runs']} | {t['target']} | {met} |")
    ref = res.get("reference", {})
    for i, r in enumerate(ref.get("runs", [])):
        if r.get("error"):
            lines += ["", f"Reference rig run {i + 1} was cut short: {r['error']}."]
    if ref.get("skipped"):
        lines += ["", f"Reference rig skipped: {ref['skipped']}."]
    if ref.get("runs"):
        last = ref["runs"][-1]
        lines += ["", f"Reference rig, per stream (last run, {ref['seconds']:.0f} s, "
                      f"offered {ref['rig_mb_per_s']} MB/s):",
                  "", "| stream | MB/s | file MB | lost | rejected | publish->flushed p50 / p99 ms | writer CPU % "
                      "| writer RSS first -> last min, peak (MB) |", "|---|---|---|---|---|---|---|---|"]
        for name, s in last["streams"].items():
            rss = last["rss"].get(f"writer:{name}", {})
            lines.append(f"| {name} | {s['mb_per_s']} | {s['file_mb']} | {s['lost']} | {s['rejected']} | "
                         f"{s['commit_p50_ms']} / {s['commit_p99_ms']} | {last['cpu_pct'].get(f'writer:{name}')} | "
                         f"{rss.get('first_mb')} -> {rss.get('last_mb')}, {rss.get('peak_mb')} |")
        for k in ("supervisor", "simulator"):
            rss = last["rss"].get(k, {})
            lines.append(f"| ({k}) | | | | | | {last['cpu_pct'].get(k)} | "
                         f"{rss.get('first_mb')} -> {rss.get('last_mb')}, {rss.get('peak_mb')} |")
    for label, r in [*((f"acqd, {c}", v) for c, v in res.get("ramp", {}).items()),
                     *([("naive receiver", res["naive"])] if "naive" in res else [])]:
        lines += ["", f"Ramp, {label} ({r['step_seconds']:.0f} s per step): probes -> MB/s "
                      "(receiver CPU %, simulator CPU %)", ""]
        for i, run in enumerate(r["runs"]):
            steps = ", ".join(
                f"{s['probes']}: {s.get('mb_per_s', '-')} ({s.get('acqd_cpu_pct', s.get('receiver_cpu_pct'))}, "
                f"{s.get('sim_cpu_pct')})" + ("" if s["keeps_up"] else " **" + "; ".join(s["why_not"]) + "**")
                for s in run["steps"])
            lines.append(f"- run {i + 1}: {steps}")
    return "\n".join(lines)


def write_doc(path: Path, res: dict) -> None:
    """Replace the generated block of the performance doc (hand-written analysis outside it is kept)."""
    begin, end = "<!-- bench:begin (generated by scripts/bench; edits inside are overwritten) -->", "<!-- bench:end -->"
    m = res["machine"]
    block = "\n".join([
        begin, "",
        f"Run {res['started']} with `{res['command']}` ({res['elapsed_s'] / 60:.0f} min), acqd "
        f"`{res['acqd_at_start']}`" + ("" if res["acqd_at_end"] == res["acqd_at_start"] else
                                       f" (changed during the run: `{res['acqd_at_end']}` at the end)") + "."
        + "".join(f" Then {', '.join(u['scenarios'])} rerun {u['started']} with `{u['command']}`, acqd "
                  f"`{u['acqd']}`." for u in res.get("updates", [])), "",
        f"Machine: {m['nproc']} cores ({m['cpu']}), {m['memory_gib']} GiB, kernel {m['kernel']}, "
        f"{m['disk_free_gb']} GB disk free, load average at start {m['load_avg_at_start']}; "
        f"Python {m['python']}, numpy {m['numpy']}, h5py {m['h5py']}, HDF5 {m['hdf5']}, hdf5plugin {m['hdf5plugin']}, "
        f"pyzmq {m['pyzmq']} (libzmq {m['libzmq']}), pynwb {m['pynwb']}.", "",
        markdown(res), "", end])
    text = path.read_text() if path.exists() else (
        "# Performance\n\n" + begin + "\n" + end + "\n\n## How to rerun\n\n```sh\nmake bench\n```\n")
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text += "\n" + block + "\n"
    path.write_text(text)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def to_json(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(type(obj))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short windows (30 s reference, 10 s ramp steps), 1 run")
    p.add_argument("--repeat", type=int, help="runs per scenario; medians are reported (default 3, quick 1)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated subset of {','.join(SCENARIOS)}")
    p.add_argument("--seconds", type=float, help="reference rig recording length (default 300, quick 30)")
    p.add_argument("--repeat-reference", type=int, help="runs of the reference rig (default: --repeat)")
    p.add_argument("--repeat-finalize", type=int, help="runs of the finalize scenario (default: --repeat)")
    p.add_argument("--flush-interval", type=float, help="override daemon.flush_interval_s of the bench rigs")
    p.add_argument("--step-seconds", type=float, help="recording length of each ramp step (default 20, quick 10)")
    p.add_argument("--max-probes", type=int, default=48, help="stop the ramp here")
    p.add_argument("--ramp-compression", default="none,blosc-lz4", help="compression variants of the acqd ramp")
    p.add_argument("--disk-gib", type=float, default=4.0,
                   help="size of the disk write baseline (>= 4 to beat the page cache)")
    p.add_argument("--pynwb-gib", type=float, help="data written by the pynwb baseline (default 2, quick 0.5)")
    p.add_argument("--finalize-seconds", type=float,
                   help="recording length of the 1x finalize session (default 10, quick 5)")
    p.add_argument("--sample-s", type=float, default=2.0, help="RSS sampling period")
    p.add_argument("--rss-limit-mb", type=int, default=RSS_LIMIT_MB,
                   help="cut a run short when a process (e.g. the simulator's send queues) grows past this")
    p.add_argument("--quiet-wait", type=float, default=120.0,
                   help="before each run, wait up to this long for other processes to quieten")
    p.add_argument("--workdir", help="where sockets and recordings go (default a fresh folder under bench-data/)")
    p.add_argument("--keep", action="store_true", help="keep the recorded sessions")
    p.add_argument("--acqd", help="run the daemon, writers and simulator from the acqd package in this folder "
                                  "(a prototype copy) instead of the installed one")
    p.add_argument("--out", help="write the JSON result here too")
    p.add_argument("--doc", help="performance doc to update (default docs/performance.md; quick runs: none)")
    p.add_argument("--no-doc", action="store_true", help="do not update any doc")
    p.add_argument("--update", metavar="JSON", help="an earlier --out result: rerun only --scenarios into it "
                                                    "(the rest is kept) and write the doc from the whole")
    a = p.parse_args(argv)
    q = a.quick
    a.repeat = a.repeat or (1 if q else 3)
    a.repeat_reference = a.repeat_reference or a.repeat
    a.repeat_finalize = a.repeat_finalize or a.repeat
    a.daemon = {"flush_interval_s": a.flush_interval} if a.flush_interval else {}
    a.seconds = a.seconds or (30.0 if q else 300.0)
    a.step_seconds = a.step_seconds or (10.0 if q else 20.0)
    a.pynwb_gib = a.pynwb_gib or (0.5 if q else 2.0)
    a.finalize_seconds = a.finalize_seconds or (5.0 if q else 10.0)
    a.ramp_compression = [c for c in a.ramp_compression.split(",") if c]
    a.scenarios = [s for s in a.scenarios.split(",") if s]
    unknown = set(a.scenarios) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    a.doc = None if a.no_doc else Path(a.doc) if a.doc else (None if q else DOC)
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.acqd:  # every subprocess (daemon, writers, simulator, receiver) imports acqd from there
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(args.acqd).resolve()),
                                                                  os.environ.get("PYTHONPATH")]))
        args.out = args.out and str(Path(args.out).resolve())
        args.doc = args.doc and Path(args.doc).resolve()
        os.chdir(tempfile.gettempdir())  # `python -m` puts the working directory first: not the repo's acqd
    started, t0 = datetime.now(timezone.utc), time.monotonic()
    (ROOT / "bench-data").mkdir(exist_ok=True)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="run-", dir=ROOT / "bench-data"))
    workdir.mkdir(parents=True, exist_ok=True)
    res: dict = {"started": started.isoformat(timespec="seconds"),
                 "command": "scripts/bench " + " ".join(sys.argv[1:] if argv is None else argv),
                 "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                 "machine": machine_info(workdir),
                 "acqd_at_start": code_fingerprint()}
    update = None
    if args.update:  # rerun some scenarios into an earlier result: the rest of it is kept as it was
        update = {"started": res["started"], "command": res["command"], "scenarios": args.scenarios,
                  "acqd": res["acqd_at_start"]}
        res = json.loads(Path(args.update).read_text())
        res["updates"] = [*res.get("updates", []), update]
    runners = {"reference": scenario_reference, "ramp": scenario_ramp, "naive": scenario_naive,
               "disk": scenario_disk, "pynwb": scenario_pynwb, "finalize": scenario_finalize}
    try:
        for name in SCENARIOS:
            if name in args.scenarios:
                res[name] = runners[name](args, workdir)
                if args.out:  # what is done survives a run that is stopped halfway
                    Path(args.out).write_text(json.dumps(res, indent=1, default=to_json))
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if update is None:
        res["elapsed_s"] = round(time.monotonic() - t0, 1)
        res["acqd_at_end"] = code_fingerprint()
    else:
        update["elapsed_s"] = round(time.monotonic() - t0, 1)
    res["targets"] = targets(res)
    text = json.dumps(res, indent=1, default=to_json)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    print("\n" + markdown(res))
    if args.doc:
        write_doc(args.doc, res)
        log(f"updated {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
