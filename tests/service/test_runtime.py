"""The daemon's runtime folder and endpoint locks, in one process (flock conflicts between open files)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from acqd.errors import SessionError
from acqd.service.runtime import lock_endpoints, make_daemon_dir, release, runtime_base


def test_an_endpoint_is_held_once_and_freed_with_its_lock_file(tmp_path, monkeypatch):
    monkeypatch.setenv("ACQD_RUNTIME_DIR", str(tmp_path / "run"))
    base = runtime_base()
    assert base == tmp_path / "run" and base.stat().st_mode & 0o777 == 0o700
    held = lock_endpoints(base, [("a", "ipc:///x/a"), ("b", "tcp://127.0.0.1:5551")])
    with pytest.raises(SessionError, match=r"endpoint tcp://127.0.0.1:5551 \(stream 'b'\) is already served by "
                                           rf"another acqd \(pid {os.getpid()}, tcp://127.0.0.1:5551\)"):
        lock_endpoints(base, [("c", "ipc:///x/c"), ("b", "tcp://127.0.0.1:5551")])
    assert len(list((base / "endpoints").iterdir())) == 2  # the refused attempt released what it took
    release(held)
    assert list((base / "endpoints").iterdir()) == []
    again = lock_endpoints(base, [("b", "tcp://127.0.0.1:5551")])
    release(again)


def test_lock_files_and_folders_left_by_a_killed_daemon_are_swept(tmp_path, monkeypatch):
    monkeypatch.setenv("ACQD_RUNTIME_DIR", str(tmp_path / "run"))
    base = runtime_base()
    code = ("import os, sys; from pathlib import Path; from acqd.service.runtime import lock_endpoints, make_daemon_dir;"
            f"lock_endpoints(Path({str(base)!r}), [('s', 'ipc:///y')]); make_daemon_dir(Path({str(base)!r}));"
            "os.kill(os.getpid(), 9)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == -9
    assert len(list((base / "endpoints").iterdir())) == 1 and len(list(base.glob("daemon-*"))) == 1
    held = lock_endpoints(base, [("s", "ipc:///y")])  # the dead holder's lock is free: taken over
    mine = make_daemon_dir(base)
    assert list(base.glob("daemon-*")) == [mine] and mine.stat().st_mode & 0o777 == 0o700
    release(held)
