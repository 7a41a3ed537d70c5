"""One measured recording: rig files on ipc endpoints, the daemon and simulator under a ProcWatch, and what
the stream files say afterwards (loss, MB/s, publish->received and publish->flushed latency)."""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from pathlib import Path

import numpy as np
import yaml

from acqd.record.streamfile import open_for_read
from acqd.service.procs import Daemon, Simulator, wait_until
from bench.common import BENCH_METADATA, BENCH_RIG
from bench.procwatch import CLK_TCK, RSS_LIMIT_MB, ProcWatch, children_running, cpu_ticks, is_acqd, wait_quiet

SIM_BEHIND_LIMIT_S = 0.25
"""A ramp step fails if the simulator ran this much later than its real-time schedule."""
BACKLOG_LIMIT_MS = 500.0
"""A ramp step fails if p99 publish->receive exceeds this: the receiver is not keeping up."""
SETTLE_S = 2.0
"""Seconds after RECORD starts before CPU and RSS are measured (files being created)."""


def rig_file(raw: dict, workdir: Path, name: str, daemon: dict | None = None, stream: dict | None = None) -> Path:
    """Write a rig with ipc endpoints under ``workdir``, its data root there and any free control port.

    ``daemon`` overrides daemon settings (``--flush-interval``), ``stream`` those of every stream
    (``--part-seconds``)."""
    raw = copy.deepcopy(raw)
    ipc = workdir / "ipc"
    ipc.mkdir(parents=True, exist_ok=True)
    raw["daemon"].update(data_root=str(workdir / "data"), control={"host": "127.0.0.1", "port": 0}, **(daemon or {}))
    for s in raw["streams"]:
        s["endpoint"] = f"ipc://{ipc}/{s['name']}"
        s.update(stream or {})
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


def lost_and_rejected(files: dict, status: dict) -> dict:
    """Messages lost and rejected in a recording: what its files say or what the daemon counted, the larger."""
    return {"lost": max(files["lost"], sum(s["gaps"] for s in status["streams"].values())),
            "rejected": max(files["rejected"], sum(s["rejected"] for s in status["streams"].values()))}


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


def record(config: Path, workdir: Path, seconds: float, sample_s: float, quiet_wait_s: float,
           rss_limit_mb: int = RSS_LIMIT_MB, sim_config: Path | None = None) -> dict:
    """Daemon + simulator: ACQUIRE, RECORD for ``seconds``, stop. Returns measurements; the session stays.

    ``sim_config``: what the simulator publishes, if not every stream of ``config`` (an idle stream has no driver)."""
    quiet = wait_quiet(quiet_wait_s)
    daemon = Daemon(config, workdir / "data", workdir)
    sim = None
    try:
        daemon.command("acquire")
        sim = Simulator(sim_config or config, seconds + 900, timeout_s=300)
        wait_until(lambda: not daemon.command("preflight")["problems"], "every stream to deliver data", 120, 0.5)
        started = daemon.command("record", session=f"bench-{time.strftime('%H%M%S')}", metadata=BENCH_METADATA)
        folder = Path(started["session"]["path"])
        writers = writer_pids(started["streams"])
        time.sleep(SETTLE_S)
        pids = {"supervisor": daemon.pid, **writers, "simulator": sim.proc.pid}
        with ProcWatch(pids, sample_s, rss_limit_mb) as watch:
            watch.sleep(seconds)
            # the session's hasher starts when the first part closes, inside the window: all its CPU is the window's
            hasher_ticks = sum(cpu_ticks(p) or 0 for p in children_running(daemon.pid, "acqd.finalize.hasher"))
        status = daemon.command("status")
        daemon.command("stop")
        daemon.command("stop", idle=True)
    finally:
        if sim is not None:
            sim.stop()
        daemon.stop()
    cpu = watch.cpu_pct()
    cpu["hasher"] = round(100 * hasher_ticks / CLK_TCK / watch.seconds, 1)
    acqd_cpu = sum(v or 0.0 for k, v in cpu.items() if is_acqd(k))
    return {"folder": folder, "window_s": round(watch.seconds + SETTLE_S, 2), "cpu_pct": cpu,
            "acqd_cpu_pct": round(acqd_cpu, 1), "acqd_cpu_per_30s": watch.acqd_cpu_timeline(),
            "sim_cpu_pct": cpu["simulator"], "others_cpu_pct": round(watch.others_pct() - cpu["hasher"], 1),
            "quiet_before": quiet, "rss": watch.rss_summary(),
            "error": watch.overflow, "status_gaps": sum(s["gaps"] for s in status["streams"].values()),
            "status_rejected": sum(s["rejected"] for s in status["streams"].values()),
            "writers_failed": [n for n, s in status["streams"].items() if s["state"] != "recording"]}


def writer_pids(streams: dict[str, dict]) -> dict[str, int]:
    """Each writer process once, labelled ``writer:<stream>`` (a group writer: ``writer:<first>+<others>``), so a
    process hosting several streams (acqd.record.group) is not counted once per stream."""
    by_pid: dict[int, list[str]] = {}
    for name, s in streams.items():
        if s["pid"]:
            by_pid.setdefault(s["pid"], []).append(name)
    return {f"writer:{names[0]}" + (f"+{len(names) - 1}" if len(names) > 1 else ""): pid
            for pid, names in by_pid.items()}


def measure_session(config: Path, workdir: Path, seconds: float, args: argparse.Namespace,
                    sim_config: Path | None = None) -> dict:
    """``record`` plus what the files say; the session folder is deleted unless ``--keep``."""
    run = record(config, workdir, seconds, args.sample_s, args.quiet_wait, args.rss_limit_mb, sim_config)
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
