"""Scenario finalize: wall time of ``acqd finalize`` on a short session and on one with 10x the data."""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from acqd.service.procs import stop_process
from bench.common import BENCH_RIG, log, med
from bench.session import record, rig_file


def finalize_help() -> str | None:
    """``acqd finalize --help`` output, or None if there is no such command."""
    try:
        proc = subprocess.run([sys.executable, "-m", "acqd.cli", "finalize", "--help"], capture_output=True,
                              text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None
    return proc.stdout if proc.returncode == 0 else None


def left_to_hash(folder: Path) -> tuple[int, int, list[tuple[str, Path]]]:
    """Before finalize: bytes recorded, bytes whose digest the daemon's hasher did not take while recording (what
    finalize still has to read), and those files with their stream."""
    try:
        from acqd.finalize.digests import trusted
    except ImportError:  # an acqd without background hashing: everything is left
        trusted = None
    session = json.loads((folder / "session.json").read_text())
    files = [(name, folder / p["path"]) for name, st in session["streams"].items() for p in st["parts"]]
    known = trusted(folder, [p for _, p in files])[0] if trusted else {}
    left = [(name, p) for name, p in files if p not in known]
    return sum(p.stat().st_size for _, p in files), sum(p.stat().st_size for _, p in left), left


def per_byte_cost(files: list[tuple[str, Path]]) -> float | None:
    """Seconds per byte of finalize's per-file work on ``files``, done as finalize does it: sha256 on its two
    threads while the chunk checksums are checked on the main thread, the files first dropped from the page cache
    (the writers drop what they fsynced, so finalize reads the last parts from the disk)."""
    from acqd.finalize.integrity import verify_part
    from acqd.finalize.seal import Digests

    total = sum(p.stat().st_size for _, p in files)
    if not total:
        return None
    for _, p in files:
        fd = os.open(p, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    t0 = time.perf_counter()
    with Digests([p for _, p in files]) as digests:
        for stream, p in files:
            verify_part(stream, p, p.name)
        for _, p in files:
            digests.get(p)
    return (time.perf_counter() - t0) / total


def projection(runs: list[dict], rig: dict, part_s: float, part_bytes: int) -> dict:
    """Finalize time after a one-hour session with a rig's default parts, from each run's measurements: the 10x
    session's time without what it read itself (master, validation, QC: what does not depend on the data hashed),
    plus the measured cost of reading what is left at stop, the last part of every stream. Worst case: every last
    part full (at most ``part_s`` seconds or ``part_bytes``); on average they are half full ("expected")."""
    rates = [_stream_bytes_per_s(s) for s in rig["streams"]]
    last = sum(min(part_bytes, r * part_s) for r in rates)
    worst, expected = [], []
    for r in runs:
        c = r.get("cost_s_per_gb")
        if c is None or "left_bytes" not in r["10x"]:
            continue
        rest = r["10x"]["seconds"] - c * r["10x"]["left_bytes"] / 1e9
        worst.append(round(rest + c * last / 1e9, 1))
        expected.append(round(rest + c * last / 2e9, 1))
    return {"seconds": med(worst), "expected_seconds": med(expected), "left_at_stop_gb": round(last / 1e9, 1),
            "part_seconds": part_s, "part_bytes": part_bytes}


def _stream_bytes_per_s(s: dict) -> float:
    import numpy as np

    return float(np.dtype(s["dtype"]).itemsize * np.prod(s.get("shape", [1])) * s["rate"])


def time_finalize(folder: Path, timeout_s: float, jsonl: bool) -> dict:
    """Wall time of ``acqd finalize FOLDER``; with ``--progress-jsonl``, also when each stage started."""
    cmd = [sys.executable, "-m", "acqd.cli", "finalize", str(folder), *(["--progress-jsonl"] if jsonl else [])]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    stages: dict[str, float] = {}
    report: dict = {}
    try:
        deadline = t0 + timeout_s
        while True:  # until stdout closes (the process exited) or the deadline
            left = deadline - time.perf_counter()
            if left <= 0:
                raise subprocess.TimeoutExpired(cmd, timeout_s)
            if not select.select([proc.stdout], [], [], min(left, 1.0))[0]:
                continue
            line = proc.stdout.readline()
            if not line:
                break
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            stage = msg.get("stage")
            if "report" in msg:
                report = msg["report"]
            if stage and stage not in stages:
                stages[stage] = round(time.perf_counter() - t0, 2)
        rc = proc.wait(max(1.0, deadline - time.perf_counter()))
    finally:
        stop_process(proc)
    stderr = proc.stderr.read() if proc.stderr else ""
    return {"seconds": round(time.perf_counter() - t0, 2), "returncode": rc, "stage_started_s": stages,
            "stderr_tail": stderr[-500:] if rc else "", "digests": report.get("sealed", {}).get("digests")}


def scenario_finalize(args: argparse.Namespace, workdir: Path) -> dict:
    help_text = finalize_help()
    if help_text is None:
        return {"skipped": "`acqd finalize` does not exist yet (`acqd finalize --help` fails)"}
    raw = yaml.safe_load(BENCH_RIG.read_text())
    config = rig_file(raw, workdir, "bench-rig", args.daemon, args.stream)
    runs = []
    for i in range(args.repeat_finalize):
        run = {}
        for label, seconds in (("1x", args.finalize_seconds), ("10x", 10 * args.finalize_seconds)):
            log(f"finalize: run {i + 1}/{args.repeat_finalize}, {label} session ({seconds:.0f} s recorded)")
            rec = record(config, workdir, seconds, args.sample_s, args.quiet_wait, args.rss_limit_mb)
            folder = Path(rec["folder"])
            try:
                recorded, left, files = left_to_hash(folder)
                run[label] = time_finalize(folder, 120 + 10 * seconds, "--progress-jsonl" in help_text)
                run[label].update(recorded_bytes=recorded, left_bytes=left)
                if label == "10x" and run[label]["returncode"] == 0:
                    cost = per_byte_cost(files)  # the files finalize itself read: page cache as it left it
                    run["cost_s_per_gb"] = round(cost * 1e9, 3) if cost else None
            finally:
                if not args.keep:
                    from acqd.finalize import unseal_session  # finalized files are immutable (chattr +i)

                    unseal_session(Path(rec["folder"]))
                    shutil.rmtree(rec["folder"], ignore_errors=True)
            r = run[label]
            log(f"  {r['seconds']} s (exit {r['returncode']}); {r.get('recorded_bytes', 0) / 1e9:.1f} GB recorded, "
                f"{r.get('left_bytes', 0) / 1e9:.1f} GB not hashed while recording")
        run["ratio"] = round(run["10x"]["seconds"] / max(run["1x"]["seconds"], 1e-9), 2)
        runs.append(run)
    from acqd.config import StreamConfig  # the defaults a rig gets: where a one-hour session's parts are cut

    defaults = StreamConfig.model_fields
    return {"seconds_1x": args.finalize_seconds, "part_seconds": args.part_seconds, "runs": runs,
            "median": {"1x_s": med([r["1x"]["seconds"] for r in runs]),
                       "10x_s": med([r["10x"]["seconds"] for r in runs]), "ratio": med([r["ratio"] for r in runs]),
                       "cost_s_per_gb": med([r.get("cost_s_per_gb") for r in runs])},
            "projection_1h": projection(runs, raw, defaults["max_file_seconds"].default,
                                        defaults["max_file_bytes"].default)}
