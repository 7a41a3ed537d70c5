"""Scenario reference: configs/bench-rig.yaml recorded for ``--seconds``, ``--repeat-reference`` times."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import yaml

from bench.common import BENCH_RIG, log, medians
from bench.session import measure_session, rig_file, rig_mb_per_s


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
