"""LSL streams end to end: real pylsl outlets on loopback, bridged and recorded next to the simulated rig,
finalized to NWB; a mismatched or missing outlet refused; LabRecorder's remote control over a real TCP socket."""

from __future__ import annotations

import gc
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from pynwb import NWBHDF5IO

from acqd.client import ApiError
from acqd.service.procs import Simulator, wait_until
from acqd.sim.simulate import Rig, SimParams
from acqd.config import load_config
from tests.conftest import write_rig
from tests.sessions import SUBJECT

pylsl = pytest.importorskip("pylsl")

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("lsl")]  # LSL discovery sees every outlet on the host


def lsl_rig(tmp_path: Path, extra: list[dict], daemon: dict | None = None) -> Path:
    """The example rig without its camera and probe (fast), plus ``extra`` LSL streams on ipc endpoints."""
    path = write_rig(tmp_path, daemon_overrides=daemon)
    raw = yaml.safe_load(path.read_text())
    raw["streams"] = [s for s in raw["streams"] if s["name"] in ("nidaq", "sensor")]
    for s in extra:
        raw["streams"].append({"endpoint": f"ipc://{tmp_path}/ipc/{s['name']}", **s})
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


class Pusher:
    """A regular outlet pushed in real time from this process: sample n has value n * channels + c and LSL
    timestamp t0 + n / rate; samples pushed while the outlet is down are never sent."""

    def __init__(self, name: str, channels: int, rate: float, fmt, dtype: str):
        self.name, self.channels, self.rate, self.fmt, self.dtype = name, channels, rate, fmt, dtype
        self.outlet = self._outlet()
        self.t0, self.n = pylsl.local_clock(), 0
        self.sent: list[int] = []

    def _outlet(self):
        return pylsl.StreamOutlet(pylsl.StreamInfo(self.name, "EEG", self.channels, self.rate, self.fmt,
                                                   f"{self.name}-src"))

    def values(self, idx: np.ndarray) -> np.ndarray:
        v = idx[:, None] * self.channels + np.arange(self.channels)
        return (v % 30000).astype(self.dtype) if self.dtype == "int16" else v.astype(self.dtype)

    def pump(self) -> None:
        k = int((pylsl.local_clock() - self.t0) * self.rate) - self.n
        if k <= 0:
            return
        idx = np.arange(self.n, self.n + k)
        if self.outlet is not None:
            self.outlet.push_chunk(self.values(idx), (self.t0 + idx / self.rate).tolist())
            self.sent += idx.tolist()
        self.n += k

    def kill(self) -> None:
        self.outlet = None
        gc.collect()

    def revive(self) -> None:
        self.outlet = self._outlet()


def test_lsl_streams_recorded_exactly_aligned_and_an_outage_is_one_gap(tmp_path, daemon_factory):
    cfg_path = lsl_rig(tmp_path, [
        {"name": "eeg", "dtype": "float32", "shape": [8], "rate": 500.0, "lsl": {"name": "acqd-eeg"}},
        {"name": "emg", "dtype": "int16", "shape": [2], "rate": 90.0, "lsl": {"source_id": "acqd-emg-src"}},
        {"name": "markers", "kind": "events", "dtype": "uint8", "shape": [1, 32], "rate": 10.0,
         "lsl": {"name": "acqd-markers", "type": "Markers", "nominal_rate": 0}},
        {"name": "saccades", "kind": "events", "dtype": "float32", "shape": [2], "rate": 10.0,
         "lsl": {"name": "acqd-saccades", "nominal_rate": 0}},
    ])
    eeg = Pusher("acqd-eeg", 8, 500.0, pylsl.cf_float32, "float32")
    emg = Pusher("acqd-emg", 2, 90.0, pylsl.cf_int16, "int16")
    markers = pylsl.StreamOutlet(pylsl.StreamInfo("acqd-markers", "Markers", 1, 0, pylsl.cf_string, "acqd-mk"))
    saccades = pylsl.StreamOutlet(pylsl.StreamInfo("acqd-saccades", "Gaze", 2, 0, pylsl.cf_float32, "acqd-sac"))
    pushed_markers: list[tuple[str, float]] = []
    truth = tmp_path / "truth.json"
    d = daemon_factory(cfg_path)
    d.command("acquire")
    sim = Simulator(cfg_path, 60, seed=3, truth=truth)
    try:
        def flowing() -> bool:
            eeg.pump(), emg.pump()
            return not d.command("preflight")["problems"]

        wait_until(flowing, "every stream to flow", 30, 0.01)
        folder = Path(d.command("record", session="lsl", metadata={"subject": SUBJECT})["session"]["path"])
        start = time.monotonic()
        phase = "before"
        # A loaded machine: still revive it, and push the 12 markers of 4 s (one per turn of this loop, whose turns
        # a slow revive stretched: 5 were pushed in one such run, and the check below needs 8).
        while (elapsed := time.monotonic() - start) < 4.0 or phase != "after" or len(pushed_markers) < 12:
            eeg.pump(), emg.pump()
            if phase == "before" and elapsed > 1.5:
                phase, killed_at = "down", pylsl.local_clock()
                eeg.kill()
            elif phase == "down" and pylsl.local_clock() - killed_at > 0.5:
                eeg.revive()
                phase, outage = "after", pylsl.local_clock() - killed_at
                at_revive = d.command("status")["streams"]["eeg"]["total"]["samples"]
            if len(pushed_markers) < int(elapsed * 3):
                text, ts = f"trial {len(pushed_markers)} ✓", pylsl.local_clock()
                markers.push_sample([text], ts)
                saccades.push_sample([len(pushed_markers), -0.5], ts)  # an irregular numeric stream
                pushed_markers.append((text, ts))
            time.sleep(0.005)
        # The inlet reconnects to the new outlet by itself (within a few seconds): record half a second of it. Its
        # first chunk records the outage's gap; samples alone may still be the old outlet's, seconds behind.
        def back() -> bool:
            eeg.pump(), emg.pump(), time.sleep(0.005)
            status = d.command("status")["streams"]["eeg"]
            return status["gaps"] >= 1 and status["total"]["samples"] > at_revive + 250

        wait_until(back, "eeg to come back", 60, 0.0)
        time.sleep(0.3)
        # Every marker pushed is in before the stop (on a loaded machine its bridge may be seconds behind).
        wait_until(lambda: min(d.command("status")["streams"][s]["total"]["samples"] for s in ("markers", "saccades"))
                   >= len(pushed_markers), "every marker to arrive", 20, 0.05)
        d.command("stop")
    finally:
        sim.stop()
    report = json.loads(subprocess.run(
        [sys.executable, "-m", "acqd.cli", "finalize", str(folder), "--json"], capture_output=True,
        text=True, timeout=240, check=True).stdout)

    # The stream files: every row carries its LSL timestamp; the clock offsets are in /sync/offsets.
    with h5py.File(folder / "streams" / "eeg.h5", "r") as f:
        assert f["timestamps"].shape[0] == f["data"].shape[0] and len(f["sync/offsets"]) >= 2
        assert len(f["gaps"]) == 1

    cfg = load_config(cfg_path)
    t0 = json.loads(truth.read_text())["t0_monotonic_s"]
    ref = Rig(cfg, SimParams(seed=3, seconds=60)).devices["nidaq"].clock
    zero_s = report["timebase"]["zero_reference_s"]
    with NWBHDF5IO(str(folder / "lsl.nwb"), "r") as io:
        nwb = io.read()
        for p in (eeg, emg):
            name = "eeg" if p is eeg else "emg"
            ts = nwb.acquisition[name]
            data = ts.data[:]
            # Values encode the sample index: every row is exactly what was pushed for that index, in order.
            k = np.flatnonzero(np.all(p.values(np.array(p.sent)) == data[0], axis=1))[0]
            idx = p.sent[k] + np.flatnonzero(np.isin(np.arange(p.sent[k], p.sent[-1] + 1), p.sent))
            idx = np.array(p.sent)[k:]
            jumps = np.flatnonzero(np.diff(data[:, 0].astype(np.float64)) != p.channels % 30000)
            if p is eeg:  # one stretch before the outage, one after: rows after the jump continue from there
                assert len(jumps) == 1, f"eeg: {len(jumps)} discontinuities"
                j = jumps[0] + 1
                resume = int(data[j, 0]) // p.channels
                idx = np.concatenate([idx[:j], np.arange(resume, resume + len(data) - j)])
                lost_s = (resume - idx[j - 1] - 1) / p.rate
            else:
                assert len(jumps) == 0
                idx = idx[:len(data)]
            assert np.isin(idx, p.sent).all() and np.array_equal(data, p.values(idx)), f"{name}: samples differ"
            # Times: the pushed LSL timestamp, through the simulator's true clock, on the reference timebase.
            times = ts.timestamps[:] if ts.timestamps is not None else ts.starting_time + np.arange(len(data)) / ts.rate
            true_ref_s = ref.phase(p.t0 + idx / p.rate - t0) / ref.rate
            err = np.abs(times + zero_s - true_ref_s)
            bound = report["streams"][name]["clock"]["error_bound_s"]
            print(f"{name}: alignment error max {err.max() * 1e3:.3f} ms, mean {err.mean() * 1e3:.3f} ms, "
                  f"bound {bound * 1e3:.3f} ms")
            assert err.max() <= bound, f"{name}: {err.max()} s off, bound {bound} s"
            # Issue 24.4: every LSL stream landed ~5 ms late (mean +4.6 to +5.2 ms): the map was moved by the height
            # of the reference's fastest fifth. It now runs through the fastest delivery: within ~1 ms of the push.
            assert err.mean() <= 1e-3 and err.max() <= 2e-3, f"{name}: {err.mean()} s off on average"
        # One gap in eeg: the outage, plus what the outlet pushed before the inlet had reconnected.
        gaps = nwb.intervals["gaps"].to_dataframe()
        g = gaps[gaps["stream"] == "eeg"]
        duration = g["stop_time"].iloc[0] - g["start_time"].iloc[0]
        print(f"outage {outage:.3f} s, samples missing for {lost_s:.3f} s, gap {duration:.3f} s")
        assert len(g) == 1 and g["kind"].iloc[0] == "samples"
        assert outage - 0.05 < duration and abs(duration - lost_s) < 0.01 and duration < outage + 5.0
        assert (gaps["stream"] == "emg").sum() == 0
        # Markers: an events table with their text, at their LSL timestamps on the reference timebase.
        ev = nwb.events["markers"]
        labels = list(ev["label"].data[:])
        recorded = [(t, s) for t, s in pushed_markers if t in labels]
        assert labels == [t for t, _ in recorded] and len(labels) >= 8
        true_ref_s = ref.phase(np.array([s for _, s in recorded]) - t0) / ref.rate
        err = np.abs(ev["timestamp"].data[:] + zero_s - true_ref_s)
        assert err.max() <= report["streams"]["markers"]["clock"]["error_bound_s"]
        values = nwb.events["saccades"]["value"].data[:]
        assert np.array_equal(values, [[i, -0.5] for i in range(len(pushed_markers)) if pushed_markers[i] in recorded])
        lsl_ts = nwb.events["saccades"]["lsl_timestamp"].data[:]
        assert np.allclose(lsl_ts, [s for _, s in recorded], rtol=0, atol=2e-9)
    assert report["streams"]["eeg"]["lsl"]["time_corrections"] >= 2


def test_an_lsl_outlet_that_does_not_match_or_is_absent_is_refused_by_name(tmp_path, daemon_factory):
    cfg_path = lsl_rig(tmp_path, [
        {"name": "eeg", "dtype": "float32", "shape": [4], "rate": 500.0, "lsl": {"name": "acqd-wide"}},
        {"name": "ghost", "dtype": "float32", "shape": [1], "rate": 100.0,
         "lsl": {"name": "acqd-nowhere", "resolve_timeout_s": 0.5}},
    ])
    outlet = pylsl.StreamOutlet(pylsl.StreamInfo("acqd-wide", "EEG", 8, 250, pylsl.cf_double64, "acqd-wide-src"))
    d = daemon_factory(cfg_path)
    d.command("acquire")

    def lsl_problems() -> list[str]:
        return [p for p in d.command("preflight")["problems"] if "LSL" in p]

    def refused() -> list[str]:
        found = lsl_problems()
        return found if sum("does not match" in p or "no LSL outlet" in p for p in found) == 2 else []

    problems = wait_until(refused, "both LSL streams to be refused", 20)
    eeg = next(p for p in problems if "'eeg'" in p)
    assert "does not match the config" in eeg and "8 channel(s)" in eeg and "double64" in eeg and "250" in eeg
    assert any("'ghost'" in p and "no LSL outlet name='acqd-nowhere'" in p for p in problems)
    assert d.command("status")["streams"]["eeg"]["lsl"]["state"] == "mismatch"
    with pytest.raises(ApiError, match="does not match the config"):
        d.command("record", session="refused", metadata={"subject": SUBJECT})
    # Discovery shows the outlet as it is, with a config entry that would record it.
    seen = [o for o in d.client.request("GET", "/api/lsl")["outlets"] if o["name"] == "acqd-wide"]
    assert len(seen) == 1 and seen[0]["channels"] == 8 and seen[0]["format"] == "double64"
    assert seen[0]["config"]["dtype"] == "float64" and seen[0]["config"]["shape"] == [8]
    del outlet


def test_labrecorder_remote_control_records_a_session_named_from_its_commands(tmp_path, daemon_factory):
    cfg_path = lsl_rig(tmp_path, [], daemon={"labrecorder": {"port": 0}})
    d = daemon_factory(cfg_path)
    d.command("acquire")
    sim = Simulator(cfg_path, 60, seed=5)
    try:
        wait_until(lambda: not d.command("preflight")["problems"], "the rig to flow", 30)
        with socket.create_connection(("127.0.0.1", d.info["labrecorder_port"]), timeout=60) as s:
            def say(line: str) -> bytes:
                s.sendall(line.encode() + b"\n")
                return s.recv(4096)

            assert say("select all") == b"OK"
            assert say("update") == b"OK"
            assert say(f"filename {{root:{tmp_path / 'data'}}} {{task:oddball}} {{run:2}} {{participant:P001}} "
                       "{session:S1} {acquisition:fast} {modality:eeg}") == b"OK"
            assert say("bogus command").startswith(b"error: unknown command 'bogus command'")
            assert say("filename {colour:red}") == b"OK"  # LabRecorder ignores options it does not know
            refused = say("start")  # nothing says what P001 is: refused, naming what is missing, never mislabeled
            assert refused.startswith(b"error: ") and b"subject" in refused and d.command("status")["mode"] == "ACQUIRE"
            d.command("recording", metadata={"subject": {"species": "Homo sapiens", "sex": "F", "age": "P30Y"}})
            assert say("start") == b"OK"  # the participant is the prepared subject's id
            assert d.command("status")["session"]["session_id"] == "sub-P001_ses-S1_task-oddball_acq-fast_run-2"
            time.sleep(0.5)
            assert say("stop") == b"OK"
    finally:
        sim.stop()
    folder = tmp_path / "data" / "sub-P001_ses-S1_task-oddball_acq-fast_run-2"
    session = json.loads((folder / "session.json").read_text())
    assert session["state"] == "closed" and session["metadata"]["subject"] == {
        "subject_id": "P001", "species": "Homo sapiens", "sex": "F", "age": "P30Y", **{
            k: v for k, v in session["metadata"]["subject"].items() if k not in ("subject_id", "species", "sex", "age")}}
    assert (folder / "streams" / "nidaq.h5").is_file()
