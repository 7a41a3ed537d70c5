"""Live preview: what the console shows of a stream, decimated inside the writer that holds the data.

This module owns turning the chunks a writer has already accepted into a few numbers a person can look at:
scrolling traces of a few channels, per-channel RMS across all channels (is the probe alive, how noisy), a
camera thumbnail with its measured frame rate and dropped frames, the last values of a sensor. It is numpy
only (no sockets, no files): the writer hands each accepted chunk to ``Preview.take`` while someone watches and
sends what it returns on its control channel; nobody watching means no ``Preview`` and no cost at all.

The data path pays O(a few rows) per message: traces keep only the rows on a fixed sample grid (``stride``),
and everything heavier (RMS over all channels, the thumbnail and its JPEG) runs at most a few times a second
on one message's worth of data, never on the whole stream.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass, field
from io import BytesIO

import numpy as np

from acqd.config import ChannelSync, StreamConfig
from acqd.record.probeview import ProbeFeatures, signal_loaded

TRACE_POINTS_PER_S = 200
"""Trace points kept per second and channel (a 5 s window is 1000 points: enough to see spikes and noise)."""
SEND_INTERVAL_S = 0.5
"""A preview message at most this often per stream."""
RMS_INTERVAL_S = 0.5
RMS_MAX_ROWS = 64
"""RMS is computed over at most this many rows of one message (evenly spaced)."""
THUMBNAIL_INTERVAL_S = 0.5
"""Cameras: a thumbnail about twice a second."""
THUMBNAIL_MAX_SIDE = 160
PROBE_INTERVAL_S = 1.0
"""Ephys streams: the probe view's features (acqd.record.probeview) in a preview message about once a second."""
DEFAULT_TRACES = 4
MAX_TRACES = 8
MAX_LAST_VALUES = 16
MESSAGE_PREFIX = b'{"type":"preview",'
CLOCK_WINDOW_S = 10.0
"""The host clock keeps the least-delayed chunk of about this long (device crystals drift: tens of ppm)."""
"""How every preview message on a writer's control channel starts: the supervisor forwards those unparsed."""


def encode_message(stream: str, msg: dict) -> bytes:
    """A preview message as it goes to the supervisor and on to the page: JSON starting with ``MESSAGE_PREFIX``."""
    return MESSAGE_PREFIX + json.dumps({"stream": stream, **msg}, separators=(",", ":"))[1:].encode()


def is_message(raw: bytes) -> bool:
    return raw.startswith(MESSAGE_PREFIX)


def is_image(cfg: StreamConfig) -> bool:
    """Frames (a camera, or any stream whose sample is 2-D or more) are previewed as thumbnails."""
    return cfg.kind == "video" or len(cfg.shape) >= 2


def default_channels(cfg: StreamConfig) -> tuple[int, ...]:
    """The first few channels, skipping a sync word (a digital line looks like noise as a trace)."""
    skip = cfg.sync.channel if isinstance(cfg.sync, ChannelSync) else -1
    return tuple(c for c in range(cfg.shape[0]) if c != skip)[:DEFAULT_TRACES]


def valid_channels(cfg: StreamConfig, channels: list[int] | tuple[int, ...] | None) -> tuple[int, ...]:
    """The requested channels that exist (at most ``MAX_TRACES``), or the defaults when none is valid."""
    if is_image(cfg) or cfg.kind == "events":
        return ()
    picked = tuple(dict.fromkeys(int(c) for c in channels or () if 0 <= int(c) < cfg.shape[0]))[:MAX_TRACES]
    return picked or default_channels(cfg)


def channel_names(cfg: StreamConfig) -> list[str]:
    return list(cfg.channel_names) if cfg.channel_names else [f"ch{i:03d}" for i in range(cfg.shape[0])]


def grid_start(first_sample: int, stride: int) -> int:
    """Index of a chunk's first row whose sample index is a multiple of ``stride``.

    A fixed grid in the device's counter keeps the spacing even across messages of any size, so the
    decimated trace neither bunches up nor skips at message boundaries.
    """
    return (-first_sample) % stride


def channel_rms(data: np.ndarray, max_rows: int = RMS_MAX_ROWS) -> np.ndarray:
    """Per-channel RMS about the mean (raw units) over at most ``max_rows`` evenly spaced rows of ``data``."""
    step = max(1, math.ceil(len(data) / max_rows))
    rows = np.asarray(data[::step], dtype=np.float32)
    rows = rows.reshape(len(rows), -1)
    if len(rows) < 2:
        return np.zeros(rows.shape[1], np.float32)
    with np.errstate(invalid="ignore"):  # an infinite sample makes its channel's RMS NaN (sent as null), quietly
        return rows.std(axis=0)


def thumbnail(frame: np.ndarray, max_side: int = THUMBNAIL_MAX_SIDE) -> np.ndarray:
    """A frame shrunk by striding to at most ``max_side`` pixels a side, as uint8 (gray, or RGB for 3/4 planes)."""
    step = max(1, math.ceil(max(frame.shape[:2]) / max_side))
    img = frame[::step, ::step]
    if img.ndim == 3:
        img = img[..., :3] if img.shape[2] in (3, 4) else img[..., 0]
    if img.ndim > 3:
        img = img.reshape(*img.shape[:2], -1)[..., 0]
    if img.dtype != np.uint8:  # other depths: stretch this frame's range (a preview, not a measurement)
        lo, hi = float(img.min()), float(img.max())
        img = ((img.astype(np.float32) - lo) * (255.0 / (hi - lo or 1.0))).astype(np.uint8)
    return np.ascontiguousarray(img)


def jpeg_data_url(img: np.ndarray, quality: int = 70) -> str:
    """``data:image/jpeg;base64,...``: what an ``<img>`` shows directly. Pillow is imported here only, so a
    writer nobody watches never loads it."""
    from PIL import Image

    buf = BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass
class HostClock:
    """Device samples -> host monotonic seconds, from when chunks arrived: the chunk that arrived soonest after its
    last sample (least delayed) sets ``offset`` (host seconds of device sample 0 at the nominal rate), renewed each
    ``CLOCK_WINDOW_S`` so that a drifting crystal is followed. Within a few ms: a display clock, not the
    finalizer's sync-edge fit."""

    rate: float
    best: float = math.inf
    candidate: float = math.inf
    since: float | None = None

    def see(self, end_sample: int, now_s: float) -> None:
        """Chunk ending before ``end_sample`` arrived at host time ``now_s``."""
        self.candidate = min(self.candidate, now_s - end_sample / self.rate)
        if self.since is None:
            self.since = now_s
        elif now_s - self.since >= CLOCK_WINDOW_S:
            self.best, self.candidate, self.since = self.candidate, math.inf, now_s

    @property
    def offset(self) -> float | None:
        o = min(self.best, self.candidate)
        return o if math.isfinite(o) else None


@dataclass
class Preview:
    """One writer's preview state while someone watches; ``take`` per accepted chunk."""

    cfg: StreamConfig
    channels: tuple[int, ...] = ()
    """Channels drawn as traces (validated by ``valid_channels``)."""
    stride: int = 1
    rows: list[tuple[int, np.ndarray]] = field(default_factory=list)
    """(sample index of the first kept row, the kept rows of ``channels``) per chunk since the last message."""
    last: np.ndarray | None = None
    """The latest chunk (a reference, not a copy); summaries are computed from it when a message is due."""
    expected: int | None = None
    samples: int = 0
    dropped: int = 0
    """Samples (frames) missing between chunks since the preview started: forward jumps of the counter."""
    window: tuple[float, int] = (0.0, 0)
    next_send: float = 0.0
    next_rms: float = 0.0
    next_thumbnail: float = 0.0
    next_probe: float = 0.0
    clock: HostClock | None = None
    origin: float | None = None
    """Host monotonic seconds of the session timebase's zero (RECORD's start, or ACQUIRE's before), if told."""
    probe: ProbeFeatures | None = None
    """The probe view's features (ephys streams only, acqd.record.probeview)."""
    probe_args: tuple | None = None
    """``ProbeFeatures.start``'s arguments until scipy.signal is loaded (on a thread: ``signal_loaded``)."""

    @classmethod
    def start(cls, cfg: StreamConfig, channels: list[int] | tuple[int, ...] | None, now_s: float,
              origin: float | None = None, block: dict | None = None) -> Preview:
        stride = max(1, round(cfg.rate / TRACE_POINTS_PER_S))
        skip = cfg.sync.channel if isinstance(cfg.sync, ChannelSync) else None
        probe_args = (cfg.rate, cfg.shape[0], skip, block) if cfg.kind == "ephys" else None
        return cls(cfg, valid_channels(cfg, channels), stride, window=(now_s, 0), next_send=now_s + SEND_INTERVAL_S,
                   clock=HostClock(cfg.rate), origin=origin, probe_args=probe_args)

    def take(self, data: np.ndarray, first_sample: int, now_s: float) -> dict | None:
        """Keep a few rows of an accepted chunk; every ``SEND_INTERVAL_S``, return a preview message."""
        n = len(data)
        if self.expected is not None and first_sample > self.expected:
            self.dropped += first_sample - self.expected
        self.expected = first_sample + n
        self.samples += n
        self.last = data
        if self.clock is not None:
            self.clock.see(first_sample + n, now_s)
        if self.probe_args is not None and signal_loaded():
            self.probe, self.probe_args = ProbeFeatures.start(*self.probe_args), None
        if self.probe is not None:
            self.probe.take(data, first_sample)
        if self.channels:
            start = grid_start(first_sample, self.stride)
            if start < n:  # a strided view, then a small copy of the shown channels (take: no fancy-index cost)
                self.rows.append((first_sample + start, data[start::self.stride].take(self.channels, axis=1)))
        if now_s < self.next_send:
            return None
        return self.flush(now_s)

    def flush(self, now_s: float) -> dict:
        """The preview message for what was taken since the last one (then forgotten)."""
        t0, s0 = self.window
        msg: dict = {"kind": self.cfg.kind, "rate": round((self.samples - s0) / max(now_s - t0, 1e-9), 2),
                     "nominal_rate": self.cfg.rate, "dropped": self.dropped, "units": self.cfg.units,
                     "scale": self.cfg.conversion, "offset": self.cfg.offset}
        self.window, self.next_send = (now_s, self.samples), now_s + SEND_INTERVAL_S
        offset = self.clock.offset if self.clock is not None else None
        if offset is not None and self.origin is not None:  # session seconds = device sample / rate + t_offset
            msg["t_offset"] = round(offset - self.origin, 6)
            msg["origin"] = self.origin  # host monotonic s of the timebase's zero: where a note (monotonic_ns) falls
        last = self.last
        if last is None:
            return msg
        if self.probe is not None and now_s >= self.next_probe:  # once a second: its lists cost more to encode
            self.next_probe = now_s + PROBE_INTERVAL_S
            msg["probe"] = self.probe.flush(self.expected)
        if is_image(self.cfg):
            if now_s >= self.next_thumbnail:
                self.next_thumbnail = now_s + THUMBNAIL_INTERVAL_S
                img = thumbnail(last[-1])
                msg["thumbnail"] = {"src": jpeg_data_url(img), "width": img.shape[1], "height": img.shape[0],
                                    "frame": self.expected - 1}
            return msg
        names = channel_names(self.cfg)
        shown = min(len(names), MAX_LAST_VALUES)
        sync = self.cfg.sync.channel if isinstance(self.cfg.sync, ChannelSync) else None
        values = _plain(self.scaled(last[-1, :shown]).round(6))
        if sync is not None and sync < shown:
            values[sync] = int(last[-1, sync])  # a digital word: its raw bits, not volts
        msg["last"] = {"names": names[:shown], "values": values, "digital": sync}
        if self.rows:
            samples = np.concatenate([s + self.stride * np.arange(len(y)) for s, y in self.rows])
            msg["traces"] = {"channels": list(self.channels), "names": [names[c] for c in self.channels],
                             "samples": samples.tolist(), "y": raw_values(np.concatenate([y for _, y in self.rows]).T)}
            self.rows = []
        if self.cfg.kind in ("ephys", "analog") and now_s >= self.next_rms:
            self.next_rms = now_s + RMS_INTERVAL_S
            rms, msg["rms_scale"] = _rms_values(channel_rms(last), last.dtype.kind in "iu", abs(self.cfg.conversion))
            if sync is not None:
                rms[sync] = None  # the sync word is not a signal: neither noisy nor flat
            msg["rms"] = rms
        return msg

    def scaled(self, raw: np.ndarray) -> np.ndarray:
        """Raw values in the stream's units (``conversion`` and ``offset`` of the config)."""
        return raw.astype(np.float64) * self.cfg.conversion + self.cfg.offset


def raw_values(a: np.ndarray) -> list:
    """Samples as they came (the page applies ``scale`` and ``offset``): integers encode as JSON several times
    faster than floats, and this runs four times a second per stream inside the writer."""
    return a.tolist() if a.dtype.kind in "iu" else _plain(a.astype(np.float64).round(6))


def _rms_values(rms: np.ndarray, integer: bool, conversion: float) -> tuple[list, float]:
    """Per-channel RMS for JSON and its factor to the stream's units: tenths of a raw unit as integers for an
    integer stream (always finite), else the raw floats."""
    if integer:
        return np.round(rms * 10).astype(np.int64).tolist(), conversion / 10
    return _plain(rms.astype(np.float64).round(6)), conversion


def _plain(a: np.ndarray) -> list:
    """Nested lists for JSON; NaN and infinities (a float stream may carry them) become null, which JSON has."""
    if np.isfinite(a).all():
        return a.tolist()
    return np.where(np.isfinite(a), a, None).tolist()
