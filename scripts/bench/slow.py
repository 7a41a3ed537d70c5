"""Scenario slow: what a slow stream costs (goal: <= 0.3 % of one core for <= 100 messages/s and <= 1 MB/s).

One rig of slow streams only, recorded for ``--slow-seconds`` (default 60, quick 30), ``--repeat`` times:

    nidaq   9 ch int16 at 30 kHz (0.54 MB/s, 100 messages/s), sync edges in its data (the reference clock)
    wheel   3 ch float32 at 1 kHz (12 kB/s, 100 messages/s), sync edges sent by its driver
    sensor  4 ch float32 at 1 kHz (16 kB/s, 100 messages/s), no sync (timed by host receive time)
    idle    a configured stream whose driver never sends: what a writer costs while nothing arrives

Each writer's CPU comes from /proc/<pid>/stat over the RECORD window (flushing and fsyncing at the daemon
defaults). ``--slow-baseline DIR`` (a copy of another acqd package) measures that code too, alternating with
the current code within each run, so that both see the same machine.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
from pathlib import Path

import yaml

from bench.common import BENCH_RIG, ROOT, log, med
from bench.session import measure_session, rig_file

GOAL_PCT = 0.3
SLOW_STREAMS = ("nidaq", "wheel", "sensor")


def slow_rig() -> dict:
    """The bench rig's slow streams (nidaq, wheel), a sensor without sync and an idle stream."""
    base = yaml.safe_load(BENCH_RIG.read_text())
    by_name = {s["name"]: s for s in base["streams"]}
    sensor = {**by_name["eye"], "name": "sensor", "sync": None}
    idle = {**by_name["eye"], "name": "idle", "sync": None, "required": False}
    streams = [{k: v for k, v in s.items() if v is not None} for s in (by_name["nidaq"], by_name["wheel"], sensor, idle)]
    return {"daemon": base["daemon"], "reference": "nidaq", "metadata": base["metadata"], "streams": streams}


def one_run(code: str | None, args: argparse.Namespace, workdir: Path) -> dict:
    """One recording of the slow rig, with the acqd package in ``code`` (None: the one already in use)."""
    raw = slow_rig()
    config = rig_file(raw, workdir, "slow", args.daemon)
    sim_raw = copy.deepcopy(raw)
    sim_raw["streams"] = [s for s in sim_raw["streams"] if s["name"] != "idle"]
    sim_config = rig_file(sim_raw, workdir, "slow-sim", args.daemon)
    saved = os.environ.get("PYTHONPATH")
    if code:
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(code).resolve()), saved]))
    try:
        run = measure_session(config, workdir, args.slow_seconds, args, sim_config=sim_config)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    run.pop("rss", None)
    run["writer_cpu_pct"] = {k.removeprefix("writer:"): v for k, v in run["cpu_pct"].items()
                             if k.startswith("writer:")}
    run["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    return run


def scenario_slow(args: argparse.Namespace, workdir: Path) -> dict:
    variants = {"current": None, **({"baseline": args.slow_baseline} if args.slow_baseline else {})}
    cwd = os.getcwd()
    if args.slow_baseline:  # `python -m` puts the working directory first: the package under test must come first
        variants["current"] = os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] or str(ROOT)
        os.chdir(tempfile.gettempdir())
    try:
        return summary(args, measure_variants(variants, args, workdir))
    finally:
        os.chdir(cwd)


def measure_variants(variants: dict[str, str | None], args: argparse.Namespace, workdir: Path
                     ) -> dict[str, list[dict]]:
    """``--repeat`` runs of each variant, alternating (baseline first) within each run."""
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    for i in range(args.repeat):
        for label, code in sorted(variants.items()):  # baseline first, then current, in every run
            log(f"slow streams ({label}): run {i + 1}/{args.repeat}, {args.slow_seconds:.0f} s")
            run = one_run(code, args, workdir)
            runs[label].append(run)
            log(f"  writer CPU % {run['writer_cpu_pct']}, lost {run['lost']}, load {run['load_avg']}")
    return runs


def summary(args: argparse.Namespace, runs: dict[str, list[dict]]) -> dict:
    out = {"seconds": args.slow_seconds, "baseline": args.slow_baseline, "runs": runs, "median": {}}
    for label, rs in runs.items():
        per = {s: med([r["writer_cpu_pct"].get(s) for r in rs]) for s in (*SLOW_STREAMS, "idle")}
        out["median"][label] = {"writer_cpu_pct": per, "max_slow_pct": max(per[s] or 0 for s in SLOW_STREAMS),
                                "lost": med([r["lost"] for r in rs]), "rejected": med([r["rejected"] for r in rs]),
                                "commit_p99_ms": med([r["commit_p99_ms"] for r in rs])}
    return out


def slow_targets(res: dict, row) -> list[dict]:
    """The slow-stream rows of the result table."""
    slow = res.get("slow", {})
    rows = []
    for label, m in slow.get("median", {}).items():
        n = len(slow["runs"][label])
        tag = "" if label == "current" else f" ({label}: {slow['baseline']})"
        rows.append(row(f"slow stream: highest writer CPU of nidaq, wheel, sensor, % of one core{tag}",
                        m["max_slow_pct"], n, f"<= {GOAL_PCT}", lambda v: v <= GOAL_PCT))
        rows.append(row(f"slow stream: idle writer CPU, % of one core{tag}", m["writer_cpu_pct"]["idle"], n, "-",
                        None))
        rows.append(row(f"slow streams: messages lost + rejected{tag}", (m["lost"] or 0) + (m["rejected"] or 0), n,
                        "0", lambda v: v == 0))
    return rows


def slow_markdown(res: dict) -> list[str]:
    """Per stream writer CPU of every run."""
    slow = res.get("slow", {})
    if not slow.get("runs"):
        return []
    lines = ["", f"Slow streams ({slow['seconds']:.0f} s per run): writer CPU, % of one core, per run "
                 "(load average at the end of the run)", "",
             "| code | " + " | ".join((*SLOW_STREAMS, "idle")) + " | load |", "|---|---|---|---|---|---|"]
    for label, rs in slow["runs"].items():
        for r in rs:
            lines.append(f"| {label} | " + " | ".join(str(r["writer_cpu_pct"].get(s)) for s in (*SLOW_STREAMS, "idle"))
                         + f" | {r['load_avg'][0]} |")
    return lines
