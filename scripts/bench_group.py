"""What one group writer costs per slow stream, alone: no daemon, no simulator, no reference rig.

    PYTHONPATH=. .venv/bin/python scripts/bench_group.py 8 32 --seconds 10
    PYTHONPATH=. .venv/bin/python scripts/bench_group.py 96 --seconds 6 --daemon-timing --record-after 1

For each N: a real group writer process (acqd.record.group, through tests/record/livegroup.py) hosting N slow
streams (4 x float32 at 1 kHz, 100 messages/s each, PUSH drivers in this process), recording for ``--seconds``;
prints its CPU (% of one core, /proc/<pid>/stat) over the window (``cpu_pct``) and until it handled every message
sent in it (``cpu_done_pct``: on a loaded machine a writer that fell behind does part of the work after the window),
its PSS (smaps_rollup) at the end of the window, then the marginal cost per stream between the smallest and the
largest N. The drivers run in this process, on the same cores: on a loaded
machine compare runs taken in the same minute.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import h5py  # noqa: E402
import numpy as np  # noqa: E402

from acqd.config import DaemonConfig  # noqa: E402
from acqd.wire.protocol import Header, encode  # noqa: E402
from tests.record.livegroup import LiveGroup  # noqa: E402


def ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def pss_mb(pid: int) -> float:
    line = next(x for x in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines() if x.startswith("Pss:"))
    return int(line.split()[1]) / 1024


def daemon_timing() -> dict:
    """The daemon's default flush, fsync, stats and clock-pair intervals (acqd.config), as a rig without them runs."""
    d = DaemonConfig(data_root="/tmp")
    return {k: getattr(d, k) for k in ("flush_interval_s", "fsync_interval_s", "stats_interval_s",
                                       "clock_pair_interval_s")}


def one(n: int, seconds: float, folder: Path, timing: dict | None = None, part_seconds: float | None = None,
        record_after_s: float | None = None) -> dict:
    names = [f"s{i:03d}" for i in range(n)]
    g = LiveGroup(folder, names, dtype="float32", timing=timing, max_file_seconds=part_seconds)
    try:
        for name in names:
            g.wait_for(name, lambda m: m["type"] == "event" and m["kind"] == "connected", "its driver")
        if record_after_s is None:
            g.record_all()
        data = np.zeros((10, 4), "<f4")
        t0, c0, seq, record_ns = time.monotonic(), ticks(g.proc.pid), 0, None
        while time.monotonic() - t0 < seconds:
            for name in names:
                h = Header(name, seq, 1, seq * 10, 10, "<f4", (4,), device_time_ns=time.time_ns())
                g.drivers[name].send_multipart(encode(h, data))
            seq += 1
            if record_after_s is not None and record_ns is None and seq * 0.01 >= record_after_s:
                record_ns = time.time_ns()  # RECORD while every stream sends: what its start costs them
                for name in names:
                    g.command(name, cmd="record", folder=str(g.folder), session={"session_id": "t"}, part=0)
            g.pump(0)
            time.sleep(max(0.0, t0 + seq * 0.01 - time.monotonic()))
        dt, cpu = time.monotonic() - t0, ticks(g.proc.pid) - c0
        pss = pss_mb(g.proc.pid)
        handled_all(g, names, seq)
        done = ticks(g.proc.pid) - c0
        g.stop_all()
    finally:
        g.close()
    hz = os.sysconf("SC_CLK_TCK")
    flushed, sent_ns = flushed_ms(g.folder)
    start = {} if record_ns is None else {
        "first_s_after_record_p99_ms": round(float(np.percentile(flushed[sent_ns < record_ns + 10**9], 99)))}
    return {**start, "streams": n, "cpu_pct": round(100 * cpu / hz / dt, 1), "cpu_done_pct": round(100 * done / hz / dt, 1),
            "pss_mb": round(pss, 1), "messages_per_s": round(seq / dt), "load": round(os.getloadavg()[0], 1),
            "flushed_p50_ms": round(float(np.percentile(flushed, 50))),
            "flushed_p99_ms": round(float(np.percentile(flushed, 99)))}


def flushed_ms(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """publish -> flushed of every message, ms: each index row's ``committed_wall_ns - device_time_ns`` (the drivers
    stamp each message with its send time), as the daemon benchmark reads it; and each one's send time (ns)."""
    out, sent = [], []
    for path in folder.rglob("*.h5"):
        with h5py.File(path, "r") as f:
            index = f["index"][:]
        out.append((index["committed_wall_ns"] - index["device_time_ns"]) / 1e6)
        sent.append(index["device_time_ns"])
    return np.concatenate(out), np.concatenate(sent)


def handled_all(g: LiveGroup, names: list[str], n: int, timeout_s: float = 60.0) -> None:
    """Until every stream's stats count ``n`` messages handled: the work for what was sent is then done (a writer
    that fell behind under load did part of it after the window; ``cpu_done_pct`` counts it, ``cpu_pct`` not)."""
    deadline, seen, done = time.monotonic() + timeout_s, 0, set()
    while len(done) < len(names):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(names) - len(done)} streams not done")
        g.pump(20)
        for name, m in g.msgs[seen:]:
            if m["type"] == "stats" and m["total"]["messages"] + m["total"]["rejected_total"] >= n:
                done.add(name)
        seen = len(g.msgs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("counts", type=int, nargs="+")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--daemon-timing", action="store_true",
                   help="the daemon's default intervals (flush and stats every 0.5 s, fsync every 1 s) instead of the "
                        "tests' (flush and stats every 0.1 s, no fsync)")
    p.add_argument("--part-seconds", type=float, default=None,
                   help="cut every stream's parts after this many seconds of samples (all roll over together)")
    p.add_argument("--record-after", type=float, default=None, metavar="S",
                   help="send for S seconds before RECORD, then record while every stream sends; reports the p99 "
                        "publish->flushed of the messages sent in the first second after RECORD (default: RECORD "
                        "before the window)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="acqd-bg-", dir="/tmp") as tmp:
        runs = []
        for n in args.counts:
            folder = Path(tmp) / str(n)
            folder.mkdir()
            timing = daemon_timing() if args.daemon_timing else None
            runs.append(one(n, args.seconds, folder, timing, args.part_seconds, args.record_after))
            print(runs[-1], flush=True)
    lo, hi = runs[0], runs[-1]
    if hi["streams"] > lo["streams"]:
        k = hi["streams"] - lo["streams"]
        print({"per_stream_cpu_pct": round((hi["cpu_pct"] - lo["cpu_pct"]) / k, 3),
               "per_stream_cpu_done_pct": round((hi["cpu_done_pct"] - lo["cpu_done_pct"]) / k, 3),
               "per_stream_pss_mb": round((hi["pss_mb"] - lo["pss_mb"]) / k, 2)})


if __name__ == "__main__":
    main()
