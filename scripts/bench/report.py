"""The result: the machine and code it came from, every figure against its target, the Markdown tables, and
the generated block of docs/performance.md."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench.common import med
from bench.hasher import hasher_targets
from bench.preview import preview_targets
from bench.synclock import synclock_targets
from bench.many import many_markdown, many_targets
from bench.slow import slow_markdown, slow_targets


def machine_info(workdir: Path) -> dict:
    import h5py
    import hdf5plugin
    import pynwb
    import zmq

    mem_kb = int(next(ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
                      if ln.startswith("MemTotal")))
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return {"nproc": os.cpu_count(), "memory_gib": round(mem_kb / (1 << 20), 1), "cpu": cpu,
            "kernel": platform.release(), "disk_free_gb": round(shutil.disk_usage(workdir).free / 1e9, 1),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "numpy": np.__version__, "h5py": h5py.version.version,
            "hdf5": h5py.version.hdf5_version, "hdf5plugin": hdf5plugin.version, "pyzmq": zmq.__version__,
            "libzmq": zmq.zmq_version(), "pynwb": pynwb.__version__}


def code_fingerprint() -> str:
    """A short hash of the acqd package the subprocesses import: other people edit it while a run goes on."""
    import hashlib

    out = subprocess.run([sys.executable, "-c", "import acqd; print(acqd.__path__[0])"], capture_output=True,
                         text=True, timeout=60).stdout.strip()
    h = hashlib.sha256()
    for path in sorted(Path(out).rglob("*.py")):
        h.update(path.read_bytes())
    return f"{out} sha256:{h.hexdigest()[:12]}"


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def targets(res: dict) -> list[dict]:
    """Every figure the issue sets a target for: value (median of runs), target, met or not."""
    rows = []
    ref = res.get("reference", {})
    if ref.get("median"):
        m, n = ref["median"], len(ref["runs"])
        rows.append(row("reference rig: messages lost + rejected", (m["lost"] or 0) + (m["rejected"] or 0), n,
                        "0", lambda v: v == 0))
        rows.append(row("reference rig: acqd CPU (supervisor + writers + hasher), % of one core", m["acqd_cpu_pct"], n,
                        "<= 50", lambda v: v <= 50))
        growth = [max((v["growth_mb"] for k, v in r["rss"].items() if k.startswith("writer:")), default=0)
                  for r in ref["runs"]]
        rows.append(row("reference rig: largest writer RSS growth, first vs last minute (MB)", med(growth), n,
                        "flat (<= 5)", lambda v: v <= 5))
        rows.append(row("reference rig: publish->flushed p50 (ms)", m["commit_p50_ms"], n, "-", None))
        rows.append(row("reference rig: publish->flushed p99 (ms)", m["commit_p99_ms"], n, "<= 1000",
                        lambda v: v <= 1000))
        rows.append(row("reference rig: MB/s recorded (all streams)", m["mb_per_s"], n,
                        f"{ref['rig_mb_per_s']} offered",
                        None))
        if m.get("naive_cpu_pct") is not None:
            rows.append(row("reference rig: naive receiver CPU, same rig right after, % of one core",
                            m["naive_cpu_pct"], n, "-", None))
            rows.append(row("reference rig: acqd CPU / naive receiver CPU (each run's pair)",
                            m["acqd_over_naive_cpu"], n, "<= 1.0", lambda v: v <= 1.0))
        rows.append(row("reference rig: simulator CPU, % of one core (not acqd)", m["sim_cpu_pct"], n, "-", None))
        rows.append(row("reference rig: other processes' CPU in the window, % of one core", m["others_cpu_pct"], n,
                        "-", None))

    def best(r: dict) -> tuple[float | None, int]:
        return r.get("median", {}).get("max_ok_mb_per_s"), len(r.get("runs", []))

    acqd, n_acqd = best(res.get("ramp", {}).get("none", {}))
    naive, n_naive = best(res.get("naive", {}))
    for comp, r in res.get("ramp", {}).items():
        rows.append(row(f"highest sustained ingest, acqd, {comp} (MB/s)", *best(r), "-", None))
    if "naive" in res:
        rows.append(row("highest sustained ingest, naive receiver (MB/s)", naive, n_naive, "-", None))
    disk = res.get("disk", {}).get("median", {}).get("mb_per_s")
    pyn = res.get("pynwb", {}).get("median", {}).get("mb_per_s")
    if disk is not None:
        rows.append(row("disk sequential write with fdatasync (MB/s)", disk, len(res["disk"]["runs"]), "-", None))
    if pyn is not None:
        rows.append(row("pynwb DataChunkIterator, file to file (MB/s)", pyn, len(res["pynwb"]["runs"]), "-", None))
    if acqd is not None and naive:
        rows.append(row("highest sustained ingest: acqd / naive receiver", ratio(acqd, naive), n_acqd, ">= 1.5",
                        lambda v: v >= 1.5))
    if acqd is not None and disk:
        rows.append(row("highest sustained ingest: acqd / disk fdatasync rate", ratio(acqd, disk), n_acqd, ">= 0.8",
                        lambda v: v >= 0.8))
    if acqd is not None and pyn:
        rows.append(row("acqd / pynwb DataChunkIterator", ratio(acqd, pyn), n_acqd, "-", None))
    fin = res.get("finalize", {})
    if fin.get("skipped"):
        rows.append({"figure": "finalize 10x / 1x time", "value": "skipped: " + fin["skipped"], "runs": 0,
                     "target": "<= 1.2", "met": None})
    elif fin.get("median"):
        n = len(fin["runs"])
        rows.append(row(f"finalize 1x session ({fin['seconds_1x']:.0f} s recorded) (s)", fin["median"]["1x_s"], n,
                        "-", None))
        rows.append(row(f"finalize 10x session ({10 * fin['seconds_1x']:.0f} s recorded) (s)", fin["median"]["10x_s"],
                        n, "-", None))
        rows.append(row("finalize 10x / 1x time", fin["median"]["ratio"], n, "<= 1.2", lambda v: v <= 1.2))
        if fin.get("projection_1h", {}).get("seconds") is not None:
            p = fin["projection_1h"]
            rows.append(row("finalize: what it reads itself, measured cost (s per GB)", fin["median"]["cost_s_per_gb"],
                            n, "-", None))
            rows.append(row(f"finalize after a 1-hour session, projected, every last part full (s; parts of "
                            f"{p['part_seconds']:.0f} s / {p['part_bytes'] / 2**30:g} GiB: {p['left_at_stop_gb']} GB "
                            f"left at stop; half full: {p['expected_seconds']} s)", p["seconds"], n, "<= 30",
                            lambda v: v <= 30))
    rows += preview_targets(res, row)
    rows += slow_targets(res, row)
    rows += many_targets(res, row)
    rows += synclock_targets(res, row)
    rows += hasher_targets(res, row)
    return rows


def row(figure: str, value, runs: int, target: str, test) -> dict:
    met = None if test is None or value is None else bool(test(value))
    return {"figure": figure, "value": value, "runs": runs, "target": target, "met": met}


def markdown(res: dict) -> str:
    lines = ["| figure | value (median) | runs | target | met |", "|---|---|---|---|---|"]
    for t in res["targets"]:
        met = {True: "yes", False: "**no**", None: ""}[t["met"]]
        lines.append(f"| {t['figure']} | {t['value']} | {t['runs']} | {t['target']} | {met} |")
    ref = res.get("reference", {})
    for i, r in enumerate(ref.get("runs", [])):
        if r.get("error"):
            lines += ["", f"Reference rig run {i + 1} was cut short: {r['error']}."]
    if ref.get("skipped"):
        lines += ["", f"Reference rig skipped: {ref['skipped']}."]
    if ref.get("runs"):
        last = ref["runs"][-1]
        lines += ["", f"Reference rig, per stream (last run, {ref['seconds']:.0f} s, "
                      f"offered {ref['rig_mb_per_s']} MB/s):",
                  "", "| stream | MB/s | file MB | lost | rejected | publish->flushed p50 / p99 ms | writer CPU % "
                      "| writer RSS first -> last min, peak (MB) |", "|---|---|---|---|---|---|---|---|"]
        for name, s in last["streams"].items():
            rss = last["rss"].get(f"writer:{name}", {})
            lines.append(f"| {name} | {s['mb_per_s']} | {s['file_mb']} | {s['lost']} | {s['rejected']} | "
                         f"{s['commit_p50_ms']} / {s['commit_p99_ms']} | {last['cpu_pct'].get(f'writer:{name}')} | "
                         f"{rss.get('first_mb')} -> {rss.get('last_mb')}, {rss.get('peak_mb')} |")
        for k in ("supervisor", "hasher", "simulator"):  # the hasher's RSS is not sampled (it starts mid-window)
            rss = last["rss"].get(k, {})
            lines.append(f"| ({k}) | | | | | | {last['cpu_pct'].get(k)} | "
                         f"{rss.get('first_mb')} -> {rss.get('last_mb')}, {rss.get('peak_mb')} |")
    for label, r in [*((f"acqd, {c}", v) for c, v in res.get("ramp", {}).items()),
                     *([("naive receiver", res["naive"])] if "naive" in res else [])]:
        lines += ["", f"Ramp, {label} ({r['step_seconds']:.0f} s per step): probes -> MB/s "
                      "(receiver CPU %, simulator CPU %)", ""]
        for i, run in enumerate(r["runs"]):
            steps = ", ".join(
                f"{s['probes']}: {s.get('mb_per_s', '-')} ({s.get('acqd_cpu_pct', s.get('receiver_cpu_pct'))}, "
                f"{s.get('sim_cpu_pct')})" + ("" if s["keeps_up"] else " **" + "; ".join(s["why_not"]) + "**")
                for s in run["steps"])
            lines.append(f"- run {i + 1}: {steps}")
    lines += slow_markdown(res)
    lines += many_markdown(res)
    lines += finalize_markdown(res.get("finalize", {}))
    return "\n".join(lines)


def finalize_markdown(fin: dict) -> list[str]:
    """Each finalize run: its time, what was recorded and what finalize had to read itself."""
    if not fin.get("runs"):
        return []
    parts = f", parts of {fin['part_seconds']:.0f} s" if fin.get("part_seconds") else ""
    lines = ["", f"Finalize ({fin['seconds_1x']:.0f} s and {10 * fin['seconds_1x']:.0f} s sessions{parts}): "
                 "seconds (GB recorded, GB not hashed while recording)", ""]
    for i, r in enumerate(fin["runs"]):
        cells = [f"{k} {r[k]['seconds']} ({r[k].get('recorded_bytes', 0) / 1e9:.1f}, "
                 f"{r[k].get('left_bytes', 0) / 1e9:.1f})" for k in ("1x", "10x")]
        lines.append(f"- run {i + 1}: {', '.join(cells)}; ratio {r['ratio']}; finalize's own reading "
                     f"{r.get('cost_s_per_gb')} s/GB")
    return lines


def write_doc(path: Path, res: dict) -> None:
    """Replace the generated block of the performance doc (hand-written analysis outside it is kept)."""
    begin, end = "<!-- bench:begin (generated by scripts/bench; edits inside are overwritten) -->", "<!-- bench:end -->"
    m = res["machine"]
    block = "\n".join([
        begin, "",
        f"Run {res['started']} with `{res['command']}` ({res['elapsed_s'] / 60:.0f} min), acqd "
        f"`{res['acqd_at_start']}`" + ("" if res["acqd_at_end"] == res["acqd_at_start"] else
                                       f" (changed during the run: `{res['acqd_at_end']}` at the end)") + "."
        + "".join(f" Then {', '.join(u['scenarios'])} rerun {u['started']} with `{u['command']}`, acqd "
                  f"`{u['acqd']}`." for u in res.get("updates", [])), "",
        f"Machine: {m['nproc']} cores ({m['cpu']}), {m['memory_gib']} GiB, kernel {m['kernel']}, "
        f"{m['disk_free_gb']} GB disk free, load average at start {m['load_avg_at_start']}; "
        f"Python {m['python']}, numpy {m['numpy']}, h5py {m['h5py']}, HDF5 {m['hdf5']}, hdf5plugin {m['hdf5plugin']}, "
        f"pyzmq {m['pyzmq']} (libzmq {m['libzmq']}), pynwb {m['pynwb']}.", "",
        markdown(res), "", end])
    text = path.read_text() if path.exists() else (
        "# Performance\n\n" + begin + "\n" + end + "\n\n## How to rerun\n\n```sh\nmake bench\n```\n")
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text += "\n" + block + "\n"
    path.write_text(text)
