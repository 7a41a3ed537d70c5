"""Where finalize's outputs go in a session folder, and the write-then-rename rule they follow.

This module owns the names of what finalize adds to a session folder (the master is ``<id>.nwb`` beside
``session.json``; the rest is below) and the one way the HDF5 outputs are written: under
``<name>.partial``, renamed into place only once complete, so that a file under its final name is always
a finished one. A killed run's leftovers are removed by the next run (``acqd.finalize._clear_outputs``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MANIFEST = "manifest.sha256"
QC_DIR = "qc"
VDS_DIR = "vds"  # virtual datasets joining the parts of a stream written by several writers
RECOVERED_DIR = "recovered"  # clean copies of the committed rows of parts a killed writer left open
PARTIAL = ".partial"


def rel(path: Path, folder: Path) -> str:
    """``path`` relative to ``folder``, '/'-separated: how the report and the manifest name a session's files."""
    return Path(os.path.relpath(path, folder)).as_posix()


@contextmanager
def partial_then_rename(dest: Path) -> Iterator[Path]:
    """Yield ``<dest>.partial`` to write (its folder created, a stale one removed); rename it to ``dest`` if the
    block completes. On an error the partial stays: the run's rollback removes it."""
    tmp = dest.with_name(dest.name + PARTIAL)
    dest.parent.mkdir(exist_ok=True)
    tmp.unlink(missing_ok=True)
    yield tmp
    os.replace(tmp, dest)
