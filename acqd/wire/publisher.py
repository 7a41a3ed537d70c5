"""The reference publisher: what a Python driver uses to send chunks to acqd (docs/protocol.md).

    pub = Publisher("probe", "tcp://127.0.0.1:5555", dtype="int16", shape=(385,))
    pub.wait_for_peers(1, timeout_s=10)      # optional: PUB drops everything sent before a subscriber
    pub.send(block)                          # block: (n_samples, 385) int16; seq and sample index kept

The publisher binds by default (drivers are the stable end; acqd connects and reconnects). Each
instance picks a random ``epoch`` so that acqd can tell a restarted driver from a late message.
"""

from __future__ import annotations

import secrets
import time

import numpy as np
import zmq

from acqd.wire.monitor import recv_monitor_message
from acqd.wire.protocol import EDGE_DTYPE, Header, encode


class Publisher:
    """Sends one stream's chunks with contiguous ``seq`` and a running sample counter."""

    def __init__(self, stream: str, endpoint: str, *, dtype: str, shape: tuple[int, ...], socket: str = "pub",
                 bind: bool = True, first_sample: int = 0, ctx: zmq.Context | None = None,
                 sndhwm: int = 1000):
        self.stream = stream
        self.dtype = np.dtype(dtype).newbyteorder("<").str
        self.shape = tuple(shape)
        self.seq = 0
        self.epoch = secrets.randbits(32)
        self.next_sample = first_sample
        self.ctx = ctx or zmq.Context.instance()
        if socket not in ("pub", "push"):
            raise ValueError(f"socket must be 'pub' or 'push', not {socket!r}")
        self.sock = self.ctx.socket(zmq.PUB if socket == "pub" else zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, sndhwm)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self._monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self.peers = 0
        (self.sock.bind if bind else self.sock.connect)(endpoint)

    def send(self, data: np.ndarray, *, first_sample: int | None = None, device_time_ns: int = 0,
             timestamps: np.ndarray | None = None, edges: np.ndarray | None = None,
             offsets: np.ndarray | None = None, frame: zmq.Frame | None = None) -> int:
        """Send ``data`` (time on the first axis); returns the seq used. ``frame``: ``data``'s bytes already in a
        ZeroMQ frame, sent instead (a frame can be sent any number of times, never copied)."""
        if data.dtype.str != self.dtype or data.shape[1:] != self.shape:
            raise ValueError(f"{self.stream}: data {data.dtype}{data.shape[1:]} is not {self.dtype}{self.shape}")
        first = self.next_sample if first_sample is None else first_sample
        h = Header(self.stream, self.seq, self.epoch, first, len(data), self.dtype, self.shape, device_time_ns)
        frames = encode(h, data, timestamps, edges, offsets)
        if frame is not None:
            frames[2] = frame
        self.sock.send_multipart(frames, copy=len(data.data) < 65536)
        seq, self.seq, self.next_sample = self.seq, self.seq + 1, first + len(data)
        return seq

    def wait_for_peers(self, n: int = 1, timeout_s: float = 10.0) -> bool:
        """Block until ``n`` peers completed the ZeroMQ handshake (socket monitor events)."""
        deadline = time.monotonic() + timeout_s
        while self.peers < n:
            left = deadline - time.monotonic()
            if left <= 0 or not self._monitor.poll(int(left * 1000)):
                return False
            evt = recv_monitor_message(self._monitor)
            self.peers += 1 if evt["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED else -1
        return True

    def close(self, linger_s: float = 1.0) -> None:
        self.sock.disable_monitor()
        self._monitor.close(0)
        self.sock.close(int(linger_s * 1000))


def edge_records(samples: np.ndarray, line: int = 0, rising: bool = True) -> np.ndarray:
    """Build an edges frame: sync edges seen by the device at these sample indices."""
    out = np.zeros(len(samples), dtype=EDGE_DTYPE)
    out["sample"], out["line"], out["rising"] = samples, line, int(rising)
    return out
