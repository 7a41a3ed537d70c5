"""Fault row 43: a PC of a multi-PC rig dies or drops off the network during RECORD.

Each test runs a leader and one follower, each a network namespace of its own with its own ``acqd serve`` and
simulator on the shared sync line (tests/multipc/netns.py):
- the follower's daemon killed with -9: the leader shows the incident; the follower's data up to the kill is
  recovered by its restarted daemon, finalized, shipped, and finalizes with the rest in the leader's master;
- the follower's cable pulled for 10 s: it records on and loses nothing; the leader shows it unreachable, then back;
- the leader killed with -9: the follower records on; stopped directly, it seals and ships its part, and the
  restarted leader finalizes the session later with it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from acqd.client import Client
from acqd.service.procs import pid_alive, wait_until
from acqd.session import SESSION_FILE
from tests.multipc.netns import MultiPC, multipc, multipc_marks, session_json, wait_finalized
from tests.multipc.rigs import LEADER, leader_seconds, node_rig
from tests.nwbread import read_master, series_times, stream_data

pytestmark = multipc_marks(ships=True)

SESSION = "row43"
NODES = (LEADER, "f1")
FOLLOWER_STREAMS = ("f1_daq", "f1_probe")


def node_view(client: Client, node: str) -> dict:
    """The leader's status of ``node`` (``nodes.<node>``: reachable, clock offset, disk, streams)."""
    return client.command("status").get("nodes", {}).get(node, {})


def leader_incident(client: Client, kind: str, node: str) -> dict:
    """Wait for the leader's incident ``kind`` about ``node`` (status ``recent_incidents``)."""
    def found() -> dict | None:
        return next((i for i in client.command("status").get("recent_incidents") or []
                     if i["kind"] == kind and f"node {node}" in i["detail"]), None)
    return wait_until(found, f"the leader's {kind} incident for {node}", 15, 0.25)


def arrived(rig: MultiPC, node: str) -> Path:
    """The follower's sealed part of the session in the leader's data root (``<session>/nodes/<node>/``)."""
    return rig.leader.data_root / SESSION / "nodes" / node


def written_s(rig: MultiPC, status: dict) -> dict[str, float]:
    """Seconds of samples each follower stream has written, by f1's ``status`` (its rows over its rate; the
    session's ``elapsed_s`` is rounded to 0.1 s and runs ahead of the data by the first chunk's latency)."""
    _, truth = node_rig(rig.nodes["f1"], rig.sim_seconds)
    return {s: status["streams"][s]["rows"] / truth.devices[s].cfg.rate for s in FOLLOWER_STREAMS}


def check_follower_part(rig: MultiPC, folder: Path, at_least_s: float) -> dict[str, int]:
    """The master holds the follower's streams, bit-exact with what its simulator sent, at least ``at_least_s``
    long, and on the leader's timebase within their error bound of the truth (extrapolated rows included: the
    follower may have recorded on after the leader died); returns the rows per stream."""
    _, truth = node_rig(rig.nodes["f1"], rig.sim_seconds)
    _, lead_truth = node_rig(rig.leader, rig.sim_seconds)
    qc = json.loads((folder / "qc" / "qc.json").read_text())
    rows = {}
    io, nwbfile = read_master(folder / f"{SESSION}.nwb")
    with io:
        names = {n.rsplit("/", 1)[-1]: n for n in nwbfile.acquisition}
        for stream in FOLLOWER_STREAMS:
            data, samples = stream_data(folder, qc["streams"][stream]["parts"])
            ts = nwbfile.acquisition[names[stream]]
            assert np.array_equal(ts.data[:], data), stream
            error = np.abs(series_times(ts) + qc["timebase"]["zero_reference_s"]
                           - leader_seconds(lead_truth, truth, stream, samples))
            assert error.max() <= qc["streams"][stream]["clock"]["error_bound_s"] + 1e-9, (stream, error.max())
            starts = np.flatnonzero(np.diff(samples, prepend=samples[0] - 1) != 1)
            for a, b in zip(starts, [*starts[1:], len(samples)]):
                assert np.array_equal(data[a:b], truth.samples(stream, int(samples[a]), int(b - a))), stream
            rate = truth.devices[stream].cfg.rate
            assert len(data) >= at_least_s * rate, (stream, len(data) / rate, at_least_s)
            rows[stream] = len(data)
            assert qc["streams"][stream]["qc"]["verdict"] in ("PASS", "WARN", "FAIL")
    assert qc["nodes"]["f1"]["state"] == "arrived", qc["nodes"]
    return rows


def test_row43_a_follower_killed_9_mid_record_is_a_leader_incident_and_its_data_finalizes_with_the_rest(tmp_path):
    with multipc(tmp_path, sim_seconds=150, nodes=NODES) as rig:
        rig.start_all()
        folder = rig.record(SESSION)
        lead = rig.clients[LEADER]
        rig.wait_recorded(12.0, ("f1",))
        pid = rig.daemons["f1"].pid
        rig.kill("f1")
        killed_after_s = 12.0
        assert not pid_alive(pid)
        wait_until(lambda: node_view(lead, "f1").get("reachable") is False, "the leader to see f1 gone", 15)
        leader_incident(lead, "node_unreachable", "f1")
        assert lead.command("status")["mode"] == "RECORD"  # the leader's own streams record on
        # f1 restarted: its daemon recovers the interrupted session; finalized, it ships it to the leader
        f1 = rig.start("f1")
        wait_until(lambda: node_view(lead, "f1").get("reachable") is True, "the leader to see f1 back", 15)
        f1_session = rig.nodes["f1"].data_root / SESSION
        assert session_json(f1_session)["state"] == "interrupted"
        f1.command("finalize", session=SESSION)
        wait_until(lambda: (arrived(rig, "f1") / SESSION_FILE).exists(), "f1's part at the leader", 120, 0.5)
        lead.command("stop")
        wait_finalized(folder)
        check_follower_part(rig, folder, at_least_s=killed_after_s * 0.9)
        assert session_json(folder)["incomplete"] is True  # the master says a part of it ended early
        assert session_json(arrived(rig, "f1"))["incomplete"] is True


def test_row43_a_follower_cut_off_the_network_for_10_s_loses_nothing_and_the_leader_shows_it_gone_then_back(tmp_path):
    with multipc(tmp_path, sim_seconds=150, nodes=NODES) as rig:
        rig.start_all()
        folder = rig.record(SESSION)
        lead = rig.clients[LEADER]
        rig.wait_recorded(3.0)
        rig.net.link("f1", up=False)
        cut = time.monotonic()
        wait_until(lambda: node_view(lead, "f1").get("reachable") is False, "the leader to see f1 unreachable", 10)
        leader_incident(lead, "node_unreachable", "f1")
        wait_until(lambda: time.monotonic() - cut >= 10.0, "the cable to stay out 10 s", 15, 0.25)
        rig.net.link("f1", up=True)
        wait_until(lambda: node_view(lead, "f1").get("reachable") is True, "the leader to see f1 back", 15)
        leader_incident(lead, "node_reachable", "f1")
        f1 = rig.clients["f1"]
        status = f1.command("status")
        assert status["mode"] == "RECORD" and status["session"]["session_id"] == SESSION
        assert all(s["gaps"] == 0 for s in status["streams"].values()), status["streams"]
        recorded_s = min(written_s(rig, status).values())
        lead.command("stop")
        wait_finalized(folder)
        rows = check_follower_part(rig, folder, at_least_s=recorded_s)
        qc = json.loads((folder / "qc" / "qc.json").read_text())
        assert all(not qc["streams"][s]["gaps"] for s in rows), {s: qc["streams"][s]["gaps"] for s in rows}


def test_row43_the_leader_killed_9_mid_record_leaves_followers_recording_and_finalizes_them_later(tmp_path):
    with multipc(tmp_path, sim_seconds=150, nodes=NODES) as rig:
        rig.start_all()
        folder = rig.record(SESSION)
        # 12 s on the leader's reference: enough shared sync edges to pair the follower's reference with it
        # (after 3 s, 4 edges are too few: the follower's part is then listed unusable, FAIL, left out)
        rig.wait_recorded(12.0)
        rig.kill(LEADER)
        f1 = rig.clients["f1"]
        at_kill = written_s(rig, f1.command("status"))
        wait_until(lambda: all(v >= at_kill[s] + 10 for s, v in written_s(rig, f1.command("status")).items()),
                   "f1 to record on 10 s", 20, 0.25)
        status = f1.command("status")
        assert status["mode"] == "RECORD" and all(s["state"] == "recording" for s in status["streams"].values())
        f1.command("stop")  # stopped directly: it seals its part and ships it to the leader's data root
        wait_until(lambda: (arrived(rig, "f1") / SESSION_FILE).exists(), "f1's part at the leader", 120, 0.5)
        lead = rig.start(LEADER)  # the restarted leader recovers its interrupted session and finalizes it
        assert session_json(folder)["state"] == "interrupted"
        lead.command("finalize", session=SESSION)
        wait_finalized(folder)
        check_follower_part(rig, folder, at_least_s=min(at_kill.values()) + 10)
