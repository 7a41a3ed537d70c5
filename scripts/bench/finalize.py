"""Scenario finalize: wall time of ``acqd finalize`` on a short session and on one with 10x the data."""

from __future__ import annotations

import argparse
import json
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from acqd.service.procs import stop_process
from bench.common import BENCH_RIG, log, med
from bench.session import record, rig_file


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
