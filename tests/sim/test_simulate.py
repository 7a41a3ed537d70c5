"""The simulated rig's pre-built message frames carry exactly the samples the rig says it sent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from acqd.config import load_config
from acqd.sim.simulate import Rig, SimParams, parse_fault
from tests.sessions import small_config

RIG = Path(__file__).parents[2] / "configs" / "rig.yaml"


@pytest.mark.parametrize("sync", ["random", "regular"])
def test_every_message_is_the_rigs_samples_whether_prebuilt_or_built(sync):
    # rig.yaml: a probe and a NIDAQ with a sync line in their data, the camera's strobes on a second NIDAQ line,
    # a camera (one frame per message) and a frame-synced sensor: 3 s of messages of each device, the pool wrapped.
    rig = Rig(load_config(RIG), SimParams(seed=3, seconds=4, sync=sync))
    twin = Rig(load_config(RIG), SimParams(seed=3, seconds=4, sync=sync))  # never sends: the truth
    for name, dev in rig.devices.items():
        n, pool, built = dev.chunk, len(dev.pool), 0
        for k in range(int(3 * dev.cfg.rate) // n):
            first = dev.next_sample + k * n
            data, frame = dev.message(first)
            expected = twin.samples(name, first, n)
            assert data.dtype == expected.dtype and np.array_equal(data, expected), (name, k)
            if frame is not None:
                assert frame.bytes == expected.tobytes(), (name, k)
            # Built only where a digital line is high (a sync pulse, a camera strobe) or the pool's end falls inside.
            high = any((expected[:, channel].astype(np.int64) >> bit & 1).any() for channel, bit in dev.lines)
            assert (frame is None) == (high or first % pool + n > pool), (name, k)
            built += frame is None
        assert built < k, (name, built)


def test_sync_off_silences_only_that_streams_sync_line(tmp_path):
    cfg = small_config(tmp_path)  # 32 probe channels and the sync word: the width is not what is tested
    rig, twin = Rig(cfg, SimParams(seed=5, seconds=30)), Rig(cfg, SimParams(seed=5, seconds=30))
    off = parse_fault("sync_off:probe:10:8")
    removed = rig.sync_off(off)
    gone = (rig.pulses >= 10) & (rig.pulses < 18)
    assert removed == gone.sum() > 0
    assert np.array_equal(rig.expected_edges("probe"), twin.expected_edges("probe")[~gone])
    assert np.array_equal(rig.expected_edges("nidaq"), twin.expected_edges("nidaq"))
    probe, sync = rig.devices["probe"], cfg.stream("probe").sync
    first = int(probe.clock.sample_at(9.0))
    data, want = rig.samples("probe", first, 300_000), twin.samples("probe", first, 300_000)
    line = (want[:, sync.channel] >> sync.bit) & 1
    kept = np.array([int(t) for t in probe.clock.phase(np.array([10.0, 18.0]))]) - first
    assert line[kept[0]:kept[1]].any() and not ((data[:, sync.channel] >> sync.bit) & 1)[kept[0]:kept[1]].any()
    others = np.delete(np.arange(data.shape[1]), sync.channel)
    assert np.array_equal(data[:, others], want[:, others])  # the data itself is untouched
    assert np.array_equal(data[:kept[0]], want[:kept[0]])


@pytest.mark.parametrize("text", ["sync_off:probe:ten:5", "sync_off:probe:1", "probe:drop"])
def test_a_bad_fault_says_how_to_write_one(text):
    with pytest.raises(ValueError, match="sync_off:STREAM:START_S:DURATION_S"):
        parse_fault(text)


def test_sync_off_needs_a_stream_with_its_own_sync_line():
    rig = Rig(load_config(RIG), SimParams(seed=5, seconds=5))
    for text, why in (("sync_off:camera:1:2", "no sync line"), ("sync_off:nope:1:2", "no simulated stream")):
        with pytest.raises(ValueError, match=why):
            rig.check_fault(parse_fault(text))


def test_the_probe_has_units_at_known_sites_and_rates_a_dead_and_a_noisy_site():
    """The probe view's own features (acqd.record.probeview) on the simulated probe's samples find what the truth
    says: each unit's rate on its site (within 20 %), the dead site flat, the noisy site the loudest."""
    from acqd.record import probeview as pv

    rig = Rig(load_config(RIG), SimParams(seed=3, seconds=40))
    truth = rig.truth()["probes"]["probe"]
    dev = rig.devices["probe"]
    skip = dev.cfg.sync.channel
    f = pv.ProbeFeatures.start(dev.cfg.rate, dev.cfg.shape[0], skip, None)
    first = dev.next_sample
    for k in range(int(pv.RATE_WINDOW_S * 1.1 / 0.01)):
        f.take(rig.samples("probe", first + 300 * k, 300), first + 300 * k)
    out = f.flush(first + 300 * (k + 1))
    background = np.median([r for r in out["rates"] if r is not None])  # the pool's scattered spikes
    for unit in truth["units"]:
        assert out["rates"][unit["channel"]] - background == pytest.approx(unit["rate_hz"], rel=0.2)
    ap = np.array([np.nan if v is None else v for v in out["ap_rms"]])
    (dead,), (noisy,) = truth["dead"], truth["noisy"]
    assert ap[dead] == 0 and np.nanargmax(ap) == noisy and ap[noisy] > 4 * np.nanmedian(ap)
