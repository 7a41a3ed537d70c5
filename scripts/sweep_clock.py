"""Clock alignment over many seeds against the independent ground truth (tests/finalize/groundtruth.py).

    .venv/bin/python scripts/sweep_clock.py [--seeds 300] [--long-seeds 40] [--json OUT]

Scenarios (issue 13): a regular 1 Hz square wave (paired through the host-time prior), random 0.5-1.5 s
intervals, barcodes (30 ms bits every ~30 s); each with 2 % missing and 0.5 % spurious edges on both sides,
0.5 ppm thermal wander, up to +-100 ppm drift, a device starting 0-30 periods late, and a counter reset at 90 %
of the session; 10 min sessions (``--seeds``) and 2 h sessions (``--long-seeds``). Per scenario: the largest
error between the end knots and at any row (extrapolated rows too), wrong pairs among all pairs, how often the
reported bound (grown over the extrapolated rows) covered every error, host-timed segments, refusals, and the
time of ``align_stream``. Then the fit time of 2 h of 10 Hz sync. Not a test: runtimes depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "finalize"))

from acqd.errors import ClockFitError  # noqa: E402
from acqd.finalize.clock import fit_clock  # noqa: E402
from groundtruth import REF_RATE, align, evaluate, make_case  # noqa: E402

SCHEMES = ("regular", "random", "barcode")


def scenario(scheme: str, seconds: float, seeds: int) -> dict:
    errors, inside, cpu, wall = [], [], [], []
    wrong = pairs = covered = host_segments = refused = 0
    for seed in range(seeds):
        rng = np.random.default_rng([seed, int(seconds)])
        case = make_case(seed, scheme, seconds, ppm=float(rng.uniform(-100, 100)), wander_ppm=0.5, missing=0.02,
                         extra=0.005, reset_at=0.9, late_periods=int(rng.integers(0, 31)))
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            fit = align(case)
        except ClockFitError:
            refused += 1
            continue
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        out = evaluate(case, fit)
        errors.append(out.max_error_samples)
        inside.append(out.inside_error_samples)
        wrong += out.wrong_pairs
        pairs += out.pairs
        covered += out.covered
        host_segments += len(fit.host_segments)
    fitted = len(errors)
    return {"scheme": scheme, "seconds": seconds, "seeds": seeds, "fitted": fitted, "refused": refused,
            "max_error_inside_samples": max(inside, default=float("nan")),
            "p99_error_inside_samples": float(np.quantile(inside, 0.99)) if inside else float("nan"),
            "max_error_any_row_samples": max(errors, default=float("nan")),
            "wrong_pairs": wrong, "pairs": pairs, "bound_covered": f"{covered}/{fitted}",
            "host_timed_segments": host_segments,
            "align_wall_s_median": float(np.median(wall)) if wall else float("nan"),
            "align_wall_s_max": max(wall, default=float("nan")),
            "align_cpu_s_max": max(cpu, default=float("nan"))}


def fit_runtime(repeats: int = 7) -> dict:
    """fit_clock on the pairs of 2 h of a 10 Hz wave (72,000 pairs), wall and CPU (all threads) per call."""
    case = make_case(1, "regular", 7200.0, period_s=0.1, ppm=30.0, wander_ppm=0.5)
    fit = align(case)
    di, rj = fit.pairs[0]
    x = case.dev_edges.samples[di] - 0.5
    y = (case.ref_edges.samples[rj] - 0.5) / REF_RATE
    wall, cpu, whole = [], [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fit_clock(x, y, case.dev.osc.rate)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        t0 = time.perf_counter()
        align(case)
        whole.append(time.perf_counter() - t0)
    return {"pairs": len(x), "fit_clock_wall_s": sorted(wall), "fit_clock_cpu_s": sorted(cpu),
            "align_stream_with_host_prior_wall_s": sorted(whole)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=300, help="seeds per 10 min scenario")
    ap.add_argument("--long-seeds", type=int, default=40, help="seeds per 2 h scenario")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    results = []
    for seconds, seeds in ((600.0, args.seeds), (7200.0, args.long_seeds)):
        for scheme in SCHEMES:
            r = scenario(scheme, seconds, seeds)
            results.append(r)
            print(f"{scheme:8s} {seconds / 60:5.0f} min  seeds {r['seeds']:4d} (refused {r['refused']})  "
                  f"max error {r['max_error_inside_samples']:.3f} (p99 {r['p99_error_inside_samples']:.3f}) "
                  f"between end knots, {r['max_error_any_row_samples']:.3f} at any row [samples]  wrong pairs "
                  f"{r['wrong_pairs']}/{r['pairs']}  bound covered {r['bound_covered']}  host-timed segments "
                  f"{r['host_timed_segments']}  align {r['align_wall_s_median'] * 1e3:.0f} ms median, "
                  f"{r['align_wall_s_max'] * 1e3:.0f} ms max", flush=True)
    rt = fit_runtime()
    print(f"fit_clock, 2 h of 10 Hz ({rt['pairs']} pairs): wall {', '.join(f'{t:.3f}' for t in rt['fit_clock_wall_s'])}"
          f" s; CPU {', '.join(f'{t:.3f}' for t in rt['fit_clock_cpu_s'])} s; align_stream with the host prior "
          f"{', '.join(f'{t:.3f}' for t in rt['align_stream_with_host_prior_wall_s'])} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"scenarios": results, "runtime": rt}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
