"""The acqd wire protocol, version 1: how a driver's chunk travels as one ZeroMQ multipart message.

This module owns the byte layout (documented for driver authors in docs/protocol.md) and nothing
else: encoding for publishers, decoding for writers. Decoding never trusts the sender: every size
is checked before a byte of payload is interpreted. Pure functions, no sockets.

Frames:  [topic = stream name] [header, 104 bytes] [payload] [timestamps]? [edges]? [offsets]?
"""

from __future__ import annotations

import dataclasses
import functools
import math
import struct
import warnings
from dataclasses import dataclass

import numpy as np

from acqd.errors import ProtocolError

VERSION = 1
MAGIC = b"ACQD"

# magic, version, header_len, flags, epoch, seq, first_sample, n_samples, ndim, shape[4], dtype, device_time_ns, stream
HEADER = struct.Struct("<4sHHIIQQII4I8sq32s")
assert HEADER.size == 104
HEADER_DTYPE = np.dtype([("magic", "S4"), ("version", "<u2"), ("header_len", "<u2"), ("flags", "<u4"),
                         ("epoch", "<u4"), ("seq", "<u8"), ("first_sample", "<u8"), ("n_samples", "<u4"),
                         ("ndim", "<u4"), ("shape", "<u4", (4,)), ("dtype", "S8"), ("device_time_ns", "<i8"),
                         ("stream", "S32")])
"""HEADER as a numpy record: many header frames decoded at once (a group writer's batch, acqd.record.batch)."""
assert HEADER_DTYPE.itemsize == HEADER.size

FLAG_TIMESTAMPS = 1 << 0  # a frame of n_samples int64 device timestamps (ns) follows the payload
FLAG_EDGES = 1 << 1  # a frame of EDGE_DTYPE records follows (after the timestamps frame, if any)
FLAG_OFFSETS = 1 << 2  # a frame of OFFSET_DTYPE records follows (last): device clock -> host clock offsets
KNOWN_FLAGS = FLAG_TIMESTAMPS | FLAG_EDGES | FLAG_OFFSETS

EDGE_DTYPE = np.dtype([("sample", "<u8"), ("line", "<u4"), ("rising", "<u4")])
"""A sync edge seen by the device: its sample index in the device counter, line number, 1 rising / 0 falling."""
OFFSET_DTYPE = np.dtype([("host_mono_ns", "<i8"), ("offset_ns", "<i8")])
"""A clock offset measured at host CLOCK_MONOTONIC ``host_mono_ns``: device timestamp + offset = host time
(an LSL inlet's time_correction())."""


@dataclass(frozen=True, slots=True)
class Header:
    """The fixed header of one chunk."""

    stream: str
    """Stream name; equals the topic frame."""
    seq: int
    """Per-publisher message counter: 0 for the first message after the publisher starts, +1 per message."""
    epoch: int
    """Chosen afresh (e.g. at random) each time the publisher starts: a change means the driver restarted."""
    first_sample: int
    """Index of the chunk's first sample in the device's own sample counter."""
    n_samples: int
    """Number of samples (rows on the time axis) in the payload."""
    dtype: str
    """numpy type string of one value, little-endian (``<i2``, ``<f4``, ``|u1``)."""
    shape: tuple[int, ...]
    """Shape of one sample (channels, or height x width)."""
    device_time_ns: int = 0
    """Device clock reading for the first sample, in ns (0 if the device has none)."""
    flags: int = 0
    """FLAG_TIMESTAMPS | FLAG_EDGES: which optional frames follow the payload."""

    @property
    def payload_bytes(self) -> int:
        # math.prod on Python ints: np.prod of four uint32 extents wraps around int64 silently.
        return self.n_samples * math.prod(self.shape) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True, slots=True)
class Chunk:
    """A decoded message: header plus zero-copy views of its frames."""

    header: Header
    data: np.ndarray
    """Samples, shape ``(n_samples, *shape)``, a read-only view of the received frame."""
    timestamps: np.ndarray | None = None
    """Per-sample device timestamps (int64 ns), if the driver sent them."""
    edges: np.ndarray | None = None
    """EDGE_DTYPE records, if the driver sent them."""
    offsets: np.ndarray | None = None
    """OFFSET_DTYPE records, if the driver sent them."""


def encode_header(h: Header) -> bytes:
    """Pack a header; raises ProtocolError if it cannot be represented."""
    if not 1 <= len(h.shape) <= 4:
        raise ProtocolError(f"shape {h.shape} must have 1 to 4 dimensions")
    name = h.stream.encode()
    if len(name) > 32:
        raise ProtocolError(f"stream name {h.stream!r} longer than 32 bytes")
    dtype = np.dtype(h.dtype).str.encode()
    shape = tuple(h.shape) + (0,) * (4 - len(h.shape))
    return HEADER.pack(MAGIC, VERSION, HEADER.size, h.flags, h.epoch, h.seq, h.first_sample, h.n_samples,
                       len(h.shape), *shape, dtype, h.device_time_ns, name)


def encode(h: Header, data: np.ndarray, timestamps: np.ndarray | None = None,
           edges: np.ndarray | None = None, offsets: np.ndarray | None = None) -> list:
    """Frames of one message. ``data`` is sent as is (no copy) when it is C-contiguous."""
    flags = ((FLAG_TIMESTAMPS if timestamps is not None else 0) | (FLAG_EDGES if edges is not None else 0)
             | (FLAG_OFFSETS if offsets is not None else 0))
    h = dataclasses.replace(h, flags=flags)
    frames: list = [h.stream.encode(), encode_header(h), np.ascontiguousarray(data)]
    if timestamps is not None:
        frames.append(np.ascontiguousarray(timestamps, dtype="<i8"))
    if edges is not None:
        frames.append(np.ascontiguousarray(edges, dtype=EDGE_DTYPE))
    if offsets is not None:
        frames.append(np.ascontiguousarray(offsets, dtype=OFFSET_DTYPE))
    return frames


def decode_header(buf: bytes | memoryview) -> Header:
    """Unpack and sanity-check a header frame. Any bytes at all give a Header or a ProtocolError, nothing else."""
    if len(buf) < HEADER.size:
        raise ProtocolError(f"header is {len(buf)} bytes, expected {HEADER.size}")
    (magic, version, header_len, flags, epoch, seq, first, n, ndim, s0, s1, s2, s3, dtype, dev_ns,
     name) = HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r}")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version} not supported (this acqd speaks {VERSION})")
    if header_len != len(buf):
        raise ProtocolError(f"header_len {header_len} but header frame is {len(buf)} bytes")
    if flags & ~KNOWN_FLAGS:
        raise ProtocolError(f"unknown flags 0x{flags:x}")
    if not 1 <= ndim <= 4:
        raise ProtocolError(f"ndim {ndim} outside 1..4")
    shape = (s0, s1, s2, s3)[:ndim]
    if 0 in shape:
        raise ProtocolError(f"shape {shape} has an empty dimension")
    try:
        stream = name.rstrip(b"\0").decode()
    except UnicodeDecodeError as e:
        raise ProtocolError(f"undecodable stream name: {e}") from None
    return Header(stream, seq, epoch, first, n, _dtype_str(bytes(dtype)), shape, dev_ns, flags)


def peek_seq(buf: bytes | memoryview) -> int | None:
    """The seq field of a header frame that starts with the magic, without trusting anything else in it:
    a rejected message is recorded under its seq whenever the sender put one there."""
    if len(buf) < HEADER.size or bytes(buf[:4]) != MAGIC:
        return None
    return struct.unpack_from("<Q", buf, 16)[0]


@functools.lru_cache(maxsize=64)  # a stream sends one dtype: parse it once (hostile churn only costs the parse)
def _dtype_str(raw: bytes) -> str:
    """The canonical numpy type string of a header's dtype field, if it names one plain numeric type."""
    try:
        # numpy's parser raises TypeError, ValueError, SyntaxError, ... (and warns) on arbitrary text: any of
        # them means the field is not a type string, and none may escape to the writer.
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            dt = np.dtype(raw.rstrip(b"\0").decode("ascii"))
    except Exception as e:  # noqa: BLE001 - see above
        raise ProtocolError(f"undecodable dtype {raw!r}: {type(e).__name__}") from None
    if dt.kind not in "biufc" or dt.fields is not None or dt.shape != () or dt.itemsize == 0:
        raise ProtocolError(f"dtype {raw!r} is not a plain numeric type")
    return dt.str


def decode(frames: list) -> Chunk:
    """Decode a received multipart message (frames as bytes or zmq.Frame) without copying the payload."""
    bufs = [f.buffer if hasattr(f, "buffer") else memoryview(f) for f in frames]
    if len(bufs) < 3:
        raise ProtocolError(f"{len(bufs)} frames, expected at least topic, header and payload")
    h = decode_header(bufs[1])
    if bytes(bufs[0]).decode(errors="replace") != h.stream:
        raise ProtocolError(f"topic {bytes(bufs[0])!r} differs from header stream {h.stream!r}")
    expected = 3 + bool(h.flags & FLAG_TIMESTAMPS) + bool(h.flags & FLAG_EDGES) + bool(h.flags & FLAG_OFFSETS)
    if len(bufs) != expected:
        raise ProtocolError(f"{len(bufs)} frames, flags 0x{h.flags:x} call for {expected}")
    if len(bufs[2]) != h.payload_bytes:
        raise ProtocolError(f"payload is {len(bufs[2])} bytes, header says {h.payload_bytes}")
    data = np.frombuffer(bufs[2], dtype=h.dtype).reshape((h.n_samples, *h.shape))
    i, timestamps, edges, offsets = 3, None, None, None
    if h.flags & FLAG_TIMESTAMPS:
        if len(bufs[i]) != 8 * h.n_samples:
            raise ProtocolError(f"timestamps frame is {len(bufs[i])} bytes, expected {8 * h.n_samples}")
        timestamps = np.frombuffer(bufs[i], dtype="<i8")
        i += 1
    if h.flags & FLAG_EDGES:
        if len(bufs[i]) % EDGE_DTYPE.itemsize:
            raise ProtocolError(f"edges frame of {len(bufs[i])} bytes is not a whole number of records")
        edges = np.frombuffer(bufs[i], dtype=EDGE_DTYPE)
        i += 1
    if h.flags & FLAG_OFFSETS:
        if len(bufs[i]) % OFFSET_DTYPE.itemsize:
            raise ProtocolError(f"offsets frame of {len(bufs[i])} bytes is not a whole number of records")
        offsets = np.frombuffer(bufs[i], dtype=OFFSET_DTYPE)
    return Chunk(h, data, timestamps, edges, offsets)
