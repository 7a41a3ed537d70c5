"""Scenario synclock: what the live sync lock costs the reference rig (budget: <= 1 % of one core, nothing lost).

configs/bench-rig.yaml recorded in windows of ``--synclock-window`` seconds (default 60), ``daemon.sync_lock.enabled``
off and on alternately (off first), ``--repeat`` pairs, each window a daemon of its own (the lock is a config key);
acqd's CPU (supervisor + writers) is measured in each, and the supervisor's separately: the lock runs on the
supervisor's thread, its edges ride on the writers' stats either way. In the windows with the lock on, the daemon's
own figure is read too: the CPU time of the supervisor thread spent on the lock (``sync_lock.cpu_s`` in status,
``time.thread_time``) over the window, a figure the neighbours' noise hardly reaches.

Registered in ``bench.common.SCENARIOS``, ``__main__``'s runners and ``bench.report.targets``
(``synclock_targets``).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import yaml

from acqd.service.procs import Daemon, Simulator, wait_until
from bench.common import BENCH_METADATA, BENCH_RIG, log, med
from bench.procwatch import ProcWatch, is_acqd, wait_quiet
from bench.session import SETTLE_S, lost_and_rejected, read_session, rig_file, summarize_streams, writer_pids

WINDOW_S = 60.0
BUDGET_PCT = 1.0


def scenario_synclock(args: argparse.Namespace, workdir: Path) -> dict:
    raw = yaml.safe_load(BENCH_RIG.read_text())
    window_s = getattr(args, "synclock_window", None) or (20.0 if args.quick else WINDOW_S)
    windows = []
    for i in range(2 * args.repeat):
        on = bool(i % 2)
        config = rig_file(raw, workdir, f"synclock-{'on' if on else 'off'}",
                          {**args.daemon, "sync_lock": {"enabled": on}})
        quiet = wait_quiet(args.quiet_wait)
        windows.append({"sync_lock": "on" if on else "off", "quiet_before": quiet,
                        **_window(config, workdir, window_s, args, f"bench-synclock-{i}")})
        w = windows[-1]
        log(f"  synclock window {i + 1}/{2 * args.repeat}: lock {w['sync_lock']}, acqd CPU {w['acqd_cpu_pct']}%, "
            f"supervisor {w['supervisor_cpu_pct']}%, computation {w['computation_pct']}%, "
            f"others {w['others_cpu_pct']}%, states {w['states']}")
    off = med([w["acqd_cpu_pct"] for w in windows if w["sync_lock"] == "off"])
    on = med([w["acqd_cpu_pct"] for w in windows if w["sync_lock"] == "on"])
    sup_off = med([w["supervisor_cpu_pct"] for w in windows if w["sync_lock"] == "off"])
    sup_on = med([w["supervisor_cpu_pct"] for w in windows if w["sync_lock"] == "on"])
    # Each "on" window against the "off" window just before it: the machine's load drifts over a run (run of
    # 2026-12-06: 27.9 -> 32.7 % with the lock off), which a difference of medians would count as the lock's.
    pairs = list(zip(windows[0::2], windows[1::2]))
    return {"window_s": window_s, "windows": windows, "off_cpu_pct": off, "on_cpu_pct": on,
            "delta_cpu_pct": med([b["acqd_cpu_pct"] - a["acqd_cpu_pct"] for a, b in pairs]),
            "supervisor_paired_delta_cpu_pct": med([b["supervisor_cpu_pct"] - a["supervisor_cpu_pct"] for a, b in pairs
                                                   if a["supervisor_cpu_pct"] is not None
                                                   and b["supervisor_cpu_pct"] is not None]),
            "supervisor_delta_cpu_pct": None if sup_off is None or sup_on is None else round(sup_on - sup_off, 2),
            "computation_pct": med([w["computation_pct"] for w in windows if w["sync_lock"] == "on"]),
            "lost": sum(w["lost"] for w in windows), "rejected": sum(w["rejected"] for w in windows)}


def _window(config: Path, workdir: Path, window_s: float, args: argparse.Namespace, session: str) -> dict:
    """One recording: ``window_s`` measured after the lock's first window has passed (it computes from then on)."""
    daemon = Daemon(config, workdir / "data", workdir)
    sim, folder = None, None
    try:
        daemon.command("acquire")
        sim = Simulator(config, window_s + 600, timeout_s=300)
        wait_until(lambda: not daemon.command("preflight")["problems"], "every stream to deliver data", 120, 0.5)
        started = daemon.command("record", session=session, metadata=BENCH_METADATA)
        folder = Path(started["session"]["path"])
        pids = {"supervisor": daemon.pid, "simulator": sim.proc.pid, **writer_pids(started["streams"])}
        time.sleep(SETTLE_S)
        cpu_before = daemon.command("status")["sync_lock"]["cpu_s"]
        with ProcWatch(pids, args.sample_s) as watch:
            watch.sleep(window_s)
        status = daemon.command("status")
        daemon.command("stop", idle=True)
    finally:
        if sim is not None:
            sim.stop()
        daemon.stop()
    try:
        files = summarize_streams(read_session(folder), watch.seconds)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    cpu = watch.cpu_pct()
    return {"seconds": round(watch.seconds, 1),
            "acqd_cpu_pct": round(sum(v or 0.0 for k, v in cpu.items() if is_acqd(k)), 2),
            "supervisor_cpu_pct": cpu["supervisor"], "others_cpu_pct": watch.others_pct(),
            "computation_pct": round(100 * (status["sync_lock"]["cpu_s"] - cpu_before) / watch.seconds, 3),
            "states": {n: (s["sync"] or {}).get("state") for n, s in status["streams"].items() if s["sync"]},
            "shed_total": status["sync_lock"]["shed_total"],
            **lost_and_rejected(files, status)}


def synclock_targets(res: dict, row) -> list[dict]:
    """The synclock scenario's rows of the targets table (``row`` is ``bench.report.row``)."""
    sl = res.get("synclock", {})
    if not sl.get("windows"):
        return []
    n = len(sl["windows"]) // 2
    return [row("live sync lock on vs off (reference rig, same run; median of on minus the off window before it): "
                "acqd CPU difference, % of one core",
                sl["delta_cpu_pct"], n, f"<= {BUDGET_PCT:g}", lambda v: v <= BUDGET_PCT),
            row("live sync lock: its computation's own CPU (daemon's measure), % of one core", sl["computation_pct"],
                n, f"<= {BUDGET_PCT:g}", lambda v: v <= BUDGET_PCT),
            row("live sync lock on vs off: messages lost + rejected", sl["lost"] + sl["rejected"], n, "0",
                lambda v: v == 0)]
