"""Fault-matrix row 44 (/work/shared/fault-matrix.md): an LSL outlet replaced behind the bridge, mid-RECORD, by
one with the same source_id and another rate, channel count or format (issue 22 defect 10). Real pylsl outlets
in this process, the real bridge and writer."""

from __future__ import annotations

import json
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from acqd.service.procs import Simulator, wait_until

pylsl = pytest.importorskip("pylsl")
from tests.service.test_lsl import Pusher, lsl_rig  # noqa: E402  (needs pylsl)
from tests.sessions import SUBJECT

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("lsl")]  # LSL discovery sees every outlet on the host


class Impostor(Pusher):
    """A replacement outlet under the same name and source_id; its values are negative, so a row of it in the
    file is told apart from every row of the real outlet (whose values are >= 0)."""

    def values(self, idx: np.ndarray) -> np.ndarray:
        return -1 - super().values(idx)


def test_row44_a_replaced_lsl_outlet_of_another_format_is_a_mismatch_and_a_gap_never_data(tmp_path,
                                                                                          daemon_factory):
    cfg_path = lsl_rig(tmp_path, [{"name": "emg", "dtype": "float32", "shape": [2], "rate": 100.0,
                                   "lsl": {"source_id": "acqd-r44-src", "resolve_timeout_s": 0.5}}])
    real = Pusher("acqd-r44", 2, 100.0, pylsl.cf_float32, "float32")
    d = daemon_factory(cfg_path)
    d.command("acquire")
    sim = Simulator(cfg_path, 60, seed=44)

    def lsl_state() -> dict:
        return d.command("status")["streams"]["emg"]["lsl"]

    def pump_for(p: Pusher, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            p.pump()
            time.sleep(0.005)

    try:
        wait_until(lambda: (real.pump(), not d.command("preflight")["problems"])[-1], "every stream to flow", 30, 0.01)
        folder = Path(d.command("record", session="r44", metadata={"subject": SUBJECT})["session"]["path"])
        pump_for(real, 1.0)
        real.kill()
        # same source_id: 200 Hz (was recorded under the 100 Hz header), 8 channels and double64 (were: nothing,
        # while status said streaming)
        for rate, channels, fmt, dtype in ((200.0, 2, pylsl.cf_float32, "float32"),
                                           (100.0, 8, pylsl.cf_float32, "float32"),
                                           (100.0, 2, pylsl.cf_double64, "float64")):
            impostor = Impostor("acqd-r44", channels, rate, fmt, dtype)
            wait_until(lambda: (impostor.pump(), time.sleep(0.01),
                                lsl_state()["state"] == "mismatch" and lsl_state()["outlet"]["rate"] == rate
                                and lsl_state()["outlet"]["channels"] == channels)[-1],
                       f"the {rate:g} Hz {channels}-channel replacement to be refused", 15, 0.0)
            detail = lsl_state()["detail"]
            assert "does not match the config" in detail, detail
            pump_for(impostor, 0.3)
            impostor.kill()
        real.revive()
        at_revive = d.command("status")["streams"]["emg"]["total"]["samples"]
        wait_until(lambda: (real.pump(), time.sleep(0.005),
                            d.command("status")["streams"]["emg"]["total"]["samples"] > at_revive + 50)[-1],
                   "the real outlet to be recorded again", 20, 0.0)
        assert lsl_state()["state"] == "streaming"
        d.command("stop")
    finally:
        sim.stop()
    with h5py.File(folder / "streams" / "emg.h5", "r") as f:
        data, gaps = f["data"][:], f["gaps"][:]
    assert len(data) > 100 and (data >= 0).all(), f"{int((data < 0).any(axis=1).sum())} rows of a replacement"
    assert len(gaps) == 1  # the time the real outlet was away, replacements included
    incidents = [i["kind"] for i in json.loads((folder / "session.json").read_text())["incidents"]
                 if i["stream"] == "emg"]
    assert "lsl_lost" in incidents and "lsl_mismatch" in incidents, incidents
