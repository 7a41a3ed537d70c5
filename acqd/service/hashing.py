"""The daemon's side of hashing closed parts while recording: one hasher process per recorded session.

The hasher itself (``python -m acqd.finalize.hasher``: low CPU and idle I/O priority, dies with the daemon) and
``digests.jsonl`` (``acqd.finalize.digests``) belong to finalize. This module starts a session's hasher when its
first part closes, hands it every part a writer closes (one JSON line on its stdin), tells it that no more will come
when the session closes (its stdin is closed: it finishes the queue and exits), and counts what it has still to hash
(``backlog_bytes``, in status as ``hash_backlog_bytes``) from the ``done`` lines it prints.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from acqd.service.procs import stop_process

log = logging.getLogger("acqd")


class Hasher:
    """One session's hasher process and the parts handed to it that it has not reported done. Both pipes are
    non-blocking: the supervisor's loop never waits on a hasher that is behind."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.proc = subprocess.Popen([sys.executable, "-m", "acqd.finalize.hasher", str(folder), str(os.getpid())],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        os.set_blocking(self.proc.stdin.fileno(), False)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.pending: dict[str, int] = {}
        self._outbox = b""
        self._inbox = b""
        self._finished = False

    def queue(self, stream: str, path: Path) -> None:
        rel = os.path.relpath(path, self.folder)
        try:
            self.pending[rel] = path.stat().st_size
        except OSError:
            return
        self._outbox += json.dumps({"path": rel, "stream": stream}).encode() + b"\n"
        self._send()

    def finish(self) -> None:
        """No more parts: it exits once it has hashed the queue (or once finalize takes over)."""
        self._finished = True
        self._send()

    def _send(self) -> None:
        if self.proc.stdin.closed:
            return
        try:
            while self._outbox:
                self._outbox = self._outbox[os.write(self.proc.stdin.fileno(), self._outbox):]
        except BlockingIOError:
            return  # the pipe is full: the rest goes at the next poll
        except OSError:  # it exited (finalize began, or it failed): finalize hashes the rest
            self._outbox = b""
        if self._finished:
            self.proc.stdin.close()

    def poll(self) -> bool:
        """Hand over what is queued, take its ``done`` lines; False once it has exited (and been reaped)."""
        self._send()
        lines, self._inbox = read_json_lines(self.proc, self._inbox)
        for line in lines:
            try:
                self.pending.pop(line["done"], None)
            except (KeyError, TypeError):
                continue
        if self.proc.poll() is None:
            return True
        if self.proc.returncode:
            log.warning("the hasher of %s exited with code %s; finalize hashes what it left", self.folder,
                        self.proc.returncode)
        for pipe in (self.proc.stdin, self.proc.stdout):
            pipe.close()
        return False


class Hashers:
    """Every session's hasher that is still running."""

    def __init__(self) -> None:
        self.running: dict[Path, Hasher] = {}

    def queue(self, folder: Path, stream: str, path: Path) -> None:
        if folder not in self.running:
            self.running[folder] = Hasher(folder)
        self.running[folder].queue(stream, path)

    def finish(self, folder: Path) -> None:
        if folder in self.running:
            self.running[folder].finish()

    def poll(self) -> None:
        for folder, h in list(self.running.items()):
            if not h.poll():
                del self.running[folder]

    def backlog_bytes(self) -> int:
        return sum(sum(h.pending.values()) for h in self.running.values())

    def stop(self) -> None:
        """The daemon leaves: hashers stop at once (finalize hashes whatever they had not)."""
        for h in self.running.values():
            stop_process(h.proc, timeout_s=10)
            h.poll()
        self.running.clear()


def read_json_lines(proc: subprocess.Popen, inbox: bytes) -> tuple[list, bytes]:
    """The JSON lines a child with a non-blocking stdout has printed since, and what is left of a partial line."""
    try:
        while chunk := os.read(proc.stdout.fileno(), 65536):
            inbox += chunk
    except BlockingIOError:
        pass
    *lines, inbox = inbox.split(b"\n")
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out, inbox
