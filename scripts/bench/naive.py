"""Scenario naive: the same ramp into a naive single-process receiver (scripts/bench_baselines.py naive)."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from acqd.service.procs import Simulator, stop_process, wait_until
from bench.common import ROOT, baselines
from bench.procwatch import ProcWatch, wait_quiet
from bench.ramp import ramp
from bench.session import probe_rig, rig_file, rig_mb_per_s, summarize_streams


def naive_run(raw: dict, config: Path, seconds: float, args: argparse.Namespace, workdir: Path, name: str) -> dict:
    """The rig ``raw`` (written to ``config``) into the naive single-process receiver for ``seconds``."""
    out = workdir / name
    out.mkdir(exist_ok=True)
    result_file = workdir / f"{name}.json"
    result_file.unlink(missing_ok=True)  # an earlier run's result must never be read as this one's
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_baselines.py"), "naive", "--out-dir", str(out),
           "--seconds", str(seconds), "--result", str(result_file)]
    for s in yaml.safe_load(config.read_text())["streams"]:
        cmd += ["--endpoint", s["endpoint"]]
    quiet = wait_quiet(args.quiet_wait)
    receiver = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    sim = None
    try:
        sim = Simulator(config, seconds + 900, timeout_s=300)
        with ProcWatch({"receiver": receiver.pid, "simulator": sim.proc.pid}, args.sample_s,
                       args.rss_limit_mb) as watch:
            wait_until(lambda: result_file.exists() or receiver.poll() is not None or watch.overflow,
                       "the naive receiver", seconds + 120, 0.2)
        if watch.overflow:
            return {"error": watch.overflow}
        result = json.loads(result_file.read_text())
    except (RuntimeError, OSError, TimeoutError, ValueError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        stop_process(receiver)
        if sim is not None:
            sim.stop()
        shutil.rmtree(out, ignore_errors=True)
    cfgs = {s["name"]: s for s in raw["streams"]}
    streams = {name: {"index": np.array([tuple(r) for r in rows], dtype=baselines.INDEX_FIELDS),
                      "rate": float(cfgs[name]["rate"]),
                      "sample_bytes": int(np.prod(cfgs[name]["shape"])) * np.dtype(cfgs[name]["dtype"]).itemsize}
               for name, rows in result["streams"].items()}
    run = summarize_streams(streams, result["wall_s"])
    if len(streams) < len(cfgs):
        run["error"] = f"only {len(streams)} of {len(cfgs)} streams arrived"
    return {**run, "receiver_cpu_pct": round(100 * result["cpu_s"] / max(result["wall_s"], 1e-9), 1),
            "sim_cpu_pct": watch.cpu_pct()["simulator"], "others_cpu_pct": watch.others_pct(), "quiet_before": quiet,
            "receiver_rss_mb": round(result["max_rss_kb"] / 1024, 1)}


def naive_step(n: int, args: argparse.Namespace, workdir: Path) -> dict:
    """One ramp step: ``n`` probes into the naive single-process receiver."""
    raw = probe_rig(n, "none")
    config = rig_file(raw, workdir, f"naive-{n}")
    return {"probes": n, "offered_mb_per_s": round(rig_mb_per_s(raw), 1),
            **naive_run(raw, config, args.step_seconds, args, workdir, f"naive-{n}")}


def scenario_naive(args: argparse.Namespace, workdir: Path) -> dict:
    return ramp(lambda n: naive_step(n, args, workdir), args, "ramp naive receiver")
