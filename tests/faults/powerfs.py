"""A FUSE passthrough that forgets, at a simulated power cut, everything that was not fsynced (fault matrix row 5).

Run as ``python powerfs.py BACKING MOUNTPOINT STATE OUT`` (foreground, single-threaded, on mfusepy: libfuse3
through ctypes). Every operation goes straight to the folder BACKING; on the side, the filesystem keeps what a
disk would still hold after a power cut, with these semantics (those of ext4 and xfs for what acqd does, and
no more generous):

- ``fsync``/``fdatasync`` of a file makes its current content durable, together with its own name and the names
  of the folders above it (a newly created file that was fsynced survives under the name it had then);
- ``fsync`` of a folder makes its current list of entries durable (a rename or an unlink becomes durable only
  then; a file named there that was never fsynced survives empty);
- nothing else is durable: writes, creations, renames and unlinks that no fsync covered vanish at the cut.
  What BACKING held at mount time counts as durable.

The power cut: ``mkdir MOUNTPOINT/.power-cut``, which fails with ECANCELED once the cut is made (synchronous:
no fsync after it counts; nothing is created). After the unmount, the durable state is written as a new folder tree to OUT (every file with its last
fsynced content; SIGHUP ends the loop if the kernel keeps the connection after the unmount), and one JSON line
is printed: ``{"cut": bool, "files": n, "fsyncs": n}``. Before that, the
line ``mounted`` is printed once the mount answers. Durable contents are kept as copies under STATE.
"""

from __future__ import annotations

import errno
import faulthandler
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import mfusepy
from mfusepy import FUSE, FuseOSError, Operations

CUT = "/.power-cut"


class PowerFS(Operations):
    use_ns = True

    def __init__(self, backing: Path, state: Path):
        self.root, self.state = backing.resolve(), state
        self.cut = False
        self.fsyncs = 0
        self.ids: dict[int, int] = {}
        """Backing inode -> identity: a new identity per creation, so that a reused inode number never brings
        back the durable content of the file that had it before."""
        self.next_id = 0
        self.entries: dict[int, dict[str, int]] = {}
        """Durable folder entries: folder identity -> {name: identity}."""
        self.dirs: set[int] = set()
        self.saved: set[int] = set()
        """Identities of files with durable content (a copy under ``state``)."""
        self.root_id = self._new(self.root)
        self.dirs.add(self.root_id)
        for dirpath, dirnames, filenames in os.walk(self.root):  # what is there at mount time is durable
            parent = self._id(Path(dirpath))
            self.entries.setdefault(parent, {})
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                child = self._new(path)
                self.entries[parent][name] = child
                if name in dirnames:
                    self.dirs.add(child)
                    self.entries.setdefault(child, {})
                else:
                    self._save(path, child)

    # -- durability bookkeeping ----------------------------------------------------------------------------------

    def _new(self, path: Path) -> int:
        self.next_id += 1
        self.ids[os.lstat(path).st_ino] = self.next_id
        return self.next_id

    def _id(self, path: Path) -> int:
        ino = os.lstat(path).st_ino
        return self.ids[ino] if ino in self.ids else self._new(path)

    def _save(self, path: Path, ident: int) -> None:
        tmp = self.state / f"{ident}.tmp"
        shutil.copyfile(path, tmp)
        os.replace(tmp, self.state / str(ident))
        self.saved.add(ident)

    def _name_durably(self, rel: str) -> None:
        """Make the name ``rel`` and the names of the folders above it durable."""
        parent, path = self.root_id, self.root
        for name in [p for p in rel.split("/") if p]:
            path = path / name
            child = self._id(path)
            self.entries.setdefault(parent, {})[name] = child
            if path.is_dir():
                self.dirs.add(child)
                self.entries.setdefault(child, {})
            parent = child

    def restore(self, out: Path) -> int:
        """Write the durable tree to ``out``; returns the number of files."""
        files = 0

        def build(ident: int, folder: Path) -> None:
            nonlocal files
            folder.mkdir(exist_ok=True)
            for name, child in self.entries.get(ident, {}).items():
                if child in self.dirs:
                    build(child, folder / name)
                elif child in self.saved:
                    shutil.copyfile(self.state / str(child), folder / name)
                    files += 1
                else:
                    (folder / name).touch()  # named durably, content never fsynced
                    files += 1

        build(self.root_id, out)
        return files

    # -- passthrough ---------------------------------------------------------------------------------------------

    def _full(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def getattr(self, path, fh=None):
        try:
            st = os.fstat(fh) if fh is not None else os.lstat(self._full(path))
        except OSError as e:
            raise FuseOSError(e.errno) from None
        keys = ("st_mode", "st_nlink", "st_size", "st_uid", "st_gid", "st_atime_ns", "st_mtime_ns", "st_ctime_ns",
                "st_ino", "st_blocks", "st_blksize")
        out = {k: getattr(st, k) for k in keys}
        for k in ("st_atime", "st_mtime", "st_ctime"):
            out[k] = out.pop(k + "_ns")
        return out

    def readdir(self, path, fh):
        return [".", "..", *os.listdir(self._full(path))]

    def mkdir(self, path, mode):
        if path == CUT:
            self.cut = True  # from now on no fsync counts; nothing is created
            raise FuseOSError(errno.ECANCELED)
        os.mkdir(self._full(path), mode)
        self._new(self._full(path))
        return 0

    def rmdir(self, path):
        os.rmdir(self._full(path))
        return 0

    def unlink(self, path):
        os.unlink(self._full(path))
        return 0

    def rename(self, old, new):
        os.rename(self._full(old), self._full(new))
        return 0

    def symlink(self, target, source):
        os.symlink(source, self._full(target))
        return 0

    def readlink(self, path):
        return os.readlink(self._full(path))

    def chmod(self, path, mode):
        os.chmod(self._full(path), mode)
        return 0

    def chown(self, path, uid, gid):
        os.chown(self._full(path), uid, gid)
        return 0

    def utimens(self, path, times=None):
        os.utime(self._full(path), ns=times)
        return 0

    def access(self, path, amode):
        if not os.access(self._full(path), amode):
            raise FuseOSError(errno.EACCES)
        return 0

    def statfs(self, path):
        sv = os.statvfs(self._full(path))
        return {k: getattr(sv, k) for k in ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree",
                                            "f_files", "f_flag", "f_frsize", "f_namemax")}

    def create(self, path, mode, flags):
        try:
            fd = os.open(self._full(path), flags | os.O_CREAT, mode)
        except OSError as e:
            raise FuseOSError(e.errno) from None
        self._new(self._full(path))
        return fd

    def open(self, path, flags):
        try:
            return os.open(self._full(path), flags & ~os.O_CREAT)
        except OSError as e:
            raise FuseOSError(e.errno) from None

    def read(self, path, size, offset, fh):
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        return os.pwrite(fh, data, offset)

    def truncate(self, path, length, fh=None):
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            os.truncate(self._full(path), length)
        return 0

    def flush(self, path, fh):
        return 0  # close(): not a sync

    def release(self, path, fh):
        os.close(fh)
        return 0

    def fsync(self, path, datasync, fh):
        if not self.cut:
            self.fsyncs += 1
            self._save(self._full(path), self._id(self._full(path)))
            self._name_durably(path)
        return 0

    def fsyncdir(self, path, datasync, fh):
        if not self.cut:
            self.fsyncs += 1
            folder = self._full(path)
            ident = self._id(folder)
            self._name_durably(path)
            self.entries[ident] = {}
            for name in os.listdir(folder):
                child = self._id(folder / name)
                self.entries[ident][name] = child
                if (folder / name).is_dir():
                    self.dirs.add(child)
                    self.entries.setdefault(child, {})
        return 0


def main(argv: list[str]) -> int:
    faulthandler.register(signal.SIGUSR1)  # a test that waits too long for us asks where we are
    backing, mount, state, out = (Path(a).resolve() for a in argv)  # libfuse may chdir("/")
    state.mkdir(parents=True, exist_ok=True)
    fs = PowerFS(backing, state)
    pid = os.fork()
    if pid == 0:  # tell the parent once the mount answers (FUSE() below blocks until unmounted)
        import time
        for _ in range(400):
            if os.path.ismount(mount):
                print("mounted", flush=True)
                os._exit(0)
            time.sleep(0.025)
        os._exit(1)
    # Single-threaded: one operation at a time, so the cut and the fsyncs are totally ordered. No attribute or
    # entry caching in the kernel: every process sees every size and name as it is.
    # SIGHUP ends the loop (libfuse's own handler): the caller sends it when the kernel keeps the connection after
    # the unmount, which a copy of the mount in another mount namespace (made by any program while it was mounted)
    # does. Once the loop is over, SIGHUP must not end the restore.
    try:
        # hard_remove: an unlinked file that is still open goes away at once, as on a disk (libfuse would rename it
        # to .fuse_hidden*, which a folder fsync then made durable and finalize refused as a file acqd never wrote).
        FUSE(fs, str(mount), foreground=True, nothreads=True, attr_timeout=0, entry_timeout=0, negative_timeout=0,
             hard_remove=True, fsname="powerfs")
    except RuntimeError:  # after SIGHUP, libfuse's own unmount of what is already unmounted fails: the loop is over
        pass
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    os.waitpid(pid, 0)
    files = fs.restore(out)
    print(json.dumps({"cut": fs.cut, "files": files, "fsyncs": fs.fsyncs}), flush=True)
    return 0


if __name__ == "__main__":
    mfusepy.log.setLevel("ERROR")
    sys.exit(main(sys.argv[1:]))
