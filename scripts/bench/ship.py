"""Scenario ship: what shipping with ``while_recording: throttle`` costs the reference rig while it records
(budget: nothing lost, <= 3 % of one core).

One recording of configs/bench-rig.yaml with a ``ship:`` destination (a local folder, ``throttle_bwlimit``
4M); windows of ``--ship-window`` seconds (default 40) alternate idle and shipping, idle first, ``--repeat``
pairs. Each shipping window starts by queueing a sealed 100 MB session (random stream files and a manifest written
by finalize's ``write_manifest``) with the ``ship`` command, so it holds a whole job: acqd's check of the session
against its manifest, the throttled copy (25 s at 4M), the hashing at the destination, READY.json.
acqd's CPU counts the supervisor (and its shipper threads), the writers and the supervisor's other children: every
rclone run (copy, hashsum, rcat, deletefile: those that ended in the window through the supervisor's
cutime/cstime, those still running from /proc) and the session's part hasher.

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
from bench.common import BENCH_METADATA, BENCH_RIG, log, med
from bench.procwatch import CLK_TCK, ProcWatch, cpu_ticks, is_acqd, wait_quiet
from bench.session import SETTLE_S, lost_and_rejected, read_session, rig_file, summarize_streams, writer_pids

WINDOW_S = 40.0
"""A throttled job of SESSION_BYTES at THROTTLE takes about 28 s to verified: the shipping window holds all of it
(and the rig's recording, about 100 MB/s, stays near 25 GB for 3 pairs: the bench shares its disk)."""
THROTTLE = "4M"
SESSION_BYTES = 100 << 20


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


def children_ticks(pid: int, skip: set[int]) -> tuple[int, int]:
    """CPU ticks of ``pid``'s children other than ``skip``: (every rclone: those it reaped, its cutime + cstime, and
    those running; the others running, i.e. the session's part hasher)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    rclone, others = int(fields[13]) + int(fields[14]), 0
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue
        for kid in set(kids) - skip:
            try:
                is_rclone = Path(f"/proc/{kid}/comm").read_text().strip() == "rclone"
            except OSError:
                continue  # reaped meanwhile: in cutime now
            ticks = cpu_ticks(kid) or 0
            rclone, others = (rclone + ticks, others) if is_rclone else (rclone, others + ticks)
    return rclone, others


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
        started = daemon.command("record", session=f"bench-ship-{time.strftime('%H%M%S')}", metadata=BENCH_METADATA)
        folder = Path(started["session"]["path"])
        pids = {"supervisor": daemon.pid, "simulator": sim.proc.pid, **writer_pids(started["streams"])}
        writers = {p for k, p in pids.items() if k.startswith("writer:")}
        time.sleep(SETTLE_S)
        for i in range(n_windows):
            shipping = bool(i % 2)
            kids0 = children_ticks(daemon.pid, writers)
            with ProcWatch(pids, args.sample_s) as watch:
                if shipping:
                    daemon.command("ship", session=to_ship[i // 2].name)
                watch.sleep(window_s)
            rclone, hasher = (round(100 * (b - a) / CLK_TCK / watch.seconds, 1)
                              for a, b in zip(kids0, children_ticks(daemon.pid, writers)))
            cpu = watch.cpu_pct()
            acqd = round(sum(v or 0.0 for k, v in cpu.items() if is_acqd(k)) + rclone + hasher, 1)
            job = daemon.command("ship_status")["jobs"][-1] if shipping else None
            windows.append({"shipping": shipping, "seconds": round(watch.seconds, 1), "acqd_cpu_pct": acqd,
                            "rclone_cpu_pct": rclone, "hasher_cpu_pct": hasher, "supervisor_cpu_pct": cpu["supervisor"],
                            "others_cpu_pct": watch.others_pct(),
                            "shipped_bytes": job["bytes_done"] if job else 0, "job_state": job and job["state"],
                            "job_seconds": job and job["finished"] and round(job["finished"] - job["created"], 1)})
            log(f"  ship window {i + 1}/{n_windows}: shipping {shipping}, acqd CPU {windows[-1]['acqd_cpu_pct']}% "
                f"(supervisor {cpu['supervisor']}%, rclone {rclone}%, part hasher {hasher}%), others "
                f"{windows[-1]['others_cpu_pct']}%" + (f"; job {job['state']}" if job else ""))
            if job:  # the next idle window starts once this job is over (its end is not idle)
                wait_until(lambda: daemon.command("ship_status")["jobs"][-1]["state"] in ("verified", "failed"),
                           "the ship job to end", 600, 0.5)
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
            "delta_without_hasher_pct": delta_without_hasher(windows), **lost_and_rejected(files, status)}


def delta_without_hasher(windows: list[dict]) -> float | None:
    """Median shipping minus median idle window of acqd's CPU without the part hasher: it hashes each 1 GiB part
    of the rig's probes as it closes (about every 46 s), so one window holds one round of it and the next two,
    whether or not anything ships."""
    idle = med([w["acqd_cpu_pct"] - w["hasher_cpu_pct"] for w in windows if not w["shipping"]])
    busy = med([w["acqd_cpu_pct"] - w["hasher_cpu_pct"] for w in windows if w["shipping"]])
    return None if idle is None or busy is None else round(busy - idle, 1)
