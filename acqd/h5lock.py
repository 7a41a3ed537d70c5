"""HDF5's file lock in a process whose other threads start subprocesses.

HDF5 locks a file with ``flock`` when it opens it (shared to read, exclusive to write), and an open that meets
a conflicting lock fails at once: "unable to lock file, errno = 11" (EAGAIN), from within the same process too.
A subprocess that another thread starts meanwhile (a ship worker's rclone, a script's timer) is a fork of this
process: until it has closed its inherited descriptors and exec'd, it holds every open file description of ours,
and with them the lock of a file we have just closed. So a step that writes an HDF5 file and opens it again (the
master written, its sync groups linked, then validated) failed now and then; measured: 1 in 3,000 close-and-reopen
cycles beside a thread running ``/bin/true`` in a loop, more under load. ``written`` and ``wait_unlocked`` wait
for that child instead.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py

UNLOCK_WAIT_S = 10.0
"""How long a lock left with another holder is waited for; a forked child drops it within milliseconds (it closes
its descriptors before exec). After that the next open meets the lock and fails with HDF5's own message."""


def wait_unlocked(path: str | Path, timeout_s: float = UNLOCK_WAIT_S) -> bool:
    """Wait until no open file description holds an HDF5 (``flock``) lock on ``path``; False if one still does
    after ``timeout_s`` (a reader in another process, say: the open that follows says so). A file system whose
    locks do not work this way (NFS emulates ``flock`` with byte-range locks, which a fork does not inherit and an
    exclusive one of which needs a writable descriptor; some support none) has no such lock to wait for: True."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # exclusive: free of readers' locks too
                fcntl.flock(fd, fcntl.LOCK_UN)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.002)
            except OSError:  # EBADF (NFS), ENOLCK, EOPNOTSUPP: HDF5 itself goes on without a lock there
                return True
    finally:
        os.close(fd)


@contextmanager
def written(path: str | Path, mode: str, **kwargs) -> Iterator[h5py.File]:
    """``h5py.File(path, mode, **kwargs)`` to write, closed on exit, then ``wait_unlocked``: the next open of the
    file, by acqd, pynwb or nwbinspector, never meets the lock a subprocess forked meanwhile inherited. An existing
    file is waited for first too: a child forked while it was open to read holds a shared lock, which a write
    open meets as well."""
    if mode in ("r+", "a") and os.path.exists(path):
        wait_unlocked(path)
    with h5py.File(path, mode, **kwargs) as f:
        yield f
    wait_unlocked(path)
