"""Scenario pynwb: pynwb's DataChunkIterator writing probe-like data, file to file (``--pynwb-gib``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.common import baselines, log, medians
from bench.procwatch import wait_quiet


def scenario_pynwb(args: argparse.Namespace, workdir: Path) -> dict:
    runs = []
    for i in range(args.repeat):
        log(f"pynwb: run {i + 1}/{args.repeat}, {args.pynwb_gib:g} GiB through DataChunkIterator")
        quiet = wait_quiet(args.quiet_wait)
        runs.append({**baselines.pynwb_write(workdir, args.pynwb_gib), "quiet_before": quiet})
        log(f"  {runs[-1]['mb_per_s']} MB/s")
    return {"gib": args.pynwb_gib, "runs": runs, "median": medians(runs, ("mb_per_s",))}
