"""Shared fixtures: a rig config on ipc:// endpoints in the test's own folder, and real processes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from acqd.config import RigConfig, load_config
from acqd.procs import Daemon
from acqd.simulate import Rig, SimParams

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "configs" / "rig.yaml"


def write_rig(tmp_path: Path, *, flush_interval_s: float = 0.25, stream_overrides: dict | None = None) -> Path:
    """The example rig with ipc endpoints under ``tmp_path`` (no port clashes between test runs)."""
    raw = yaml.safe_load(EXAMPLE.read_text())
    (tmp_path / "ipc").mkdir(exist_ok=True)
    raw["daemon"].update(data_root=str(tmp_path / "data"), flush_interval_s=flush_interval_s,
                         control={"host": "127.0.0.1", "port": 0})
    for s in raw["streams"]:
        s["endpoint"] = f"ipc://{tmp_path}/ipc/{s['name']}"
        s.update((stream_overrides or {}).get(s["name"], {}))
    path = tmp_path / "rig.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def rig_file(tmp_path: Path) -> Path:
    return write_rig(tmp_path)


@pytest.fixture
def daemon_factory(tmp_path: Path):
    """Start daemons on the test's data root; every one is stopped (or killed) at teardown."""
    started: list[Daemon] = []

    def start(config: Path, env: dict | None = None) -> Daemon:
        d = Daemon(config, tmp_path / "data", tmp_path, env=env)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop(timeout_s=30)


def assert_bit_exact(f, rig: Rig, stream: str) -> int:
    """Every committed index row of a stream file equals what the simulated device sent; returns rows."""
    index = f["index"][:]
    data = f["data"]
    for row in index:
        a, n = int(row["file_row"]), int(row["n_samples"])
        expected = rig.samples(stream, int(row["first_sample"]), n)
        assert np.array_equal(data[a:a + n], expected), f"{stream}: rows {a}..{a + n} differ from what was sent"
    return int(index["n_samples"].sum()) if len(index) else 0


def rig_for(config: Path, seconds: float, seed: int = 0) -> tuple[RigConfig, Rig]:
    cfg = load_config(config)
    return cfg, Rig(cfg, SimParams(seed=seed, seconds=seconds))
