"""How finalize time grows with data size: record a 1x and a 10x session (tests/sessions.py), finalize both.

    .venv/bin/python scripts/finalize_scaling.py [--seconds 20] [--factor 10] [--keep DIR]

Prints, per size, the bytes recorded and the time of each finalize stage (from the progress callback). The
sessions are the test rig (32-channel probe, 48x64 camera) with a dropped probe chunk, so the probe needs
per-row timestamps; 10x is ten times the duration. Not a test: numbers depend on the machine and its disk.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from acqd.finalize import finalize_session, unseal_session  # noqa: E402
from acqd.sim.simulate import Rig, SimParams  # noqa: E402
from sessions import Recording, record_session, small_config  # noqa: E402


def run(root: Path, seconds: float) -> dict:
    cfg = small_config(root / f"{seconds:g}s")
    rig = Rig(cfg, SimParams(seed=3, seconds=seconds + 40))
    t0 = time.monotonic()
    folder = record_session(cfg, rig, "S", Recording(seconds=seconds, drops={"probe": [(8.0, 8.15)]}))
    built = time.monotonic() - t0
    size = sum(p.stat().st_size for p in (folder / "streams").glob("*.h5"))
    marks: list[tuple[str, float]] = []
    t0 = time.monotonic()
    report = finalize_session(folder, lambda stage, _: marks.append((stage, time.monotonic() - t0)))
    total = time.monotonic() - t0
    stages: dict[str, float] = {}
    running, last = "check", 0.0
    for stage, t in marks:  # the time up to a mark belongs to the stage that was running before it
        stages[running] = stages.get(running, 0.0) + t - last
        running, last = stage, t
    unseal_session(folder)
    return {"seconds": seconds, "mb": size / 1e6, "build_s": built, "finalize_s": total, "stages": stages,
            "timing": {n: s.timing for n, s in report.streams.items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--factor", type=float, default=10.0)
    p.add_argument("--keep", help="record into this folder and keep it (default: a temporary folder)")
    args = p.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="acqd-scaling-"))
    try:
        results = [run(root, args.seconds), run(root, args.seconds * args.factor)]
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    for r in results:
        stages = "  ".join(f"{k} {v:.2f}" for k, v in r["stages"].items())
        print(f"{r['seconds']:6.0f} s recorded, {r['mb']:8.1f} MB: finalize {r['finalize_s']:6.2f} s "
              f"(record {r['build_s']:.1f} s)   stages: {stages}")
    small, big = results
    print(f"ratio: data x{big['mb'] / small['mb']:.1f}, finalize time x{big['finalize_s'] / small['finalize_s']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
