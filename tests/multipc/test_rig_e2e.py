"""A rig of three PCs end to end: each node a network namespace with its own ``acqd serve``, data root, token and
simulated devices (drifts -20, +15, +40 ppm) on one shared sync line. The leader's API records, stops; the
followers seal and ship their part to the leader's data root; the leader's finalize builds one master NWB. Read
back with plain pynwb: every stream of every node present and bit-exact with what its simulator sent, every
synced follower stream within 1 sample (30 kHz) of the truth on the leader's reference timebase, the host-timed
one within its bound, the start skew reported, one QC verdict per stream.

``test_three_pcs_record_gather_and_finalize_one_master`` records 12 s (``make test``); the ``slow`` one 60 s, as
the issue asks, and prints the figures docs/multi-pc.md quotes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from tests.multipc.netns import MultiPC, multipc, multipc_marks, session_json, wait_finalized
from tests.multipc.rigs import FOLLOWERS, LEADER, leader_seconds, node_rig
from tests.nwbread import read_master, series_times, stream_data

pytestmark = multipc_marks(ships=True)

SESSION = "rig26"
SAMPLE_30K_S = 1 / 30000.0


def record_rig(rig: MultiPC, seconds: float, session: str = SESSION) -> tuple[Path, float]:
    """Start every node, acquire, record ``seconds`` from the leader's API, stop; returns the leader's session
    folder once it is finalized and the time from stop to that (gather and finalize)."""
    rig.start_all()
    folder = rig.record(session)
    for name, client in rig.clients.items():  # every node records the same session
        assert client.command("status")["session"]["session_id"] == session, name
    rig.wait_recorded(seconds)
    stopped = time.monotonic()
    rig.clients[LEADER].command("stop")
    try:
        wait_finalized(folder)
    except TimeoutError as e:  # say where it stuck: each node's session state
        states = {n: session_json(node.data_root / session).get("state") for n, node in rig.nodes.items()}
        raise TimeoutError(f"{e}; session states by node: {states}") from None
    return folder, time.monotonic() - stopped


def series(nwbfile, stream: str):
    """The master's series of ``stream`` (named after the stream, node-unique)."""
    found = [ts for name, ts in nwbfile.acquisition.items() if name == stream or name.endswith(f"/{stream}")]
    assert len(found) == 1, (stream, sorted(nwbfile.acquisition))
    return found[0]


def check_master(rig: MultiPC, folder: Path, seconds: float) -> dict:
    """Check the finalized session against every node's truth; returns the figures (skew, errors)."""
    truths = {name: node_rig(node, rig.sim_seconds)[1] for name, node in rig.nodes.items()}
    qc = json.loads((folder / "qc" / "qc.json").read_text())
    meta = session_json(folder)
    assert qc["timebase"]["reference"] == f"{LEADER}_daq"
    zero_s = qc["timebase"]["zero_reference_s"]
    errors: dict[str, float] = {}
    io, nwbfile = read_master(folder / f"{SESSION}.nwb")
    with io:
        expected = {s for truth in truths.values() for s in truth.devices}
        assert {n.rsplit("/", 1)[-1] for n in nwbfile.acquisition} == expected
        for node, truth in truths.items():
            for stream, dev in truth.devices.items():
                report = qc["streams"][stream]
                assert report["qc"]["verdict"] in ("PASS", "WARN", "FAIL"), stream  # one verdict per stream
                assert node == LEADER or all(p.startswith(f"nodes/{node}/") for p in report["parts"]), report
                data, samples = stream_data(folder, report["parts"])
                assert len(data) >= 0.9 * dev.cfg.rate * seconds, (stream, len(data))
                ts = series(nwbfile, stream)
                assert np.array_equal(ts.data[:], data), stream  # the master links the node's bytes
                starts = np.flatnonzero(np.diff(samples, prepend=samples[0] - 1) != 1)
                for a, b in zip(starts, [*starts[1:], len(samples)]):  # ...which are what the simulator sent
                    assert np.array_equal(data[a:b], truth.samples(stream, int(samples[a]), int(b - a))), stream
                error = np.abs(series_times(ts) + zero_s - leader_seconds(truths[LEADER], truth, stream, samples))
                errors[stream] = float(error.max())
                if node != LEADER and dev.cfg.sync is not None:
                    assert error.max() <= SAMPLE_30K_S, (stream, error.max() * 30000, "samples")
                assert error.max() <= report["clock"]["error_bound_s"] + 1e-9, (stream, error.max(), report["clock"])
    assert {n: v["state"] for n, v in qc["nodes"].items()} == {n: "leader" if n == LEADER else "arrived"
                                                                for n in rig.nodes}
    assert set(meta["nodes"]) == set(rig.nodes) and all(n.get("start_host_ns") for n in meta["nodes"].values())
    assert 0 <= meta["start_skew_s"] < 5.0
    return {"start_skew_s": meta["start_skew_s"], "max_error_samples_30k": {s: e * 30000 for s, e in errors.items()}}


def run(tmp_path: Path, seconds: float) -> dict:
    with multipc(tmp_path, sim_seconds=seconds + 90) as rig:
        folder, gather_finalize_s = record_rig(rig, seconds)
        figures = check_master(rig, folder, seconds)
    figures["gather_and_finalize_s"] = round(gather_finalize_s, 2)
    print(f"multi-PC {seconds:.0f} s:", json.dumps(figures))
    return figures


def test_three_pcs_record_gather_and_finalize_one_master(tmp_path):
    run(tmp_path, 12.0)  # enough random-interval pulses to pair (5 s are not)


@pytest.mark.slow
def test_three_pcs_record_60_s_gather_and_finalize_one_master(tmp_path):
    run(tmp_path, 60.0)


@pytest.mark.slow
def test_one_pc_recording_the_same_streams_60_s_for_comparison(tmp_path):
    # the baseline of the gather-and-finalize time: one PC with all six streams (no followers, nothing to gather)
    with multipc(tmp_path, sim_seconds=150, nodes=(LEADER,), carries={LEADER: (LEADER, *FOLLOWERS)}) as rig:
        folder, finalize_s = record_rig(rig, 60.0)
        qc = json.loads((folder / "qc" / "qc.json").read_text())
        assert len(qc["streams"]) == 6
    print("one PC 60 s:", json.dumps({"finalize_s": round(finalize_s, 2)}))
