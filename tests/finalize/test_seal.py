"""Sealing's ioctl numbers: chattr's FS_IOC_GETFLAGS/SETFLAGS as each architecture's kernel headers define them."""

from __future__ import annotations

import os
import struct

import pytest

from acqd.finalize.seal import _FS_IOC_GETFLAGS, _FS_IOC_SETFLAGS, ioc_flags_numbers


@pytest.mark.parametrize(("machine", "long_size", "numbers"), [
    ("x86_64", 8, (0x80086601, 0x40086602)),
    ("aarch64", 8, (0x80086601, 0x40086602)),
    ("riscv64", 8, (0x80086601, 0x40086602)),
    ("s390x", 8, (0x80086601, 0x40086602)),
    ("i686", 4, (0x80046601, 0x40046602)),
    ("armv7l", 4, (0x80046601, 0x40046602)),
    ("ppc64le", 8, (0x40086601, 0x80086602)),  # powerpc: 13 size bits, _IOC_READ 2, _IOC_WRITE 4
    ("mips", 4, (0x40046601, 0x80046602)),
    ("mips64", 8, (0x40086601, 0x80086602)),
    ("sparc64", 8, (0x40086601, 0x80086602)),
    ("alpha", 8, (0x40086601, 0x80086602)),
    ("parisc", 4, (0x40046601, 0x80046602)),  # parisc: _IOC_READ 1, _IOC_WRITE 2
])
def test_ioctl_numbers_follow_each_architectures_headers(machine, long_size, numbers):
    assert ioc_flags_numbers(machine, long_size) == numbers


def test_this_machine_uses_its_own_numbers():
    assert (_FS_IOC_GETFLAGS, _FS_IOC_SETFLAGS) == ioc_flags_numbers(os.uname().machine, struct.calcsize("l"))


def test_a_file_renamed_away_while_the_folder_is_scanned_is_skipped(tmp_path, monkeypatch):
    """Regression: a second finalize scanned the session folder while the daemon's scrub wrote scrub.json through a
    temporary file; the temporary file was renamed between the listing and its lstat, and finalize died with
    FileNotFoundError (seen in the lifecycle test under load)."""
    from acqd.finalize import integrity

    (tmp_path / "session.json").write_text("{}")
    tmp = tmp_path / ".scrub.json.abc123"
    tmp.write_text("{}")
    real_walk = os.walk

    def walk_then_rename(top, *a, **k):
        for entry in real_walk(top, *a, **k):
            if tmp.exists():
                tmp.rename(tmp_path / "scrub.json")  # the atomic write's rename, after the listing
            yield entry

    monkeypatch.setattr(integrity.os, "walk", walk_then_rename)
    files, dirs, problems = integrity.scan_folder(tmp_path)
    assert [p.name for p in files] == ["session.json"]  # listed before the rename: neither name is there after
    assert problems == []
