"""The simulated rig's sync schemes, recorded by the daemon and finalized: every synced stream timed by its edges."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from acqd.finalize import finalize_session, unseal_session
from acqd.service.procs import wait_until
from tests.conftest import recording, write_rig

SMALL = {"probe": {"shape": [33], "sync": {"source": "channel", "channel": 32, "bit": 0}},
         "camera": {"shape": [48, 64]}}  # a smaller probe and camera: the test is about timing, not bandwidth
RECORD_S = 13.0  # a 1 Hz wave gives ~13 edges: more than the 10 pairs a fit needs


@pytest.mark.e2e
def test_a_rig_with_a_regular_1hz_square_wave_is_timed_by_its_edges(tmp_path, daemon_factory):
    """SpikeGLX's default sync: the host-time prior resolves the 1 s period, so probe and sensor pair their edges
    with the NIDAQ's, and the camera is timed by its strobes through the NIDAQ's map."""
    rig_file = write_rig(tmp_path, stream_overrides=SMALL)
    daemon = daemon_factory(rig_file)
    with recording(daemon, rig_file, "regular", seed=21, extra=("--sync", "regular")) as (_, folder):
        rows = lambda: daemon.command("status")["streams"]["nidaq"]["rows"]  # noqa: E731
        wait_until(lambda: rows() >= RECORD_S * 30000, f"{RECORD_S} s of recording", timeout_s=60)
        daemon.command("stop")
    daemon.command("stop", idle=True)
    try:
        report = finalize_session(folder)
        for name in ("probe", "sensor"):
            clock = report.streams[name].clock
            assert clock["source"] == "sync" and clock["pairing"] == "intervals + host prior", (name, clock)
            assert clock["error_bound_samples"] <= 1.5 and report.streams[name].flags == []
        camera = report.streams["camera"]
        assert camera.clock["source"] == "strobe" and camera.flags == [], (camera.flags, camera.frames)
        # The simulator drew its sync line as a regular wave: the edges the reference latched are 1 s apart.
        with h5py.File(folder / "streams" / "nidaq.h5", "r") as f:
            edges = f["sync/edges"][:]
        sync = edges["sample"][edges["line"] == 0].astype(np.int64)
        assert len(sync) >= 12 and np.all(np.abs(np.diff(sync) - 30000) <= 2)
    finally:
        unseal_session(folder)
