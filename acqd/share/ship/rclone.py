"""rclone command lines for shipping, and what rclone says back (its ``--use-json-log`` lines and hashsum output).

rclone does the copying, retrying and hashing; this module only builds its arguments and reads its output:
``copy --checksum --files-from`` (exactly the manifest's files: nothing else in the folder leaves the rig),
``hashsum sha256`` at the destination (``--download``: read back and hashed locally, for backends without sha256),
``rcat`` for READY.json and ``deletefile``. ``reason`` turns rclone's errors into one line a person can act on.
The child runs at nice 19 and the idle I/O class and dies with its parent (a daemon killed -9 leaves no rclone
copying behind it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from acqd.finalize.background import lower_priority
from acqd.record.launch import die_with_parent
from acqd.config.ship import ShipDestination
from acqd.share.ship import stall

RCLONE: str | None = None
"""The rclone program to run; None: ``$ACQD_RCLONE`` (read at each run, as acqd's other variables are), else
``rclone`` on the PATH."""
STALL_CHECK_S = 1.0
"""How often a running rclone is looked at for a stall."""
STALL_KILL_S = 10.0
"""A stalled rclone that a SIGTERM did not end within this long is killed."""

# rclone's error texts -> what the operator should do (first match wins; rclone wording of 1.60).
_REASONS = (
    ("no space left on device", "destination full (no space left on device)"),
    ("too big for remaining disk space", "destination full (no space left on device)"),
    ("quota", "destination full (quota exceeded)"),
    ("read-only file system", "destination is read-only"),
    ("permission denied", "permission denied at the destination (read-only, or wrong owner)"),
    ("unable to authenticate", "wrong credentials for the destination (ssh authentication failed)"),
    ("ssh: handshake failed", "ssh handshake with the destination failed (credentials or host key)"),
    ("knownhosts", "the destination's host key is not the known one"),
    ("didn't find section in config file", "the destination's rclone remote is not in the rclone config"),
    ("connection refused", "the destination refuses connections (server down?)"),
    ("no route to host", "no route to the destination (network down?)"),
    ("i/o timeout", "the destination does not answer (network down?)"),
    ("connection reset", "the connection to the destination was reset"),
    ("connection lost", "the connection to the destination was lost"),
    ("directory not found", "a folder was not found at the destination or locally"),
)


@dataclass(frozen=True, slots=True)
class Stats:
    """One of rclone's periodic stats lines."""

    bytes: int
    total_bytes: int
    speed: float
    """Bytes per second over the last interval."""
    eta_s: float | None
    transfers: int


def remote_path(dest: ShipDestination, *parts: str) -> str:
    """``dest.remote`` joined with ``parts`` ('/'-separated, as rclone names paths on every backend)."""
    return "/".join([dest.remote.rstrip("/") or "/", *parts]) if parts else dest.remote


def program() -> str:
    return RCLONE or os.environ.get("ACQD_RCLONE") or "rclone"


def base_args(dest: ShipDestination) -> list[str]:
    args = [program()]
    if dest.rclone_config is not None:
        args += ["--config", str(dest.rclone_config)]
    return args


def copy_args(dest: ShipDestination, src: Path, dst: str, files_from: Path, bwlimit: str | None,
              resend: bool = False) -> list[str]:
    """``rclone copy`` of exactly the files listed in ``files_from`` (one relative path a line), compared by
    checksum (a file that differs only in content is sent again), with stats as JSON once a second.
    ``resend``: every listed file is sent whatever is at the destination (``--ignore-times``): where the backends
    share no hash (SFTP) rclone's ``--checksum`` falls back to comparing sizes and would skip a file that arrived
    with its size but other bytes.
    ``--ignore-checksum``: rclone does not hash what it copied to check it (on the local backend it computes every
    hash it knows as it copies: 3.2 % of a core at 4 MB/s, 0.3 % without); acqd hashes every file at the
    destination against the manifest anyway, and re-sends what differs."""
    args = [*base_args(dest), "copy", str(src), dst, "--files-from-raw", str(files_from), "--checksum",
            "--ignore-checksum",
            "--retries", str(dest.retries), "--low-level-retries", str(dest.low_level_retries),
            "--use-json-log", "--stats", "1s", "--stats-log-level", "NOTICE", "--log-level", "NOTICE",
            "--no-traverse"]
    if resend:
        args.append("--ignore-times")
    if bwlimit and bwlimit.lower() != "off":
        args += ["--bwlimit", bwlimit]
    if supports("--partial-suffix"):  # rclone >= 1.63 writes partial files under a suffix; 1.60 in place
        args += ["--partial-suffix", ".acqd-partial"]
    return args


def hashsum_args(dest: ShipDestination, dst: str, files_from: Path, download: bool) -> list[str]:
    args = [*base_args(dest), "hashsum", "sha256", dst, "--files-from-raw", str(files_from),
            "--retries", "1", "--low-level-retries", str(dest.low_level_retries)]
    return args + ["--download"] if download else args


def rcat_args(dest: ShipDestination, dst: str) -> list[str]:
    return [*base_args(dest), "rcat", dst, "--low-level-retries", str(dest.low_level_retries)]


def deletefile_args(dest: ShipDestination, dst: str) -> list[str]:
    return [*base_args(dest), "deletefile", dst, "--low-level-retries", str(dest.low_level_retries)]


@cache
def supports(flag: str) -> bool:
    """Whether this rclone knows ``flag`` (its global flags list)."""
    try:
        out = subprocess.run([program(), "help", "flags"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return f"{flag} " in out


def parse_log_line(line: str) -> tuple[Stats | None, str | None]:
    """One ``--use-json-log`` line -> (stats, error message); a line that is not rclone's JSON is an error text
    (rclone prints its final 'Failed to ...' line without JSON)."""
    line = line.strip()
    if not line:
        return None, None
    try:
        rec = json.loads(line)
    except ValueError:
        return None, line
    if not isinstance(rec, dict):
        return None, line
    if isinstance(s := rec.get("stats"), dict):
        return Stats(bytes=int(s.get("bytes", 0)), total_bytes=int(s.get("totalBytes", 0)),
                     speed=float(s.get("speed") or 0.0), eta_s=s.get("eta"), transfers=int(s.get("transfers", 0))), None
    if rec.get("level") in ("error", "critical"):
        obj = f"{rec['object']}: " if rec.get("object") else ""
        return None, f"{obj}{rec.get('msg', '')}".strip()
    return None, None


def parse_hashsum(text: str) -> dict[str, str]:
    """sha256sum-format lines -> {path: digest}; rclone writes UNSUPPORTED (or an empty hash) where the backend has
    none, and those are left out."""
    out = {}
    for line in text.splitlines():
        digest, sep, name = line.partition("  ")
        if sep and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
            out[name] = digest
    return out


def reason(errors: Iterable[str], returncode: int) -> str:
    """One line saying why rclone failed: the known cause of its first recognised error, else its last error."""
    errors = [e for e in errors if e]
    for text in errors:
        low = text.lower()
        for needle, why in _REASONS:
            if needle in low:
                return why
    if returncode < 0:
        return f"rclone was killed ({signal.Signals(-returncode).name})"
    tail = errors[-1] if errors else "no message"
    return f"rclone exited {returncode}: {tail[:300]}"


def _child() -> None:
    """In the rclone child before exec: die with the thread that started it, lowest CPU and I/O priority."""
    die_with_parent()
    lower_priority()


@dataclass
class Run:
    """An rclone process: started, its stderr read line by line (``on_line``), stoppable from another thread."""

    args: list[str]
    proc: subprocess.Popen | None = None
    stalled: str | None = None
    """Why the watchdog stopped it (``stall``), if it did."""

    def start(self, stdin: bytes | None = None) -> None:
        self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_child)
        if stdin is not None:
            self.proc.stdin.write(stdin)
            self.proc.stdin.close()

    def wait(self, on_line: Callable[[str], None], timeout_s: float, stall_s: float | None = None) -> tuple[int, str]:
        """Read stderr lines until rclone exits (stopped after ``timeout_s``, or once it moved nothing for
        ``stall_s``: ``stalled`` says so); (returncode, stdout)."""
        out: list[bytes] = []
        reader = threading.Thread(target=lambda: out.append(self.proc.stdout.read()), daemon=True)
        reader.start()
        timer = threading.Timer(timeout_s, self.stop)
        timer.start()
        done = threading.Event()
        if stall_s is not None:
            threading.Thread(target=self._watch, args=(stall_s, done), name="rclone-watch", daemon=True).start()
        try:
            for raw in self.proc.stderr:
                on_line(raw.decode(errors="replace"))
            rc = self.proc.wait()
        finally:
            timer.cancel()
            done.set()
        reader.join(10)
        return rc, (out[0] if out else b"").decode(errors="replace")

    def _watch(self, stall_s: float, done: threading.Event) -> None:
        """Stop rclone once it stalled (``stall.StallClock``); kill it if SIGTERM does not end it."""
        clock, pid = stall.StallClock(stall_s), self.proc.pid
        while not done.wait(STALL_CHECK_S):
            if (read := stall.read_chars(pid)) is None:
                return  # exited, or no /proc: rclone's own --timeout is all there is
            if clock.feed(time.monotonic(), read, lambda: stall.run_delays(pid)):
                self.stalled = (f"rclone stalled: nothing moved for {stall_s:.0f} s while it could run "
                                f"(the destination stopped answering?)")
                self.stop()
                if not done.wait(STALL_KILL_S):
                    self.proc.kill()
                return

    def stop(self) -> None:
        """SIGTERM: rclone stops where it is; the next run copies only what is still missing or different."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
