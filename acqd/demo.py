"""``acqd demo``: a whole simulated rig session end to end, with real processes and sockets.

Starts the daemon and the simulated rig as subprocesses, acquires, records for a while, stops,
and prints what each stream file holds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from acqd.api import Client
from acqd.status import print_session_summary

console = Console()


def wait_until(cond, what: str, timeout_s: float = 60.0, every_s: float = 0.1):
    """Poll ``cond`` until it returns something truthy, or raise TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


def start_daemon(config: Path, data_root: Path, workdir: Path) -> tuple[subprocess.Popen, Client]:
    """Start ``acqd serve`` on a free port; returns the process and a client once the API answers."""
    ready = workdir / "daemon.json"
    proc = subprocess.Popen([sys.executable, "-m", "acqd.cli", "serve", "--config", str(config), "--data-root",
                             str(data_root), "--port", "0", "--ready-file", str(ready)], stdin=subprocess.DEVNULL)
    wait_until(lambda: ready.exists() or proc.poll() is not None, "the daemon to start")
    if proc.poll() is not None:
        raise RuntimeError(f"the daemon exited with code {proc.returncode}")
    return proc, Client(json.loads(ready.read_text())["url"])


def stop_process(proc: subprocess.Popen, timeout_s: float = 60.0) -> int:
    """SIGTERM, wait, then SIGKILL if it must: a process is always reaped."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def demo(config: Path, data_root: Path, seconds: float) -> int:
    data_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="acqd-demo-") as tmp:
        work = Path(tmp)
        daemon, client = start_daemon(config, data_root, work)
        sim = None
        try:
            console.print("[bold]acquire[/bold]: starting one writer per stream")
            client.command("acquire")
            sim = subprocess.Popen([sys.executable, "-m", "acqd.cli", "simulate", "--config", str(config),
                                    "--seconds", str(seconds + 30), "--truth", str(work / "truth.json")],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            wait_until(lambda: not client.command("preflight")["problems"], "every stream to deliver data")
            status = client.command("record", metadata={"session_description": "acqd demo session"})
            session = status["session"]
            console.print(f"[bold]record[/bold]: session {session['session_id']} for {seconds:.0f} s")
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                time.sleep(min(2.0, max(0.0, end - time.monotonic())))
                s = client.command("status")["streams"]
                console.print("  " + "  ".join(f"{n} {v['mb_per_s']:.1f} MB/s gaps {v['gaps']}" for n, v in s.items()))
            client.command("stop")
            client.command("stop", idle=True)
        finally:
            if sim is not None:
                stop_process(sim)
            stop_process(daemon)
    folder = Path(session["path"])
    print_session_summary(folder)
    console.print(f"session folder: [bold]{folder}[/bold]")
    return 0
