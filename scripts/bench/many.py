"""Scenario many: the reference rig plus N slow streams, N = 8, 32, 96 in the same run (issue 27).

Each slow stream is 4 x float32 at 1 kHz (16 kB/s, 100 messages/s), alternately SUB and PULL, every other pair
with its own sync edges (frame sync) and the rest timed by host receive time; by default they share the group
writer ``slow`` (acqd.record.group). For each N, ``--repeat`` runs, the N's alternating within each run so that
all see the same machine. Per run:

- ACQUIRE: from the command until every stream's writer is ready (connected; the simulated drivers start
  right after, as PUSH drivers block until acqd's PULL sockets exist), and RECORD: from the command until every stream reports ``recording``; stop: the command's round trip;
- ``GET /api/status`` every 50 ms from another thread from ACQUIRE to the end: p99 latency;
- over ``--many-seconds`` of RECORD: messages lost + rejected, p99 publish->flushed, acqd CPU (supervisor, every
  writer process once, the hasher) and the PSS of the daemon's whole process tree (smaps_rollup; the simulator is
  not in it).

``--part-seconds`` cuts the reference rig's streams into parts (so that the hasher works in the window), not the
slow streams: they keep the daemon's default parts (600 s; 9.6 MB of a slow stream), as a rig would. Cut every
10 s, 96 slow streams would close ~10 parts a second between them, a load no rig chooses.

The marginal cost of a slow stream is the least-squares slope of acqd CPU and tree PSS over N (medians of the
runs): what one more slow stream costs, with the reference rig's own cost in the intercept.
"""

from __future__ import annotations

import argparse
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import yaml

from acqd.service.procs import Daemon, Simulator, wait_until
from bench.common import BENCH_METADATA, BENCH_RIG, log, med
from bench.procwatch import CLK_TCK, ProcWatch, children_running, cpu_ticks, is_acqd, wait_quiet
from bench.session import SETTLE_S, read_session, rig_file, summarize_streams, writer_pids

SLOW_STEPS = (8, 32, 96)
GOAL_CPU_PCT, GOAL_PSS_MB = 0.3, 5.0
GOAL_ACQUIRE_S, GOAL_MODE_S, GOAL_STATUS_MS = 5.0, 2.0, 50.0
STATUS_EVERY_S = 0.05


def many_rig(n: int, reference_overrides: dict | None = None) -> dict:
    """The bench rig, each of its streams with ``reference_overrides`` (``--part-seconds``), plus ``n`` slow streams
    like its ``eye`` (4 x float32 at 1 kHz) with the daemon's default parts."""
    raw = yaml.safe_load(BENCH_RIG.read_text())
    eye = next(s for s in raw["streams"] if s["name"] == "eye")
    for s in raw["streams"]:
        s.update(reference_overrides or {})
    for i in range(n):
        synced = (i // 2) % 2 == 0  # SUB+sync, PULL+sync, SUB, PULL, ...
        raw["streams"].append({**eye, "name": f"slow{i:03d}", "socket": "sub" if i % 2 == 0 else "pull",
                               "sync": {"source": "frame"} if synced else None, "required": True})
    return raw


def tree_pids(root: int) -> list[int]:
    """``root`` and every process descending from it."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit():
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += [c for c, p in parent.items() if p == pid]
    return out


def pss_mb(pid: int) -> float:
    """Proportional set size: shared pages (the Python runtime, numpy, h5py) split between the processes sharing
    them, so the sum over a tree is what the tree costs."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class StatusTimer:
    """``GET /api/status`` every STATUS_EVERY_S from its own thread; the latency of each answer."""

    def __init__(self, url: str):
        self.url, self.ms, self.errors = url, [], 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self.done.is_set():
                t = time.perf_counter()
                try:
                    http.get("/api/status").raise_for_status()
                    self.ms.append((time.perf_counter() - t) * 1000)
                except httpx.HTTPError:
                    self.errors += 1
                self.done.wait(STATUS_EVERY_S)

    def __enter__(self) -> StatusTimer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join(40)


def one_run(n: int, args: argparse.Namespace, workdir: Path) -> dict:
    """One recording of the reference rig plus ``n`` slow streams."""
    config = rig_file(many_rig(n, args.stream), workdir, f"many-{n}", args.daemon)
    quiet = wait_quiet(args.quiet_wait)
    daemon = Daemon(config, workdir / "data", workdir)
    sim = None
    try:
        with StatusTimer(daemon.url) as status_timer:
            t = time.monotonic()
            daemon.command("acquire")
            wait_until(lambda: all(s["state"] == "acquiring" for s in daemon.command("status")["streams"].values()),
                       "every writer to be ready", 120, 0.05)
            acquire_s = time.monotonic() - t
            # The simulated drivers start now: a PUSH driver blocks until acqd's PULL socket is there.
            sim = Simulator(config, args.many_seconds + 900, timeout_s=300)
            wait_until(lambda: not daemon.command("preflight")["problems"], "every stream to deliver", 120, 0.5)
            t = time.monotonic()
            started = daemon.command("record", session=f"many-{n}-{time.strftime('%H%M%S')}", metadata=BENCH_METADATA)
            wait_until(lambda: all(s["state"] == "recording" for s in daemon.command("status")["streams"].values()),
                       "every stream to record", 60, 0.05)
            record_s = time.monotonic() - t
            folder = Path(started["session"]["path"])
            time.sleep(SETTLE_S)
            pids = {"supervisor": daemon.pid, **writer_pids(started["streams"]), "simulator": sim.proc.pid}
            with ProcWatch(pids, args.sample_s, args.rss_limit_mb) as watch:
                watch.sleep(args.many_seconds)
                hasher_ticks = sum(cpu_ticks(p) or 0 for p in children_running(daemon.pid, "acqd.finalize.hasher"))
                tree = tree_pids(daemon.pid)
                pss = sum(pss_mb(p) for p in tree)
            status = daemon.command("status")
            t = time.monotonic()
            daemon.command("stop")
            stop_s = time.monotonic() - t
        daemon.command("stop", idle=True)
    finally:
        if sim is not None:
            sim.stop()
        daemon.stop()
    cpu = watch.cpu_pct()
    cpu["hasher"] = round(100 * hasher_ticks / CLK_TCK / watch.seconds, 1)
    files = summarize_streams(read_session(folder), watch.seconds + SETTLE_S)
    if not args.keep:  # 9 runs of the reference rig are ~22 GB: on a tmpfs --workdir, the machine's memory
        shutil.rmtree(folder, ignore_errors=True)
    slow = [v for k, v in files["streams"].items() if k.startswith("slow")]
    lost = max(files["lost"], sum(s["gaps"] for s in status["streams"].values()))
    rejected = max(files["rejected"], sum(s["rejected"] for s in status["streams"].values()))
    ms = np.array(status_timer.ms)
    return {"slow_streams": n, "streams": len(status["streams"]), "processes": len(tree),
            "writer_processes": len(set(pids.values())) - 2, "acquire_s": round(acquire_s, 2),
            "record_s": round(record_s, 2), "stop_s": round(stop_s, 2),
            "status_p99_ms": round(float(np.percentile(ms, 99)), 1) if len(ms) else None,
            "status_max_ms": round(float(ms.max()), 1) if len(ms) else None, "status_errors": status_timer.errors,
            "acqd_cpu_pct": round(sum(v or 0.0 for k, v in cpu.items() if is_acqd(k)), 1), "cpu_pct": cpu,
            "tree_pss_mb": round(pss, 1), "sim_cpu_pct": cpu["simulator"], "others_cpu_pct": watch.others_pct(),
            "lost": lost, "rejected": rejected, "commit_p99_ms": files["commit_p99_ms"],
            "slow_commit_p99_ms": max((s["commit_p99_ms"] or 0 for s in slow), default=None),
            "mb_per_s": files["mb_per_s"], "quiet_before": quiet, "load_avg": [round(x, 2) for x in os.getloadavg()],
            "error": watch.overflow}


def slope(xs: list[int], ys: list[float | None]) -> float | None:
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
    if len(pts) < 2:
        return None
    return round(float(np.polyfit([p[0] for p in pts], [p[1] for p in pts], 1)[0]), 3)


def scenario_many(args: argparse.Namespace, workdir: Path) -> dict:
    runs: dict[int, list[dict]] = {n: [] for n in SLOW_STEPS}
    for i in range(args.repeat):
        for n in SLOW_STEPS:
            log(f"many: run {i + 1}/{args.repeat}, reference rig + {n} slow streams, {args.many_seconds:.0f} s")
            try:
                r = one_run(n, args, workdir)
            except (RuntimeError, TimeoutError, OSError) as e:  # one failed run (a starved simulator) keeps the rest
                log(f"  failed: {type(e).__name__}: {e}")
                runs[n].append({"slow_streams": n, "error": f"{type(e).__name__}: {e}"})
                continue
            runs[n].append(r)
            log(f"  acquire {r['acquire_s']} s, record {r['record_s']} s, stop {r['stop_s']} s, status p99 "
                f"{r['status_p99_ms']} ms; lost {r['lost']}, rejected {r['rejected']}, p99 flushed "
                f"{r['commit_p99_ms']} ms; acqd CPU {r['acqd_cpu_pct']}%, tree PSS {r['tree_pss_mb']} MB, "
                f"{r['writer_processes']} writer processes; others {r['others_cpu_pct']}%, load {r['load_avg']}")
    keys = ("acqd_cpu_pct", "tree_pss_mb", "lost", "rejected", "commit_p99_ms", "slow_commit_p99_ms", "acquire_s",
            "record_s", "stop_s", "status_p99_ms", "sim_cpu_pct", "others_cpu_pct", "writer_processes")
    median = {n: {k: med([r.get(k) for r in rs]) for k in keys} for n, rs in runs.items()}
    cpu_slope = slope(list(SLOW_STEPS), [median[n]["acqd_cpu_pct"] for n in SLOW_STEPS])
    pss_slope = slope(list(SLOW_STEPS), [median[n]["tree_pss_mb"] for n in SLOW_STEPS])
    return {"seconds": args.many_seconds, "steps": list(SLOW_STEPS), "runs": runs, "median": median,
            "per_slow_stream": {"cpu_pct": cpu_slope, "pss_mb": pss_slope}}


def many_targets(res: dict, row) -> list[dict]:
    many = res.get("many", {})
    if not many.get("median"):
        return []
    top = many["median"].get(max(SLOW_STEPS), many["median"].get(str(max(SLOW_STEPS))))
    n = len(next(iter(many["runs"].values())))
    per = many["per_slow_stream"]
    return [
        row("many: per slow stream, acqd CPU (slope over 8/32/96), % of one core", per["cpu_pct"], n,
            f"<= {GOAL_CPU_PCT}", lambda v: v <= GOAL_CPU_PCT),
        row("many: per slow stream, process tree PSS (slope over 8/32/96), MB", per["pss_mb"], n,
            f"<= {GOAL_PSS_MB}", lambda v: v <= GOAL_PSS_MB),
        row("many (96 slow): messages lost + rejected", (top["lost"] or 0) + (top["rejected"] or 0), n, "0",
            lambda v: v == 0),
        row("many (96 slow): publish->flushed p99 (ms)", top["commit_p99_ms"], n, "<= 1000", lambda v: v <= 1000),
        row("many (96 slow): acqd CPU, % of one core", top["acqd_cpu_pct"], n, "-", None),
        row("many (96 slow): process tree PSS (MB)", top["tree_pss_mb"], n, "-", None),
        row("many (96 slow): ACQUIRE until every writer is ready (s)", top["acquire_s"], n, f"<= {GOAL_ACQUIRE_S}",
            lambda v: v <= GOAL_ACQUIRE_S),
        row("many (96 slow): RECORD until every stream records (s)", top["record_s"], n, f"<= {GOAL_MODE_S}",
            lambda v: v <= GOAL_MODE_S),
        row("many (96 slow): stop (s)", top["stop_s"], n, f"<= {GOAL_MODE_S}", lambda v: v <= GOAL_MODE_S),
        row("many (96 slow): GET /api/status p99 throughout (ms)", top["status_p99_ms"], n, f"<= {GOAL_STATUS_MS}",
            lambda v: v <= GOAL_STATUS_MS),
    ]


def many_markdown(res: dict) -> list[str]:
    many = res.get("many", {})
    if not many.get("runs"):
        return []
    lines = ["", f"Reference rig + N slow streams ({many['seconds']:.0f} s per run): medians of "
                 f"{len(next(iter(many['runs'].values())))} runs", "",
             "| slow streams | writer processes | acqd CPU % | tree PSS MB | lost + rejected | p99 flushed ms | "
             "ACQUIRE s | RECORD s | stop s | status p99 ms | others' CPU % |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, m in many["median"].items():
        lines.append(f"| {n} | {m['writer_processes']} | {m['acqd_cpu_pct']} | {m['tree_pss_mb']} | "
                     f"{(m['lost'] or 0) + (m['rejected'] or 0)} | {m['commit_p99_ms']} | {m['acquire_s']} | "
                     f"{m['record_s']} | {m['stop_s']} | {m['status_p99_ms']} | {m['others_cpu_pct']} |")
    per = many["per_slow_stream"]
    lines += ["", f"Marginal cost of one slow stream (least-squares slope over N): {per['cpu_pct']} % of one core, "
                  f"{per['pss_mb']} MB PSS."]
    return lines
