"""Sealing a session folder, unsealing it, and its sha256 manifest.

This module owns what makes a finalized session tamper-evident: every file read-only and immutable (the
``chattr +i`` flag, set through the ioctl chattr(1) uses), ``manifest.sha256`` (sha256sum format: every file
but itself, ``session.json`` included: the finalized record is frozen with the data), checking a folder against
it, and undoing the seal (tests, admins). Nothing here follows a symbolic link: files are opened with
``O_NOFOLLOW`` and chmod'ed through that descriptor, so a link planted in a session never reaches its target.

Hashing is the one part of finalize that reads every byte. ``Digests`` hashes on worker threads (hashlib and
file reads release the GIL), so finalize hashes the recorded files while it builds and validates the master.
"""

from __future__ import annotations

import array
import errno
import fcntl
import hashlib
import os
import struct
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from acqd.finalize.digests import Stamp
from acqd.finalize.digests import stamp as _stamp
from acqd.finalize.layout import MANIFEST, NODES_DIR, SCRUB_FILE, SHIPPING, rel
from acqd.session import SESSION_FILE, write_bytes_atomic

# chattr +i through the ioctl chattr(1) uses (linux/fs.h): root can still write a 0444 file, not an immutable one.
_FS_IMMUTABLE_FL = 0x10
# How _IOC() lays out an ioctl number differs by architecture (asm-generic/ioctl.h and the arch headers that
# override it): (bits of the size field, value of _IOC_READ, value of _IOC_WRITE).
_IOC_LAYOUTS = {"generic": (14, 2, 1), "alpha|mips|powerpc|sparc": (13, 2, 4), "parisc": (14, 1, 2)}
_ARCH_FAMILY = {"alpha": "alpha|mips|powerpc|sparc", "mips": "alpha|mips|powerpc|sparc", "ppc": "alpha|mips|powerpc|sparc",
                "powerpc": "alpha|mips|powerpc|sparc", "sparc": "alpha|mips|powerpc|sparc", "parisc": "parisc"}


def ioc_flags_numbers(machine: str, long_size: int) -> tuple[int, int]:
    """(FS_IOC_GETFLAGS, FS_IOC_SETFLAGS) = (_IOR('f', 1, long), _IOW('f', 2, long)) on ``machine`` (``uname -m``)."""
    family = next((f for prefix, f in _ARCH_FAMILY.items() if machine.startswith(prefix)), "generic")
    size_bits, read, write = _IOC_LAYOUTS[family]
    dir_shift = 16 + size_bits
    return ((read << dir_shift) | (long_size << 16) | (ord("f") << 8) | 1,
            (write << dir_shift) | (long_size << 16) | (ord("f") << 8) | 2)


_FS_IOC_GETFLAGS, _FS_IOC_SETFLAGS = ioc_flags_numbers(os.uname().machine, struct.calcsize("l"))
_OPEN_FOR_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW
_HASH_BLOCK = 4 << 20
_HASH_THREADS = 2


# -- read-only and immutable -------------------------------------------------------------------------------------


def seal_paths(paths: list[Path]) -> dict:
    """chmod 0444, then chattr +i (root ignores 0444, not the immutable flag). Reports, honestly, what held."""
    errors = []
    for p in paths:
        _set_immutable(p, False)  # sealed by an earlier, killed run: chmod would fail on an immutable file
        _chmod(p, lambda mode: 0o444)
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
        if p.exists() and not p.is_symlink():
            _set_immutable(p, False)
            _chmod(p, lambda mode: mode | 0o200)


def unseal_session(folder: Path) -> None:
    """Clear the immutable flag and restore owner write on every file of a session (tests, admins); links are
    left alone (and so is what they point at)."""
    unseal(_regular_files(Path(folder)))


def _chmod(path: Path, mode: Callable[[int], int]) -> None:
    """chmod ``path`` itself to ``mode(current mode)``; a symbolic link raises (ELOOP) instead of being followed.
    An unchanged mode is not set again: every chmod moves ctime, which would void the file's digest taken while
    recording (acqd.finalize.digests) after a finalize that rolled back."""
    fd = os.open(path, _OPEN_FOR_FLAGS)
    try:
        current = os.fstat(fd).st_mode & 0o7777
        if (new := mode(current) & 0o7777) != current:
            os.fchmod(fd, new)
    finally:
        os.close(fd)


def _regular_files(folder: Path) -> list[Path]:
    """Every regular file below ``folder``, without following links (os.walk never enters a linked folder)."""
    return sorted(Path(d) / n for d, _, names in os.walk(folder) for n in names
                  if not (Path(d) / n).is_symlink() and (Path(d) / n).is_file())


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
    """The files finalize seals and hashes: every regular file (never a link) but the manifest itself,
    ``session.json`` (written last, at the commit point; its digest is given to ``write_manifest``), the scrub's
    record and the record of shipped copies (both written after the seal) and the temporary files of an atomic
    write."""
    own = (SESSION_FILE, MANIFEST, SCRUB_FILE, SHIPPING)
    return [p for p in _regular_files(folder) if p.parent != folder or (
        p.name not in own and not p.name.startswith(tuple(f".{name}." for name in own)))]


def write_manifest(folder: Path, paths: list[Path], digests: Digests, progress: Callable[[int, int], None],
                   session_record: bytes) -> None:
    """Hash ``paths`` into ``manifest.sha256`` (written atomically), using what ``digests`` already hashed, with
    ``session.json`` listed as ``session_record`` (the bytes about to be written to it at the commit point);
    ``progress`` gets the bytes hashed so far and in all."""
    lines, total = [], sum(p.stat().st_size for p in paths) or 1
    done = 0
    digests.add(paths)
    for p in paths:
        lines.append(f"{digests.get(p)}  {rel(p, folder)}\n")
        done += p.stat().st_size
        progress(done, total)
    lines.append(f"{hashlib.sha256(session_record).hexdigest()}  {SESSION_FILE}\n")
    write_bytes_atomic(folder / MANIFEST, "".join(sorted(lines, key=lambda line: line.split("  ", 1)[1])).encode())


def verify_manifest(folder: Path) -> list[str]:
    """Problems found checking the session against its manifest (empty: every file there and unchanged)."""
    folder = Path(folder)
    try:
        listed = read_manifest(folder)
    except OSError as e:
        return [f"{MANIFEST}: {e.strerror}"]
    problems, present = listed_problems(folder, listed)
    with Digests(present.values()) as digests:
        problems += [f"{name}: contents changed" for name, path in present.items() if digests.get(path) != listed[name]]
    return sorted(problems, key=lambda line: line.split(": ", 1)[0]) + unlisted_problems(folder, listed)


def read_manifest(folder: Path) -> dict[str, str]:
    """``manifest.sha256`` as {relative path: sha256}; raises OSError if it cannot be read (never through a link)."""
    return parse_manifest(manifest_bytes(folder))


def manifest_bytes(folder: Path) -> bytes:
    with open(os.open(Path(folder) / MANIFEST, os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:
        return f.read()


def parse_manifest(data: bytes) -> dict[str, str]:
    return {name: digest for digest, _, name in (line.partition("  ") for line in data.decode(errors="replace")
                                                 .splitlines())}


def listed_problems(folder: Path, listed: dict[str, str]) -> tuple[list[str], dict[str, Path]]:
    """Files of the manifest that are links or missing (a problem each), and the regular files present, by name."""
    problems, present = [], {}
    for name in sorted(listed):
        path = folder / name
        if path.is_symlink():
            problems.append(f"{name}: a symbolic link (verify never follows links)")
        elif path.is_file():
            present[name] = path
        else:
            problems.append(f"{name}: missing")
    return problems, present


def unlisted_problems(folder: Path, listed: dict[str, str]) -> list[str]:
    """Files and links in the session that the manifest does not list. Another PC's part of a multi-PC session
    that the manifest lists nothing of (``nodes/<node>/``: still arriving, or left out) is not part of the sealed
    session (acqd.finalize.nodes)."""
    sealed_nodes = {Path(n).parts[1] for n in listed if n.startswith(f"{NODES_DIR}/") and len(Path(n).parts) > 2}
    extra = sorted(name for name in (rel(p, folder) for p in manifest_files(folder)) if name not in listed
                   and not (name.startswith(f"{NODES_DIR}/") and Path(name).parts[1] not in sealed_nodes))
    links = [rel(Path(d) / n, folder) for d, dirs, names in os.walk(folder) for n in dirs + names
             if (Path(d) / n).is_symlink()]
    return [f"{name}: not in the manifest" for name in extra] + [
        f"{name}: a symbolic link, not in the manifest" for name in links if name not in listed]


class Digests:
    """sha256 of files, hashed ahead on worker threads, or known already (``known``: path -> (digest, stamp) taken
    while recording, trusted only if the file's stamp is still that one). ``get`` returns a digest of the file as
    it is when asked: a file whose size, mtime or inode changed after it was queued is hashed again; ``recheck``,
    called just before the files are sealed, compares the ctime too (sealing changes it, so ``get`` cannot).
    Leaving the ``with`` block stops the workers between blocks, so an abandoned run does not wait for a large
    file to finish."""

    def __init__(self, paths: Iterable[Path] = (), known: dict[Path, tuple[str, Stamp]] | None = None):
        self._pool = ThreadPoolExecutor(_HASH_THREADS, thread_name_prefix="sha256")
        self._queued: dict[Path, tuple[Future[str], Stamp]] = {}
        self._stop = threading.Event()
        self.reused = 0
        """Files whose digest was known and still valid (not read again)."""
        for p, (digest, stamp) in (known or {}).items():
            try:
                if _stamp(p) != stamp:
                    continue
            except OSError:  # gone since: whoever lists it finds it missing
                continue
            self._queued[p] = (_done(digest), stamp)
            self.reused += 1
        self.add(paths)

    def add(self, paths: Iterable[Path]) -> None:
        for p in paths:
            if p not in self._queued:
                self._submit(p)

    def _submit(self, p: Path) -> None:
        stamp = _stamp(p)  # before the worker reads: a change while it reads is caught by get()
        self._queued[p] = (self._pool.submit(_sha256, p, self._stop), stamp)

    def recheck(self) -> list[Path]:
        """Hash again every queued file whose size, mtime, ctime or inode changed since it was queued (called before
        the seal, which changes the ctime); returns those files."""
        changed = [p for p, (_, stamp) in self._queued.items() if _stamp(p) != stamp]
        for p in changed:
            self._submit(p)
        return changed

    def get(self, path: Path) -> str:
        if path not in self._queued:
            self.add([path])
        future, stamp = self._queued[path]
        digest = future.result()
        same = _stamp(path)[:2] + _stamp(path)[3:] == stamp[:2] + stamp[3:]  # not the ctime: the seal changed it
        return digest if same else _sha256(path)

    def taken(self) -> dict[Path, tuple[str, Stamp]]:
        """The digests taken so far, with the stamp of each file as it was hashed: ``known`` of another ``Digests``
        (which trusts only those whose file still has that stamp)."""
        return {p: (f.result(), stamp) for p, (f, stamp) in self._queued.items() if f.done() and f.exception() is None}

    def __enter__(self) -> Digests:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)


def _done(digest: str) -> Future[str]:
    f: Future[str] = Future()
    f.set_result(digest)
    return f


def _sha256(path: Path, stop: threading.Event | None = None) -> str:
    h = hashlib.sha256()
    buf = bytearray(_HASH_BLOCK)
    view = memoryview(buf)
    with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb", buffering=0) as f:
        while n := f.readinto(buf):
            if stop is not None and stop.is_set():
                raise InterruptedError(f"hashing {path} was abandoned")
            h.update(view[:n])
    return h.hexdigest()
