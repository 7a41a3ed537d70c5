"""Rig configuration: the pydantic models for the daemon and its streams (session metadata: acqd.metadata).

This module owns every rule about what a valid config is (names, dtypes, shapes, sync sources,
the reference clock) and turns a YAML file into a frozen ``RigConfig``, or into a ``ConfigError``
listing every problem with its line and column (worded and located by ``acqd.config.errors``).
Nothing here touches sockets or files other than the YAML being read; ``dataset_options`` and
friends live with the stage that uses them.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from acqd.config.errors import Found, Loc, closest_first
from acqd.errors import ConfigError
from acqd.metadata.models import Frozen as _Frozen
from acqd.metadata.probes import contact_columns, read_layout
from acqd.config.ship import ShipList
from acqd.config.nodes import FollowerList, NodeName, follower_problem, resolve_token_files

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)
STREAM_NAME_BYTES = 32
"""The wire header's stream field (docs/protocol.md): longer stream names could never be received."""


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


class ChannelSync(_Frozen):
    """Sync edges are a bit of one channel of the stream's own (integer) data."""

    source: Literal["channel"] = "channel"
    """Sync edges are a bit of one of this stream's own integer channels."""
    channel: int = Field(ge=0, description="index of the digital channel on the stream's first sample axis")
    """Index of the digital channel on the stream's first sample axis."""
    bit: int = Field(0, ge=0, le=63, description="bit of that channel carrying the sync line")
    """Bit of that channel carrying the sync line (0 = least significant)."""


class FrameSync(_Frozen):
    """Sync edges arrive from the driver in the message's edge frame (see docs/protocol.md)."""

    source: Literal["frame"] = "frame"
    """The driver sends sync edges in each message's edges frame (docs/protocol.md)."""


class StrobeSync(_Frozen):
    """Every sample of this stream (e.g. a camera frame) strobes a bit of another stream's channel."""

    source: Literal["strobe"] = "strobe"
    """Every sample (frame) of this stream strobes a bit of another stream's channel."""
    stream: str = Field(description="the stream whose data records the strobe line")
    """The stream whose data records the strobe line."""
    channel: int = Field(ge=0)
    """Index of the integer channel of that stream carrying the strobe."""
    bit: int = Field(0, ge=0, le=63)
    """Bit of that channel carrying the strobe (0 = least significant)."""


SyncSource = Annotated[ChannelSync | FrameSync | StrobeSync, Field(discriminator="source")]

Compression = Literal["none", "gzip", "lz4", "blosc-lz4", "zstd"]


class VideoConfig(_Frozen):
    """Encode a camera's frames into external video files instead of HDF5 frames."""

    codec: Literal["ffv1", "libx264"] = Field("ffv1", description="ffv1: lossless (.mkv); libx264: lossy (.mp4)")
    """ffv1: lossless, in Matroska (.mkv); libx264: lossy, in fragmented MP4 (.mp4)."""
    crf: int = Field(18, ge=0, le=51, description="libx264 quality (lower is better)")
    """libx264 quality (lower is better; 18 is visually lossless)."""
    frames_per_file: int = Field(3600, gt=0, description="start a new file after this many frames")
    """Start a new video file after this many frames (a crash loses at most the open file's tail)."""
    max_backlog_s: float = Field(10.0, gt=0, description="seconds of frames held for a slow encoder; beyond, "
                                                         "frames are lost as gaps with reason encoder")
    """Frames waiting for the encoder, in seconds of video (memory: this x rate x frame bytes); a frame beyond it is
    not stored, and recorded as a gap with reason ``encoder`` (the receive path never waits for the encoder)."""


class CurveKeys(_Frozen):
    """ZeroMQ CURVE on a stream acqd binds on tcp: encrypted, and only drivers whose public key is listed may send
    (docs/protocol.md "Authenticated drivers"). Make keys with ``zmq.auth.create_certificates(folder, name)``."""

    secret_key_file: Path = Field(description="acqd's secret certificate for this stream (a .key_secret file)")
    """acqd's certificate for this stream: the ``.key_secret`` file ``zmq.auth.create_certificates`` writes (its
    ``.key`` twin is what drivers need)."""
    client_keys_dir: Path = Field(description="folder of the public certificates (.key) of the drivers allowed")
    """Folder of the public certificates (``.key`` files) of the drivers allowed to send; any other key is
    refused, counted and logged (``peer_refused``)."""

    @model_validator(mode="after")
    def _readable(self) -> CurveKeys:
        from zmq.auth import load_certificate

        try:
            public, secret = load_certificate(self.secret_key_file)
        except (OSError, ValueError) as e:
            raise ValueError(f"secret_key_file {str(self.secret_key_file)!r}: {e}") from e
        if not secret:
            raise ValueError(f"secret_key_file {str(self.secret_key_file)!r} holds no secret key (the .key_secret file)")
        if not self.client_keys_dir.is_dir():
            raise ValueError(f"client_keys_dir {str(self.client_keys_dir)!r} is not a folder")
        return self


class LslSource(_Frozen):
    """The stream comes from a Lab Streaming Layer outlet, bridged by acqd (docs/lsl.md).

    The outlet is selected like LabRecorder's RequiredStreams: by name, type and/or source_id (all given must
    match). When it resolves, its channel count, format and nominal rate are checked against the stream's
    ``shape``, ``dtype`` and ``nominal_rate``: a mismatch is refused, never coerced. A string outlet is recorded
    as ``dtype: uint8``, ``shape: [channels, max_bytes]`` (UTF-8, NUL-padded).
    """

    name: str | None = None
    """The outlet's name (LSL ``name``)."""
    type: str | None = None
    """The outlet's content type (LSL ``type``, e.g. EEG, Markers)."""
    source_id: str | None = None
    """The outlet's source_id: the only selector that lets an inlet recover a restarted outlet by itself."""
    nominal_rate: float | None = Field(None, ge=0)
    """The outlet's nominal_srate to expect; default the stream's ``rate``; 0 for an irregular stream (markers),
    whose ``rate`` then only sizes the file's chunks."""
    resolve_timeout_s: float = Field(2.0, gt=0)
    """How long one look for the outlet on the network lasts (repeated until it is found)."""
    clock_interval_s: float = Field(1.0, gt=0)
    """How often the inlet's time_correction() is sampled and stored in ``/sync/offsets``."""
    gap_threshold_s: float = Field(0.1, gt=0)
    """Regular streams: a jump in LSL timestamps larger than this between two samples is recorded as a gap."""

    @model_validator(mode="after")
    def _selected(self) -> LslSource:
        if not (self.name or self.type or self.source_id):
            raise ValueError("an LSL source needs at least one of name, type, source_id")
        return self


class ProbeConfig(_Frozen):
    """The probe layout of an ephys stream: contact positions, shanks and wiring, read with probeinterface."""

    file: Path
    """Probe file, relative to the config file's folder: probeinterface JSON, SpikeGLX .meta or Open Ephys
    settings.xml (Neuropixels); read again at finalize, so keep it where it is."""
    format: Literal["auto", "probeinterface", "spikeglx", "openephys"] = "auto"
    """auto: from the file name (.meta SpikeGLX, .xml Open Ephys, else probeinterface JSON)."""
    manufacturer: str | None = None
    """Maker of the probe, e.g. IMEC; default: what the file says."""
    model: str | None = None
    """Model or part number, e.g. NP1000; default: what the file says."""
    serial: str | None = None
    """Serial number of the probe; default: what the file says (SpikeGLX imDatPrb_sn)."""
    reference: str | None = None
    """Reference scheme of every contact, e.g. 'tip' or 'external'; the electrodes table's reference column."""


class StimulusConfig(_Frozen):
    """A stimulus program's stream (``kind: stimulus``), written into the NWB ``stimulus`` group (docs/finalize.md).

    Shape ``[1]`` (an integer per presented frame): the index of the image shown, into ``images``; finalize writes an
    IndexSeries over an Images container. Shape ``[height, width]`` or ``[height, width, 3]``: the frames themselves;
    finalize writes an OpticalSeries with ``field_of_view``, ``distance`` and ``orientation``.
    """

    images: Path | None = None
    """Folder of the unique images (PNG, JPEG, TIFF ...): index i is the i-th file in sorted name order; copied into
    the session folder at RECORD. Relative paths are resolved against the config file's folder."""
    field_of_view: tuple[float, ...] | None = Field(None, min_length=2, max_length=3)
    """Frames: width, height (and depth) of the presented image in meters."""
    distance: float | None = Field(None, gt=0)
    """Frames: distance from the monitor to the eye in meters."""
    orientation: str | None = None
    """Frames: which way is up in the frame, relative to a stated reference frame."""


class StreamConfig(_Frozen):
    """One hardware stream: where it comes from, what its chunks must look like, how it is stored."""

    name: str
    """Stream name: the topic and header stream field; 1-32 letters, digits, '_', '.', '-'."""
    kind: Literal["ephys", "analog", "video", "events", "generic", "stimulus"] = "generic"
    """What the stream carries; decides how finalize writes it into the NWB file."""
    endpoint: str = Field(description="ZeroMQ endpoint of the driver, e.g. tcp://127.0.0.1:5555 or ipc:///run/x")
    """ZeroMQ endpoint of the driver, e.g. tcp://127.0.0.1:5555 or ipc:///run/x."""
    socket: Literal["sub", "pull"] = Field("sub", description="SUB drops when slow (counted); PULL pushes back")
    """sub: the driver PUBlishes and drops when acqd is slow (counted as gaps); pull: the driver PUSHes, blocks."""
    bind: bool = Field(False, description="acqd binds the endpoint instead of connecting to the driver")
    """acqd binds the endpoint instead of connecting to the driver."""
    dtype: str = Field(description="numpy dtype of one sample value, e.g. int16, float32")
    """numpy dtype of one sample value, e.g. int16, float32 (stored little-endian)."""
    shape: tuple[int, ...] = Field((1,), description="shape of one sample (channels, or height x width)")
    """Shape of one sample: channels, or height x width."""
    rate: float = Field(gt=0, description="nominal sample (or frame) rate in Hz")
    """Nominal sample (or frame) rate in Hz."""
    units: str = "a.u."
    """Physical unit of the values after conversion and offset."""
    conversion: float = Field(1.0, description="multiply raw values by this to get `units`")
    """Multiply raw values by this to get `units`."""
    offset: float = Field(0.0, description="added after conversion")
    """Added after conversion."""
    channel_names: tuple[str, ...] | None = None
    """One name per channel (shape[0] of them); absent from the stream file when not given."""
    chunk_rows: int | None = Field(None, gt=0, description="HDF5 chunk length in samples (default ~2 MiB)")
    """HDF5 chunk length in samples (default: about 2 MiB, at most 0.1 s of data)."""
    compression: Compression = "none"
    """Filter applied while recording; blosc-lz4, lz4 and zstd need hdf5plugin in the reader."""
    sync: SyncSource | None = Field(None, description="where sync edges come from; none: host receive times")
    """Where sync edges come from; none: the stream is timed by host receive times."""
    required: bool = Field(True, description="RECORD is refused while a required stream is silent")
    """RECORD is refused while a required stream is silent."""
    max_message_bytes: int = Field(64 << 20, gt=0, description="larger messages are rejected unread")
    """Larger messages are rejected unread (reason oversized)."""
    max_file_bytes: int | None = Field(1 << 30, gt=0, description="roll over to a new part file at this size")
    """Roll over to a new part file at this size (bytes; null: no limit)."""
    max_file_seconds: float | None = Field(600.0, gt=0, description="roll over after this many seconds of samples")
    """Roll over to a new part file once a part holds this many seconds of samples (rows / rate; null: no limit)."""
    video: VideoConfig | None = Field(None, description="cameras: encode frames to video files")
    """Cameras: encode frames to video files instead of HDF5 frames."""
    allow_from: tuple[str, ...] = ("127.0.0.1", "::1")
    """With ``bind: true`` on tcp: the only peer IP addresses acqd takes data from (ZAP); others are refused."""
    curve: CurveKeys | None = Field(None, description="bind: true on tcp: drivers must hold a listed CURVE key")
    """With ``bind: true`` on tcp: encrypt, and take data only from drivers whose CURVE key is listed (besides
    ``allow_from``); without it any process that can reach the port (every local one) can send."""
    description: str = ""
    """Free text, written into the stream file and the NWB file."""
    lsl: LslSource | None = Field(None, description="the stream is an LSL outlet bridged onto `endpoint`")
    probe: ProbeConfig | None = None
    """Ephys streams: the probe layout (positions, shanks) for the NWB electrodes table; none: positions unknown."""
    stimulus: StimulusConfig | None = None
    """``kind: stimulus``: the image set its indices point into, or how its frames were presented."""
    writer_group: str | None = Field(None, description="writer process: a group name shared with other streams, "
                                                       "'own', or none: grouped if slow (docs/writers.md)")
    """Which writer process hosts the stream: streams given the same name share one process; ``own`` gives it a
    process of its own; none: a stream of at most ``daemon.group_below_bytes_per_s`` (and not a camera encoded to
    video) joins the group ``slow``, any other has its own (acqd.record.group, docs/writers.md)."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        check_name(v, "stream name")
        if len(v.encode()) > STREAM_NAME_BYTES:
            raise ValueError(f"stream name {v!r} is {len(v.encode())} bytes; the wire header's stream field holds "
                             f"{STREAM_NAME_BYTES} (docs/protocol.md)")
        return v

    @field_validator("writer_group")
    @classmethod
    def _group(cls, v: str | None) -> str | None:
        return v if v is None else check_name(v, "writer_group")

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
        if self.curve is not None and (not self.bind or not self.endpoint.startswith("tcp://") or self.lsl is not None):
            raise ValueError("curve keys go with a tcp endpoint that acqd binds (bind: true), and not with lsl")
        if self.channel_names is not None and len(self.channel_names) != self.shape[0]:
            raise ValueError(f"{len(self.channel_names)} channel_names for {self.shape[0]} channels")
        if self.video is not None and (self.kind != "video" or self.dtype != "|u1" or len(self.shape) != 2):
            raise ValueError("video encoding needs kind 'video', dtype uint8 and shape [height, width]")
        if isinstance(self.sync, ChannelSync):
            if self.sync.channel >= self.shape[0]:
                raise ValueError(f"sync channel {self.sync.channel} is outside shape {self.shape}")
            if np.dtype(self.dtype).kind not in "iu":
                raise ValueError("a sync channel needs an integer dtype")
        if (self.kind == "stimulus") != (self.stimulus is not None):
            raise ValueError("a stimulus block goes with kind 'stimulus', and kind 'stimulus' needs one")
        if self.stimulus is not None:
            stimulus_problem(self.stimulus, self.shape, self.np_dtype)
        if self.lsl is not None and self.dtype == "|u1" and len(self.shape) != 2:
            raise ValueError("an LSL string stream needs dtype uint8 and shape [channels, max_bytes]")
        return self

    @property
    def lsl_rate(self) -> float:
        """The LSL outlet's expected nominal rate (0: irregular)."""
        return self.rate if self.lsl is None or self.lsl.nominal_rate is None else self.lsl.nominal_rate

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def sample_bytes(self) -> int:
        return math.prod(self.shape) * self.np_dtype.itemsize  # per batch in a group writer: np.prod is 10x slower


def stimulus_problem(stim: StimulusConfig, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Index streams: shape [1], an integer dtype, an image folder; frame streams: [h, w(, 3)] and the optics."""
    if shape == (1,):
        if dtype.kind not in "iu" or stim.images is None:
            raise ValueError("a stimulus index stream (shape [1]) needs an integer dtype and stimulus.images")
    elif len(shape) == 2 or (len(shape) == 3 and shape[2] == 3):
        if stim.field_of_view is None or stim.distance is None or stim.orientation is None:
            raise ValueError("a stimulus frame stream needs stimulus.field_of_view, distance and orientation")
    else:
        raise ValueError(f"a stimulus stream has shape [1] (image indices) or [height, width(, 3)] (frames), "
                         f"not {list(shape)}")


class ControlConfig(_Frozen):
    """Where the control API listens."""

    host: str = "127.0.0.1"
    """Address the control API listens on."""
    port: int = Field(8600, ge=0, le=65535)
    """TCP port of the control API (0: any free port)."""
    token: str | None = Field(None, description="required by every request; mandatory off loopback")
    """Bearer token required by every request; mandatory off loopback."""
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
    request_timeout_s: float = Field(10.0, gt=0, le=3600)
    """A connection that has not sent a whole request (headers and body) this long after opening (or after its
    last response) is closed: idle or trickling sockets cannot hold the server's connections."""
    stall_timeout_s: float = Field(10.0, gt=0, le=3600)
    """A connection that reads nothing of what it is sent for this long is dropped (e.g. an event stream whose
    client stopped reading)."""
    max_connections_per_client: int = Field(400, ge=1, le=448)
    """Connections from one address at once; beyond it (or beyond 448 in all) the connection idle longest is
    closed to make room."""

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


class LabRecorderConfig(_Frozen):
    """LabRecorder's remote control socket, served by acqd (docs/lsl.md)."""

    host: str = "127.0.0.1"
    """Address to listen on; LabRecorder listens on every address, acqd on loopback unless told otherwise."""
    port: int = Field(22345, ge=0, le=65535)
    """LabRecorder's port (0: any free port, written to the ready file)."""
    token: str | None = Field(None, min_length=16)
    """Secret a client sends as its first line (``token <secret>``) before any command; mandatory off loopback."""
    max_connections: int = Field(8, ge=1, le=256)
    """Clients connected at once; more are answered ``error: too many connections`` and closed."""

    @model_validator(mode="after")
    def _token_off_loopback(self) -> LabRecorderConfig:
        if not is_loopback(self.host) and not self.token:
            raise ValueError(f"labrecorder.host {self.host!r} is not loopback: set labrecorder.token")
        return self


class SyncLockConfig(_Frozen):
    """The live sync lock: while recording, the daemon pairs each synced stream's recent sync edges with the
    reference's (finalize's pairing) and alarms when a stream is not locked (docs/clock-alignment.md)."""

    enabled: bool = True
    """Compute the live sync lock (off: no sync state in status, no sync alarms; the edges are recorded anyway)."""
    window_s: float = Field(30.0, ge=5, le=600)
    """Edges of the last this many seconds are paired and fitted (drift, offset)."""
    edge_timeout_s: float = Field(5.0, gt=0, le=600)
    """A synced stream with no sync edge for this long is `no edges`; set it above the longest interval between
    pulses of your sync scheme (random 0.5-1.5 s, a 1 s square wave: 5 s; barcodes every 30 s: 40 s)."""
    interval_s: float = Field(2.0, gt=0, le=60)
    """How often the edges are paired and fitted (seconds; silence is checked every 0.5 s whatever this says);
    skipped while the daemon's loop is behind (shed before data)."""


class DaemonConfig(_Frozen):
    """Settings of the acqd service itself."""

    data_root: Path
    """Folder that holds the session folders; relative to the config file's folder."""
    control: ControlConfig = ControlConfig()
    """Address, port and token of the control API."""
    flush_interval_s: float = Field(0.5, gt=0, le=10, description="bound on data lost by a writer kill -9")
    """Bound on data lost by a writer kill -9 (seconds between flushes)."""
    fsync_interval_s: float | None = Field(
        1.0, ge=0, description="bound on data lost by a power cut (0: every flush; null: never fsync)"
    )
    """Bound on data lost by a power cut (0: every flush; null: never fsync)."""
    stats_interval_s: float = Field(0.5, gt=0)
    """How often each writer reports its counters to the daemon (seconds)."""
    clock_pair_interval_s: float = Field(1.0, gt=0, description="how often (device counter, host time) is stored")
    """How often a (device counter, host time) pair is stored (seconds)."""
    silent_after_s: float = Field(2.0, gt=0, description="a stream with no message for this long is silent")
    """A stream with no message for this long is silent (seconds)."""
    max_writer_restarts: int = Field(3, ge=0, description="a writer that dies more often than this within "
                                                          "restart_window_s is not restarted again")
    """A writer that dies more often than this within restart_window_s is not restarted again."""
    restart_window_s: float = Field(600.0, gt=0)
    """Window over which writer restarts are counted (seconds)."""
    finalize_on_stop: bool = False
    """Finalize each session as soon as its recording stops."""
    nodes_timeout_s: float = Field(600.0, ge=0)
    """A leader's finalize waits this long for the other PCs' parts of a session (nodes/<node>/); then it goes on
    without the missing ones, listed as missing (`acqd finalize` again once they arrive)."""
    labrecorder: LabRecorderConfig | None = None
    """Serve LabRecorder's remote control commands (start, stop, filename ...); off when absent."""
    heartbeat_timeout_s: float = Field(2.0, gt=0)
    """A live writer that sends nothing (not even stats) for this long is reported `hung`."""
    disk_reserve_bytes: int = Field(2_000_000_000, ge=0)
    """Free space on the data root below which recording stops cleanly (a warning at twice this)."""
    annotation_buttons: tuple[str, ...] = ("drug on", "animal moved", "stimulus start", "stimulus end")
    """Quick annotation buttons of the console (one click sends the text as an annotation)."""
    max_image_pixels: int = Field(50_000_000, gt=0)
    """Largest image (width x height) an attachment or a stimulus image set may have; checked before decoding."""
    sync_lock: SyncLockConfig = SyncLockConfig()
    """The live sync lock per synced stream while recording (edges, pairs, drift, offset; an alarm when lost)."""
    group_below_bytes_per_s: float = Field(100_000, ge=0)
    """Streams whose configured data rate (rate x sample bytes) is at most this share one writer process, the
    group ``slow`` (0: none do); a stream's ``writer_group`` overrides it (docs/writers.md)."""

    @model_validator(mode="after")
    def _heartbeat_after_stats(self) -> DaemonConfig:
        if self.heartbeat_timeout_s <= 2 * self.stats_interval_s:  # stats are the heartbeat
            raise ValueError(f"heartbeat_timeout_s ({self.heartbeat_timeout_s:g}) must exceed twice "
                             f"stats_interval_s ({self.stats_interval_s:g})")
        return self


SESSION_ONLY = ("subject", "Subject", "session_id", "bids")
"""Metadata keys a rig config may not hold: they describe one session (the animal, the session's name)."""


class QcConfig(_Frozen):
    """Thresholds of the verdict in the QC report that finalize writes (qc/index.html, qc/qc.json)."""

    max_residual_samples: float = Field(2.5, gt=0)
    """A stream whose largest clock-fit residual exceeds this many of its own samples fails QC (IBL's practice)."""
    max_drift_ppm: float = Field(150.0, gt=0)
    """A stream whose clock runs further than this off its nominal rate fails QC (IBL's practice)."""
    max_pairing_ppm: float = Field(200.0, gt=0, le=5000)
    """The largest rate difference (ppm) between a device and the reference that finalize's sync pairing searches;
    a device further off is refused with its measured rate, and host-timed (raise it for such a crystal)."""


class RigConfig(_Frozen):
    """A whole rig: the daemon settings, its streams, the reference clock, default metadata."""

    daemon: DaemonConfig
    """The acqd service: data root, control API, flush, fsync and restart policy."""
    reference: str = Field(description="name of the stream whose clock is the session timebase")
    """Name of the stream whose clock is the session timebase; it needs a sync source."""
    streams: tuple[StreamConfig, ...] = Field(min_length=1)
    """The hardware streams, one stream file each; a writer process each, except slow ones, which share one per group
    (``writer_group``)."""
    metadata: dict = Field(default_factory=dict, description="rig-level defaults of every session's metadata "
                           "(lab, institution, experimenters, devices; never a subject)")
    """Rig-level defaults of every session's metadata (lab, institution, experimenters, devices; never a subject):
    a record request's metadata replaces each block it contains (see SessionMetadata)."""
    qc: QcConfig = QcConfig()
    """Thresholds of the QC verdict (residual, drift) that finalize applies."""
    ship: ShipList = ()
    """Destinations sealed sessions are copied to and verified at (docs/shipping.md); none by default."""
    node: NodeName = "main"
    """This PC's name in a rig of several PCs (1-32 letters, digits, '_', '-'); every session.json records it."""
    followers: FollowerList = ()
    """The leader's config only: the other PCs of the rig, started and stopped with this one (docs/multi-pc.md)."""

    @field_validator("metadata")
    @classmethod
    def _rig_level_only(cls, v: dict) -> dict:
        per_session = [k for k in SESSION_ONLY if k in v] + [f"NWBFile.{k}" for k in SESSION_ONLY
                                                              if k in (v.get("NWBFile") or {})]
        if per_session:  # a subject here was recorded into every session, whichever animal was on the rig
            raise ValueError(f"{', '.join(per_session)}: the rig config holds rig-level metadata only (lab, "
                             "institution, experimenters, devices); the subject and the session's identity come "
                             "with each session (acqd record --subject-id/--species/--sex/--age, --metadata FILE, "
                             "the console's record form): remove it from the config")
        return v

    @field_validator("followers")
    @classmethod
    def _not_self(cls, v: tuple, info: ValidationInfo) -> tuple:
        if problem := follower_problem(info.data.get("node", "main"), v):
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> RigConfig:
        problems = rig_problems(self.reference, [s.model_dump() for s in self.streams], self.streams)
        if problems:
            raise ValueError("; ".join(f"{Found(None).path(loc)}: {msg}" for loc, msg in problems))
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
    """"sync" for the stream's own sync line, "strobe:<camera>" for a camera's frame strobes."""
    channel: int
    """Index of the integer channel carrying the line."""
    bit: int
    """Bit of that channel."""


# -- rules across fields -----------------------------------------------------------------------------------------
# They run over the raw mapping (and whichever streams validated), so the loader reports them beside field errors
# instead of pydantic skipping them whenever one field is wrong.

def rig_problems(reference: object, streams: Sequence[object], parsed: Sequence[StreamConfig | None]
                 ) -> list[tuple[Loc, str]]:
    """Problems between streams: names, endpoints, the reference clock, strobe lines. ``parsed[i]`` is
    ``streams[i]`` validated, or None when it has field errors of its own."""
    raw = [s if isinstance(s, Mapping) else {} for s in streams]
    problems: list[tuple[Loc, str]] = []
    first_by_name: dict[str, int] = {}
    first_by_endpoint: dict[tuple, int] = {}
    for i, s in enumerate(raw):
        name = s.get("name")
        if isinstance(name, str):
            if name in first_by_name:
                problems.append((("streams", i, "name"), f"stream name {name!r} is already used by "
                                                         f"streams[{first_by_name[name]}]"))
            first_by_name.setdefault(name, i)
        endpoint = s.get("endpoint")
        if isinstance(endpoint, str):
            key = _endpoint_key(endpoint)
            clash = next((j for k, j in first_by_endpoint.items() if _same_endpoint(k, key)), None)
            if clash is not None:
                problems.append((("streams", i, "endpoint"), f"endpoint {endpoint} is already used by "
                                                             f"streams[{clash}] {raw[clash].get('name')!r}"))
            first_by_endpoint.setdefault(key, i)
    if isinstance(reference, str):
        if reference not in first_by_name:
            known = ", ".join(closest_first(reference, list(first_by_name))) or "none"
            problems.append((("reference",), f"reference {reference!r} is not a configured stream (streams: {known})"))
        elif raw[first_by_name[reference]].get("sync") is None:
            problems.append((("streams", first_by_name[reference], "sync"),
                             f"the reference stream {reference!r} needs a sync source"))
    by_name = {s.name: s for s in parsed if s is not None}
    for i, s in enumerate(raw):
        sync = s.get("sync")
        if not isinstance(sync, Mapping) or sync.get("source") != "strobe" or not isinstance(sync.get("stream"), str):
            continue
        target = by_name.get(sync["stream"])
        if sync["stream"] == s.get("name") or sync["stream"] not in first_by_name:
            problems.append((("streams", i, "sync", "stream"),
                             f"strobe stream {sync['stream']!r} is not another configured stream"))
            continue
        s = parsed[i]
        if s is None or not isinstance(s.sync, StrobeSync):
            continue
        if target is not None and (s.sync.channel >= target.shape[0] or target.np_dtype.kind not in "iu"):
            problems.append((("streams", i, "sync", "channel"), f"strobe channel {s.sync.channel} is not an integer "
                                                                f"channel of {target.name!r} ({target.dtype}, "
                                                                f"shape {list(target.shape)})"))
    return problems


_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
_ANY_HOST = {"*", "0.0.0.0", "[::]", "::"}


def _endpoint_key(endpoint: str) -> tuple:
    """tcp endpoints as (host, port) with local names folded together; others as they are."""
    m = re.fullmatch(r"tcp://(.+):(\d+)", endpoint)
    if not m:
        return (endpoint,)
    host = m.group(1)
    return ("local" if host in _LOCAL_HOSTS else "*" if host in _ANY_HOST else host, int(m.group(2)))


def _same_endpoint(a: tuple, b: tuple) -> bool:
    """The same endpoint, or one port bound on every interface and the same port on this host."""
    if a == b:
        return True
    local = {"local", "*"}
    return len(a) == len(b) == 2 and a[1] == b[1] and "*" in (a[0], b[0]) and {a[0], b[0]} <= local


# -- loading, with every problem located in the YAML (acqd.config.errors) -------------------------------------------


def parse_config(raw: object, source: str = "config", node: yaml.Node | None = None) -> RigConfig:
    """Validate an already-parsed mapping; raise ``ConfigError`` listing every problem, each located in
    ``node`` (the composed YAML document ``raw`` was built from) when given."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    found = Found(raw, node, _schema())
    problems = found.duplicate_keys()
    try:
        cfg = RigConfig.model_validate(raw)
    except ValidationError as e:
        cfg = None
        # Rules across fields (loc ()) are checked here on the raw mapping, whatever else is wrong.
        problems += found.field_problems([err for err in e.errors(include_url=False) if err["loc"]])
        streams = raw.get("streams") if isinstance(raw.get("streams"), list) else []
        parsed = [_stream_or_none(s) for s in streams]
        problems += [found.at(loc, msg) for loc, msg in rig_problems(raw.get("reference"), streams, parsed)]
    if problems:
        problems.sort(key=lambda p: (p.line or 0, p.column or 0))
        raise ConfigError("\n".join([f"{source}: {len(problems)} problem{'s' * (len(problems) > 1)}",
                                     *(p.format(source) for p in problems)]))
    assert cfg is not None
    return cfg


def load_config(path: str | Path, data_root: str | Path | None = None) -> RigConfig:
    """Read and validate a rig YAML file. Relative ``data_root`` is resolved against the file's folder.

    ``data_root`` (from ``--data-root`` or ``ACQD_DATA_ROOT``, relative to the working folder) replaces the file's
    before validation, so a rig file may leave it out.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            raw = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data_root is not None and isinstance(raw, dict) and isinstance(raw.get("daemon", {}), dict):
        raw["daemon"] = {**raw.get("daemon", {}), "data_root": str(Path(data_root).resolve())}
    cfg = parse_config(raw, str(path), node)
    root = cfg.daemon.data_root
    if not root.is_absolute():
        daemon = cfg.daemon.model_copy(update={"data_root": (path.parent / root).resolve()})
        cfg = cfg.model_copy(update={"daemon": daemon})
    cfg = _resolve_probe_files(cfg, path.parent)
    if cfg.followers:
        cfg = cfg.model_copy(update={"followers": resolve_token_files(cfg.followers, path.parent)})
    streams = tuple(_resolve_images(s, path.parent) for s in cfg.streams)
    return cfg.model_copy(update={"streams": streams}) if streams != cfg.streams else cfg


def _resolve_images(s: StreamConfig, base: Path) -> StreamConfig:
    """A relative stimulus.images folder is relative to the config file, like data_root."""
    if s.stimulus is None or s.stimulus.images is None or s.stimulus.images.is_absolute():
        return s
    stim = s.stimulus.model_copy(update={"images": (base / s.stimulus.images).resolve()})
    return s.model_copy(update={"stimulus": stim})


def _resolve_probe_files(cfg: RigConfig, folder: Path) -> RigConfig:
    """Probe files relative to the config's folder become absolute, and each is read once to refuse a bad one."""
    streams, problems = [], []
    for s in cfg.streams:
        if s.probe is not None:
            probe = s.probe.model_copy(update={"file": (folder / s.probe.file).resolve()})
            s = s.model_copy(update={"probe": probe})
            try:
                contact_columns(read_layout(probe.file, probe.format), electrode_columns(s))
            except Exception as e:  # noqa: BLE001 - probeinterface raises many kinds; each is a config problem
                problems.append(f"stream {s.name!r}: probe file {probe.file}: {e}")
        streams.append(s)
    if problems:
        raise ConfigError("\n".join(problems))
    return cfg.model_copy(update={"streams": tuple(streams)})


def electrode_columns(s: StreamConfig) -> list[int]:
    """The columns of an ephys stream's data that are electrodes: all but its digital sync word."""
    sync = s.sync.channel if isinstance(s.sync, ChannelSync) else None
    return [c for c in range(s.shape[0]) if c != sync]


def _stream_or_none(raw: object) -> StreamConfig | None:
    try:
        return StreamConfig.model_validate(raw)
    except ValidationError:
        return None


@functools.cache
def _schema() -> dict:
    return RigConfig.model_json_schema()
