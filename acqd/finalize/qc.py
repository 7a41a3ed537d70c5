"""The finalizer's QC report: ``qc/qc.json`` and one PNG of plots per stream.

This module owns how the quality of a finalized session is shown to a person: it receives the summary
(clock fits, gaps, rates, frame reconciliation, validation findings) and per-stream plot data already
computed by ``acqd.finalize`` and writes them, deterministically (sorted JSON keys, no dates, matplotlib's
Agg canvas without pyplot's global state), so two finalizes of one session give identical bytes.

Each stream's PNG has four panels: clock-fit residuals over time, the clock's offset from its nominal rate
(drift and wander), gaps on the session timeline, and the rate at which samples arrived.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import numpy as np

__all__ = ["StreamPlot", "write_report"]

_PNG_METADATA = {"Software": "acqd finalize"}  # fixed, so the bytes do not depend on the matplotlib version


@dataclass(frozen=True, slots=True, eq=False)
class StreamPlot:
    """What to plot for one stream (all times in session seconds)."""

    name: str
    title: str
    pair_time_s: np.ndarray
    """Session time of each sync pair (or frame/strobe pair) the clock fit rests on."""
    residual_s: np.ndarray
    """Reference time minus fitted time of each pair."""
    time_s: np.ndarray
    """Session time of (a subsample of) the stream's chunks."""
    offset_vs_nominal_s: np.ndarray
    """How far each of those chunks is from where a clock at exactly the nominal rate would put it."""
    gaps: list[tuple[float, float]] = field(default_factory=list)
    receive_time_s: np.ndarray = field(default_factory=lambda: np.empty(0))
    """Host receive time of each chunk, from the first."""
    receive_samples: np.ndarray = field(default_factory=lambda: np.empty(0))
    """Samples in each chunk."""
    nominal_rate: float = 0.0


def write_report(qc_dir: Path, summary: dict, plots: list[StreamPlot]) -> list[Path]:
    """Write ``qc.json`` and ``<stream>.png`` into ``qc_dir`` (created); returns the files written."""
    qc_dir = Path(qc_dir)
    qc_dir.mkdir(parents=True, exist_ok=True)
    written = [_write(qc_dir / "qc.json", (json.dumps(_plain(summary), indent=2, sort_keys=True) + "\n").encode())]
    for p in plots:
        written.append(_write(qc_dir / f"{p.name}.png", render(p)))
    return written


def render(p: StreamPlot) -> bytes:
    """The four-panel PNG of one stream."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # imported late: only finalize needs it
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 9), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.subplots(4, 1, sharex=True)
    fig.suptitle(p.title, fontsize=10)

    if len(p.pair_time_s):
        ax[0].plot(p.pair_time_s, p.residual_s * 1e6, ".", markersize=3)
    else:
        ax[0].text(0.5, 0.5, "no sync pairs (host-time fit or reference)", ha="center", va="center",
                   transform=ax[0].transAxes)
    ax[0].set_ylabel("residual (us)")
    ax[0].axhline(0, color="grey", linewidth=0.5)

    ax[1].plot(p.time_s, p.offset_vs_nominal_s * 1e3, linewidth=1)
    ax[1].set_ylabel("offset vs nominal (ms)")

    for start, stop in p.gaps:
        for a in ax:
            a.axvspan(start, max(stop, start + 1e-3), color="red", alpha=0.3, linewidth=0)
    ax[2].set_yticks([])
    ax[2].set_ylabel(f"gaps: {len(p.gaps)}")
    if len(p.time_s):
        ax[2].plot(p.time_s, np.zeros_like(p.time_s), "|", color="grey", markersize=4)

    t, rate = _arrival_rate(p.receive_time_s, p.receive_samples)
    if len(t):
        ax[3].step(t + (p.time_s[0] if len(p.time_s) else 0.0), rate, where="post", linewidth=1)
    ax[3].axhline(p.nominal_rate, color="grey", linewidth=0.5, linestyle="--")
    ax[3].set_ylabel("arrival (samples/s)")
    ax[3].set_xlabel("session time (s)")
    fig.tight_layout()
    buf = BytesIO()
    fig.savefig(buf, format="png", metadata=_PNG_METADATA)
    return buf.getvalue()


def _arrival_rate(receive_s: np.ndarray, samples: np.ndarray, bin_s: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Samples received per second, in ``bin_s`` bins of host receive time."""
    if len(receive_s) == 0:
        return np.empty(0), np.empty(0)
    edges = np.arange(0.0, float(receive_s.max()) + bin_s, bin_s)
    if len(edges) < 2:
        return np.empty(0), np.empty(0)
    counts, _ = np.histogram(receive_s, bins=edges, weights=samples)
    return edges[:-1], counts / bin_s


def _plain(obj: object) -> object:
    """JSON-able: numpy scalars and arrays as Python values, non-finite floats as None."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _write(path: Path, data: bytes) -> Path:
    tmp = path.with_name(path.name + ".partial")
    tmp.unlink(missing_ok=True)
    with open(tmp, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def summary_lines(report: dict) -> list[str]:
    """A finalize report (``FinalizeReport.to_dict()``) as a few lines for a terminal."""
    lines = [f"{report['session_id']}: {report['message']} ({report['seconds']:.1f} s)"]
    if report.get("master"):
        lines.append(f"  master: {report['master']}   qc: {report['qc']}   manifest: {report['manifest']}")
    for name, s in report.get("streams", {}).items():
        c = s["clock"]
        lines.append(f"  {name:10s} {s['rows']:>10d} rows  {s['timing']:10s} {c['source']:9s} {c['model']:9s} "
                     f"pairs {c['n_pairs']:>6d}  drift {c['drift_ppm']:+7.2f} ppm  bound {c['error_bound_s'] * 1e6:8.1f} us"
                     f"  gaps {len(s['gaps'])}")
        if s.get("frames"):
            f = s["frames"]
            lines.append(f"    frames: {f['recorded']} recorded, {f['paired']} paired with strobes, {f['dropped']} "
                         f"dropped, {f['strobes_without_frame']} strobes without a frame, {f['extra_strobes']} extra")
        lines += [f"    ! {flag}" for flag in s["flags"]]
    sealed = report.get("sealed") or {}
    if sealed:
        lines.append(f"  sealed {sealed['files']} files read-only; immutable (chattr +i): "
                     + ("yes" if sealed["immutable"] else f"NO ({sealed['immutable_error']})"))
    findings = [m for m in (report.get("check") or {}).get("inspector", [])
                if m["importance"] not in ("BEST_PRACTICE_SUGGESTION",)]
    lines += [f"  nwbinspector {m['importance']}: {m['check']}: {m['message']}" for m in findings]
    lines += [f"  warning: {w}" for w in report.get("warnings", [])]
    return lines
