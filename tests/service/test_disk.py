"""The disk reserve (unit, free space faked): a warning once below twice the reserve, re-armed above it, and
the stop below the reserve."""

from __future__ import annotations

import shutil
from collections import namedtuple

from acqd.service.disk import DiskReserve

Usage = namedtuple("Usage", "total used free")


def test_warn_once_then_stop_at_the_reserve(tmp_path, monkeypatch):
    free = [10_000]
    monkeypatch.setattr(shutil, "disk_usage", lambda root: Usage(0, 0, free[0]))
    said: list[tuple] = []
    disk = DiskReserve(1000, lambda stream, kind, detail, incomplete=False: said.append((kind, incomplete)))
    steps = [(5000, False, []), (1500, False, [("disk_low", False)]), (1400, False, []),
             (3000, False, []), (1900, False, [("disk_low", False)]), (900, True, [("disk_full", True)])]
    for value, reached, incidents in steps:
        free[0], said[:] = value, []
        assert disk.reached(tmp_path) is reached and said == incidents, value


def test_a_vanished_data_root_is_left_to_the_writers(tmp_path):
    disk = DiskReserve(1000, lambda *a, **k: None)
    assert disk.reached(tmp_path / "gone") is False


def test_a_data_root_gone_while_the_daemon_runs_is_named_by_status_and_preflight(tmp_path):
    """Status and preflight read the free space of the data root: once it is gone (a disk unmounted under a
    running daemon) they say so instead of failing every command with a traceback."""
    from acqd.config import load_config
    from acqd.service.supervisor import Supervisor
    from tests.conftest import write_rig

    sup = Supervisor(load_config(write_rig(tmp_path)))
    try:
        assert sup.status()["disk_free_bytes"] > 0
        shutil.rmtree(sup.data_root)
        status = sup.status()
        assert status["disk_free_bytes"] is None
        assert any("cannot be read" in p for p in sup.preflight())
    finally:
        sup.shutdown()
