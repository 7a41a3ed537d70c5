"""The LSL bridge: a driver that records one Lab Streaming Layer outlet through acqd's own wire protocol.

Run as ``python -m acqd.wire.lsl SPEC_JSON`` by the supervisor, one process per LSL stream, next to the
stream's writer (docs/lsl.md). It resolves the outlet the stream's ``lsl`` section selects, refuses one whose
channel count, format or nominal rate differs from the config (and keeps looking), then pulls chunks with
pylsl and publishes them with ``acqd.wire.publisher``: per-sample LSL timestamps in the timestamps frame,
the inlet's time_correction() in the offsets frame. So the writer, its checks, gaps and files are those of
any driver.

A string (marker) outlet is sent as ``uint8`` rows of ``[channels, max_bytes]``: each value UTF-8 encoded,
NUL-padded; a longer value is cut at a character boundary and reported. The inlet never recovers by itself
(liblsl's recovery reconnects to any outlet with the same source_id and would record a replacement at another
rate under the old header, or nothing at all for another channel count or format): an outlet that is lost is
resolved again and checked against the config like the first one, and a mismatch is reported and never
recorded. A regular outlet whose timestamps jump by more than ``gap_threshold_s`` (it vanished and came
back, or was replaced) skips the sample counter by the samples the jump spans, so the writer records a
SAMPLES gap of that duration.

It reports to the supervisor over a DEALER socket (identity ``lsl:<stream>``, JSON): ``state`` messages
(resolving, not_found, mismatch, streaming) and ``event`` messages (truncated markers, outages).
"""

from __future__ import annotations

import ctypes
import json
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import zmq

from acqd.config import StreamConfig
from acqd.wire.protocol import OFFSET_DTYPE

PULL_INTERVAL_S = 0.02
"""Pull the inlet this often: 50 messages a second, about the 10-20 ms per message that docs/protocol.md
advises (the writer's cost is per message)."""
MAX_CHUNK = 4096
FORMATS = {"float32": "<f4", "double64": "<f8", "int8": "|i1", "int16": "<i2", "int32": "<i4", "int64": "<i8",
           "string": "|u1"}
"""LSL channel format -> the stream's dtype; string values are UTF-8 bytes in uint8 rows."""


@dataclass(frozen=True, slots=True)
class OutletInfo:
    """What an LSL outlet declares about itself (what discovery shows and the config is checked against)."""

    name: str
    type: str
    source_id: str
    channels: int
    rate: float
    format: str
    hostname: str
    uid: str = ""

    @classmethod
    def of(cls, info) -> OutletInfo:
        """From a ``pylsl.StreamInfo``."""
        fmt = {v: k for k, v in _pylsl_formats().items()}.get(info.channel_format(), str(info.channel_format()))
        return cls(info.name(), info.type(), info.source_id(), info.channel_count(), float(info.nominal_srate()),
                   fmt, info.hostname(), info.uid())

    def as_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.__slots__}


def _pylsl_formats() -> dict[str, int]:
    import pylsl

    return {"float32": pylsl.cf_float32, "double64": pylsl.cf_double64, "string": pylsl.cf_string,
            "int32": pylsl.cf_int32, "int16": pylsl.cf_int16, "int8": pylsl.cf_int8, "int64": pylsl.cf_int64}


def selector(cfg: StreamConfig) -> str:
    """The stream's outlet selection as text (for messages), e.g. ``name='EEG' type='EEG'``."""
    src = cfg.lsl
    return " ".join(f"{k}={v!r}" for k, v in (("name", src.name), ("type", src.type), ("source_id", src.source_id))
                    if v)


def predicate(cfg: StreamConfig) -> str:
    """The XPath predicate liblsl resolves the stream's outlet by."""
    src = cfg.lsl
    return " and ".join(f"{k}='{v}'" for k, v in (("name", src.name), ("type", src.type),
                                                  ("source_id", src.source_id)) if v)


def mismatch(cfg: StreamConfig, out: OutletInfo) -> list[str]:
    """How the outlet differs from what the config declares (empty: it fits). Never coerced."""
    problems = []
    want = FORMATS.get(out.format)
    if want != cfg.dtype:
        problems.append(f"format {out.format} (stored as {want}) but the config says dtype {cfg.dtype}")
    if out.channels != cfg.shape[0]:
        problems.append(f"{out.channels} channel(s) but the config says shape {list(cfg.shape)}")
    if abs(out.rate - cfg.lsl_rate) > 1e-6 * max(1.0, cfg.lsl_rate):
        problems.append(f"nominal rate {out.rate:g} Hz but the config expects {cfg.lsl_rate:g} Hz")
    return problems


def config_snippet(out: OutletInfo, endpoint: str = "ipc:///tmp/acqd-lsl-NAME") -> dict:
    """A stream entry for the rig config that records this outlet as it is."""
    name = "".join(c if c.isalnum() or c in "_.-" else "_" for c in out.name)[:64].lstrip("_.-") or "lsl"
    string = out.format == "string"
    select = {"name": out.name, "type": out.type, **({"source_id": out.source_id} if out.source_id else {})}
    entry: dict = {"name": name, "kind": "events" if string or out.rate == 0 else "generic",
                   "endpoint": endpoint.replace("NAME", name),
                   "dtype": str(np.dtype(FORMATS[out.format])) if out.format in FORMATS else out.format,
                   "shape": [out.channels, 256] if string else [out.channels],
                   "rate": out.rate if out.rate > 0 else 10.0, "lsl": select}
    if out.rate == 0:
        entry["lsl"]["nominal_rate"] = 0
    return entry


def encode_strings(values: np.ndarray, max_bytes: int) -> tuple[np.ndarray, int]:
    """(n, channels) values (bytes or str) -> (n, channels, max_bytes) uint8 rows, NUL-padded; and how many
    values were cut to fit (at a UTF-8 character boundary)."""
    n, ch = values.shape
    out = np.zeros((n, ch, max_bytes), dtype=np.uint8)
    cut = 0
    for i in range(n):
        for j in range(ch):
            raw = values[i, j]
            raw = raw.encode() if isinstance(raw, str) else bytes(raw)
            if len(raw) > max_bytes:
                cut += 1
                raw = raw[:max_bytes].decode("utf-8", errors="ignore").encode()
            out[i, j, :len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    return out, cut


def decode_strings(rows: np.ndarray) -> list[list[str]]:
    """(n, channels, max_bytes) uint8 rows -> the text of each value (trailing NULs removed)."""
    return [[bytes(v).rstrip(b"\0").decode("utf-8", errors="replace") for v in row] for row in rows]


def split_outages(ts: np.ndarray, threshold_s: float) -> list[int]:
    """Indices where a chunk's timestamps jump by more than ``threshold_s``: the outlet was away in between."""
    return (np.flatnonzero(np.diff(ts) > threshold_s) + 1).tolist()


def skipped_samples(last_ts: float, next_ts: float, rate: float) -> int:
    """Samples a regular outlet would have sent between two timestamps ``next_ts - last_ts`` apart."""
    return max(0, round((next_ts - last_ts) * rate) - 1)


class Bridge:
    """One LSL outlet -> one acqd publisher."""

    def __init__(self, cfg: StreamConfig, control: str):
        from acqd.wire.publisher import Publisher

        self.cfg = cfg
        self.stop_requested = False
        self.ctx = zmq.Context()
        self.ctrl = self.ctx.socket(zmq.DEALER)
        self.ctrl.setsockopt(zmq.IDENTITY, f"lsl:{cfg.name}".encode())
        self.ctrl.setsockopt(zmq.LINGER, 1000)
        self.ctrl.connect(control)
        socket = "pub" if cfg.socket == "sub" else "push"
        self.pub = Publisher(cfg.name, cfg.endpoint, dtype=cfg.dtype, shape=cfg.shape, socket=socket,
                             bind=not cfg.bind, ctx=self.ctx, sndhwm=100_000)
        self.regular = cfg.lsl_rate > 0 and cfg.dtype != "|u1"
        self.last_ts: float | None = None
        self.offsets: list[tuple[int, int]] = []
        self.next_offset = 0.0

    def report(self, msg_type: str, **body) -> None:
        try:
            self.ctrl.send_json({"type": msg_type, "stream": self.cfg.name, **body}, zmq.NOBLOCK)
        except zmq.Again:
            pass

    def resolve(self):
        """Look for the outlet until one fits the config (or we are stopped); returns its pylsl StreamInfo."""
        import pylsl

        src = self.cfg.lsl
        self.report("state", state="resolving", detail=f"looking for the LSL outlet {selector(self.cfg)}")
        while not self.stop_requested:
            found = pylsl.resolve_bypred(predicate(self.cfg), 1, src.resolve_timeout_s)
            if not found:
                self.report("state", state="not_found",
                            detail=f"no LSL outlet {selector(self.cfg)} on the network "
                                   f"(looked for {src.resolve_timeout_s:g} s; still looking)")
                continue
            infos = [OutletInfo.of(i) for i in found]
            fits = [i for i, o in zip(found, infos) if not mismatch(self.cfg, o)]
            if fits:
                out = OutletInfo.of(fits[0])
                more = f" ({len(fits)} outlets match: give source_id to choose)" if len(fits) > 1 else ""
                self.report("state", state="streaming", detail=f"recording LSL outlet {out.name!r} from "
                                                               f"{out.hostname}{more}", outlet=out.as_dict())
                return fits[0]
            self.report("state", state="mismatch", outlet=infos[0].as_dict(),
                        detail=f"LSL outlet {selector(self.cfg)} does not match the config: "
                               + "; ".join(mismatch(self.cfg, infos[0])))
            time.sleep(src.resolve_timeout_s)
        return None

    def run(self) -> int:
        try:
            import pylsl
            from pylsl.util import LostError
        except ImportError:  # stays up, so that status and preflight say why, instead of a restart loop
            self.report("state", state="unavailable", detail="pylsl is not installed: pip install 'acqd[lsl]'")
            while not self.stop_requested:
                time.sleep(0.2)
            return 0
        info = self.resolve()
        if info is None:
            return 0
        inlet = self.open(info)
        string = self.cfg.dtype == "|u1"
        while not self.stop_requested:
            time.sleep(PULL_INTERVAL_S)
            self.sample_clock(inlet)
            try:
                data, ts = inlet.pull_chunk(timeout=0.0, max_samples=MAX_CHUNK, as_numpy=True)
            except LostError:  # gone, or replaced: whatever answers next is checked against the config again
                self.report("event", kind="lsl_lost", detail="the LSL outlet was lost; looking for it again")
                inlet.close_stream()
                info = self.resolve()
                if info is None:
                    return 0
                inlet = self.open(info)
                continue
            if len(ts) == 0:
                continue
            if string:
                data, cut = encode_strings(np.asarray(data), self.cfg.shape[1])
                if cut:
                    self.report("event", kind="lsl_truncated", detail=f"{cut} marker value(s) longer than "
                                f"{self.cfg.shape[1]} bytes were cut to fit")
            self.publish(np.ascontiguousarray(data, dtype=self.cfg.dtype), np.asarray(ts, dtype=np.float64))
        inlet.close_stream()
        return 0

    @staticmethod
    def open(info):
        """An inlet on the outlet ``resolve`` checked; it raises LostError instead of reconnecting by itself."""
        import pylsl

        inlet = pylsl.StreamInlet(info, max_buflen=360, recover=False)
        inlet.open_stream(timeout=10.0)
        return inlet

    def sample_clock(self, inlet) -> None:
        """Every ``clock_interval_s``: the inlet's offset (outlet clock -> this host's), at this host's clock."""
        import pylsl

        now = time.monotonic()
        if now < self.next_offset:
            return
        try:
            offset = inlet.time_correction(timeout=1.0)
        except RuntimeError:  # pylsl.util.TimeoutError or LostError
            return  # the outlet is away; the next sample comes once it is back
        # pylsl's local_clock() is CLOCK_MONOTONIC, the clock of the writers' host_mono_ns.
        self.offsets.append((time.monotonic_ns(), round(offset * 1e9)))
        self.next_offset = now + self.cfg.lsl.clock_interval_s

    def publish(self, data: np.ndarray, ts: np.ndarray) -> None:
        """Send one pulled chunk; a regular outlet's outages become skipped samples (a gap the writer records)."""
        pieces = [0, *split_outages(ts, self.cfg.lsl.gap_threshold_s), len(ts)] if self.regular else [0, len(ts)]
        for a, b in zip(pieces[:-1], pieces[1:]):
            if self.regular and self.last_ts is not None and ts[a] - self.last_ts > self.cfg.lsl.gap_threshold_s:
                lost = skipped_samples(self.last_ts, ts[a], self.cfg.lsl_rate)
                self.pub.next_sample += lost
                self.report("event", kind="lsl_outage", detail=f"LSL timestamps jumped {ts[a] - self.last_ts:.3f} s: "
                            f"{lost} samples missing")
            offsets = np.array(self.offsets, dtype=OFFSET_DTYPE) if self.offsets else None
            self.pub.send(data[a:b], timestamps=np.round(ts[a:b] * 1e9).astype(np.int64), offsets=offsets)
            self.offsets = []
            self.last_ts = float(ts[b - 1])

    def close(self) -> None:
        self.pub.close()
        self.ctrl.close(1000)
        self.ctx.term()


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    spec = json.loads((argv or sys.argv[1:])[0])
    cfg = StreamConfig.model_validate(spec["stream"])
    _die_with_parent()
    bridge = Bridge(cfg, spec["control"])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: setattr(bridge, "stop_requested", True))
    try:
        return bridge.run()
    finally:
        bridge.close()


if __name__ == "__main__":
    sys.exit(main())
