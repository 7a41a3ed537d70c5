"""Scenario ship: what shipping with ``while_recording: throttle`` costs the reference rig while it records
(budget: nothing lost, <= 3 % of one core).

One recording of configs/bench-rig.yaml with a ``ship:`` destination (a local folder, ``throttle_bwlimit``
4M); windows of ``--ship-window`` seconds (default 60) alternate idle and shipping, idle first, ``--repeat``
pairs. Before each shipping window a sealed 200 MB session (random stream files and a manifest written by
finalize's ``write_manifest``) is queued with the ``ship`` command, so rclone copies throughout the window.
acqd's CPU counts the supervisor (and its shipper threads), the writers and the rclone child.

Registered in ``bench.common.SCENARIOS`` and ``__main__``'s runners.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import yaml

from acqd.finalize.seal import Digests, manifest_files, write_manifest
from acqd.service.procs import Daemon, Simulator, wait_until
from acqd.session import FINALIZED, SESSION_FILE, json_bytes, write_bytes_atomic
from bench.common import BENCH_RIG, log, med
from bench.procwatch import ProcWatch, is_acqd, wait_quiet
from bench.session import SETTLE_S, lost_and_rejected, read_session, rig_file, summarize_streams

WINDOW_S = 60.0
THROTTLE = "4M"
SESSION_BYTES = 200 << 20


def sealed(data_root: Path, name: str) -> Path:
    """A finalized-looking session finalize's seal code would leave: stream files and their manifest."""
    folder = data_root / name
    (folder / "streams").mkdir(parents=True)
    for i in range(4):
        (folder / "streams" / f"s{i}.h5").write_bytes(os.urandom(SESSION_BYTES // 4))
    record = json_bytes({"session_id": name, "state": FINALIZED})
    with Digests() as digests:
        write_manifest(folder, manifest_files(folder), digests, lambda done, total: None, record)
    write_bytes_atomic(folder / SESSION_FILE, record)
    return folder


def _rclone(pid: int) -> int | None:
    for task in Path(f"/proc/{pid}/task").glob("*"):
        for kid in (task / "children").read_text().split():
            if Path(f"/proc/{kid}/comm").read_text().strip() == "rclone":
                return int(kid)
    return None


def scenario_ship(args: argparse.Namespace, workdir: Path) -> dict:
    raw = yaml.safe_load(BENCH_RIG.read_text())
    raw["ship"] = [{"name": "nas", "remote": str(workdir / "nas"), "after": "manual", "while_recording": "throttle",
                    "throttle_bwlimit": THROTTLE}]
    config = rig_file(raw, workdir, "ship-rig", args.daemon)
    window_s = getattr(args, "ship_window", None) or (20.0 if args.quick else WINDOW_S)
    n_windows = 2 * args.repeat
    to_ship = [sealed(workdir / "data", f"ship-{i}") for i in range(args.repeat)]
    quiet = wait_quiet(args.quiet_wait)
    daemon = Daemon(config, workdir / "data", workdir)
    sim, windows, folder = None, [], None
    try:
        daemon.command("acquire")
        sim = Simulator(config, n_windows * (window_s + 20) + 900, timeout_s=300)
        wait_until(lambda: not daemon.command("preflight")["problems"], "every stream to deliver data", 120, 0.5)
        started = daemon.command("record", session=f"bench-ship-{time.strftime('%H%M%S')}")
        folder = Path(started["session"]["path"])
        pids = {"supervisor": daemon.pid, "simulator": sim.proc.pid,
                **{f"writer:{n}": s["pid"] for n, s in started["streams"].items() if s["pid"]}}
        time.sleep(SETTLE_S)
        for i in range(n_windows):
            shipping = bool(i % 2)
            watched = dict(pids)
            if shipping:
                daemon.command("ship", session=to_ship[i // 2].name)
                wait_until(lambda: daemon.command("ship_status")["jobs"][-1]["bytes_done"] > 0, "rclone to copy", 60)
                watched["rclone"] = _rclone(daemon.pid)  # the copy's rclone (the first bytes are out)
            with ProcWatch(watched, args.sample_s) as watch:
                watch.sleep(window_s)
            cpu = watch.cpu_pct()
            st = daemon.command("ship_status")
            windows.append({"shipping": shipping, "seconds": round(watch.seconds, 1),
                            "acqd_cpu_pct": round(sum(v or 0.0 for k, v in cpu.items() if is_acqd(k)), 1),
                            "rclone_cpu_pct": cpu.get("rclone"), "supervisor_cpu_pct": cpu["supervisor"],
                            "others_cpu_pct": watch.others_pct(),
                            "shipped_bytes": st["jobs"][-1]["bytes_done"] if shipping else 0})
            log(f"  ship window {i + 1}/{n_windows}: shipping {shipping}, acqd CPU {windows[-1]['acqd_cpu_pct']}% "
                f"(rclone {windows[-1]['rclone_cpu_pct']}%), others {windows[-1]['others_cpu_pct']}%")
        status = daemon.command("status")
        daemon.command("stop", idle=True)
    finally:
        if sim is not None:
            sim.stop()
        daemon.stop()
    try:
        files = summarize_streams(read_session(folder), sum(w["seconds"] for w in windows))
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(workdir / "nas", ignore_errors=True)
    idle = med([w["acqd_cpu_pct"] for w in windows if not w["shipping"]])
    busy = med([w["acqd_cpu_pct"] for w in windows if w["shipping"]])
    return {"window_s": window_s, "throttle": THROTTLE, "quiet_before": quiet, "windows": windows,
            "idle_cpu_pct": idle, "shipping_cpu_pct": busy,
            "delta_cpu_pct": None if idle is None or busy is None else round(busy - idle, 1),
            **lost_and_rejected(files, status)}
