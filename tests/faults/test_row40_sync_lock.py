"""Fault-matrix row 40: a sync line stops carrying edges mid-RECORD (cable pulled). The real daemon records the
simulated rig; the simulator stops the probe latching sync edges (``sync_off``); the live sync lock alarms within
10 s (an incident on /api/events, the stream's ``sync`` in status, the metric), clears when the edges return, and
finalize's QC says so. And a stream whose sync line never shows an edge is ``no edges`` within 10 s of RECORD."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx

from acqd.finalize import finalize_session, unseal_session
from acqd.record.streamfile import open_for_read
from acqd.service.procs import Daemon, Simulator, wait_until
from acqd.sim.simulate import SyncOff
from tests.conftest import SIM_SECONDS, SMALL_RIG, assert_bit_exact, rig_for, write_rig
from tests.sessions import SUBJECT

ALARM_S = 10.0  # the promise: the alarm within 10 s of RECORD or of the cable being pulled
PULL_AT_S, PULL_S = 20.0, 8.0  # seconds of the simulation: after the lock (~10 pulses after RECORD), then 8 s out


class Incidents:
    """Every ``incident`` event of the daemon's /api/events, with the test's monotonic time it arrived."""

    def __init__(self, daemon: Daemon):
        self.seen: list[tuple[float, dict]] = []
        self.client = httpx.Client(base_url=daemon.url, timeout=httpx.Timeout(60, read=None))
        self.open = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        assert self.open.wait(30), "the event stream did not open"

    def _read(self) -> None:
        kind = None
        try:
            with self.client.stream("GET", "/api/events") as resp:
                self.open.set()
                for line in resp.iter_lines():
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: ") and kind == "incident":
                        self.seen.append((time.monotonic(), json.loads(line[6:])))
        except (httpx.HTTPError, RuntimeError):
            pass  # closed at the end of the test

    def wait(self, stream: str, kind: str, after: float = 0.0, timeout_s: float = 30.0) -> tuple[float, dict]:
        return wait_until(lambda: next(((t, d) for t, d in list(self.seen)
                                        if t >= after and d["stream"] == stream and d["kind"] == kind), None),
                          f"a {kind} incident of {stream}", timeout_s)

    def close(self) -> None:
        self.client.close()
        self.thread.join(10)


def sync_of(daemon: Daemon, stream: str) -> dict | None:
    return daemon.command("status")["streams"][stream]["sync"]


def status_once(daemon: Daemon, stream: str, state: str) -> dict:
    """The status once it shows ``stream``'s lock in ``state``: the snapshot follows an incident event within a
    publish interval (0.25 s), so a status read just after the event may still show the state before."""
    return wait_until(lambda: (st := daemon.command("status"))["streams"][stream]["sync"]["state"] == state and st,
                      f"{stream}'s sync {state} in status", 5)


def test_row40_cable_pulled_mid_record_alarms_within_10_s_and_clears_when_edges_return(tmp_path, daemon_factory):
    rig_file = write_rig(tmp_path, stream_overrides=SMALL_RIG)
    daemon = daemon_factory(rig_file)
    daemon.command("acquire")
    events = Incidents(daemon)
    sim = Simulator(rig_file, SIM_SECONDS, seed=40, faults=(f"sync_off:probe:{PULL_AT_S}:{PULL_S}",))
    sim_t0 = time.monotonic()  # just after the simulator's t0 (it prints "publishing", then starts its clock)
    try:
        wait_until(lambda: not daemon.command("preflight")["problems"], "all streams to flow")
        folder = Path(daemon.command("record", session="row40", metadata={"subject": SUBJECT})["session"]["path"])
        locked = wait_until(lambda: (s := sync_of(daemon, "probe")) and s["state"] == "locked" and s,
                            "the probe's sync to lock", PULL_AT_S - (time.monotonic() - sim_t0))
        assert locked["paired"] >= 10 and abs(locked["drift_ppm"]) < 31  # the simulator's crystals: within 30 ppm
        pulled = sim_t0 + PULL_AT_S
        lost_at, lost = events.wait("probe", "sync_lost", after=pulled - 1.0, timeout_s=PULL_AT_S + ALARM_S)
        assert lost_at - pulled <= ALARM_S, f"alarm {lost_at - pulled:.1f} s after the cable was pulled"
        assert "no edges" in lost["detail"] and lost["session"] == "row40"
        st = status_once(daemon, "probe", "no edges")
        probe = st["streams"]["probe"]["sync"]
        assert "no sync edge for" in probe["reason"]
        assert "probe: sync no edges" in " ".join(st["verdict"]["problems"])
        assert st["streams"]["nidaq"]["sync"]["state"] == "locked"  # the reference and the sensor keep their lock
        assert st["streams"]["sensor"]["sync"]["state"] in ("locked", "searching")
        assert st["streams"]["camera"]["sync"] is None  # strobe-timed: no sync line of its own
        assert st["sync_lock"]["enabled"] and st["sync_lock"]["active"]
        metrics = httpx.get(daemon.url + "/metrics", timeout=30).text
        assert 'acqd_stream_sync_locked{node="main",state="no edges",stream="probe"} 0.0' in metrics
        assert 'acqd_stream_sync_locked{node="main",state="locked",stream="nidaq"} 1.0' in metrics
        returned = sim_t0 + PULL_AT_S + PULL_S
        back_at, back = events.wait("probe", "sync_restored", after=returned - 1.0, timeout_s=PULL_S + ALARM_S + 5)
        assert back_at - returned <= ALARM_S and "after no edges" in back["detail"]
        status_once(daemon, "probe", "locked")
        daemon.command("stop")
    finally:
        sim.stop()
        events.close()
    kinds = [(i["stream"], i["kind"]) for i in json.loads((folder / "session.json").read_text())["incidents"]
             if i["kind"].startswith("sync_")]
    assert kinds == [("probe", "sync_lost"), ("probe", "sync_restored")]  # nothing else flapped
    # The file holds every sample the probe sent, and its sync edges are exactly what the device latched: none
    # while the cable was out.
    cfg, rig = rig_for(rig_file, seed=40)
    rig.sync_off(SyncOff("probe", PULL_AT_S, PULL_S))
    with open_for_read(folder / "streams" / "probe.h5") as f:
        assert assert_bit_exact(f, rig, "probe") > 0
        edges = f["sync/edges"][:]
        recorded = edges["sample"][edges["line"] == 0]
        expected = rig.expected_edges("probe")
        inside = (expected >= recorded[0]) & (expected <= recorded[-1])
        assert list(recorded) == list(expected[inside])
    try:
        finalize_session(folder)
        qc = json.loads((folder / "qc" / "qc.json").read_text())["streams"]["probe"]["qc"]
    finally:
        unseal_session(folder)  # sealed files are immutable: pytest could not remove the folder (nor its basetemp)
    # QC on this branch lists no edge gaps yet (another change adds them); it says the live lock was lost once.
    assert qc["source"] == "sync" and qc["sync_losses"] == 1 and "1 live sync losses" in qc["reasons"]
    assert qc["verdict"] == "WARN"


def test_row40_a_stream_whose_sync_never_shows_an_edge_is_no_edges_within_10_s_of_record(tmp_path, daemon_factory):
    rig_file = write_rig(tmp_path, stream_overrides=SMALL_RIG)
    daemon = daemon_factory(rig_file)
    daemon.command("acquire")
    events = Incidents(daemon)
    sim = Simulator(rig_file, SIM_SECONDS, seed=41, faults=("sync_off:sensor:0:1000",))
    try:
        wait_until(lambda: not daemon.command("preflight")["problems"], "all streams to flow")
        daemon.command("record", session="row40b", metadata={"subject": SUBJECT})
        recorded = time.monotonic()
        at, lost = events.wait("sensor", "sync_lost", after=recorded - 5.0, timeout_s=ALARM_S + 5)
        assert at - recorded <= ALARM_S, f"no edges reported {at - recorded:.1f} s after RECORD"
        assert "no edges" in lost["detail"]
        st = status_once(daemon, "sensor", "no edges")
        assert st["streams"]["sensor"]["sync"]["edges"] == 0
        assert not st["verdict"]["ok"] and "sensor: sync no edges" in st["verdict"]["line"] + " ".join(
            st["verdict"]["problems"])
        # The others lock (or are still searching: ~10 pulses are needed), and are never reported.
        assert all(st["streams"][n]["sync"]["state"] in ("locked", "searching") for n in ("probe", "nidaq"))
        assert not [d for _, d in events.seen if d["kind"] == "sync_lost" and d["stream"] != "sensor"]
        daemon.command("stop")
    finally:
        sim.stop()
        events.close()
