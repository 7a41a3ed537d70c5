"""Scenario ramp: N probes into acqd for ``--step-seconds`` each, N growing until a step does not keep up;
``ramp`` is shared with the naive receiver's scenario."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.common import log, medians
from bench.session import keeps_up, measure_session, probe_rig, rig_file, rig_mb_per_s

PROBE_STEPS = (1, 2, 4, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48)


def acqd_step(n: int, compression: str, args: argparse.Namespace, workdir: Path) -> dict:
    """One ramp step: ``n`` probes into acqd for ``--step-seconds``."""
    raw = probe_rig(n, compression)
    try:
        run = measure_session(rig_file(raw, workdir, f"ramp-{n}", args.daemon), workdir, args.step_seconds, args)
    except (RuntimeError, TimeoutError, OSError) as e:
        run = {"error": f"{type(e).__name__}: {e}"}
    run.pop("rss", None)
    return {"probes": n, "offered_mb_per_s": round(rig_mb_per_s(raw), 1), **run}


def ramp(step, args: argparse.Namespace, label: str) -> dict:
    """Run ``step(n)`` for growing probe counts until one does not keep up; repeated ``--repeat`` times."""
    runs = []
    for i in range(args.repeat):
        steps = []
        for n in [k for k in PROBE_STEPS if k <= args.max_probes]:
            log(f"{label}: run {i + 1}/{args.repeat}, {n} probes, {args.step_seconds:.0f} s")
            r = step(n)
            r["keeps_up"] = not (why := keeps_up(r))
            r["why_not"] = why
            r.pop("streams", None)
            steps.append(r)
            cpu = r.get("acqd_cpu_pct", r.get("receiver_cpu_pct"))
            log(f"  {r.get('mb_per_s', 0)} MB/s, acqd/receiver CPU {cpu}%, simulator CPU {r.get('sim_cpu_pct')}%, "
                f"others {r.get('others_cpu_pct')}%: {'; '.join(why) or 'keeps up'}")
            if why:
                break
        ok = [s for s in steps if s["keeps_up"]]
        runs.append({"steps": steps, "max_ok_mb_per_s": max((s["mb_per_s"] for s in ok), default=0.0),
                     "max_ok_probes": max((s["probes"] for s in ok), default=0),
                     "first_failure": None if steps[-1]["keeps_up"] else
                     {"probes": steps[-1]["probes"], "why": steps[-1]["why_not"]}})
    return {"step_seconds": args.step_seconds, "runs": runs,
            "median": medians(runs, ("max_ok_mb_per_s", "max_ok_probes"))}


def scenario_ramp(args: argparse.Namespace, workdir: Path) -> dict:
    return {c: ramp(lambda n, c=c: acqd_step(n, c, args, workdir), args, f"ramp acqd ({c})")
            for c in args.ramp_compression}
