"""The daemon's runtime folder and the locks that keep one daemon per rig.

Every daemon gets a private folder (mode 0700, removed on exit) under the runtime base: ``$ACQD_RUNTIME_DIR``,
else ``$XDG_RUNTIME_DIR/acqd``, else ``/run/acqd`` when it can be created, else ``<tmp>/acqd-<uid>``. The writer
control socket lives there as an ``ipc://`` endpoint, so only the daemon's own user can reach it.

Beside those folders, ``endpoints/`` holds one lock file per data endpoint (named by a hash of the endpoint).
A daemon holds an exclusive ``flock`` on each of its streams' endpoints for as long as it runs, so a second
daemon with the same rig config (on any data root) is refused before it connects to a driver: with PUSH/PULL
it would otherwise take messages from the first one's streams. The data root has its own lock
(``lock_data_root``): a second daemon there would corrupt the first one's session records.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from acqd.errors import SessionError

RUNTIME_ENV = "ACQD_RUNTIME_DIR"


def runtime_base() -> Path:
    """The folder that holds every daemon's runtime folder and the endpoint locks (created 0700)."""
    candidates = [os.environ.get(RUNTIME_ENV)]
    if os.environ.get("XDG_RUNTIME_DIR"):
        candidates.append(os.path.join(os.environ["XDG_RUNTIME_DIR"], "acqd"))
    candidates += ["/run/acqd", os.path.join(tempfile.gettempdir(), f"acqd-{os.getuid()}")]
    for c in filter(None, candidates):
        try:
            os.makedirs(c, mode=0o700, exist_ok=True)
        except OSError:
            continue
        st = os.stat(c)
        if st.st_uid == os.getuid() and os.access(c, os.W_OK):
            return Path(c)
    raise SessionError(f"no usable runtime folder (tried {', '.join(filter(None, candidates))}): "
                       f"set {RUNTIME_ENV} to a folder this user owns")


def make_daemon_dir(base: Path) -> Path:
    """A fresh private folder for this daemon (0700); folders left by daemons that died are removed first."""
    for old in base.glob("daemon-*"):
        pid = old.name.split("-")[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"daemon-{os.getpid()}-", dir=base))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_endpoints(base: Path, endpoints: Iterable[tuple[str, str]]) -> list[tuple[int, Path]]:
    """Hold every (stream, endpoint) exclusively; refuse, naming the endpoint, if another daemon holds one."""
    folder = base / "endpoints"
    folder.mkdir(mode=0o700, exist_ok=True)
    for stale in folder.glob("*.lock"):  # left by daemons that were killed: free, so lockable
        if (fd := _lock(stale)) is not None:
            release([(fd, stale)])
    held: list[tuple[int, Path]] = []
    try:
        for stream, endpoint in endpoints:
            path = folder / (hashlib.sha256(endpoint.encode()).hexdigest()[:32] + ".lock")
            fd = _lock(path)
            if fd is None:
                owner = path.read_text(errors="replace").strip() or "unknown"
                raise SessionError(f"endpoint {endpoint} (stream {stream!r}) is already served by another acqd "
                                   f"({owner}); one daemon per rig config: stop it first")
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()}, {endpoint}\n".encode())
            held.append((fd, path))
    except BaseException:
        release(held)
        raise
    return held


def _lock(path: Path) -> int | None:
    """An exclusive flock on ``path``, or None if another process holds it. A lock file is unlinked by its
    holder on release, so after locking, the path must still name the locked file (else lock the new one)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # released and unlinked by its holder in between: try the file now at that path


def release(held: list[tuple[int, Path]]) -> None:
    """Unlink and unlock (in that order, so no one locks a file that is about to disappear)."""
    for fd, path in held:
        path.unlink(missing_ok=True)
        os.close(fd)
    held.clear()


def lock_data_root(root: Path) -> int:
    """One daemon per data root: a second one would corrupt the first one's session records."""
    fd = os.open(root / ".acqd.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SessionError(f"another acqd is already serving {root}") from None
    return fd
