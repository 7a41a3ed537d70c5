"""Where finalize's outputs go in a session folder, and the write-then-rename rule they follow.

This module owns the names of what finalize adds to a session folder (the master is ``<id>.nwb`` beside
``session.json``; the rest is below) and the one way the HDF5 outputs are written: under
``<name>.partial``, renamed into place only once complete, so that a file under its final name is always
a finished one. A killed run's leftovers are removed by the next run (``acqd.finalize._clear_outputs``).
It also owns the list of every name acqd gives a file in a session folder (``known_file``): finalize refuses
a folder holding anything else (``acqd.finalize.integrity``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from acqd.images import ATTACHMENTS_DIR, IMAGE_SUFFIXES, STIMULI_DIR
from acqd.record.video import CONTAINERS, VIDEO_DIR
from acqd.session import ANNOTATIONS_FILE, LOG_FILE, SESSION_FILE, STREAMS_DIR

MANIFEST = "manifest.sha256"
DIGESTS = "digests.jsonl"  # parts hashed while recording (acqd.finalize.digests)
SCRUB_FILE = "scrub.json"
"""The scrub's record (``acqd.finalize.scrub``): written after the seal, so it is neither sealed nor in the manifest."""
SHIPPING = "shipping.json"
"""Verified copies of a sealed session (acqd.share.ship): beside session.json, never part of the sealed set."""
QC_DIR = "qc"
VDS_DIR = "vds"  # virtual datasets joining the parts of a stream written by several writers
RECOVERED_DIR = "recovered"  # clean copies of the committed rows of parts a killed writer left open
PARTIAL = ".partial"
NODES_DIR = "nodes"
"""The other PCs' parts of a multi-PC session on the leader: ``nodes/<node>/``, each checked against its own
manifest (acqd.finalize.nodes), not against ``known_file``."""
READY = "READY.json"
"""Written last by the ship queue where a verified copy landed (acqd.share.ship): a node's part has arrived."""
KNOWN_DIRS = (STREAMS_DIR, VIDEO_DIR, QC_DIR, VDS_DIR, RECOVERED_DIR, STIMULI_DIR, ATTACHMENTS_DIR)


def known_dir(name: str, streams: list[str]) -> bool:
    """A folder acqd makes in a session folder: ``KNOWN_DIRS`` and ``stimuli/<stream>`` (acqd.images)."""
    return name in KNOWN_DIRS or (name.startswith(f"{STIMULI_DIR}/") and name.split("/", 1)[1] in streams)


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


def known_file(name: str, session_id: str, streams: list[str]) -> bool:
    """Whether ``name`` (relative to the session folder, '/'-separated) is a file acqd writes there: the session
    record (and the temporary file of its atomic write), the stream parts and video files the writers create, and
    finalize's outputs (and their ``.partial`` files). Anything else in a session folder is refused by finalize."""
    return any(re.fullmatch(pattern, name) for pattern in _known_patterns(session_id, streams))


def _known_patterns(session_id: str, streams: list[str]) -> list[str]:
    s = "(?:" + "|".join(re.escape(n) for n in streams) + ")" if streams else "(?!)"
    part = rf"{s}(?:\.part\d{{3,}})?\.h5"  # streamfile.part_filename
    atomic = r"\.{}\.[^/]+"  # session.write_bytes_atomic's temporary file
    videos = "|".join(re.escape(ext) for ext, _ in CONTAINERS.values())
    return [re.escape(SESSION_FILE), atomic.format(re.escape(SESSION_FILE)), re.escape(ANNOTATIONS_FILE),
            re.escape(LOG_FILE),
            re.escape(MANIFEST), atomic.format(re.escape(MANIFEST)), re.escape(SCRUB_FILE),
            atomic.format(re.escape(SCRUB_FILE)), rf"{re.escape(session_id)}\.nwb(?:{PARTIAL})?",
            re.escape(SHIPPING), atomic.format(re.escape(SHIPPING)),
            rf"{STREAMS_DIR}/{part}", rf"{VIDEO_DIR}/{s}_\d{{3,}}_\d{{4,}}\.(?:{videos})",  # video.video_filename
            rf"{QC_DIR}/(?:qc\.json|index\.html|{s}\.png)(?:{PARTIAL})?", rf"{VDS_DIR}/{s}\.h5(?:{PARTIAL})?",
            rf"{RECOVERED_DIR}/{part}(?:{PARTIAL})?", re.escape(DIGESTS), *_image_patterns(s)]


def _image_patterns(streams: str) -> list[str]:
    """Stimulus image sets (``stimuli/<stream>/<file>``) and attachments with their JSON sidecars (acqd.images)."""
    image = r"[^/]+(?:" + "|".join(re.escape(ext) for ext in IMAGE_SUFFIXES) + ")"
    return [rf"{STIMULI_DIR}/{streams}/(?i:{image})", rf"{ATTACHMENTS_DIR}/{image}(?:\.json)?"]
