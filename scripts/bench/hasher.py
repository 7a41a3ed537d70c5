"""Scenario hasher: the daemon's hasher process against coreutils ``sha256sum`` of the same bytes, same run.

Runs ``scripts/bench_hasher.py`` (which records a session and times both, interleaved, ``--repeat`` times, cold and
hot page cache; see its docstring) and keeps its medians. Goal (issue 27): hasher CPU <= 1.2x ``sha256sum``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench.common import ROOT, log
from bench.procwatch import wait_quiet

GOAL = 1.2
SECONDS = 40.0
"""Session recorded (the test rig, a 384-channel probe: ~1 GB). The hasher is one process per session, so its
start-up (~0.4 s of imports) is paid once per session: on the bench's old 8 s (0.2 GB) it was most of the ratio."""
TIMEOUT_S = 1800


def scenario_hasher(args: argparse.Namespace, workdir: Path) -> dict:
    log(f"hasher: the hasher process vs sha256sum, {args.repeat} runs each, cold and hot")
    quiet = wait_quiet(args.quiet_wait)
    out = workdir / "hasher.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_hasher.py"), "--runs", str(args.repeat),
                    "--seconds", str(SECONDS), "--out", str(out)], check=True, timeout=TIMEOUT_S, stdout=subprocess.DEVNULL)
    res = {**json.loads(out.read_text()), "quiet_before": quiet}
    log(f"  hasher / sha256sum: cold {res['hasher_over_sha256sum_cold']}, hot {res['hasher_over_sha256sum_hot']}")
    return res


def hasher_targets(res: dict, row) -> list[dict]:
    """The hasher scenario's rows of the targets table (``row`` is ``bench.report.row``)."""
    h = res.get("hasher", {})
    if "runs" not in h:
        return []
    mb = round(h["bytes"] / 1e6)
    return [row(f"hasher CPU / sha256sum CPU, same {mb} MB, {cache} page cache (start-up included)",
                h[f"hasher_over_sha256sum_{cache}"], h["runs"], f"<= {GOAL:g}", lambda v: v <= GOAL)
            for cache in ("cold", "hot")] + [
            row(f"hasher CPU net of its start-up / sha256sum CPU, {cache}",
                h[f"hasher_net_of_startup_over_sha256sum_{cache}"], h["runs"], "-", None) for cache in ("cold", "hot")]
