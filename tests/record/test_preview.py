"""The writer-side live preview (acqd.record.preview): decimation on a fixed grid, RMS, thumbnails, drops."""

from __future__ import annotations

import base64
from io import BytesIO

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from acqd.config import StreamConfig
from acqd.record.preview import (SEND_INTERVAL_S, Preview, channel_rms, default_channels, encode_message,
                                 thumbnail, valid_channels)

PROBE = StreamConfig(name="probe", kind="ephys", endpoint="ipc:///tmp/p", dtype="int16", shape=(385,), rate=30000.0,
                     conversion=2e-6, sync={"source": "channel", "channel": 0})
CAMERA = StreamConfig(name="cam", kind="video", endpoint="ipc:///tmp/c", dtype="uint8", shape=(480, 640), rate=60.0)


def _feed(p: Preview, sizes: list[int], channels: int = 385, first: int = 0, dt_s: float = 0.01) -> list[dict]:
    """Chunks whose value is their sample index (channel c adds c), ``sizes`` rows each; returns messages."""
    out, now = [], 0.0
    for n in sizes:
        idx = np.arange(first, first + n)
        data = (idx[:, None] + np.arange(channels)[None, :]).astype(np.int16)
        now += dt_s
        if (m := p.take(data, first, now)) is not None:
            out.append(m)
        first += n
    out.append(p.flush(now + SEND_INTERVAL_S))
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 700), min_size=1, max_size=60), st.integers(0, 10**9))
def test_traces_are_an_even_grid_of_the_device_counter_whatever_the_message_sizes(sizes, first):
    p = Preview.start(PROBE, [5, 7], 0.0)
    msgs = _feed(p, sizes, first=first % 30000)
    samples = np.concatenate([np.empty(0, np.int64)] + [m["traces"]["samples"] for m in msgs if "traces" in m])
    start = first % 30000
    expected = np.arange(start + (-start) % p.stride, start + sum(sizes), p.stride)
    assert np.array_equal(samples, expected)
    y = np.concatenate([np.empty((2, 0))] + [np.array(m["traces"]["y"]) for m in msgs if "traces" in m], axis=1)
    raw = (samples[None, :] + np.array([[5], [7]])).astype(np.int16)  # what the rows held, wrapped like int16
    assert np.array_equal(y, raw) and all(m["scale"] == PROBE.conversion for m in msgs)


def test_channels_default_skip_the_sync_word_and_requests_are_checked():
    assert default_channels(PROBE) == (1, 2, 3, 4)
    assert valid_channels(PROBE, [3, 3, 999, -1, 10]) == (3, 10)
    assert valid_channels(PROBE, [999]) == (1, 2, 3, 4)
    assert valid_channels(CAMERA, [1]) == ()


def test_rms_is_the_spread_of_each_channel():
    rng = np.random.default_rng(0)
    sd = np.array([1.0, 10.0, 100.0, 0.0])
    data = (rng.normal(0, 1, (6000, 4)) * sd + 500).astype(np.float32)
    rms = channel_rms(data, max_rows=6000)
    assert np.allclose(rms, sd, rtol=0.05, atol=1e-3)
    assert channel_rms(data, max_rows=64).shape == (4,)


def test_messages_are_paced_and_carry_rate_drops_rms_and_last_values():
    p = Preview.start(PROBE, None, 0.0)
    msgs = _feed(p, [300] * 200)  # 2 s of data at 30 kHz in 10 ms messages
    assert 4 <= len(msgs) <= 6
    m = msgs[1]
    assert m["rate"] == 30000.0 and m["dropped"] == 0
    assert len(m["last"]["values"]) == 16
    assert 3 <= sum("rms" in m for m in msgs) <= 5 and all(len(m["rms"]) == 385 for m in msgs if "rms" in m)
    first = next(m for m in msgs if "rms" in m)
    assert first["rms"][0] is None and first["rms_scale"] == PROBE.conversion / 10  # channel 0: the sync word
    assert all(isinstance(v, int) for v in first["rms"][1:])
    assert m["traces"]["names"] == ["ch001", "ch002", "ch003", "ch004"]

    p = Preview.start(PROBE, None, 0.0)
    p.take(np.zeros((300, 385), np.int16), 0, 0.01)
    p.take(np.zeros((300, 385), np.int16), 900, 0.02)  # 600 samples never arrived
    assert p.flush(1.0)["dropped"] == 600


def test_camera_thumbnail_is_small_readable_and_about_twice_a_second():
    frame = np.tile(np.arange(640, dtype=np.uint8), (480, 1))
    small = thumbnail(frame)
    assert small.shape == (120, 160) and small[0, 1] == frame[0, 4]
    assert thumbnail(np.zeros((10, 10, 3), np.uint16)).shape == (10, 10, 3)

    p = Preview.start(CAMERA, None, 0.0)
    msgs = [m for i in range(120) if (m := p.take(frame[None], i, (i + 1) / 60))]  # 2 s at 60 fps
    shots = [m["thumbnail"] for m in msgs if "thumbnail" in m]
    assert 3 <= len(shots) <= 5 and all(abs(m["rate"] - 60) < 1 for m in msgs)
    img = Image.open(BytesIO(base64.b64decode(shots[0]["src"].split(",", 1)[1])))
    assert img.size == (160, 120) and img.mode == "L"


def test_a_float_stream_with_nan_still_gives_valid_json():
    import json

    sensor = StreamConfig(name="s", kind="analog", endpoint="ipc:///tmp/s", dtype="float32", shape=(3,), rate=1000.0)
    p = Preview.start(sensor, None, 0.0)
    data = np.array([[1.0, np.nan, np.inf]] * 10, np.float32)
    p.take(data, 0, 0.01)
    raw = encode_message("s", p.flush(1.0))
    msg = json.loads(raw, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert msg["stream"] == "s" and msg["last"]["values"] == [1.0, None, None]
    assert msg["traces"]["y"][1][0] is None and msg["rms"][0] == 0.0 and msg["rms"][2] is None
