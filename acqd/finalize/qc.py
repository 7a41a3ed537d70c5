"""The finalizer's QC report: ``qc/index.html`` (the verdict), ``qc/qc.json`` and one PNG of plots per stream.

This module owns how the quality of a finalized session is shown to a person: it receives the summary
(clock fits, gaps, rates, frame reconciliation, QC rows with verdicts, validation findings) and per-stream plot
data already computed by ``acqd.finalize`` and writes them, deterministically (sorted JSON keys, no dates,
matplotlib's Agg canvas without pyplot's global state), so two finalizes of one session give identical bytes.

``index.html`` is self-contained (inline CSS, no scripts, the PNGs beside it): the session verdict, one row per
stream, then each stream's plots. Each stream's PNG shows what its timing rests on: the clock-fit residuals
(sync pairs; for a host-timed stream, its receive latency above the fitted envelope), the clock's offset from
its nominal rate (not for the reference, which is exact), the timeline with gaps (drawn at least a visible
width, labelled) and incidents, the arrival rate (full bins only), and for cameras the frame intervals with
dropped frames marked.
"""

from __future__ import annotations

import html
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
    gaps: list[tuple[float, float, str]] = field(default_factory=list)
    """(start, stop, kind) of each gap."""
    receive_time_s: np.ndarray = field(default_factory=lambda: np.empty(0))
    """Host receive time of each chunk, from the first."""
    receive_samples: np.ndarray = field(default_factory=lambda: np.empty(0))
    """Samples in each chunk."""
    nominal_rate: float = 0.0
    source: str = "sync"
    """'reference', 'sync', 'strobe' or 'host': what the residual panel shows."""
    residual_limit_s: float = 0.0
    """The QC threshold on residuals (drawn as lines)."""
    bound_s: float = 0.0
    """The fit's error bound (drawn as lines)."""
    incidents: list[tuple[float, str]] = field(default_factory=list)
    """(session time, label) of each incident that concerns this stream or the whole session."""
    frame_time_s: np.ndarray = field(default_factory=lambda: np.empty(0))
    """Cameras: session time of every recorded frame."""
    dropped_frame_time_s: np.ndarray = field(default_factory=lambda: np.empty(0))
    """Cameras: session time of each frame after a frame-counter jump (frames the camera counted, acqd lost)."""


def write_report(qc_dir: Path, summary: dict, plots: list[StreamPlot]) -> list[Path]:
    """Write ``qc.json``, ``<stream>.png`` and ``index.html`` into ``qc_dir`` (created); returns the files written."""
    qc_dir = Path(qc_dir)
    qc_dir.mkdir(parents=True, exist_ok=True)
    written = [_write(qc_dir / "qc.json", (json.dumps(_plain(summary), indent=2, sort_keys=True) + "\n").encode())]
    for p in plots:
        written.append(_write(qc_dir / f"{p.name}.png", render(p)))
    written.append(_write(qc_dir / "index.html", index_html(summary, [p.name for p in plots]).encode()))
    return written


def render(p: StreamPlot) -> bytes:
    """The panels of one stream, in one PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # imported late: only finalize needs it
    from matplotlib.figure import Figure

    camera = len(p.frame_time_s) > 1
    n = 5 if camera else 4
    width, height = 9.0, 2.2 * n + 0.4
    fig = Figure(figsize=(width, height), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.subplots(n, 1)
    fig.suptitle(p.title, fontsize=10)
    _residual_panel(ax[0], p)
    if p.source == "reference":  # exact by definition: a panel would only show float rounding
        ax[1].text(0.5, 0.5, "reference clock: offset from nominal is zero by definition", ha="center",
                   va="center", transform=ax[1].transAxes)
        ax[1].set_yticks([])
    else:
        ax[1].plot(p.time_s, p.offset_vs_nominal_s * 1e3, linewidth=1)
        ax[1].set_ylabel("offset vs nominal (ms)")
    _timeline_panel(ax[2], ax, p)
    t, rate = _arrival_rate(p.receive_time_s, p.receive_samples)
    if len(t):
        ax[3].stairs(rate, np.append(t, t[-1] + 1.0) + (p.time_s[0] if len(p.time_s) else 0.0), linewidth=1,
                     baseline=None)
    ax[3].axhline(p.nominal_rate, color="grey", linewidth=0.5, linestyle="--")
    ax[3].set_ylabel("arrival (samples/s)")
    if camera:
        periods = np.diff(p.frame_time_s) * p.nominal_rate  # 1: the next frame; 2: one dropped before it
        ax[4].plot(p.frame_time_s[1:], periods, ".", markersize=2)
        for d in p.dropped_frame_time_s:
            ax[4].axvline(d, color="red", linewidth=0.8)
        ax[4].set_ylim(0, max(3.0, float(periods.max()) + 0.5))
        ax[4].set_ylabel("frame interval\n(frame periods)")
        ax[4].set_title(f"{len(p.dropped_frame_time_s)} dropped-frame runs (red)", fontsize=8, loc="left")
    ax[-1].set_xlabel("session time (s)")
    _one_time_axis(ax)
    # Margins fixed in inches where tight_layout puts them for these panels (labels of two lines, a panel title):
    # tight_layout draws the whole figure once more to measure it, as long again as the draw that saves it.
    fig.subplots_adjust(left=0.9 / width, right=1 - 0.15 / width, bottom=0.6 / height, top=1 - 0.65 / height,
                        hspace=0.22)
    buf = BytesIO()
    fig.savefig(buf, format="png", metadata=_PNG_METADATA)
    return buf.getvalue()


def _one_time_axis(axes) -> None:
    """Every panel on one session-time range (their data's, with the 5 % margins autoscaling gives), its ticks on
    the last panel only. Not a shared axis: shared panels each make the ticks they hide, and making ticks (a few
    artists each, at every draw) was half of a plot's cost."""
    from matplotlib.ticker import NullLocator
    from matplotlib.transforms import Bbox

    # (a panel with only an axhline has data but no x extent: its data box spans +inf..-inf in x)
    spans = [a.dataLim for a in axes if a.has_data() and np.isfinite(a.dataLim.intervalx).all()]
    if spans:
        seen = Bbox.union(spans)
        pad = 0.05 * (seen.x1 - seen.x0) or 0.5
        for a in axes:
            a.set_xlim(seen.x0 - pad, seen.x1 + pad)
    for a in axes[:-1]:
        a.xaxis.set_major_locator(NullLocator())


def _residual_panel(ax, p: StreamPlot) -> None:
    if p.source == "reference":
        ax.text(0.5, 0.5, "reference clock: no fit (the timebase itself)", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_yticks([])
        return
    if p.source == "host":
        ax.plot(p.pair_time_s, p.residual_s * 1e3, ".", markersize=2)
        ax.set_ylabel("latency above\nenvelope (ms)")
        ax.set_title(f"HOST-TIMED: {len(p.pair_time_s)} host (sample, receive time) pairs", fontsize=8, loc="left")
        return
    if len(p.pair_time_s):
        ax.plot(p.pair_time_s, p.residual_s * p.nominal_rate, ".", markersize=3)
    else:
        ax.text(0.5, 0.5, "no sync pairs", ha="center", va="center", transform=ax.transAxes)
    for y, style, label in ((p.bound_s, ":", "error bound"), (p.residual_limit_s, "--", "QC limit")):
        if y > 0:
            ax.axhline(y * p.nominal_rate, color="grey", linewidth=0.7, linestyle=style, label=label)
            ax.axhline(-y * p.nominal_rate, color="grey", linewidth=0.7, linestyle=style)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_ylabel("residual\n(device samples)")
    ax.axhline(0, color="grey", linewidth=0.5)


def _timeline_panel(ax, axes, p: StreamPlot) -> None:
    """Gaps at least 0.4 % of the session wide (a one-frame gap stays visible), labelled; incidents as lines."""
    span = (float(p.time_s[-1] - p.time_s[0]) if len(p.time_s) > 1 else 1.0) or 1.0
    width = 0.004 * span
    for start, stop, kind in p.gaps:
        mid = 0.5 * (start + stop)
        for a in axes:
            a.axvspan(min(start, mid - width / 2), max(stop, mid + width / 2), color="red", alpha=0.3, linewidth=0)
        ax.text(mid + width, 0.75, f"{kind} {1e3 * (stop - start):.0f} ms", fontsize=7, ha="left", va="center",
                color="darkred")
    for t, label in p.incidents:
        ax.axvline(t, color="orange", linewidth=1)
        ax.text(t, 0.2, f" {label}", fontsize=7, ha="left", va="center", color="darkorange")
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    total = sum(stop - start for start, stop, _ in p.gaps)
    ax.set_ylabel(f"gaps: {len(p.gaps)}\n{total * 1e3:.0f} ms")
    if len(p.time_s):
        ax.plot(p.time_s, np.full(len(p.time_s), 0.5), "|", color="grey", markersize=4)


def _arrival_rate(receive_s: np.ndarray, samples: np.ndarray, bin_s: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Samples received per second, in ``bin_s`` bins of host receive time; full bins only (a last, partial bin
    would show a dip that never happened)."""
    if len(receive_s) == 0:
        return np.empty(0), np.empty(0)
    edges = np.arange(0.0, np.floor(float(receive_s.max()) / bin_s) * bin_s + bin_s / 2, bin_s)
    if len(edges) < 2:
        return np.empty(0), np.empty(0)
    counts, _ = np.histogram(receive_s, bins=edges, weights=samples)
    return edges[:-1], counts / bin_s


_CSS = """body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f3f3f3}td.l{text-align:left}
.PASS{background:#d8f5d8}.WARN{background:#fff0c0}.FAIL{background:#ffd0d0}img{max-width:100%}
h2{margin-top:1.5em}.small{font-size:12px;color:#555}"""

COLUMNS = (("stream", "stream"), ("verdict", "verdict"), ("source", "timing source"), ("model", "model"),
           ("pairs", "pairs"), ("drift_ppm", "drift (ppm)"), ("residual_max_samples", "residual max (samples)"),
           ("error_bound_samples", "error bound (samples)"), ("gaps", "gaps"), ("gap_seconds", "gap time (s)"),
           ("rejects", "rejects"), ("writer_restarts", "writer restarts"), ("dropped_frames", "dropped frames"))
"""The QC table's columns: the key in each stream's ``qc`` row, and its label (HTML and terminal alike)."""


def cell(key: str, row: dict, name: str) -> str:
    """One QC table cell as text, the same in the HTML page and the terminal summary."""
    if key == "stream":
        return name
    v = row.get(key)
    if key == "rejects":
        return ", ".join(f"{k} {n}" for k, n in v.items()) if v else "0"
    if key == "drift_ppm":
        return "-" if row.get("source") == "reference" else f"{v:+.2f}"
    if key in ("residual_max_samples", "error_bound_samples"):
        return "-" if row.get("source") == "reference" else f"{v:.2f}"
    if key == "gap_seconds":
        return f"{v:.3f}"
    return str(v)


def stream_label(name: str, report: dict) -> str:
    """A stream as the QC table names it: ``<node>/<stream>`` when another PC of the rig recorded it."""
    return f"{report['node']}/{name}" if report.get("node") else name


def node_lines(summary: dict) -> list[str]:
    """One line per PC of a multi-PC session: its state, verdict and what is wrong (none on a one-PC session)."""
    return [f"node {n}: {v['state']}, {v['verdict']}" + (f" ({', '.join(v['streams'])})" if v.get("streams") else "")
            + (f": {v['problem']}" if v.get("problem") else "") for n, v in (summary.get("nodes") or {}).items()]


def index_html(summary: dict, plots: list[str]) -> str:
    """The QC page: the verdict and thresholds, one row per stream, each stream's reasons, flags and plots."""
    e = html.escape
    verdict = summary.get("verdict", "")
    limits = summary.get("thresholds", {})
    rows = []
    for name, s in summary["streams"].items():
        q, label = s.get("qc") or {}, stream_label(name, s)
        cells = "".join(f'<td class="{"l" if k in ("stream", "source", "model", "rejects") else ""}">'
                        f"{e(cell(k, q, label))}</td>" if k != "verdict" else f'<td class="{e(q.get(k, ""))}">'
                        f"{e(q.get(k, ''))}</td>" for k, _ in COLUMNS)
        rows.append(f"<tr>{cells}</tr>")
    head = "".join(f"<th>{e(label)}</th>" for _, label in COLUMNS)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>QC {e(summary['session_id'])}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>QC: {e(summary['session_id'])} <span class='{e(verdict)}'>&nbsp;{e(verdict)}&nbsp;</span></h1>",
             f"<p class='small'>Thresholds (rig config <code>qc:</code>): residual max &le; "
             f"{limits.get('max_residual_samples', '')} samples, |drift| &le; {limits.get('max_drift_ppm', '')} ppm "
             "(FAIL beyond); WARN: host-timed, sync edge gaps, gaps, rejects, writer restarts, disconnects, "
             "dropped frames, live sync losses, flags. "
             f"Master: <code>{e(summary.get('master', ''))}</code>. Timebase: "
             f"{e(str(summary.get('timebase', {}).get('reference', '')))}, zero at "
             f"{e(str(summary.get('timebase', {}).get('session_start_time', '')))}.</p>",
             f"<table><tr>{head}</tr>{''.join(rows)}</table>"]
    parts += [f"<p class='small'>{e(line)}</p>" for line in node_lines(summary)]
    parts += [f"<p class='small'>warning: {e(w)}</p>" for w in summary.get("warnings", [])]
    parts += [f"<p class='small'>{e(line)}</p>" for line in trusted_lines(summary)]
    parts += [f"<p class='small'>{e(line)}</p>" for line in log_lines(summary.get("session_log") or {})]
    for name in plots:
        s = summary["streams"].get(name, {})
        q = s.get("qc") or {}
        notes = [f"{q.get('verdict', '')}: " + "; ".join(q.get("reasons", [])) if q.get("reasons") else ""]
        notes += [f"flag: {f}" for f in s.get("flags", [])]
        if q.get("pairing"):
            dropped = f"; {q.get('rejected_pairs', 0)} pairs dropped after the first fit" if q["source"] == "sync" else ""
            notes.append(f"pairing: {q['pairing']}{dropped}")
        parts.append(f"<h2 id='{e(name)}'>{e(name)}</h2>"
                     + "".join(f"<p class='small'>{e(n)}</p>" for n in notes if n)
                     + f"<img src='{e(name)}.png' alt='QC plots of {e(name)}'>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


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
    """A finalize report (``FinalizeReport.to_dict()``) as a few lines for a terminal: the QC table of
    ``qc/index.html`` (same columns, same cells), then frames, flags, sealing and findings."""
    lines = [f"{report['session_id']}: {report['message']} ({report['seconds']:.1f} s)"]
    if report.get("master"):
        lines.append(f"  master: {report['master']}   qc: {report['qc']} (+ qc/index.html)   manifest: "
                     f"{report['manifest']}")
    streams = report.get("streams", {})
    table = [[label for _, label in COLUMNS]] + [[cell(k, s.get("qc") or {}, stream_label(n, s))
                                                  for k, _ in COLUMNS] for n, s in streams.items()]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    lines += ["  " + "  ".join(c.rjust(w) if i > 3 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
              for r in table]
    for name, s in streams.items():
        if s.get("frames"):
            f = s["frames"]
            lines.append(f"  {name} frames: {f['recorded']} recorded, {f['paired']} paired with strobes, "
                         f"{f['dropped']} dropped, {f['strobes_without_frame']} strobes without a frame, "
                         f"{f['extra_strobes']} extra")
        lines += [f"  {name} ! {flag}" for flag in s["flags"]]
    sealed = report.get("sealed") or {}
    if sealed:
        lines.append(f"  sealed {sealed['files']} files read-only; immutable (chattr +i): "
                     + ("yes" if sealed["immutable"] else f"NO ({sealed['immutable_error']})"))
    findings = [m for m in (report.get("check") or {}).get("inspector", [])
                if m["importance"] not in ("BEST_PRACTICE_SUGGESTION",)]
    lines += [f"  nwbinspector {m['importance']}: {m['check']}: {m['message']}" for m in findings]
    lines += [f"  {line}" for line in node_lines(report)]
    lines += [f"  warning: {w}" for w in report.get("warnings", [])]
    lines += [f"  {line}" for line in trusted_lines(report)]
    lines += [f"  {line}" for line in log_lines(report.get("session_log") or {})]
    return lines


def trusted_lines(summary: dict) -> list[str]:
    """What finalize did not read itself (``FinalizeReport.trusted_from_recording``), and what makes it verified."""
    trusted = summary.get("trusted_from_recording", [])
    if not trusted:
        return []
    return [f"trusted from the digests taken while recording (not read again by finalize): {', '.join(trusted)}; "
            "the session is verified once the scrub has read every sealed byte (acqd verify)"]


def log_lines(summary: dict) -> list[str]:
    """The session log's summary (``session.summarise_log``) in a few lines: counts, who commanded, first warnings."""
    if not summary.get("file"):
        return []
    levels = ", ".join(f"{n} {level}" for level, n in sorted(summary["levels"].items()))
    out = [f"session log ({summary['file']}): {summary['lines']} lines ({levels or 'none readable'})"
           + (f", {summary['unreadable']} unreadable" if summary.get("unreadable") else "")]
    if summary["commands"]:
        out.append("commands: " + "; ".join(f"{k} ×{n}" for k, n in summary["commands"].items()))
    if summary["incidents"]:
        out.append("incidents: " + ", ".join(f"{k} ×{n}" for k, n in summary["incidents"].items()))
    out += [f"first warning: {w}" for w in summary["first_warnings"][:1]]
    return out
