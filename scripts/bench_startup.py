"""What starting the writers costs, and what a writer's restart loses: the daemon with the small test rig.

    PYTHONPATH=. .venv/bin/python scripts/bench_startup.py --runs 3

Each run starts ``acqd serve`` with the example rig made small (tests/conftest.py ``SMALL_RIG``: a 33-channel probe,
a 48x64 camera, the DAQ and the sensor; each stream a writer process of its own), and measures:

- ``acquire_s``: ACQUIRE, from the command until every writer is ready (the command returns then);
- ``cpu_s``: the CPU of every process of the daemon (the daemon, its writers, its fork server: this script is their
  subreaper, and reaps each) from the start until its exit after SIGTERM, ACQUIRE and nothing else in between;
- ``restart_gap_ms``: with the simulated rig sending and a recording running, the probe's writer is killed -9
  ``--kills`` times; each time, the samples between the last one in the dead writer's part and the first one in the
  next part (the probe is a SUB stream: what was published while no writer listened is lost), in ms of the probe's
  30 kHz.

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


def restart_gaps(folder: Path, kills: int) -> list[float]:
    rig = write_rig(folder, stream_overrides=SMALL_RIG)
    daemon = Daemon(rig, folder / "data", folder)
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
                os.kill(probe["pid"], signal.SIGKILL)
            wait_until(lambda: (p := daemon.command("status")["streams"]["probe"])["part"] == kills
                       and p["state"] == "recording" and p["rows"] > 30000, "the last restart to record")
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
    return [round((nxt[0] - prev[1]) / 30.0, 1) for prev, nxt in zip(spans, spans[1:])]


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
            out["restart_gap_ms"] = restart_gaps(Path(tmp) / "b", args.kills)
        print(json.dumps(out), flush=True)
        runs.append(out)
    med = {k: statistics.median(r[k] for r in runs) for k in ("start_s", "acquire_s", "cpu_s")}
    med["restart_gap_ms"] = statistics.median(g for r in runs for g in r["restart_gap_ms"])
    print(json.dumps({"median": med}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
