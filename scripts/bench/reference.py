"""Scenario reference: configs/bench-rig.yaml recorded for ``--seconds``, ``--repeat-reference`` times."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import yaml

from bench.common import BENCH_RIG, log, med, medians
from bench.naive import naive_run
from bench.session import measure_session, rig_file, rig_mb_per_s


def scenario_reference(args: argparse.Namespace, workdir: Path) -> dict:
    raw = yaml.safe_load(BENCH_RIG.read_text())
    need = rig_mb_per_s(raw) * 1e6 * (args.seconds + 30) * 1.1
    free = shutil.disk_usage(workdir).free
    if free < need + (5 << 30):
        return {"skipped": f"needs {need / 1e9:.0f} GB of disk, {free / 1e9:.0f} GB free"}
    config = rig_file(raw, workdir, "bench-rig", args.daemon, args.stream)
    runs = []
    for i in range(args.repeat_reference):
        log(f"reference rig: run {i + 1}/{args.repeat_reference}, {args.seconds:.0f} s")
        runs.append(measure_session(config, workdir, args.seconds, args))
        log(f"  lost {runs[-1]['lost']}, acqd CPU {runs[-1]['acqd_cpu_pct']}%, "
            f"p99 publish->flushed {runs[-1]['commit_p99_ms']} ms, {runs[-1]['mb_per_s']} MB/s; "
            f"acqd CPU per 30 s: {runs[-1]['acqd_cpu_per_30s']}")
        # The same rig into the naive receiver right after: a CPU baseline from the same machine and minute.
        log(f"reference rig into the naive receiver: run {i + 1}/{args.repeat_reference}, {args.seconds:.0f} s")
        naive = naive_run(raw, config, args.seconds, args, workdir, "naive-reference")
        naive.pop("streams", None)
        runs[-1]["naive"] = naive
        runs[-1]["acqd_over_naive_cpu"] = (round(runs[-1]["acqd_cpu_pct"] / naive["receiver_cpu_pct"], 2)
                                           if naive.get("receiver_cpu_pct") else None)
        runs[-1]["load_avg"] = [round(x, 2) for x in os.getloadavg()]
        log(f"  naive receiver CPU {naive.get('receiver_cpu_pct')}%, lost {naive.get('lost')}, "
            f"{naive.get('error') or ''}; acqd / naive CPU {runs[-1]['acqd_over_naive_cpu']}; "
            f"load {runs[-1]['load_avg']}")
    m = medians(runs, ("lost", "rejected", "acqd_cpu_pct", "sim_cpu_pct", "others_cpu_pct", "mb_per_s",
                       "commit_p50_ms", "commit_p99_ms", "recv_p50_ms", "recv_p99_ms", "acqd_over_naive_cpu"))
    m["naive_cpu_pct"] = med([r["naive"].get("receiver_cpu_pct") for r in runs])
    m["naive_lost"] = med([r["naive"].get("lost") for r in runs])
    return {"seconds": args.seconds, "rig_mb_per_s": round(rig_mb_per_s(raw), 1), "runs": runs, "median": m}
