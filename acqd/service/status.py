"""Human-readable renderings of daemon status and session summaries (rich tables)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from acqd.session import STREAMS_DIR, read_session
from acqd.record.streamfile import summarize

console = Console()


def print_status(status: dict) -> None:
    """Render a status reply: mode, session and one row of health per stream."""
    if "mode" not in status:
        console.print_json(data=status)
        return
    session = status.get("session")
    where = f"  session {session['session_id']} at {session['path']}" if session else ""
    console.print(f"[bold]{status['mode']}[/bold]{where}   disk free {status['disk_free_bytes'] / 1e9:.1f} GB")
    table = Table("stream", "state", "driver", "msg/s", "MB/s", "last seq", "gaps", "rejected", "MB written")
    for name, s in status["streams"].items():
        driver = "[green]connected[/green]" if s["connected"] else "[red]no driver[/red]"
        state = s["state"] + (f" ({s['reason']})" if s.get("reason") else "")
        table.add_row(name, state, driver, f"{s['messages_per_s']:.0f}", f"{s['mb_per_s']:.2f}", str(s["last_seq"]),
                      str(s["gaps"]), str(s["rejected"]), f"{s['bytes_written'] / 1e6:.1f}")
    console.print(table)
    for r in status.get("recovered") or []:
        console.print(f"[yellow]interrupted session found:[/yellow] {r['session_id']} at {r['path']}")


def session_summary(folder: Path) -> list[dict]:
    """One row per stream file of a session, read from the files themselves."""
    return [summarize(p) for p in sorted((Path(folder) / STREAMS_DIR).glob("*.h5"))]


def print_session_summary(folder: Path) -> None:
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
