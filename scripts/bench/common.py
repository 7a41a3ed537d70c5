"""What every part of the benchmark shares: paths, logging, medians, JSON output, the baselines module."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
"""The repository: scripts/bench/common.py -> the folder holding configs/, docs/, scripts/."""
sys.path.insert(0, str(ROOT / "scripts"))
import bench_baselines as baselines  # noqa: E402,F401 - scripts/bench_baselines.py, re-exported for the scenarios

BENCH_RIG = ROOT / "configs" / "bench-rig.yaml"
BENCH_METADATA = {"subject": {"subject_id": "bench", "species": "Mus musculus", "sex": "U", "age": "P90D"}}
"""What every benchmark session records under (the rig config holds no subject)."""
DOC = ROOT / "docs" / "performance.md"
SCENARIOS = ("reference", "ramp", "naive", "disk", "pynwb", "finalize", "preview", "slow", "ship", "synclock", "many",
             "hasher")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def to_json(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(type(obj))


def med(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 2) if values else None


def medians(runs: list[dict], keys: tuple[str, ...]) -> dict:
    return {k: med([r.get(k) for r in runs]) for k in keys}
