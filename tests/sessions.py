"""Recorded sessions for tests, written without sockets through the writer's own code paths.

``record_session`` plays a simulated rig (``acqd.sim.simulate.Rig``) into a session folder exactly as the
daemon would: ``create_session_dir`` and ``write_json_atomic`` for the folder and ``session.json``
(as ``Supervisor.record`` / ``_close_session`` write it), and per stream ``StreamFile.create``,
``ingest.check_format`` / ``check_continuity`` / ``advance`` for every chunk, ``StreamFile.append`` /
``add_gap`` / ``add`` and ``ingest.rising_edges`` for the sync edges (as ``Writer.on_message`` and
``store_edges`` do), periodic ``flush`` and a final ``close``. Chunks carry device sample indices; host
receive times are the chunk's true end time plus a random latency, so the host-time fallback can be
tested too. Faults: dropped chunks (a recorded SEQ gap), and a writer restart that continues a stream
in a second part file — closed cleanly, or with the first part left as a writer killed with -9 left it.

Everything is deterministic for a given rig and arguments.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from acqd.config import FrameSync, RigConfig, VideoConfig, load_config
from acqd.metadata import SessionMetadata
from acqd.record.ingest import Cursor, advance, check_continuity, check_format, rising_edges
from acqd.wire.protocol import Header
from acqd.session import CLOSED, RECORDING, SESSION_FILE, STREAMS_DIR, create_session_dir, write_json_atomic
from acqd.sim.simulate import Rig
from acqd.record.streamfile import StreamFile, part_filename

RIG_YAML = Path(__file__).resolve().parents[1] / "configs" / "rig.yaml"
WALL_EPOCH_NS = 1_700_000_000 * 10**9  # host wall clock at true time 0 (2023-11-14, in the past)
MONO_EPOCH_NS = 5_000 * 10**9  # host monotonic clock at true time 0
START = datetime(2023, 11, 14, 22, 13, 20, tzinfo=timezone.utc)  # = WALL_EPOCH_NS


def small_config(data_root: Path, *, probe_channels: int = 32, camera_shape: tuple[int, int] = (48, 64),
                 no_sync: tuple[str, ...] = (), camera_video: dict | None = None) -> RigConfig:
    """configs/rig.yaml with a smaller probe (``probe_channels`` + the sync word) and camera, so tests are fast.

    Streams named in ``no_sync`` lose their sync source (they fall back to host receive times);
    ``camera_video`` (a ``VideoConfig`` mapping) encodes the camera's frames to video files.
    """
    cfg = load_config(RIG_YAML)
    streams = []
    for s in cfg.streams:
        update: dict = {}
        if s.name == "probe":
            update = {"shape": (probe_channels + 1,), "sync": s.sync.model_copy(update={"channel": probe_channels}),
                      "probe": None}  # the example's 384-contact layout does not fit the smaller probe
        elif s.name == "camera":
            update = {"shape": camera_shape,  # frames in the stream file unless the test asks for video files
                      "video": None if camera_video is None else VideoConfig.model_validate(camera_video)}
        if s.name in no_sync:
            update["sync"] = None
        streams.append(s.model_copy(update=update))
    daemon = cfg.daemon.model_copy(update={"data_root": Path(data_root)})
    return cfg.model_copy(update={"daemon": daemon, "streams": tuple(streams)})


@dataclass(frozen=True, slots=True)
class Restart:
    """The writer of ``stream`` dies at true time ``at_s``; a new one records into part 1 after ``lost_s``."""

    stream: str
    at_s: float
    lost_s: float = 0.05
    crash: bool = False
    """True: part 0 is left as kill -9 leaves it (SWMR flag set, last flush only); False: closed cleanly."""


@dataclass(frozen=True, slots=True)
class Recording:
    """What to record: true-time window, chunking and faults."""

    start_s: float = 2.0
    """True time (seconds of the simulation) at which recording starts."""
    seconds: float = 20.0
    chunk_factor: int = 10
    """Messages carry this many simulator chunks (10 ms each; cameras one frame each)."""
    drops: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    """Per stream, true-time windows whose chunks never arrive (a SEQ gap)."""
    restart: Restart | None = None
    flush_every: int = 10
    """Flush after this many messages (the writer flushes once a second)."""
    seed: int = 1
    """Seed of the host-latency draws."""
    backlog: dict[str, float] = field(default_factory=dict)
    """Per stream, seconds of receive latency added per second recorded (a writer falling behind)."""
    drained: dict[str, float] = field(default_factory=dict)
    """Per stream, the period (s) of the timer at which a writer drains its queue (``Writer.drains_at_deadlines``):
    the receive time recorded is that of the next drain, ``recorded_arrival`` False (acqd before issue 24.4), or
    the message's own arrival, True (the writer's receiver thread)."""
    recorded_arrival: bool = True
    counter_reset: dict[str, float] = field(default_factory=dict)
    """Per stream, the true time at which the device restarts its sample counter (the next message starts at 0)."""


SUBJECT = {"subject_id": "mouse001", "species": "Mus musculus", "sex": "F", "age": "P90D",
           "description": "simulated subject of the acqd tests (no animal was recorded)"}
"""The animal every test session records: the rig config holds none, each session names its own."""


def session_metadata(cfg: RigConfig, session: dict | None = None) -> dict:
    """The rig's defaults, then the session's own blocks (``SUBJECT`` unless ``session`` gives a subject)."""
    meta = {**cfg.metadata, "subject": SUBJECT, **(session or {})}
    return SessionMetadata.model_validate(meta).model_dump(mode="json")


def record_session(cfg: RigConfig, rig: Rig, session_id: str, rec: Recording = Recording(),
                   metadata: dict | None = None) -> Path:
    """Write a closed session folder under ``cfg.daemon.data_root``; returns its path. ``metadata``: the session's
    own blocks over the rig's defaults (the subject is ``SUBJECT`` unless it gives one)."""
    folder = create_session_dir(cfg.daemon.data_root, session_id)
    created = (START + timedelta(seconds=rec.start_s)).isoformat(timespec="milliseconds")
    session = {
        "session_id": session_id, "state": RECORDING, "created": created, "stopped": None, "incomplete": False,
        "metadata": session_metadata(cfg, metadata), "reference": cfg.reference, "config": cfg.model_dump(mode="json"),
        "incidents": [], "streams": {s.name: {"parts": []} for s in cfg.streams},
    }
    write_json_atomic(folder / SESSION_FILE, session)
    attrs = {k: session[k] for k in ("session_id", "created", "metadata", "reference")}
    for i, s in enumerate(cfg.streams):
        rng = np.random.default_rng([rec.seed, i])
        restart = rec.restart if rec.restart and rec.restart.stream == s.name else None
        windows = [(rec.start_s, rec.start_s + rec.seconds)]
        if restart:
            windows = [(rec.start_s, restart.at_s), (restart.at_s + restart.lost_s, rec.start_s + rec.seconds)]
        for part, (t0, t1) in enumerate(windows):
            rel = f"{STREAMS_DIR}/{part_filename(s.name, part)}"
            job = (cfg, rig, s.name, folder / rel, attrs, part, (t0, t1), rec, rng)
            if restart and restart.crash and part == 0:
                rows, counts = _run_killed(job), None
                session["incidents"].append({"time": created, "stream": s.name, "kind": "writer_died",
                                             "detail": "writer killed by signal 9; restarted, recording into part 1"})
                session["incomplete"] = True
            else:
                rows, counts = _write_part(*job)
            entry = {"part": part, "path": rel, "rows": rows}
            if counts is not None:
                entry["counts"] = counts
            session["streams"][s.name]["parts"].append(entry)
            # Each part draws its own latencies; a crashed part's draws happened in the child, so skip them here.
            rng = np.random.default_rng([rec.seed, i, part + 1])
    session["state"] = CLOSED
    session["stopped"] = (START + timedelta(seconds=rec.start_s + rec.seconds)).isoformat(timespec="milliseconds")
    write_json_atomic(folder / SESSION_FILE, session)
    return folder


def _chunks(rig: Rig, name: str, factor: int, t0: float, t1: float) -> list[tuple[int, int, float]]:
    """(first sample, n, true arrival time of the last sample) of each message whose end falls in [t0, t1)."""
    dev = rig.devices[name]
    n = dev.chunk * factor
    k0 = dev.next_sample  # the simulator's first sample; messages are aligned to it
    first = k0 + n * max(0, int(np.floor((dev.clock.phase(t0) - k0) / n)))
    out = []
    while True:
        end = float(dev.clock.time_of(first + n))
        if end >= t1:
            return out
        if end >= t0:
            out.append((first, n, end))
        first += n


def _write_part(cfg: RigConfig, rig: Rig, name: str, path: Path, attrs: dict, part: int, window: tuple[float, float],
                rec: Recording, rng: np.random.Generator) -> tuple[int, dict]:
    """Record one part file of one stream as the writer does; returns (rows, counts)."""
    s = cfg.stream(name)
    lines = cfg.edge_lines(name)
    dev = rig.devices[name]
    f = StreamFile.create(path, s, session=attrs, lines=lines, part=part)
    cursor: Cursor | None = None
    levels: list[bool | None] = [None] * len(lines)
    epoch = 1000 + part
    counts = {"messages": 0, "samples": 0, "bytes": 0, "gaps": 0, "rejected": {}, "rejected_total": 0}
    drops = rec.drops.get(name, [])
    reset_at, shift = rec.counter_reset.get(name, np.inf), 0
    for seq, (first, n, end) in enumerate(_chunks(rig, name, rec.chunk_factor, *window)):
        if end - n / s.rate >= reset_at and not shift:
            shift = first  # the device restarted: its counter reads 0 at this message
        counter = first - shift
        latency = rng.uniform(1e-4, 3e-3) + (0.02 if rng.random() < 0.02 else 0.0)
        latency += rec.backlog.get(name, 0.0) * (end - window[0])
        if name in rec.drained and not rec.recorded_arrival:  # read at the next timer, up to its period late
            tick = rec.drained[name]
            latency = np.ceil((end + latency) / tick) * tick + rng.uniform(0, 2e-4) - end
        if any(a <= end < b for a, b in drops):
            continue  # lost between publisher and acqd: the next chunk shows a seq gap
        wall_ns = WALL_EPOCH_NS + round((end + latency) * 1e9)
        mono_ns = MONO_EPOCH_NS + round((end + latency) * 1e9)
        h = Header(name, seq, epoch, counter, n, s.dtype, s.shape)
        verdict = check_format(h, name, s.dtype, s.shape)
        if verdict.accepted:
            verdict = check_continuity(cursor, h)
        assert verdict.accepted, verdict.detail
        cursor = advance(h)
        data = rig.samples(name, first, n)
        if verdict.gap is not None:
            f.add_gap(verdict.gap, wall_ns)
            counts["gaps"] += 1
        f.append(data, (seq, epoch, n, counter, wall_ns, mono_ns, 0))
        rows = []
        for i, line in enumerate(lines):
            idx, levels[i] = rising_edges(data[:, line.channel], line.bit, levels[i])
            rows.extend((counter + int(k), i, 1) for k in idx)
        if isinstance(s.sync, FrameSync):
            e = dev.pulse_edges
            rows.extend((int(k) - shift, 0, 1) for k in e[(e >= first) & (e < first + n)])
        if rows:
            f.add("sync/edges", rows)
        if seq % 4 == 0:
            f.add("sync/clock", [(counter, mono_ns, wall_ns)])
        counts["messages"] += 1
        counts["samples"] += n
        counts["bytes"] += data.nbytes
        if counts["messages"] % rec.flush_every == 0:
            f.flush(fsync=False)
    f.close(fsync=False)
    return f.rows, counts


def _killed_child(job: tuple) -> None:
    """Write a part, flush it, and die by SIGKILL with the file still open (SWMR flag set)."""
    cfg, rig, name, path, attrs, part, window, rec, rng = job
    real_close = StreamFile.close

    def flush_then_die(self: StreamFile, fsync: bool = True) -> None:
        self.flush(fsync=True)
        os.kill(os.getpid(), signal.SIGKILL)

    StreamFile.close = flush_then_die  # type: ignore[method-assign]
    try:
        _write_part(cfg, rig, name, path, attrs, part, window, rec, rng)
    finally:
        StreamFile.close = real_close  # type: ignore[method-assign]


def _run_killed(job: tuple) -> None:
    """Run ``_killed_child`` in a forked process (no HDF5 file is open in this one) and reap it."""
    proc = multiprocessing.get_context("fork").Process(target=_killed_child, args=(job,))
    proc.start()
    proc.join(120)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise RuntimeError("the killed-writer child did not die")
    assert proc.exitcode == -signal.SIGKILL, proc.exitcode
    return None


def working_copy(recorded: Path, tmp_path: Path) -> Iterator[Path]:
    """A fixture body: a copy of the module's ``recorded`` session to finalize, corrupt or seal, unsealed after the
    test so that pytest can remove it."""
    from acqd.finalize import unseal_session

    folder = tmp_path / "s" / recorded.name
    shutil.copytree(recorded, folder, symlinks=True)
    yield folder
    unseal_session(folder)
