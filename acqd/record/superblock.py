"""What an HDF5 file's superblock says its size is, read without HDF5 (a part may be truncated or empty).

HDF5 trusts the superblock: opened in SWMR-read mode (which skips the library's own "truncated file" check), a
file cut below the end-of-file address its superblock records makes reads of its metadata retry for ever (over
600 s seen on ``/index``). Before any SWMR open acqd reads that address itself (``part_problem``) and refuses
such a file, so that a truncated, empty or headerless part is reported as lost instead of hanging the reader.

The layout is the HDF5 file format specification's, section "Superblock": the 8-byte signature is searched at
offset 0, then 512, 1024, 2048, ... (after a user block); the end-of-file address is relative to the base
address in the specification's words, but HDF5 stores (and checks, ``H5F__super_read``) the file's whole size
there, user block included (measured: a file with a 1024-byte user block records its full length). Versions 0 and 1 hold it after the free-space address, behind fields
of fixed size (version 1 has 4 more bytes); versions 2 and 3 hold it after the superblock extension address.
"""

from __future__ import annotations

import os
from pathlib import Path

SIGNATURE = b"\x89HDF\r\n\x1a\n"
HEAD_BYTES = 64 << 10  # how much of a file is searched for the signature (acqd never writes a user block)


def _uint(buf: bytes, at: int, size: int) -> int | None:
    """A little-endian unsigned integer of ``size`` bytes at ``at``; None if ``buf`` ends before it."""
    if at < 0 or at + size > len(buf):
        return None
    return int.from_bytes(buf[at:at + size], "little")


def _eof_of_superblock(buf: bytes, at: int) -> int | None:
    """The end-of-file address (the file size HDF5 expects) of the superblock whose signature is at ``at``, or None if unreadable."""
    version = _uint(buf, at + 8, 1)
    if version in (0, 1):
        # version, free-space version, root-group version, reserved, shared-header version: 5 bytes; then the
        # sizes of offsets and lengths, a reserved byte, two 2-byte K values and 4 bytes of flags (v1: 4 more).
        sizes_at, fields_at = at + 13, at + 24 + (4 if version == 1 else 0)
    elif version in (2, 3):
        # version, then the sizes of offsets and lengths, then the consistency flags: 4 bytes in all.
        sizes_at, fields_at = at + 9, at + 12
    else:
        return None
    offsets = _uint(buf, sizes_at, 1)
    if offsets not in (2, 4, 8, 16, 32):  # the sizes the specification allows
        return None
    base = _uint(buf, fields_at, offsets)
    eof = _uint(buf, fields_at + 2 * offsets, offsets)  # after the base and the free-space/extension address
    undefined = (1 << (8 * offsets)) - 1  # all bytes 0xff
    if base is None or eof is None or undefined in (base, eof):
        return None  # cut off, or undefined
    return eof


def superblock_eof(head: bytes) -> int | None:
    """The end-of-file address (absolute, bytes) that the first superblock found in ``head`` records, or None if
    ``head`` holds no superblock that can be read (no signature, an unknown version, or too few bytes)."""
    at = 0
    while at + len(SIGNATURE) <= len(head):
        if head[at:at + len(SIGNATURE)] == SIGNATURE:
            return _eof_of_superblock(head, at)
        at = 512 if at == 0 else at * 2
    return None


def left_open(head: bytes) -> bool:
    """Whether the superblock in ``head`` still carries a writer's file-consistency flags (versions 2 and 3: byte 11;
    bit 0 write access, bit 2 SWMR write): its writer never closed it, and readers must open it in SWMR mode. A
    file without a readable superblock counts as left open (nobody vouches for it)."""
    at = 0
    while at + len(SIGNATURE) <= len(head):
        if head[at:at + len(SIGNATURE)] == SIGNATURE:
            version, flags = _uint(head, at + 8, 1), _uint(head, at + 11, 1)
            return version not in (0, 1) and (flags is None or bool(flags & 0b101))
        at = 512 if at == 0 else at * 2
    return True


def read_head(path: Path) -> tuple[int, bytes]:
    """(size, first HEAD_BYTES bytes) of ``path``, opened without following a link."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        return os.fstat(fd).st_size, os.pread(fd, HEAD_BYTES, 0)
    finally:
        os.close(fd)


def part_problem(path: Path) -> str | None:
    """None if ``path`` is at least as long as its superblock says; else why it cannot be read safely: empty,
    headerless, or truncated (with both sizes). Raises OSError if it cannot be opened at all."""
    size, head = read_head(path)
    if size == 0:
        return "empty (0 bytes): no HDF5 header was ever written"
    eof = superblock_eof(head)
    if eof is None:
        return f"no readable HDF5 superblock in its {size} bytes (headerless)"
    if size < eof:
        return f"truncated: {size} bytes of the {eof} its HDF5 superblock records"
    return None


def file_size(path: Path) -> int:
    """Bytes of ``path`` (0 if it is gone): what a lost part is reported with."""
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0

