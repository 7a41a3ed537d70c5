"""Simulators of several PCs share one sync line: one seed, one true-time origin, each node's own drift."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from acqd.sim.simulate import skip_to
from tests.multipc.rigs import (DRIFT_PPM, FOLLOWERS, LEADER, SEED, Node, leader_seconds, node_raw, node_rig,
                                sim_args)

ROOT = Path(__file__).resolve().parents[2]


def nodes(tmp_path) -> dict[str, Node]:
    return {n: Node(n, f"10.0.0.{i + 1}", "t" * 16, tmp_path / n) for i, n in enumerate((LEADER, *FOLLOWERS))}


def test_nodes_latch_the_same_pulses_at_their_own_drift(tmp_path):
    rigs = {name: node_rig(node, 60.0)[1] for name, node in nodes(tmp_path).items()}
    lead = rigs[LEADER]
    for name, rig in rigs.items():
        # other streams, other config: the same pulse train, because the pulses are drawn first from the seed
        assert np.array_equal(rig.pulses, lead.pulses) and len(rig.pulses) > 40, name
        for dev_name, dev in rig.devices.items():
            assert dev.clock.ppm == DRIFT_PPM[name], dev_name
            if dev.cfg.sync is not None:
                # every synced device latches each pulse where its own clock reads the pulse's true time
                t = dev.clock.time_of(rig.expected_edges(dev_name).astype(float))
                assert np.all(np.abs(t - rig.pulses) <= 1 / dev.cfg.rate), dev_name
    # A follower's sample taken at a pulse maps onto the leader reference's sample of the same pulse.
    f1 = rigs["f1"]
    at_pulses = leader_seconds(lead, f1, "f1_probe", f1.expected_edges("f1_probe"))
    ref = lead.devices[f"{LEADER}_daq"]
    assert np.all(np.abs(at_pulses * ref.cfg.rate - lead.expected_edges(f"{LEADER}_daq")) <= 1.0)
    # ...and the drifts differ as asked: over 60 s, f1 (+15 ppm) gains 35 ppm of samples on the leader (-20)
    gain = (f1.devices["f1_daq"].clock.phase(60.0) - f1.devices["f1_daq"].clock.phase(0.0)) / 60.0 / 30000.0
    assert abs(gain - (1 + 15e-6)) < 1e-9


def test_a_simulator_joining_the_shared_origin_late_starts_at_the_true_time_not_with_a_burst(tmp_path):
    node = nodes(tmp_path)["f2"]
    _, early = node_rig(node, 60.0)
    _, late = node_rig(node, 60.0)
    skip_to(late, 12.5)
    for name, dev in late.devices.items():
        assert dev.next_sample == int(np.ceil(dev.clock.phase(12.5))) > early.devices[name].next_sample, name
        # what it sends from there is what the early one would have sent for the same samples
        first = dev.next_sample
        assert np.array_equal(late.samples(name, first, 100), early.samples(name, first, 100))


def test_two_simulate_processes_write_one_sync_line_and_each_nodes_drift(tmp_path):
    # `acqd simulate` of two nodes with the options the multi-PC harness gives them (no daemon: nobody connects)
    t0 = time.monotonic()
    truths = {}
    for name in (LEADER, "f1"):
        node = nodes(tmp_path)[name]
        (node.home / "ipc").mkdir(parents=True)
        node.config.write_text(yaml.safe_dump(node_raw(node)))  # the simulator reads only the streams
        truths[name] = tmp_path / f"{name}.json"
        subprocess.run([sys.executable, "-m", "acqd.cli", "simulate", "--config", str(node.config), "--seconds", "0.3",
                        "--seed", str(SEED), "--wait-peers", "0", "--truth", str(truths[name]), *sim_args(name, t0)],
                       check=True, timeout=60, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lead, f1 = (json.loads(truths[n].read_text()) for n in (LEADER, "f1"))
    assert lead["pulse_times_s"] == f1["pulse_times_s"] and lead["t0_monotonic_s"] == f1["t0_monotonic_s"] == t0
    assert {d["ppm"] for d in lead["devices"].values()} == {DRIFT_PPM[LEADER]}
    assert {d["ppm"] for d in f1["devices"].values()} == {DRIFT_PPM["f1"]}
