"""Control-plane benchmark: status latency while mode changes run back to back, and the daemon's own CPU.

    python scripts/bench_control.py [--cycles 8] [--config configs/rig.yaml]

Runs the real daemon and the simulated rig (ipc endpoints in a temporary folder). One thread changes modes
without pause (IDLE -> RECORD, which starts every writer, then back to IDLE; each RECORD a new session); another asks ``GET /api/status`` every
10 ms and times each answer. Prints the latency percentiles (goal: p99 <= 50 ms) and the CPU the daemon
process itself (supervisor + API, writers excluded) used while acquiring quietly, as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import yaml

from acqd.service.procs import Daemon, Simulator, wait_until

SUBJECT = {"subject": {"subject_id": "bench", "species": "Mus musculus", "sex": "U", "age": "P90D"}}

ROOT = Path(__file__).resolve().parent.parent


def rig_in(folder: Path, config: Path) -> Path:
    raw = yaml.safe_load(config.read_text())
    raw["daemon"].update(data_root=str(folder / "data"), control={"host": "127.0.0.1", "port": 0})
    (folder / "ipc").mkdir()
    for s in raw["streams"]:
        s["endpoint"] = f"ipc://{folder}/ipc/{s['name']}"
    path = folder / "rig.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "rig.yaml"))
    p.add_argument("--cycles", type=int, default=8, help="RECORD/stop cycles")
    p.add_argument("--idle-seconds", type=float, default=10.0, help="quiet ACQUIRE time for the CPU figure")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="acqd-bc-", dir="/tmp") as tmp:
        rig = rig_in(Path(tmp), Path(args.config))
        daemon = Daemon(rig, Path(tmp) / "data", Path(tmp))
        sim = None
        try:
            daemon.command("acquire")
            sim = Simulator(rig, 3600)
            wait_until(lambda: not daemon.command("preflight")["problems"], "every stream to deliver data")
            c0, t0 = cpu_seconds(daemon.pid), time.monotonic()
            time.sleep(args.idle_seconds)
            cpu = (cpu_seconds(daemon.pid) - c0) / (time.monotonic() - t0)

            latencies: list[float] = []
            done = threading.Event()

            def poll() -> None:
                with httpx.Client(base_url=daemon.url, timeout=60) as http:
                    while not done.is_set():
                        t = time.perf_counter()
                        http.get("/api/status").raise_for_status()
                        latencies.append(time.perf_counter() - t)
                        time.sleep(0.01)

            poller = threading.Thread(target=poll)
            poller.start()
            t0 = time.monotonic()
            try:
                for i in range(args.cycles):  # from IDLE: writers start, data flows, files open; then all stop
                    daemon.command("record", session=f"bench{i:03d}", metadata=SUBJECT)
                    daemon.command("stop", idle=True)
            finally:
                done.set()
                poller.join()
            busy_s = time.monotonic() - t0
        finally:
            if sim is not None:
                sim.stop()
            daemon.stop()
    ms = np.array(latencies) * 1000
    print(json.dumps({"status_requests": len(ms), "mode_change_seconds": round(busy_s, 1), "cycles": args.cycles,
                      "status_ms": {"p50": round(float(np.percentile(ms, 50)), 1),
                                    "p99": round(float(np.percentile(ms, 99)), 1), "max": round(float(ms.max()), 1)},
                      "daemon_cpu_percent_acquiring": round(cpu * 100, 1)}, indent=2))


if __name__ == "__main__":
    main()
