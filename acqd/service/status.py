"""Human-readable renderings of daemon status (80 columns, one verdict line) and session summaries (rich)."""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from acqd.service.overload import load_cell, load_lines

# Every CLI client command (acquire, stop, status...) imports this module: what only the session summaries need
# (the config models, h5py) is imported in them, so that such a command costs ~0.15 s of CPU, not ~0.45.

console = Console()
SYNC_SHORT = {"locked": "locked", "searching": "search", "no edges": "NO EDGE", "not pairing": "NO PAIR",
              "drift out of range": "DRIFT"}
"""The live sync lock's states (acqd.service.synclock) in the status table's 7-column ``sync`` column."""


def _duration(seconds: float | None) -> str:
    """``1:02:03``, ``4:05``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, m, sec = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _left(seconds: float | None) -> str:
    if seconds is None:
        return "not writing"
    return f"{seconds / 3600:.1f} h left" if seconds >= 3600 else f"{seconds / 60:.0f} min left"


def status_renderable(status: dict, width: int = 80) -> Group:
    """Mode, session and elapsed time, disk, one row per stream, recent incidents, one verdict; fits ``width``."""
    session = status.get("session")
    head = Text(status["mode"], style="bold")
    if session:
        head.append(f"  {session['session_id']}  {_duration(session.get('elapsed_s'))}")
    free = status["disk_free_bytes"]
    head.append(f"  disk {free / 1e9:.0f} GB, {_left(status.get('disk_time_left_s'))}" if free is not None
                else "  data root unreadable")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, padding=(0, 0, 0, 0))  # the box separates columns by one space: 77 in all
    for col, w, justify in (("stream", 11, "left"), ("state", 11, "left"), ("drv", 3, "left"), ("msg/s", 6, "right"),
                            ("MB/s", 6, "right"), ("silent", 6, "right"), ("gaps", 5, "right"),
                            ("rej", 5, "right"), ("rst", 3, "right"), ("load", 5, "right"), ("sync", 7, "left")):
        table.add_column(col, max_width=w, no_wrap=True, overflow="ellipsis", justify=justify)
    for name, s in status["streams"].items():
        bad = s["state"] in ("failed", "stopped_failed", "hung")
        table.add_row(name, Text(s["state"], style="red" if bad else ""),
                      Text("yes", style="green") if s["connected"] else Text("no", style="red"),
                      f"{s['messages_per_s']:.0f}", f"{s['mb_per_s']:.2f}",
                      "-" if s["silent_s"] is None else f"{s['silent_s']:.1f}", str(s["gaps"]), str(s["rejected"]),
                      str(s["restarts"]), load_cell(s), _sync_cell(s.get("sync")))
    parts: list = [head, table]
    parts += [Text(_fit(line, width, lines=2), style="yellow") for line in load_lines(status["streams"])]
    incidents = status.get("recent_incidents") or []
    if incidents:
        parts.append(Text(f"incidents: {status.get('incident_count', len(incidents))} (latest last)"))
        for inc in incidents[-3:]:
            when = time.strftime("%H:%M:%S", time.localtime(inc["time"]))
            parts.append(Text(_fit(f"  {when} {inc['stream'] or 'session'} {inc['kind']}: {inc['detail']}", width,
                                   lines=2)))
    for line in node_lines(status):  # a rig's leader: its other nodes (acqd.service.rig adds them)
        parts.append(Text(_fit(line, width), style="red" if "unreachable" in line else ""))
    for r in status.get("recovered") or []:
        parts.append(Text(_fit(f"interrupted session found: {r['session_id']}", width), style="yellow"))
    verdict = status.get("verdict")
    if verdict:
        parts.append(Text(_fit(verdict["line"], width), style="bold green" if verdict["ok"] else "bold red"))
    return Group(*parts)


def _sync_cell(sync: dict | None) -> Text:
    """The stream's live sync lock in a word: green when locked, red when it should be and is not."""
    if not sync:
        return Text("-")
    state = sync["state"]
    return Text(SYNC_SHORT.get(state, state), style="green" if state == "locked" else "" if state == "searching"
                else "red")


def _fit(line: str, width: int, lines: int = 1) -> str:
    """``line`` in at most ``lines`` lines of ``width``, broken and shortened between words (" …" says so)."""
    return "\n".join(textwrap.wrap(line, width, subsequent_indent=" " * 11, max_lines=lines, placeholder=" …",
                                   drop_whitespace=False) or [""])


def print_status(status: dict) -> None:
    """Render a status reply (or any other reply as JSON)."""
    if "mode" not in status or "streams" not in status:
        console.print_json(data=status)
        return
    console.print(status_renderable(status, min(console.width, 80)))


def node_lines(status: dict) -> list[str]:
    """A leader's other nodes in words, one line each (``acqd status``): "node video: reachable, clock +0.003 s,
    disk 1200 GB free, RECORD, 2 streams" or "node video: unreachable at <url> (...)"."""
    lines = []
    for name, n in (status.get("nodes") or {}).items():
        if name == status.get("node"):
            continue
        if n["reachable"] is False:
            lines.append(n.get("error") or f"node {name}: unreachable")  # the error names the node
            continue
        clock = "" if n["clock_offset_s"] is None else f", clock {n['clock_offset_s']:+.3f} s"
        disk = f", disk {n['disk']['free_bytes'] / 1e9:.0f} GB free" if (n.get("disk") or {}).get("free_bytes") is not None else ""
        lines.append(f"node {name}: {'reachable' if n['reachable'] else 'asking'}{clock}{disk}, {n.get('mode')}, "
                     f"{len(n.get('streams') or {})} streams")
    return lines


def watch_status(fetch: Callable[[], dict], every_s: float) -> int:
    """Refresh the status every ``every_s`` until Ctrl-C."""
    with Live(console=console, auto_refresh=False) as live:
        try:
            while True:
                live.update(status_renderable(fetch(), min(console.width, 80)), refresh=True)
                time.sleep(every_s)
        except KeyboardInterrupt:
            return 0


def session_summary(folder: Path) -> list[dict]:
    """One row per stream file of a session, read from the files themselves."""
    from acqd.record.streamfile import summarize
    from acqd.session import STREAMS_DIR

    return [summarize(p) for p in sorted((Path(folder) / STREAMS_DIR).glob("*.h5"))]


def print_session_summary(folder: Path) -> None:
    from acqd.session import read_session

    s = read_session(folder)
    flag = "[red]INCOMPLETE[/red]" if s.get("incomplete") else "[green]complete[/green]"
    console.print(f"session [bold]{s['session_id']}[/bold] ({s['state']}, {flag}) at {folder}")
    table = Table("file", "samples", "MB", "messages", "gaps", "rejected", "sync edges")
    for r in session_summary(folder):
        table.add_row(r["file"], str(r["samples"]), f"{r['mb']:.1f}", str(r["messages"]), str(r["gaps"]),
                      str(r["rejected"]), str(r["edges"]))
    console.print(table)
    for inc in s.get("incidents", []):
        console.print(f"  incident: {inc['stream'] or 'session'}: {inc['kind']}: {inc['detail']}")
