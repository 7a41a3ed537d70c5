"""Scenario disk: the disk's sequential write rate with fdatasync (``--disk-gib``, 4 MiB blocks)."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.common import baselines, log, medians
from bench.procwatch import wait_quiet


def scenario_disk(args: argparse.Namespace, workdir: Path) -> dict:
    runs = []
    for i in range(args.repeat):
        log(f"disk: run {i + 1}/{args.repeat}, {args.disk_gib:g} GiB with fdatasync")
        quiet = wait_quiet(args.quiet_wait)
        runs.append({**baselines.disk_write(workdir / "disk.bin", args.disk_gib), "quiet_before": quiet})
        log(f"  {runs[-1]['mb_per_s']} MB/s")
    return {"gib": args.disk_gib, "runs": runs, "median": medians(runs, ("mb_per_s",))}
