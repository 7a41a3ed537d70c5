"""Rig configuration: the pydantic models for the daemon, its streams and session metadata.

This module owns every rule about what a valid config is (names, dtypes, shapes, sync sources,
the reference clock) and turns a YAML file into a frozen ``RigConfig``. Nothing here touches
sockets or files other than the YAML being read; ``dataset_options`` and friends live with the
stage that uses them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from acqd.errors import ConfigError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)
_AGE_RE = re.compile(r"P(?!$)(\d+Y)?(\d+M)?(\d+W)?(\d+D)?(T(?=\d)(\d+H)?(\d+M)?(\d+(\.\d+)?S)?)?(/\S*)?")


def check_name(value: str, what: str = "name") -> str:
    """Refuse names that could escape a folder or collide with acqd's own files.

    One path component of letters, digits, ``_ . -``, starting with a letter or digit, at most 64
    characters, never ``..`` inside. Used for stream and session names alike.
    """
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value) or ".." in value:
        raise ValueError(
            f"invalid {what} {value!r}: use 1-64 letters, digits, '_', '.', '-', starting with a letter or digit"
        )
    return value


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ChannelSync(_Frozen):
    """Sync edges are a bit of one channel of the stream's own (integer) data."""

    source: Literal["channel"] = "channel"
    channel: int = Field(ge=0, description="index of the digital channel on the stream's first sample axis")
    bit: int = Field(0, ge=0, le=63, description="bit of that channel carrying the sync line")


class FrameSync(_Frozen):
    """Sync edges arrive from the driver in the message's edge frame (see docs/protocol.md)."""

    source: Literal["frame"] = "frame"


class StrobeSync(_Frozen):
    """Every sample of this stream (e.g. a camera frame) strobes a bit of another stream's channel."""

    source: Literal["strobe"] = "strobe"
    stream: str = Field(description="the stream whose data records the strobe line")
    channel: int = Field(ge=0)
    bit: int = Field(0, ge=0, le=63)


SyncSource = Annotated[ChannelSync | FrameSync | StrobeSync, Field(discriminator="source")]

Compression = Literal["none", "gzip", "lz4", "blosc-lz4", "zstd"]


class VideoConfig(_Frozen):
    """Encode a camera's frames into external video files instead of HDF5 frames."""

    codec: Literal["ffv1", "libx264"] = Field("ffv1", description="ffv1: lossless (.mkv); libx264: lossy (.mp4)")
    crf: int = Field(18, ge=0, le=51, description="libx264 quality (lower is better)")
    frames_per_file: int = Field(3600, gt=0, description="start a new file after this many frames")


class StreamConfig(_Frozen):
    """One hardware stream: where it comes from, what its chunks must look like, how it is stored."""

    name: str
    kind: Literal["ephys", "analog", "video", "events", "generic"] = "generic"
    endpoint: str = Field(description="ZeroMQ endpoint of the driver, e.g. tcp://127.0.0.1:5555 or ipc:///run/x")
    socket: Literal["sub", "pull"] = Field("sub", description="SUB drops when slow (counted); PULL pushes back")
    bind: bool = Field(False, description="acqd binds the endpoint instead of connecting to the driver")
    dtype: str = Field(description="numpy dtype of one sample value, e.g. int16, float32")
    shape: tuple[int, ...] = Field((1,), description="shape of one sample (channels, or height x width)")
    rate: float = Field(gt=0, description="nominal sample (or frame) rate in Hz")
    units: str = "a.u."
    conversion: float = Field(1.0, description="multiply raw values by this to get `units`")
    offset: float = Field(0.0, description="added after conversion")
    channel_names: tuple[str, ...] | None = None
    chunk_rows: int | None = Field(None, gt=0, description="HDF5 chunk length in samples (default ~2 MiB)")
    compression: Compression = "none"
    sync: SyncSource | None = Field(None, description="where sync edges come from; none: host receive times")
    required: bool = Field(True, description="RECORD is refused while a required stream is silent")
    max_message_bytes: int = Field(64 << 20, gt=0, description="larger messages are rejected unread")
    max_file_bytes: int | None = Field(None, gt=0, description="roll over to a new part file at this size")
    video: VideoConfig | None = Field(None, description="cameras: encode frames to video files")
    description: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "stream name")

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        try:
            dt = np.dtype(v)
        except TypeError as e:
            raise ValueError(f"unknown dtype {v!r}") from e
        if dt.kind not in "iuf" or dt.itemsize > 8:
            raise ValueError(f"dtype {v!r} must be a numeric integer or float type")
        return dt.newbyteorder("<").str  # the wire and the files are little-endian

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not 1 <= len(v) <= 4 or any(n < 1 for n in v):
            raise ValueError(f"shape {v} must have 1 to 4 positive dimensions")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> StreamConfig:
        if self.channel_names is not None and len(self.channel_names) != self.shape[0]:
            raise ValueError(f"{len(self.channel_names)} channel_names for {self.shape[0]} channels")
        if self.video is not None and (self.kind != "video" or self.dtype != "|u1" or len(self.shape) != 2):
            raise ValueError("video encoding needs kind 'video', dtype uint8 and shape [height, width]")
        if isinstance(self.sync, ChannelSync):
            if self.sync.channel >= self.shape[0]:
                raise ValueError(f"sync channel {self.sync.channel} is outside shape {self.shape}")
            if np.dtype(self.dtype).kind not in "iu":
                raise ValueError("a sync channel needs an integer dtype")
        return self

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def sample_bytes(self) -> int:
        return int(np.prod(self.shape)) * self.np_dtype.itemsize


class ControlConfig(_Frozen):
    """Where the control API listens."""

    host: str = "127.0.0.1"
    port: int = Field(8600, ge=0, le=65535)
    token: str | None = Field(None, description="required by every request; mandatory off loopback")
    allowed_hosts: tuple[str, ...] = ()
    """Host header names accepted besides loopback ones (DNS-rebinding defence), e.g. the rig's own hostname."""
    cors_origins: tuple[str, ...] = ()
    """Browser origins (scheme://host[:port]) allowed to call the API; none by default."""
    data_roots: tuple[Path, ...] = ()
    """Folders Open Ephys ``parent_directory`` may point into, besides daemon.data_root."""
    export_roots: tuple[Path, ...] = ()
    """Folders exports may be written under; default: the folder that holds daemon.data_root."""
    enable_quit: bool = False
    """Let Open Ephys ``PUT /api/quit`` stop the daemon."""

    @model_validator(mode="after")
    def _token_off_loopback(self) -> ControlConfig:
        if not is_loopback(self.host) and not self.token:
            raise ValueError(f"control.host {self.host!r} is not loopback: set control.token")
        return self


def is_loopback(host: str) -> bool:
    """Every address ``host`` resolves to is a loopback address (127.0.0.0/8, ::1); names are resolved."""
    import ipaddress
    import socket

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


class DaemonConfig(_Frozen):
    """Settings of the acqd service itself."""

    data_root: Path
    control: ControlConfig = ControlConfig()
    flush_interval_s: float = Field(0.5, gt=0, le=10, description="bound on data lost by a writer kill -9")
    fsync_interval_s: float | None = Field(
        1.0, ge=0, description="bound on data lost by a power cut (0: every flush; null: never fsync)"
    )
    stats_interval_s: float = Field(0.5, gt=0)
    clock_pair_interval_s: float = Field(1.0, gt=0, description="how often (device counter, host time) is stored")
    silent_after_s: float = Field(2.0, gt=0, description="a stream with no message for this long is silent")
    max_writer_restarts: int = Field(3, ge=0, description="a writer that dies more often than this within "
                                                          "restart_window_s is not restarted again")
    restart_window_s: float = Field(600.0, gt=0)
    finalize_on_stop: bool = False
    annotation_buttons: tuple[str, ...] = ("drug on", "animal moved", "stimulus start", "stimulus end")
    """Quick annotation buttons of the console (one click sends the text as an annotation)."""


class Subject(_Frozen):
    """The fields DANDI treats as critical are required when a recording starts."""

    subject_id: str = Field(min_length=1)
    species: str = Field(min_length=1, description="Latin binomial, e.g. Mus musculus")
    sex: Literal["M", "F", "U", "O"]
    age: str = Field(description="ISO 8601 duration, e.g. P90D")
    description: str = ""
    strain: str | None = None
    genotype: str | None = None

    @field_validator("age")
    @classmethod
    def _age(cls, v: str) -> str:
        if not _AGE_RE.fullmatch(v):
            raise ValueError(f"age {v!r} is not an ISO 8601 duration such as P90D or P12W")
        return v


class SessionMetadata(_Frozen):
    """Metadata a recording cannot start without; it is written into every stream file at creation."""

    session_description: str = Field(min_length=1)
    experimenter: tuple[str, ...] = ()
    institution: str | None = None
    lab: str | None = None
    experiment_description: str | None = None
    keywords: tuple[str, ...] = ()
    subject: Subject


class RigConfig(_Frozen):
    """A whole rig: the daemon settings, its streams, the reference clock, default metadata."""

    daemon: DaemonConfig
    reference: str = Field(description="name of the stream whose clock is the session timebase")
    streams: tuple[StreamConfig, ...] = Field(min_length=1)
    metadata: dict = Field(default_factory=dict, description="defaults merged under a record request's metadata")

    @model_validator(mode="after")
    def _consistent(self) -> RigConfig:
        names = [s.name for s in self.streams]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate stream names: {dupes}")
        endpoints = [s.endpoint for s in self.streams]
        if len(set(endpoints)) != len(endpoints):
            raise ValueError("two streams share an endpoint")
        by_name = {s.name: s for s in self.streams}
        if self.reference not in by_name:
            raise ValueError(f"reference {self.reference!r} is not a configured stream")
        if by_name[self.reference].sync is None:
            raise ValueError(f"reference stream {self.reference!r} needs a sync source")
        for s in self.streams:
            if isinstance(s.sync, StrobeSync):
                target = by_name.get(s.sync.stream)
                if target is None or target.name == s.name:
                    raise ValueError(f"stream {s.name!r}: strobe stream {s.sync.stream!r} is not another stream")
                if s.sync.channel >= target.shape[0] or target.np_dtype.kind not in "iu":
                    raise ValueError(f"stream {s.name!r}: strobe channel {s.sync.channel} not an integer channel "
                                     f"of {target.name!r}")
        return self

    def stream(self, name: str) -> StreamConfig:
        for s in self.streams:
            if s.name == name:
                return s
        raise ConfigError(f"no stream named {name!r}")

    def edge_lines(self, name: str) -> list[EdgeLine]:
        """The digital lines whose rising edges stream ``name``'s writer extracts from its data.

        Its own sync line first (line 0), then the strobe lines other streams are timed by.
        """
        own = self.stream(name).sync
        lines = [EdgeLine(label="sync", channel=own.channel, bit=own.bit)] if isinstance(own, ChannelSync) else []
        for s in self.streams:
            if isinstance(s.sync, StrobeSync) and s.sync.stream == name:
                lines.append(EdgeLine(label=f"strobe:{s.name}", channel=s.sync.channel, bit=s.sync.bit))
        return lines


class EdgeLine(_Frozen):
    """One bit of one integer channel whose rising edges are recorded in ``/sync/edges``."""

    label: str
    channel: int
    bit: int


def format_validation_error(err: ValidationError, raw: dict | None = None) -> str:
    """One line per problem, with the path spelled out (``streams[1] 'probe'.dtype: ...``)."""
    lines = []
    for e in err.errors():
        parts: list[str] = []
        node = raw
        for key in e["loc"]:
            if isinstance(key, int):
                label = f"[{key}]"
                if isinstance(node, list) and key < len(node) and isinstance(node[key], dict) and "name" in node[key]:
                    label += f" {node[key]['name']!r}"
                parts.append(label)
            else:
                parts.append(("." if parts else "") + str(key))
            node = node[key] if isinstance(node, (dict, list)) and _has(node, key) else None
        where = "".join(parts) or "(top level)"
        lines.append(f"{where}: {e['msg']}")
    return "\n".join(lines)


def _has(node: dict | list, key: str | int) -> bool:
    return key in node if isinstance(node, dict) else isinstance(key, int) and key < len(node)


def parse_config(raw: object, source: str = "config") -> RigConfig:
    """Validate an already-parsed mapping; raise ``ConfigError`` listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return RigConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{source}: {e.error_count()} problem(s)\n{format_validation_error(e, raw)}") from None


def load_config(path: str | Path) -> RigConfig:
    """Read and validate a rig YAML file. Relative ``data_root`` is resolved against the file's folder."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    cfg = parse_config(raw, str(path))
    root = cfg.daemon.data_root
    if not root.is_absolute():
        daemon = cfg.daemon.model_copy(update={"data_root": (path.parent / root).resolve()})
        cfg = cfg.model_copy(update={"daemon": daemon})
    return cfg
