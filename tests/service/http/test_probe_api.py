"""The probe view's API (acqd.service.http.probes) on the real daemon and simulated rig, no browser: the layout from
the probe file, the simulated units' rates at their sites, the dead and noisy sites, crossings on the session
timebase, the trace block chosen by channel and band, stale once the data stops. Pure parts with fakes below."""

from __future__ import annotations

import json
import threading

import httpx
import numpy as np
import pytest

from acqd.config import load_config
from acqd.record.preview import encode_message
from acqd.service.http.probes import classify, features, site_pitch
from acqd.service.procs import Simulator, wait_until
from acqd.sim.simulate import probe_truth
from tests.conftest import write_rig


def _watch(url: str, stop: threading.Event, seen: dict) -> threading.Thread:
    """A page's preview stream, held open in a thread (writers compute previews only while someone watches)."""
    def run() -> None:
        with httpx.Client(base_url=url, timeout=httpx.Timeout(30.0)) as http, \
                http.stream("GET", "/api/console/preview") as resp:
            for line in resp.iter_lines():
                if line.startswith("data:"):
                    msg = json.loads(line[5:])
                    if "probe" in msg:
                        seen.setdefault("blocks", []).append(msg["probe"]["block"])
                if stop.is_set():
                    return
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_probe_view_shows_the_simulated_units_dead_and_noisy_sites_on_the_session_timebase(tmp_path, daemon_factory):
    rig = write_rig(tmp_path)
    truth = probe_truth(load_config(rig).stream("probe"))
    daemon = daemon_factory(rig)
    daemon.command("acquire")
    sim = Simulator(rig, 60, seed=4)
    stop, seen = threading.Event(), {}
    watcher = _watch(daemon.url, stop, seen)
    try:
        with httpx.Client(base_url=daemon.url, timeout=httpx.Timeout(30.0)) as http:
            (probe,) = http.get("/api/console/probes").json()["probes"]
            assert probe["layout"] == "probe" and len(probe["sites"]) == 384 and probe["sync_channel"] == 384
            assert probe["pitch_um"] == 20.0 and probe["sites"][0]["area"] == "VISp"
            assert http.put("/api/console/probes/probe/block", json={"channels": list(range(64, 128)), "band": "ap"}
                            ).status_code == 200
            bad = http.put("/api/console/probes/probe/block", json={"channels": [384], "band": "ap"})
            assert bad.status_code == 422 and "no electrode channel" in bad.text
            assert http.put("/api/console/probes/probe/block", json={"channels": [1], "band": "x"}).status_code == 422

            def full() -> dict | None:  # 30 s of the data analysed (the AP segments' share of it)
                r = http.get("/api/console/probes/probe").json()
                f, s = r["features"], r["settings"]
                return r if f and f["analysed_s"] >= 0.9 * 30 * (s["ap_segment_s"] - 0.003) / s["ap_period_s"] else None
            reply = wait_until(full, "a full window of probe features", 60, every_s=0.5)
            status = http.get("/api/status").json()
    finally:
        stop.set()
        sim.stop()
    f = reply["features"]
    assert reply["stale"] is False and reply["timebase"] == "session" and reply["uv_per_unit"] == pytest.approx(1.95)
    background = np.median([r for r in f["rates"] if r is not None])  # the pool's scattered spikes, a Hz or two
    for unit in truth["units"]:
        assert f["rates"][unit["channel"]] - background == pytest.approx(unit["rate_hz"], rel=0.2)
    assert truth["dead"][0] in f["dead"] and truth["noisy"][0] in f["noisy"] and len(f["dead"] + f["noisy"]) == 2
    # Crossings on the session timebase: seconds since ACQUIRE, none in the future, the last ~10 s.
    t = np.array(f["crossings"]["t"])
    since_acquire = status["uptime_s"]  # the daemon was started just before ACQUIRE
    assert len(t) > 50 and t.max() <= since_acquire + 0.5 and t.min() >= t.max() - 10.5 and t.min() > 0
    assert any(b["channels"] == list(range(64, 128)) and b["band"] == "ap" and b["y"] for b in seen["blocks"])
    watcher.join(10)


def test_sites_are_classified_against_the_probes_median():
    rms = [10.0] * 10 + [0.5, 50.0, None]
    assert classify(rms, 0.2, 3.0) == ([10], [11], 10.0)
    assert classify([None, None], 0.2, 3.0) == ([], [], None)


def test_site_pitch_is_the_smallest_row_step():
    assert site_pitch([{"y": 0.0}, {"y": 0.0}, {"y": 20.0}, {"y": 40.0}]) == 20.0


def test_features_put_crossings_on_the_session_timebase_and_say_stale():
    from acqd.config import StreamConfig

    s = StreamConfig(name="p", kind="ephys", endpoint="ipc:///tmp/p", dtype="int16", shape=(3,), rate=1000.0,
                     units="volts", conversion=2e-6)
    probe = {"ap_rms": [1.0, 2.0, 1.5], "lfp_rms": [1, 1, 1], "rates": [0, 1, 2], "threshold": [-1, -1, -1],
             "analysed_s": 1.0, "crossings": {"samples": [5000, 6500], "channels": [1, 2], "dropped": 0},
             "block": {"channels": [0], "band": "ap", "starts": [], "steps": [], "y": []}}
    raw = encode_message("p", {"probe": probe, "t_offset": -3.0})
    out = features(s, (100.0, raw), 0.2, 3.0, 101.0)
    assert out["features"]["crossings"]["t"] == [2.0, 3.5] and out["stale"] is False and out["age_s"] == 1.0
    assert features(s, (100.0, raw), 0.2, 3.0, 103.0)["stale"] is True
    assert features(s, None, 0.2, 3.0, 103.0)["features"] is None
