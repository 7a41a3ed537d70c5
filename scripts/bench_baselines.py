"""Baselines that scripts/bench measures acqd against, in the same run and on the same machine.

    disk_write(path, gib)              the disk's sequential write rate with fdatasync (like dd conv=fdatasync)
    pynwb_write(workdir, gib)          pynwb DataChunkIterator writing probe-like data, file to file
    python bench_baselines.py naive    a naive single-process receiver (run as a subprocess by the bench)

The naive receiver is what one writes in an afternoon: one process, one SUB socket connected to
every stream, each 10 ms message appended with h5py ``resize`` + slice assignment. No checks, no
index, no flush, no fsync. It keeps the same dataset layout as acqd (~2 MiB chunks, a chunk cache
that holds them) so that the comparison measures acqd's design, not the chunk-cache trap. It only
reads each header's ``seq`` and times, to count loss and latency the same way the bench does.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

BLOCK = 4 << 20
CHUNK_TARGET_BYTES = 2 << 20  # same as acqd.record.streamfile
INDEX_FIELDS = [("seq", "<u8"), ("first_sample", "<u8"), ("n_samples", "<u4"), ("host_wall_ns", "<i8"),
                ("device_time_ns", "<i8")]


def disk_write(path: Path, gib: float, block: int = BLOCK) -> dict:
    """Write ``gib`` GiB sequentially in ``block``-byte writes, fdatasync, and time it all; the file is removed."""
    buf = os.urandom(block)
    n = max(1, int(gib * (1 << 30)) // block)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            os.write(fd, buf)
        t_written = time.perf_counter()
        os.fdatasync(fd)
        t1 = time.perf_counter()
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    total = n * block
    return {"bytes": total, "seconds": round(t1 - t0, 3), "mb_per_s": round(total / (t1 - t0) / 1e6, 1),
            "fdatasync_s": round(t1 - t_written, 3), "block_bytes": block}


def probe_like(seconds: float, seed: int = 0) -> np.ndarray:
    """One second-long pool of Neuropixels-like samples (385 x int16), from the simulator."""
    from acqd.config import StreamConfig
    from acqd.sim.simulate import signal_pool

    cfg = StreamConfig(name="probe", endpoint="ipc:///unused", dtype="int16", shape=(385,), rate=30000.0)
    return signal_pool(cfg, np.random.default_rng(seed), seconds)


def pynwb_write(workdir: Path, gib: float, buffer_rows: int = 300) -> dict:
    """pynwb writing ``gib`` GiB of probe-like data from an HDF5 file through ``DataChunkIterator``.

    The source file is written first (not timed). The timed part is building the NWB file, writing it
    with ``buffer_rows`` rows per iteration (300 = one 10 ms message of a probe) and an fsync, so
    the figure is comparable with data that reached the disk.
    """
    from datetime import datetime, timezone

    import h5py
    from hdmf.backends.hdf5 import H5DataIO
    from hdmf.data_utils import DataChunkIterator
    from pynwb import NWBHDF5IO, NWBFile, TimeSeries

    pool = probe_like(1.0)
    rows = int(gib * (1 << 30)) // (385 * 2)
    src, out = workdir / "pynwb-src.h5", workdir / "pynwb-out.nwb"
    chunk_rows = CHUNK_TARGET_BYTES // (385 * 2)
    try:
        with h5py.File(src, "w") as f:
            d = f.create_dataset("data", (rows, 385), "<i2", chunks=(chunk_rows, 385))
            for a in range(0, rows, len(pool)):
                b = min(rows, a + len(pool))
                d[a:b] = pool[:b - a]
        with h5py.File(src, "r") as f:
            t0 = time.perf_counter()
            nwb = NWBFile(session_description="bench", identifier="bench",
                          session_start_time=datetime.now(timezone.utc))
            it = DataChunkIterator(data=f["data"], buffer_size=buffer_rows)
            nwb.add_acquisition(TimeSeries(name="probe", data=H5DataIO(it, chunks=(chunk_rows, 385)), unit="V",
                                           rate=30000.0))
            with NWBHDF5IO(out, "w") as io:
                io.write(nwb)
            fd = os.open(out, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            t1 = time.perf_counter()
        nbytes = rows * 385 * 2
        return {"bytes": nbytes, "seconds": round(t1 - t0, 3), "mb_per_s": round(nbytes / (t1 - t0) / 1e6, 1),
                "buffer_rows": buffer_rows}
    finally:
        src.unlink(missing_ok=True)
        out.unlink(missing_ok=True)


# -- the naive receiver ---------------------------------------------------------------------------
def naive_receive(endpoints: list[str], out_dir: Path, seconds: float, idle_s: float = 10.0) -> dict:
    """Receive from every endpoint for ``seconds`` after the first message; one file per stream.

    Returns per-stream index arrays (as lists) and this process's CPU time; the bench analyses
    them exactly like acqd's ``/index``.
    """
    import h5py
    import zmq

    from acqd.wire.protocol import HEADER

    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    for ep in endpoints:
        sock.connect(ep)
    files: dict[str, h5py.File] = {}
    dsets: dict[str, h5py.Dataset] = {}
    index: dict[str, list[tuple]] = {}
    print("naive: connected", flush=True)
    first = end = None
    last_msg = time.monotonic()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    try:
        while end is None or time.monotonic() < end:
            if not sock.poll(100):
                if first is not None and time.monotonic() - last_msg > idle_s:
                    break  # the publishers stopped
                continue
            for _ in range(256):  # drain, but look at the clock: a receiver that falls behind must still stop
                if end is not None and time.monotonic() >= end:
                    break
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                wall = time.time_ns()
                last_msg = time.monotonic()
                if first is None:
                    first, end = wall, time.monotonic() + seconds
                    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
                (_, _, _, _, _, seq, first_sample, n, ndim, s0, s1, s2, s3, dtype, dev_ns,
                 name) = HEADER.unpack_from(frames[1].buffer)
                stream = name.rstrip(b"\0").decode()
                shape = (s0, s1, s2, s3)[:ndim]
                data = np.frombuffer(frames[2].buffer, dtype=dtype.rstrip(b"\0").decode()).reshape((n, *shape))
                d = dsets.get(stream)
                if d is None:
                    f = files[stream] = h5py.File(out_dir / f"{stream}.h5", "w",
                                                  rdcc_nbytes=4 * max(CHUNK_TARGET_BYTES, data[:1].nbytes))
                    rows = max(1, CHUNK_TARGET_BYTES // max(1, data[:1].nbytes))
                    d = dsets[stream] = f.create_dataset("data", (0, *shape), data.dtype, chunks=(rows, *shape),
                                                         maxshape=(None, *shape))
                    index[stream] = []
                a = d.shape[0]
                d.resize(a + n, axis=0)
                d[a:] = data
                index[stream].append((seq, first_sample, n, wall, dev_ns))
    finally:
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        for f in files.values():
            f.close()
        sock.close(0)
        ctx.term()
    wall_s = (time.time_ns() - first) / 1e9 if first else 0.0
    return {"streams": {s: rows for s, rows in index.items()}, "wall_s": wall_s,
            "cpu_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
            "max_rss_kb": cpu1.ru_maxrss}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    n = sub.add_parser("naive", help="run the naive receiver; writes its result JSON")
    n.add_argument("--endpoint", action="append", required=True)
    n.add_argument("--out-dir", required=True)
    n.add_argument("--seconds", type=float, required=True)
    n.add_argument("--result", required=True)
    args = p.parse_args(argv)
    result = naive_receive(args.endpoint, Path(args.out_dir), args.seconds)
    tmp = args.result + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, args.result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
