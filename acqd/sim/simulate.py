"""The simulated rig: every configured stream published over real sockets, with known clocks.

``Rig(cfg, params)`` is deterministic for a seed: each device has a ``DeviceClock`` (offset, drift,
optional wander), every device sees the same sync pulses in its own sample counter (random intervals,
a regular square wave or barcodes: ``SimParams.sync``), and sample values come from a pre-built pool
of band-limited noise with spikes (so compression ratios mean something), sent as pre-built ZeroMQ frames
whenever no digital line is high in a message (so publishing costs little CPU). Tests rebuild the same
``Rig`` to know exactly what was sent: ``samples(stream, first, n)`` and ``expected_edges(stream, line)``.

``run`` paces the devices in real time and injects faults (``Fault``); ``truth()`` is the record
of what happened, written to JSON by ``acqd simulate --truth``.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zmq

from acqd.config import ChannelSync, FrameSync, RigConfig, StreamConfig, StrobeSync
from acqd.images import image_files
from acqd.sim.devclock import DeviceClock, barcode_pulses, random_pulse_times, regular_pulse_times
from acqd.wire.protocol import Header, encode, encode_header
from acqd.wire.publisher import Publisher, edge_records

PULSE_WIDTH_S = 0.010
STROBE_WIDTH_S = 0.002
CHUNK_S = 0.010  # one message per 10 ms of samples (one frame per message for cameras)
PROBE_MIN_CHANNELS = 32
"""An ephys stream with at least this many electrode channels is a probe: it gets units, a dead and a noisy site."""
UNIT_PLACES = ((0.15, 20.0), (0.4, 30.0), (0.65, 50.0), (0.88, 25.0))
"""Units as (fraction of the electrode channels, rate in Hz): sites along the shank and rates the probe view
must show (rates a few tens of Hz: the view analyses a share of the data, see acqd.record.probeview)."""
UNIT_SPREAD = (1.0, 0.6, 0.25)
"""A unit's amplitude on its site and on the channels 1 and 2 away (it is seen by its neighbours)."""
UNIT_AMPLITUDE = 25.0
"""Times the template of ``signal_pool`` (trough -12): a trough of -300 raw units, ~15 x the noise."""
DEAD_AT, NOISY_AT, NOISY_GAIN = 0.28, 0.52, 8.0
FAULT_KINDS = ("drop", "duplicate", "reorder", "malformed", "oversized", "wrong_dtype", "wrong_shape",
               "size_mismatch", "wrong_frames", "restart")


@dataclass(frozen=True, slots=True)
class SimParams:
    """How the simulated devices misbehave; all random draws come from ``seed``."""

    seed: int = 0
    seconds: float = 3600.0
    """Longest run the truth is prepared for."""
    max_ppm: float = 30.0
    """Each device's crystal error is drawn from [-max_ppm, max_ppm]."""
    wander_ppm: float = 0.0
    max_offset_s: float = 600.0
    """Devices were started up to this long before the simulation (their counters are not at 0)."""
    send_jitter_s: float = 0.002
    """Random extra delay before each send (host-side latency)."""
    sync: str = "random"
    """Sync scheme on the shared line: 'random' (intervals 0.5-1.5 s), 'regular' (square wave of ``sync_period_s``,
    50 % duty: SpikeGLX's default), or 'barcode' (32-bit barcodes of 30 ms bits every 30 s)."""
    sync_period_s: float = 1.0
    """Period of the regular square wave."""
    ppm: float | None = None
    """Every device's crystal error in ppm instead of a draw (one PC of a multi-PC rig: its known drift)."""
    t0_monotonic: float | None = None
    """True time 0 on the host's CLOCK_MONOTONIC, shared by the simulators of several PCs of one rig (every
    network namespace of a machine has the same CLOCK_MONOTONIC): with one ``seed`` they latch one sync line.
    None: the moment ``run`` starts publishing."""


@dataclass(frozen=True, slots=True)
class Fault:
    """Inject ``kind`` into ``stream`` at message ``seq`` (``stream:kind:seq`` on the command line)."""

    stream: str
    kind: str
    seq: int

    @classmethod
    def parse(cls, text: str) -> Fault:
        stream, kind, seq = text.split(":")
        if kind not in FAULT_KINDS:
            raise ValueError(f"fault kind {kind!r} not one of {', '.join(FAULT_KINDS)}")
        return cls(stream, kind, int(seq))


@dataclass(frozen=True, slots=True)
class SyncOff:
    """``stream`` latches no sync edge from ``start_s`` for ``duration_s`` (seconds of the run, from when it starts
    publishing): a pulled sync cable. Only its sync line goes quiet; its data and every other line are unchanged.
    On the command line ``sync_off:stream:start_s:duration_s``."""

    stream: str
    start_s: float
    duration_s: float


def parse_fault(text: str) -> Fault | SyncOff:
    """A ``--fault`` argument: ``stream:kind:seq`` or ``sync_off:stream:start_s:duration_s``."""
    try:
        if text.startswith("sync_off:"):
            _, stream, start, duration = text.split(":")
            return SyncOff(stream, float(start), float(duration))
        return Fault.parse(text)
    except ValueError as e:
        if "fault kind" in str(e):
            raise
        raise ValueError(f"{text!r}: use STREAM:KIND:SEQ or sync_off:STREAM:START_S:DURATION_S") from None


def signal_pool(cfg: StreamConfig, rng: np.random.Generator, seconds: float = 1.0) -> np.ndarray:
    """A pool of realistic samples: band-limited noise with spikes (or textured frames for video)."""
    n = max(8, int(cfg.rate * seconds))
    dt = cfg.np_dtype
    if cfg.stimulus is not None and cfg.shape == (1,):  # a stimulus program: which image each frame showed
        return stimulus_indices(cfg, rng, n)
    if len(cfg.shape) > 1:  # images: a smooth pattern with noise, shifting frame to frame
        h, w = cfg.shape[:2]
        yy, xx = np.mgrid[0:h, 0:w]
        base = 96 + 64 * np.sin(xx / 37.0) * np.cos(yy / 23.0)
        # One draw for every frame (the same numbers, in the same order, as a draw per frame), added in place: the
        # pool is built at every simulator's start, and its temporaries cost more than its numbers.
        frames = rng.normal(0, 4, (n, h, w))
        frames += base + np.array([8 * np.sin(i / 5.0) for i in range(n)])[:, None, None]
        if len(cfg.shape) == 3:  # colour: the same pattern, a little different per channel
            frames = frames[..., None] + np.arange(cfg.shape[2]) * 16
        return np.clip(frames, 0, 255, out=frames).astype(dt).reshape((n, *cfg.shape))
    ch = cfg.shape[0]
    noise = np.cumsum(rng.normal(0, 1, (n + 8, ch)), axis=0)
    x = np.subtract(noise[8:], noise[:-8])  # moving sum: a low-pass, band-limited noise
    del noise
    x /= np.sqrt(8)
    x *= 20  # in place from here on: a 385-channel pool is 90 MB a copy
    spikes = np.zeros((n, ch))
    template = -np.exp(-((np.arange(30) - 8) ** 2) / 8.0) * 12 + np.exp(-((np.arange(30) - 16) ** 2) / 30.0) * 4
    probe = probe_truth(cfg)  # a simulated probe's unit sites get no scattered spikes: their rate is the unit's
    quiet = {u["channel"] + d for u in probe["units"] for d in range(-4, 5)} if probe else set()
    for t in rng.integers(0, n - 30, size=max(1, n // 300)):
        c = rng.integers(0, ch)
        if c not in quiet:  # drawn all the same: every other stream's samples stay as they were
            spikes[t:t + 30, max(0, c - 2):c + 3] += template[:, None]
    spikes *= 15
    x += spikes
    del spikes
    if probe:
        x = probe_sites(cfg, x, template)
    if dt.kind == "f":
        return (x / 100).astype(dt)
    info = np.iinfo(dt)
    if info.min >= 0:
        x += info.max // 2
    return np.clip(x, info.min, info.max, out=x).astype(dt)


def electrode_channels(cfg: StreamConfig) -> list[int]:
    skip = cfg.sync.channel if isinstance(cfg.sync, ChannelSync) else -1
    return [c for c in range(cfg.shape[0]) if c != skip]


def probe_truth(cfg: StreamConfig) -> dict | None:
    """Where a simulated probe's units, dead and noisy sites are (stream columns) and the units' rates; None for a
    stream that is no probe (``PROBE_MIN_CHANNELS``)."""
    el = electrode_channels(cfg)
    if cfg.kind != "ephys" or len(el) < PROBE_MIN_CHANNELS:
        return None
    at = lambda f: el[int(f * (len(el) - 1))]  # noqa: E731
    return {"units": [{"channel": at(f), "rate_hz": r} for f, r in UNIT_PLACES], "dead": [at(DEAD_AT)],
            "noisy": [at(NOISY_AT)]}


def unit_times(rate_hz: float, n: int, pool_rate: float, rng: np.random.Generator) -> np.ndarray:
    """A unit's spike rows in a pool of ``n`` rows: exactly ``rate_hz`` per second of pool, near-regular (interval
    jittered by +-5 %), so any stretch of the pool holds its share (the pool repeats every second)."""
    count = max(1, round(rate_hz * n / pool_rate))
    grid = (np.arange(count) + 0.5 + rng.uniform(-0.05, 0.05, count)) * n / count
    return np.clip(grid.astype(np.int64), 0, n - 31)


def probe_sites(cfg: StreamConfig, x: np.ndarray, template: np.ndarray) -> np.ndarray:
    """``x`` with the units of ``probe_truth`` added (on their site and neighbours), the dead site flat and the
    noisy site's noise ``NOISY_GAIN`` times louder. Draws from a generator of its own (seeded by the stream's
    name), so every other stream's samples are as they were."""
    truth = probe_truth(cfg)
    rng = np.random.default_rng(zlib.crc32(cfg.name.encode()))
    el = electrode_channels(cfg)
    for unit in truth["units"]:
        k = el.index(unit["channel"])
        for t in unit_times(unit["rate_hz"], len(x), cfg.rate, rng):
            for d, a in enumerate(UNIT_SPREAD):
                for c in {k - d, k + d} & set(range(len(el))):
                    x[t:t + 30, el[c]] += UNIT_AMPLITUDE * a * template
    x[:, truth["noisy"][0]] *= NOISY_GAIN
    x[:, truth["dead"][0]] = 0.0
    return x


def stimulus_indices(cfg: StreamConfig, rng: np.random.Generator, n: int) -> np.ndarray:
    """Image indices of a stimulus stream: every image of its set in a shuffled block, block after block (so each
    image is shown several times); the set is counted the way finalize orders it (acqd.images.image_files)."""
    count = len(image_files(cfg.stimulus.images))
    blocks = [rng.permutation(count) for _ in range(-(-n // count))]
    return np.concatenate(blocks)[:n].astype(cfg.np_dtype).reshape(n, 1)


@dataclass
class Device:
    """One simulated stream: its clock, its data and what it has sent."""

    cfg: StreamConfig
    clock: DeviceClock
    pool: np.ndarray
    chunk: int
    next_sample: int
    lines: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    """Digital lines in this device's data: (channel, bit) -> (rising, falling) sample indices."""
    pulse_edges: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    """Where this device's counter saw each sync pulse rise."""
    _prebuilt: dict[int, tuple[np.ndarray, zmq.Frame]] | None = field(default=None, init=False, repr=False)

    def message(self, first: int) -> tuple[np.ndarray, zmq.Frame | None]:
        """The samples of the message starting at ``first`` (``chunk`` of them), and the same bytes as a pre-built
        ZeroMQ frame when no digital line is high in them: a frame is sent again and again without a copy, so the
        load generator costs little per message. No frame when the message must be built: a pulse in it, or
        the pool's end inside it."""
        if self._prebuilt is None:
            self._prebuilt = self._prebuild(first)
        n = self.chunk
        if any(np.searchsorted(up, first + n) > np.searchsorted(down, first, "right")
               for up, down in self.lines.values()):
            return self.samples(first, n), None
        return self._prebuilt.get(first % len(self.pool)) or (self.samples(first, n), None)

    def _prebuild(self, first: int) -> dict[int, tuple[np.ndarray, zmq.Frame]]:
        """A frame per message of the pool for messages following ``first``, by offset in the pool. The digital
        lines' channels of the pool are set to 0 first: ``samples`` overwrites them anyway (0 between pulses)."""
        for channel, _ in self.lines:
            self.pool[:, channel] = 0
        offsets = range(first % self.chunk, len(self.pool) - self.chunk + 1, self.chunk)
        return {o: (v, zmq.Frame(v, copy=False)) for o in offsets for v in [self.pool[o:o + self.chunk]]}

    def samples(self, first: int, n: int) -> np.ndarray:
        """Exactly what the device sends for samples [first, first + n)."""
        out = np.take(self.pool, np.arange(first, first + n) % len(self.pool), axis=0)
        words: dict[int, np.ndarray] = {}
        for (channel, bit), (up, down) in self.lines.items():
            word = words.setdefault(channel, np.zeros(n, dtype=np.int64))
            lo, hi = np.searchsorted(down, first, "right"), np.searchsorted(up, first + n, "left")
            for a, b in zip(up[lo:hi], down[lo:hi]):
                word[max(a, first) - first:min(b, first + n) - first] |= 1 << bit
        for channel, word in words.items():
            out[:, channel] = word.astype(out.dtype)
        return out


class Rig:
    """All devices of a rig config, with their ground truth."""

    def __init__(self, cfg: RigConfig, params: SimParams = SimParams()):
        self.cfg, self.params = cfg, params
        rng = np.random.default_rng(params.seed)
        self.pulses, self.widths = sync_pulses(params, rng)
        self.devices: dict[str, Device] = {}
        for s in (s for s in cfg.streams if s.lsl is None):  # LSL streams come from their outlets
            offset_s = -float(rng.uniform(1, params.max_offset_s))  # the draws' order is the seeds' meaning
            ppm = float(rng.uniform(-params.max_ppm, params.max_ppm))  # drawn even when overridden: same pools
            clock = DeviceClock(rate=s.rate, offset_s=offset_s, ppm=ppm if params.ppm is None else params.ppm,
                                wander_ppm=params.wander_ppm, wander_period_s=float(rng.uniform(300, 1800)))
            chunk = 1 if len(s.shape) > 1 else max(1, round(s.rate * CHUNK_S))
            first = int(np.ceil(clock.phase(0.0)))
            self.devices[s.name] = Device(s, clock, signal_pool(s, rng), chunk, first)
        for dev in self.devices.values():
            sync = dev.cfg.sync
            if isinstance(sync, (ChannelSync, FrameSync)):
                dev.pulse_edges = dev.clock.sample_at(self.pulses)
            if isinstance(sync, ChannelSync):
                dev.lines[(sync.channel, sync.bit)] = (dev.pulse_edges,
                                                       dev.clock.sample_at(self.pulses + self.widths))
            if isinstance(sync, StrobeSync):  # each frame strobes a line of another device
                target = self.devices[sync.stream]
                frames = np.arange(dev.next_sample, dev.next_sample + int(params.seconds * dev.cfg.rate) + 2)
                t = dev.clock.time_of(frames)
                target.lines[(sync.channel, sync.bit)] = (target.clock.sample_at(t),
                                                          target.clock.sample_at(t + STROBE_WIDTH_S))

    def check_fault(self, f: Fault | SyncOff) -> None:
        """Raise ValueError, in words, if ``f`` names no simulated stream (or, sync_off, one without a sync line)."""
        if f.stream not in self.devices:
            raise ValueError(f"no simulated stream {f.stream!r} (streams: {', '.join(self.devices)})")
        if isinstance(f, SyncOff) and not isinstance(self.devices[f.stream].cfg.sync, (ChannelSync, FrameSync)):
            raise ValueError(f"sync_off: stream {f.stream!r} has no sync line of its own")

    def sync_off(self, f: SyncOff) -> int:
        """Apply ``f`` to the device's sync pulses (before ``run``); returns how many edges it will not latch."""
        self.check_fault(f)
        dev = self.devices[f.stream]
        sync = dev.cfg.sync
        keep = ~((self.pulses >= f.start_s) & (self.pulses < f.start_s + f.duration_s))
        dev.pulse_edges = dev.clock.sample_at(self.pulses[keep])
        if isinstance(sync, ChannelSync):
            dev.lines[(sync.channel, sync.bit)] = (dev.pulse_edges,
                                                   dev.clock.sample_at(self.pulses[keep] + self.widths[keep]))
        return int((~keep).sum())

    def samples(self, stream: str, first: int, n: int) -> np.ndarray:
        return self.devices[stream].samples(first, n)

    def expected_edges(self, stream: str, label: str = "sync") -> np.ndarray:
        """Device sample indices where ``stream`` records the rising edges of line ``label``.

        ``label`` is an ``EdgeLine`` label (``sync``, ``strobe:<camera>``); frame-sync streams have ``sync``.
        """
        dev = self.devices[stream]
        for line in self.cfg.edge_lines(stream):
            if line.label == label:
                return dev.lines[(line.channel, line.bit)][0]
        return dev.pulse_edges

    def truth(self) -> dict:
        return {"seed": self.params.seed, "params": {k: getattr(self.params, k) for k in SimParams.__slots__},
                "pulse_times_s": self.pulses.tolist(),
                "probes": {n: t for n, d in self.devices.items() if (t := probe_truth(d.cfg)) is not None},
                "devices": {n: {"rate": d.clock.rate, "offset_s": d.clock.offset_s, "ppm": d.clock.ppm,
                                "wander_ppm": d.clock.wander_ppm, "wander_period_s": d.clock.wander_period_s,
                                "first_sample": int(d.next_sample)} for n, d in self.devices.items()}}


def sync_pulses(params: SimParams, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(rising-edge true times, widths) of the shared sync line, by ``params.sync``."""
    start, stop = 0.2, params.seconds + 5
    if params.sync == "random":
        t = random_pulse_times(rng, start, stop)
        return t, np.full(len(t), PULSE_WIDTH_S)
    if params.sync == "regular":
        # The generator's crystal is not the reference's: the pulses' phase against the sample clocks moves.
        t = regular_pulse_times(start, stop, params.sync_period_s, float(rng.uniform(-20, 20)))
        return t, np.full(len(t), params.sync_period_s / 2)
    if params.sync == "barcode":
        return barcode_pulses(rng, start, stop)
    raise ValueError(f"sync scheme {params.sync!r} is not one of random, regular, barcode")


def run(rig: Rig, seconds: float, faults: list[Fault | SyncOff] = (), *, wait_for_peers_s: float = 30.0,
        on_ready: Callable[[], None] | None = None, should_stop: Callable[[], bool] = lambda: False) -> dict:
    """Publish every device in real time for ``seconds``; returns what was sent and injected."""
    ctx = zmq.Context()
    rng = np.random.default_rng(rig.params.seed + 1)
    pubs = {n: _publisher(d.cfg, ctx) for n, d in rig.devices.items()}
    sent = {n: {"messages": 0, "first_sample": None, "last_sample": None} for n in rig.devices}
    injected = [{"stream": f.stream, "kind": "sync_off", "start_s": f.start_s, "duration_s": f.duration_s,
                 "edges_not_latched": rig.sync_off(f)} for f in faults if isinstance(f, SyncOff)]
    pending = {(f.stream, f.seq): f for f in faults if isinstance(f, Fault)}
    for pub in pubs.values():
        pub.wait_for_peers(1, wait_for_peers_s)
    if on_ready:
        on_ready()
    t0 = time.monotonic() if rig.params.t0_monotonic is None else rig.params.t0_monotonic
    skip_to(rig, time.monotonic() - t0)
    held: dict[str, list] = {}
    try:
        while not should_stop():
            now = time.monotonic() - t0
            if now >= seconds:
                break
            for name, dev in rig.devices.items():
                while dev.clock.time_of(dev.next_sample + dev.chunk) <= now:
                    data, frame = dev.message(dev.next_sample)
                    edges = None
                    if isinstance(dev.cfg.sync, FrameSync):
                        e = dev.pulse_edges
                        e = e[(e >= dev.next_sample) & (e < dev.next_sample + dev.chunk)]
                        edges = edge_records(e) if len(e) else None
                    pub = pubs[name]
                    fault = pending.pop((name, pub.seq), None)
                    if fault is not None:
                        injected.append(_inject(fault, pub, dev, data, edges, ctx, pubs, held))
                    else:
                        # The simulated devices' clock is the host's: publish -> flushed latency is measurable.
                        pub.send(data, first_sample=dev.next_sample, edges=edges, device_time_ns=time.time_ns(),
                                 frame=frame)
                        for late in held.pop(name, []):
                            pub.sock.send_multipart(late)
                    rec = sent[name]
                    rec["messages"] += 1
                    rec["first_sample"] = dev.next_sample if rec["first_sample"] is None else rec["first_sample"]
                    dev.next_sample += dev.chunk
                    rec["last_sample"] = dev.next_sample
            wake = min(d.clock.time_of(d.next_sample + d.chunk) for d in rig.devices.values())
            delay = wake - (time.monotonic() - t0) + rng.uniform(0, rig.params.send_jitter_s)
            if delay > 0:
                time.sleep(min(delay, 0.05))
    finally:
        for pub in pubs.values():
            pub.close()
        ctx.term()
    # True time 0 on the host's CLOCK_MONOTONIC: what maps a host instant (an LSL timestamp) to each device's clock.
    return {"sent": sent, "faults": injected, "t0_monotonic_s": t0}


def skip_to(rig: Rig, elapsed_s: float) -> None:
    """Devices start publishing at true time ``elapsed_s`` (a simulator joining a shared sync line late): what
    they would have sent before is never sent, rather than sent at once as a burst."""
    for dev in rig.devices.values():
        dev.next_sample = max(dev.next_sample, int(np.ceil(dev.clock.phase(elapsed_s))))


def _publisher(cfg: StreamConfig, ctx: zmq.Context) -> Publisher:
    socket = "pub" if cfg.socket == "sub" else "push"  # the driver's side of acqd's SUB or PULL
    return Publisher(cfg.name, cfg.endpoint, dtype=cfg.dtype, shape=cfg.shape, socket=socket,
                     bind=not cfg.bind, ctx=ctx, first_sample=0, sndhwm=100_000)


def _inject(f: Fault, pub: Publisher, dev: Device, data: np.ndarray, edges: np.ndarray | None,
            ctx: zmq.Context, pubs: dict[str, Publisher], held: dict[str, list]) -> dict:
    """Send chunk ``pub.seq`` with fault ``f`` applied; returns the record of what was done."""
    seq, first, n = pub.seq, dev.next_sample, len(data)
    record = {"stream": f.stream, "kind": f.kind, "seq": seq, "sample_from": first, "sample_to": first + n}
    h = Header(pub.stream, seq, pub.epoch, first, n, pub.dtype, pub.shape)
    topic = pub.stream.encode()
    bad: list | None = None
    match f.kind:
        case "drop":
            pub.seq += 1
            return record
        case "duplicate":
            pub.send(data, first_sample=first, edges=edges)
            pub.sock.send_multipart(encode(h, data, None, edges))
            return record
        case "reorder":  # this chunk is held back and sent after the next one
            held.setdefault(f.stream, []).append(encode(h, data, None, edges))
            pub.seq += 1
            return record
        case "restart":
            pub.close(0)  # the endpoint must be free before the new publisher binds it
            fresh = _publisher(dev.cfg, ctx)
            pubs[f.stream] = fresh
            fresh.wait_for_peers(1, 10.0)
            fresh.send(data, first_sample=first, edges=edges)
            record["epoch"] = fresh.epoch
            return record
        case "malformed":
            bad = [topic, b"NOPE" + encode_header(h)[4:], data]
        case "oversized":
            big = np.zeros((int(dev.cfg.max_message_bytes // dev.cfg.sample_bytes) + 1, *dev.cfg.shape),
                           dev.cfg.np_dtype)
            bad = encode(Header(pub.stream, seq, pub.epoch, first, len(big), pub.dtype, pub.shape), big)
        case "wrong_dtype":
            other = "<f4" if pub.dtype != "<f4" else "<i4"
            wrong = np.zeros(data.shape, other)
            bad = encode(Header(pub.stream, seq, pub.epoch, first, n, other, pub.shape), wrong)
        case "wrong_shape":
            shape = (pub.shape[0] + 1, *pub.shape[1:])
            bad = encode(Header(pub.stream, seq, pub.epoch, first, n, pub.dtype, shape),
                         np.zeros((n, *shape), pub.dtype))
        case "size_mismatch":
            bad = [topic, encode_header(h), data.tobytes()[:-1]]
        case "wrong_frames":
            bad = [topic, encode_header(h)]
    pub.sock.send_multipart(bad)  # the bad message first, then the good chunk with the same seq
    pub.send(data, first_sample=first, edges=edges)
    return record


def write_truth(path: Path, rig: Rig, result: dict) -> None:
    path.write_text(json.dumps({**rig.truth(), **result}, indent=1))
