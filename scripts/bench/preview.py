"""Scenario preview: what an open console page costs the data path (budget: <= 3 % of one core, nothing lost).

One recording of configs/bench-rig.yaml; windows of ``--preview-window`` seconds (default 60) alternate with the
page closed and open, closed first, ``--repeat`` pairs; acqd's CPU (supervisor + writers) is measured in each.
"Open" reads what the page reads: ``GET /api/events`` and ``GET /api/console/preview`` (every writer then
decimates its data for the preview), with every probe view live (issue 28): a 64-channel AP trace block set on
each probe (js/probe.js draws the rest from the preview messages). The browser's own drawing is not acqd's CPU and
is left out. Windows of
one run see the same files growing and the same neighbours, so the difference is the page's.

Registered in ``bench.common.SCENARIOS``, ``__main__``'s runners and ``bench.report.targets``
(``preview_targets``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from pathlib import Path

import yaml

from acqd.service.procs import Daemon, Simulator, wait_until
from bench.common import BENCH_METADATA, BENCH_RIG, log, med
from bench.procwatch import ProcWatch, is_acqd, wait_quiet
from bench.session import SETTLE_S, lost_and_rejected, read_session, rig_file, summarize_streams, writer_pids

WINDOW_S = 60.0
BUDGET_PCT = 5.0
"""Issue 28: every view open on all 4 probes (features, raster, traces) within +5 % of a core (3 % before them)."""


class ConsoleReader:
    """The page's two streams, read as they come, each on a thread of its own; ``counts`` of events read."""

    def __init__(self, url: str):
        import httpx

        self.client = httpx.Client(base_url=url, timeout=httpx.Timeout(10.0, read=None))
        self.counts = {"/api/events": 0, "/api/console/preview": 0}
        self.featured: set[str] = set()
        """Probes whose previews carry the probe view's features (they start once the writer has scipy.signal)."""
        self._stop = threading.Event()
        self.probes = [p["stream"] for p in self.client.get("/api/console/probes").json()["probes"]]
        for name in self.probes:  # the full view's trace block on every probe: 64 channels, AP band
            self.client.put(f"/api/console/probes/{name}/block", json={"channels": list(range(64)), "band": "ap"})
        self._threads = [threading.Thread(target=self._read, args=(p,), daemon=True) for p in self.counts]
        for t in self._threads:
            t.start()

    def _read(self, path: str) -> None:
        with self.client.stream("GET", path) as resp:
            for line in resp.iter_lines():
                if self._stop.is_set():
                    return
                self.counts[path] += line.startswith("event:")
                if line.startswith("data:") and '"probe":' in line:
                    self.featured.add(json.loads(line[5:])["stream"])

    def close(self) -> None:
        self._stop.set()  # each stream has a message at least every second: its reader sees the flag
        for t in self._threads:
            t.join(10)
        self.client.close()


def scenario_preview(args: argparse.Namespace, workdir: Path) -> dict:
    raw = yaml.safe_load(BENCH_RIG.read_text())
    config = rig_file(raw, workdir, "preview-rig", args.daemon)
    window_s = getattr(args, "preview_window", None) or (20.0 if args.quick else WINDOW_S)
    n_windows = 2 * args.repeat
    quiet = wait_quiet(args.quiet_wait)
    daemon = Daemon(config, workdir / "data", workdir)
    sim, windows, folder = None, [], None
    try:
        daemon.command("acquire")
        sim = Simulator(config, n_windows * (window_s + 10) + 900, timeout_s=300)
        wait_until(lambda: not daemon.command("preflight")["problems"], "every stream to deliver data", 120, 0.5)
        if args.preview_acquire:  # nothing stored: the previews' cost without filling the disk (157 MB/s)
            started = daemon.command("status")
        else:
            started = daemon.command("record", session=f"bench-preview-{time.strftime('%H%M%S')}",
                                     metadata=BENCH_METADATA)
            folder = Path(started["session"]["path"])
        pids = {"supervisor": daemon.pid, "simulator": sim.proc.pid, **writer_pids(started["streams"])}
        time.sleep(SETTLE_S)
        for i in range(n_windows):
            page = ConsoleReader(daemon.url) if i % 2 else None
            if page is not None:  # measure once every writer previews (about 4 messages a second each) and every
                # probe sends its features: a writer loads scipy.signal on a thread when a page first watches (~1 s of
                # CPU each, once per process), the page's start-up, not what watching costs
                wait_until(lambda: page.counts["/api/console/preview"] >= 4 * len(raw["streams"])
                           and page.featured >= set(page.probes), "previews with the probes' features", 120)
            with ProcWatch(pids, args.sample_s) as watch:
                watch.sleep(window_s)
            if page is not None:
                page.close()
            cpu = watch.cpu_pct()
            windows.append({"page": "open" if page else "closed", "seconds": round(watch.seconds, 1),
                            "acqd_cpu_pct": round(sum(v or 0.0 for k, v in cpu.items() if is_acqd(k)), 1),
                            "supervisor_cpu_pct": cpu["supervisor"], "others_cpu_pct": watch.others_pct(),
                            "cpu_pct": cpu, "timeline": watch.acqd_cpu_timeline(10.0),  # per process; acqd per 10 s
                            "load_avg": [round(x, 2) for x in os.getloadavg()],
                            "events_read": dict(page.counts) if page else {}})
            log(f"  preview window {i + 1}/{n_windows}: page {windows[-1]['page']}, acqd CPU "
                f"{windows[-1]['acqd_cpu_pct']}%, others {windows[-1]['others_cpu_pct']}%")
            time.sleep(1.0)  # the supervisor tells the writers to stop previewing within its next loop
        status = daemon.command("status")
        daemon.command("stop", idle=True)
    finally:
        if sim is not None:
            sim.stop()
        daemon.stop()
    files = {"lost": 0, "rejected": 0}  # ACQUIRE: no files; the daemon's counters say what was lost
    if folder is not None:
        try:
            files = summarize_streams(read_session(folder), sum(w["seconds"] for w in windows))
        finally:
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
    closed = med([w["acqd_cpu_pct"] for w in windows if w["page"] == "closed"])
    opened = med([w["acqd_cpu_pct"] for w in windows if w["page"] == "open"])
    return {"window_s": window_s, "quiet_before": quiet, "windows": windows,
            "closed_cpu_pct": closed, "open_cpu_pct": opened,
            "delta_cpu_pct": None if closed is None or opened is None else round(opened - closed, 1),
            **lost_and_rejected(files, status)}


def preview_targets(res: dict, row) -> list[dict]:
    """The preview scenario's rows of the targets table (``row`` is ``bench.report.row``)."""
    pre = res.get("preview", {})
    if not pre.get("windows"):
        return []
    n = len(pre["windows"]) // 2
    return [row("console page open vs closed (reference rig, same run): acqd CPU difference, % of one core",
                pre["delta_cpu_pct"], n, f"<= {BUDGET_PCT:g}", lambda v: v <= BUDGET_PCT),
            row("console page open vs closed: messages lost + rejected", pre["lost"] + pre["rejected"], n, "0",
                lambda v: v == 0)]
