"""``acqd demo``: a whole simulated rig session end to end, with real processes and sockets.

Starts the daemon and the simulated rig as subprocesses, acquires, records for a while, stops,
finalizes through the control API, and prints what each stream file holds and the clock table.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from rich.console import Console

from acqd.config import load_config
from acqd.config.ports import check_ports_free
from acqd.service.procs import Daemon, Simulator, wait_until
from acqd.finalize.qc import summary_lines
from acqd.service.status import print_session_summary

console = Console()
DEMO_SUBJECT = {"subject_id": "demo", "species": "Mus musculus", "sex": "U", "age": "P90D",
                "description": "simulated subject of the acqd demo (no animal was recorded)"}


def demo(config: Path, data_root: Path, seconds: float) -> int:
    # The daemon's API takes any free port; the streams' tcp ports are bound by it or by the simulated drivers.
    check_ports_free(load_config(config), ("acqd", "drivers"), control=False)
    data_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="acqd-demo-") as tmp:
        daemon = Daemon(config, data_root, Path(tmp))
        sim = None
        try:
            console.print("[bold]acquire[/bold]: starting one writer per stream")
            daemon.command("acquire")
            sim = Simulator(config, seconds + 60, truth=Path(tmp) / "truth.json")
            wait_until(lambda: not daemon.command("preflight")["problems"], "every stream to deliver data")
            # The subject comes with every session, never from the rig config: the demo names its own.
            session = daemon.command("record", metadata={"session_description": "acqd demo session",
                                                         "subject": DEMO_SUBJECT})["session"]
            console.print(f"[bold]record[/bold]: session {session['session_id']} for {seconds:.0f} s")
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                time.sleep(min(2.0, max(0.0, end - time.monotonic())))
                s = daemon.command("status")["streams"]
                rates = " ".join(f"{n} {v['mb_per_s']:.1f}" for n, v in s.items())
                lost = sum(v["gaps"] + v["rejected"] for v in s.values())
                console.print(f"  MB/s: {rates}   gaps+rejected: {lost}")
            daemon.command("stop")
            daemon.command("stop", idle=True)
            console.print("[bold]finalize[/bold]: clock alignment, master NWB, validation, seal")
            daemon.command("finalize", session=session["session_id"])
            job = wait_until(lambda: (j := daemon.command("finalize_status", session=session["session_id"]))[
                "state"] != "running" and j, "finalize to finish", 600, every_s=0.5)
        finally:
            if sim is not None:
                sim.stop()
            daemon.stop()
    folder = Path(session["path"])
    print_session_summary(folder)
    if job["state"] != "done":
        console.print(f"[red]finalize failed[/red]: {job['error']}")
        return 1
    console.print("\n".join(summary_lines(job["report"])), highlight=False, soft_wrap=True)  # a table: never wrap
    console.print(f"session folder: [bold]{folder}[/bold]\nmaster NWB: [bold]{folder / job['report']['master']}[/bold]")
    return 0
