"""Files a user or a planted link could point anywhere: read with a bound, created only where they belong.

Below everything (it imports ``acqd.errors`` only), so that metadata files, attached images and the session folder
share one way of doing it: ``read_bounded`` (a regular file of at most so many bytes, one-line refusals),
``open_folder`` and ``create_file`` (under a folder descriptor, never through a symbolic link).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from acqd.errors import ConfigError


def open_folder(name: str | Path, dir_fd: int | None = None, *, create: bool = False) -> int:
    """A descriptor of the folder ``name`` (under ``dir_fd`` when given), created first if ``create``; a symbolic
    link in its place is refused (ELOOP), never followed, so what is written under the descriptor stays inside."""
    if create:
        try:
            os.mkdir(name, 0o755, dir_fd=dir_fd)
        except FileExistsError:
            pass
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)


def create_file(dir_fd: int, name: str, data: bytes) -> None:
    """Write ``data`` to a new file ``name`` under ``dir_fd``, durably (file and folder fsynced). An existing name,
    a symbolic link or a dangling one included, is refused (FileExistsError): O_CREAT | O_EXCL never follows one."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(name, dir_fd=dir_fd)
        raise
    os.close(fd)
    os.fsync(dir_fd)


def read_bounded(path: str | Path, limit: int) -> bytes:
    """The bytes of the regular file ``path`` given by a user (a metadata file, a photo), refused with one line
    (ConfigError) when it cannot be read, is not a regular file (a FIFO must not block the reader: opened
    non-blocking) or holds more than ``limit`` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    with open(fd, "rb", buffering=0) as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: not a regular file")
        if st.st_size > limit:
            raise ConfigError(f"{path}: {st.st_size} bytes; at most {limit} are accepted here")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ConfigError(f"{path}: grew past {limit} bytes while it was read")
    return data
