"""What starting the writers costs, and what a writer's restart loses: the daemon with the small test rig.

    PYTHONPATH=. .venv/bin/python scripts/bench_startup.py --runs 3

Each run starts ``acqd serve`` with the example rig made small (tests/conftest.py ``SMALL_RIG``: a 33-channel probe,
a 48x64 camera, the DAQ and the sensor; each stream a writer process of its own), and measures:

- ``acquire_s``: ACQUIRE, from the command until every writer is ready (the command returns then);
- ``cpu_s``: the CPU of every process of the daemon (the daemon, its writers, its fork server: this script is their
  subreaper, and reaps each) from the start until its exit after SIGTERM, ACQUIRE and nothing else in between;
- with the simulated rig sending and a recording running, the probe's writer is killed -9 ``--kills`` times; each
  time ``restart_ms``, from the kill until the status shows the stream recording into its next part (polled every
  5 ms), and ``restart_gap_ms``, the samples between the last one in the dead writer's part and the first one in the
  next part, in ms of the probe's 30 kHz: what the kill lost (up to ``flush_interval_s``, 0.25 s here, that the
  writer had not flushed) and what was published while no writer listened (the probe is a SUB stream).

Prints one JSON line per run, then the medians. Run it in two checkouts to compare them; nothing else should run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import h5py  # noqa: E402

from acqd.service.procs import Daemon, Simulator, wait_until  # noqa: E402
from tests.conftest import SMALL_RIG, write_rig  # noqa: E402
from tests.sessions import SUBJECT  # noqa: E402

PR_SET_CHILD_SUBREAPER = 36


def reap_all() -> None:
    """Wait for every process handed to us (a daemon's fork server outlives it by a moment)."""
    while True:
        try:
            os.wait()
        except ChildProcessError:
            return


def cpu_of_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def start_and_acquire(folder: Path) -> dict:
    folder.mkdir()
    rig = write_rig(folder, stream_overrides=SMALL_RIG)
    cpu0, t0 = cpu_of_children(), time.monotonic()
    daemon = Daemon(rig, folder / "data", folder)
    started = time.monotonic() - t0
    t1 = time.monotonic()
    daemon.command("acquire")
    acquire_s = time.monotonic() - t1
    daemon.stop(timeout_s=60)
    reap_all()
    return {"start_s": round(started, 3), "acquire_s": round(acquire_s, 3),
            "cpu_s": round(cpu_of_children() - cpu0, 3)}


def restarts(folder: Path, kills: int) -> tuple[list[int], list[float]]:
    folder.mkdir()
    rig = write_rig(folder, stream_overrides=SMALL_RIG, daemon_overrides={"max_writer_restarts": kills})
    daemon = Daemon(rig, folder / "data", folder)
    restart_ms: list[int] = []
    try:
        daemon.command("acquire")
        sim = Simulator(rig, 600, seed=1)
        try:
            wait_until(lambda: not daemon.command("preflight")["problems"], "every stream to deliver data")
            started = daemon.command("record", session="restarts", metadata={"subject": SUBJECT})
            session = Path(started["session"]["path"])
            for k in range(kills):
                probe = wait_until(lambda: (p := daemon.command("status")["streams"]["probe"])["state"] == "recording"
                                   and p["part"] == k and p["rows"] > 30000 and p, "a second of the probe")
                killed = time.monotonic()
                os.kill(probe["pid"], signal.SIGKILL)
                wait_until(lambda: (p := daemon.command("status")["streams"]["probe"])["part"] == k + 1
                           and p["state"] == "recording", "the restarted writer to record", every_s=0.005)
                restart_ms.append(round((time.monotonic() - killed) * 1000))
            wait_until(lambda: daemon.command("status")["streams"]["probe"]["rows"] > 30000, "the last part's data")
            daemon.command("stop")
        finally:
            sim.stop()
    finally:
        daemon.stop(timeout_s=60)
        reap_all()
    parts = sorted((session / "streams").glob("probe*.h5"))
    spans = []
    for p in parts:
        with h5py.File(p, "r", libver="latest", swmr=True) as f:
            index = f["index"][:]
            spans.append((int(index["first_sample"][0]), int(index["first_sample"][-1] + index["n_samples"][-1])))
    return restart_ms, [round((nxt[0] - prev[1]) / 30.0, 1) for prev, nxt in zip(spans, spans[1:])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--kills", type=int, default=5)
    args = ap.parse_args()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1)
    runs = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="acqd-startup-") as tmp:
            out = start_and_acquire(Path(tmp) / "a")
            out["restart_ms"], out["restart_gap_ms"] = restarts(Path(tmp) / "b", args.kills)
        print(json.dumps(out), flush=True)
        runs.append(out)
    med = {k: statistics.median(r[k] for r in runs) for k in ("start_s", "acquire_s", "cpu_s")}
    for k in ("restart_ms", "restart_gap_ms"):
        med[k] = statistics.median(g for r in runs for g in r[k])
    print(json.dumps({"median": med}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
