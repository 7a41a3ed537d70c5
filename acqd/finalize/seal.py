"""Sealing a session folder, unsealing it, and its sha256 manifest.

This module owns what makes a finalized session tamper-evident: every file read-only and immutable (the
``chattr +i`` flag, set through the ioctl chattr(1) uses), ``manifest.sha256`` (sha256sum format: every file
but itself and ``session.json``), checking a folder against it, and undoing the seal (tests, admins).
"""

from __future__ import annotations

import array
import errno
import fcntl
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from acqd.finalize.layout import MANIFEST, rel
from acqd.session import SESSION_FILE, write_bytes_atomic

# chattr +i through the ioctl chattr(1) uses (linux/fs.h): root can still write a 0444 file, not an immutable one.
_FS_IOC_GETFLAGS, _FS_IOC_SETFLAGS, _FS_IMMUTABLE_FL = 0x80086601, 0x40086602, 0x10
_OPEN_FOR_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW


# -- read-only and immutable -------------------------------------------------------------------------------------


def seal_paths(paths: list[Path]) -> dict:
    """chmod 0444, then chattr +i (root ignores 0444, not the immutable flag). Reports, honestly, what held."""
    errors = []
    for p in paths:
        _set_immutable(p, False)  # sealed by an earlier, killed run: chmod would fail on an immutable file
        os.chmod(p, 0o444)
        err = _set_immutable(p, True)
        if err:
            errors.append(f"{p.name}: {err}")
    return {"files": len(paths), "read_only": True, "immutable": not errors,
            "immutable_error": errors[0] if errors else None}


def merge_seal(into: dict, more: dict) -> None:
    """Add a later ``seal_paths`` result to an earlier one."""
    into["files"] += more["files"]
    into["immutable"] = into["immutable"] and more["immutable"]
    into["immutable_error"] = into["immutable_error"] or more["immutable_error"]


def unseal(paths: list[Path]) -> None:
    """Clear the immutable flag and restore owner write on those of ``paths`` that exist."""
    for p in paths:
        if p.exists():
            _set_immutable(p, False)
            os.chmod(p, os.stat(p).st_mode | 0o200)


def unseal_session(folder: Path) -> None:
    """Clear the immutable flag and restore owner write on every file of a session (tests, admins)."""
    unseal(sorted(p for p in Path(folder).rglob("*") if p.is_file()))


def _set_immutable(path: Path, on: bool) -> str | None:
    """Set or clear the immutable flag (FS_IOC_SETFLAGS, as chattr does); the error text if the filesystem or our
    privileges do not allow it (tmpfs, overlayfs, not root)."""
    try:
        fd = os.open(path, _OPEN_FOR_FLAGS)
    except OSError as e:
        return e.strerror
    try:
        flags = _get_flags(fd)
        new = flags | _FS_IMMUTABLE_FL if on else flags & ~_FS_IMMUTABLE_FL
        if new != flags:
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, array.array("i", [new]), True)
        return None
    except OSError as e:
        return f"chattr {'+' if on else '-'}i not possible: {errno.errorcode.get(e.errno, e.errno)} ({e.strerror})"
    finally:
        os.close(fd)


def is_immutable(path: Path) -> bool:
    """Whether ``path`` has the immutable flag (False where flags cannot be read)."""
    try:
        fd = os.open(path, _OPEN_FOR_FLAGS)
    except OSError:
        return False
    try:
        return bool(_get_flags(fd) & _FS_IMMUTABLE_FL)
    except OSError:
        return False
    finally:
        os.close(fd)


def _get_flags(fd: int) -> int:
    flags = array.array("i", [0])
    fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags, True)
    return flags[0]


# -- the manifest ---------------------------------------------------------------------------------------------------


def manifest_files(folder: Path) -> list[Path]:
    """The files the manifest covers: all but itself, ``session.json`` (it changes last, at the commit point) and
    the temporary files of an atomic ``session.json`` write."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (SESSION_FILE, MANIFEST)
                  and not p.name.startswith(f".{SESSION_FILE}."))


def write_manifest(folder: Path, paths: list[Path], progress: Callable[[int, int], None]) -> None:
    """Hash ``paths`` into ``manifest.sha256`` (written atomically); ``progress`` gets the bytes hashed so far and
    in all."""
    lines, total = [], sum(p.stat().st_size for p in paths) or 1
    done = 0
    for p in paths:
        lines.append(f"{_sha256(p)}  {rel(p, folder)}\n")
        done += p.stat().st_size
        progress(done, total)
    write_bytes_atomic(folder / MANIFEST, "".join(lines).encode())


def verify_manifest(folder: Path) -> list[str]:
    """Problems found checking the session against its manifest (empty: every file there and unchanged)."""
    folder = Path(folder)
    try:
        text = (folder / MANIFEST).read_text()
    except OSError as e:
        return [f"{MANIFEST}: {e.strerror}"]
    listed = {}
    for line in text.splitlines():
        digest, _, name = line.partition("  ")
        listed[name] = digest
    problems = []
    for name, digest in sorted(listed.items()):
        p = folder / name
        if not p.is_file():
            problems.append(f"{name}: missing")
        elif _sha256(p) != digest:
            problems.append(f"{name}: contents changed")
    extra = sorted(name for name in (rel(p, folder) for p in manifest_files(folder)) if name not in listed)
    problems += [f"{name}: not in the manifest" for name in extra]
    return problems


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
