"""Finalize refuses a session while a process holds one of its files open for writing, and only then."""

from __future__ import annotations

import os

from acqd.finalize import _held_open, _open_for_writing


def test_a_file_held_for_writing_is_found_and_a_reader_or_a_descriptor_closed_meanwhile_is_not(tmp_path):
    path = tmp_path / "probe.h5"
    path.write_bytes(b"\x89HDF")
    reader = os.open(path, os.O_RDONLY)  # the daemon's hasher, a live preview
    try:
        assert _held_open([path]) == []
        writer = os.open(path, os.O_RDWR)
        assert _held_open([path]) == [(path, os.getpid())]
        os.close(writer)
    finally:
        os.close(reader)
    # Listed in /proc/PID/fd, then closed before its flags were read (a hasher done with a part that just closed):
    # not held. Counted as held, it could make finalize on stop refuse "files are still open in another process".
    assert not _open_for_writing(str(os.getpid()), str(reader))
