"""The three PCs of the simulated multi-PC rig the tests record: their rig configs and their simulators' truth.

Every node has its own reference DAQ latching the rig's shared sync line (30 kHz, sync on bit 0 of its digital
word) and one more stream: the leader a frame-synced behaviour sensor, follower ``f1`` a probe with the sync
line in its data, follower ``f2`` a wheel with no sync line (timed by host receive times). Stream names carry
the node's name, so nothing clashes between nodes. Each node's devices run at the drift the test asks for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from acqd.config import RigConfig, parse_config
from acqd.sim.simulate import Rig, SimParams

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "rig.yaml"
LEADER, FOLLOWERS = "lead", ("f1", "f2")
DRIFT_PPM = {"lead": -20.0, "f1": 15.0, "f2": 40.0}
SEED = 26


@dataclass(frozen=True, slots=True)
class Node:
    """One PC of the rig: its name, its address on the test network, its control token and its folders."""

    name: str
    address: str
    token: str
    home: Path
    """The node's own folder: config, data root, ipc endpoints."""
    carries: tuple[str, ...] = ()
    """The nodes whose streams this one records (default: its own): one PC with the whole rig's streams."""

    @property
    def data_root(self) -> Path:
        return self.home / "data"

    @property
    def config(self) -> Path:
        return self.home / "rig.yaml"

    @property
    def url(self) -> str:
        return f"http://{self.address}:{PORT}"


PORT = 8600  # every node has its own network namespace, so all of them can listen on the same port


def daq(node: str, ipc: Path) -> dict:
    return {"name": f"{node}_daq", "kind": "analog", "description": f"{node}'s DAQ, the node's reference clock",
            "endpoint": f"ipc://{ipc}/{node}_daq", "dtype": "int16", "shape": [9], "rate": 30000.0, "units": "volts",
            "conversion": 3.0517578125e-4, "sync": {"source": "channel", "channel": 8, "bit": 0}}


def extra_stream(node: str, ipc: Path) -> dict:
    """The node's second stream: frame-synced (leader), sync in its data (f1) or host-timed (f2)."""
    if node == "f1":
        return {"name": "f1_probe", "kind": "ephys", "description": "probe on f1, 32 channels + sync word",
                "endpoint": f"ipc://{ipc}/f1_probe", "dtype": "int16", "shape": [33], "rate": 30000.0,
                "units": "volts", "conversion": 1.95e-6, "sync": {"source": "channel", "channel": 32, "bit": 0}}
    if node == "f2":
        return {"name": "f2_wheel", "kind": "analog", "description": "wheel on f2, no sync line",
                "endpoint": f"ipc://{ipc}/f2_wheel", "dtype": "float32", "shape": [1], "rate": 1000.0, "units": "a.u."}
    return {"name": f"{node}_sensor", "kind": "analog", "description": "behaviour sensor on the leader",
            "endpoint": f"ipc://{ipc}/{node}_sensor", "dtype": "float32", "shape": [3], "rate": 1000.0, "units": "a.u.",
            "sync": {"source": "frame"}}


def node_raw(node: Node) -> dict:
    """The node's rig config as a mapping, without the multi-PC keys (``node_yaml`` adds them)."""
    example = yaml.safe_load(EXAMPLE.read_text())
    ipc = node.home / "ipc"
    return {"daemon": {"data_root": str(node.data_root), "flush_interval_s": 0.25, "finalize_on_stop": True,
                       "nodes_timeout_s": 120,
                       "control": {"host": node.address, "port": PORT, "token": node.token,
                                   "allowed_hosts": [node.address]}},
            "reference": f"{node.name}_daq", "metadata": {k: v for k, v in example["metadata"].items() if k != "ecephys"},
            "streams": [s for n in node.carries or (node.name,) for s in (daq(n, ipc), extra_stream(n, ipc))]}


def node_yaml(node: Node, followers: tuple[Node, ...] = (), ship_to: Node | None = None) -> Path:
    """Write the node's config: its name, the leader's followers, a follower's shipping to the leader's data
    root (a path both see: the issue allows a shared filesystem as the destination)."""
    raw = node_raw(node) | {"node": node.name}
    if followers:
        raw["followers"] = [{"name": f.name, "url": f.url, "token": f.token} for f in followers]
    if ship_to is not None:
        raw["ship"] = [{"name": "leader", "remote": str(ship_to.data_root), "path": "{session}/nodes/{node}",
                        "sessions": "led", "after": "finalize"}]
    (node.home / "ipc").mkdir(parents=True, exist_ok=True)
    node.config.write_text(yaml.safe_dump(raw, sort_keys=False))
    return node.config


def node_rig(node: Node, seconds: float, t0_monotonic: float | None = None) -> tuple[RigConfig, Rig]:
    """The node's config (without multi-PC keys) and the simulated devices its simulator runs: the truth."""
    cfg = parse_config(node_raw(node))
    return cfg, Rig(cfg, node_params(node.name, seconds, t0_monotonic))


def node_params(name: str, seconds: float, t0_monotonic: float | None = None) -> SimParams:
    return SimParams(seed=SEED, seconds=seconds, ppm=DRIFT_PPM[name], t0_monotonic=t0_monotonic)


def sim_args(name: str, t0_monotonic: float) -> tuple[str, ...]:
    """``acqd simulate`` options of the node's simulator (besides --config, --seconds, --seed)."""
    return (f"--ppm={DRIFT_PPM[name]}", f"--t0-monotonic={t0_monotonic!r}")


def leader_seconds(leader: Rig, stream: Rig, name: str, samples: np.ndarray) -> np.ndarray:
    """Truth: the leader reference's time (s of its counter) at which device ``name`` of ``stream`` took
    ``samples``."""
    ref = leader.devices[leader.cfg.reference].clock
    return ref.phase(stream.devices[name].clock.time_of(samples.astype(float))) / ref.rate
