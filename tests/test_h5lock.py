"""An HDF5 file written and opened again while a subprocess holds the lock it inherited (acqd.h5lock)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from acqd.h5lock import wait_unlocked, written

HELD_S = 0.5


def child_holding(f: h5py.File) -> subprocess.Popen:
    """A subprocess that keeps ``f``'s open file description (and so HDF5's lock on it) for ``HELD_S``: what a
    fork by another thread holds until it execs, made to last."""
    fd = f.id.get_vfd_handle()
    return subprocess.Popen(["sleep", str(HELD_S)], pass_fds=(fd,))


def test_reopening_a_file_a_child_still_holds_fails_without_waiting(tmp_path: Path):
    path = tmp_path / "a.h5"
    with h5py.File(path, "x") as f:
        f["d"] = np.arange(3)
        child = child_holding(f)
    try:
        with pytest.raises(OSError, match="unable to lock file"):
            h5py.File(path, "r")
    finally:
        child.wait(timeout=10)


def test_written_waits_for_the_child_then_the_file_opens(tmp_path: Path):
    path = tmp_path / "a.h5"
    with written(path, "x") as f:
        f["d"] = np.arange(3)
        child = child_holding(f)
        started = time.monotonic()
    try:
        assert time.monotonic() - started >= HELD_S * 0.9  # it waited for the child
        with h5py.File(path, "r+") as f:
            assert f["d"][:].tolist() == [0, 1, 2]
    finally:
        child.wait(timeout=10)


def test_a_lock_held_longer_than_the_deadline_is_reported_not_waited_for_ever(tmp_path: Path):
    path = tmp_path / "a.h5"
    with h5py.File(path, "x") as f:
        f["d"] = np.arange(3)
        with h5py.File(path, "r"):  # the same file, open twice in this process: HDF5 shares one lock
            assert not wait_unlocked(path, timeout_s=0.05)
    assert wait_unlocked(path, timeout_s=0.05)


def test_a_write_open_waits_for_the_child_of_a_reader(tmp_path: Path):
    """A child forked while the file was open to read holds a shared lock: ``written(..., "r+")`` waits for it
    before it opens (finalize reads a part, then adds its NWB attributes)."""
    path = tmp_path / "a.h5"
    with h5py.File(path, "x") as f:
        f["d"] = np.arange(3)
    with h5py.File(path, "r") as f:
        child = child_holding(f)
        started = time.monotonic()
    try:
        with written(path, "r+") as f:
            f.attrs["unit"] = "uV"
        assert time.monotonic() - started >= HELD_S * 0.9
    finally:
        child.wait(timeout=10)


def test_a_file_system_without_flock_locks_is_not_waited_for(tmp_path: Path, monkeypatch):
    """NFS emulates flock with byte-range locks (an exclusive one on a read-only descriptor: EBADF); some file
    systems have none (ENOLCK): there is no inherited lock to wait for, and HDF5 goes on without one."""
    import errno
    import fcntl

    path = tmp_path / "a.h5"
    path.write_bytes(b"")
    for code in (errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP):
        def refuse(fd, op, code=code):
            raise OSError(code, os.strerror(code))
        monkeypatch.setattr(fcntl, "flock", refuse)
        assert wait_unlocked(path, timeout_s=5)
