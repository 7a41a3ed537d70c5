"""The simulated rig's pre-built message frames carry exactly the samples the rig says it sent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from acqd.config import load_config
from acqd.sim.simulate import Rig, SimParams

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
