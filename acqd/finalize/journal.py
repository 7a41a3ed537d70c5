"""The journal that makes amending a finalized session crash-safe (``amend.journal`` in the session folder).

An amend after finalize changes three sealed files: the master (a validated ``<id>.nwb.partial`` renamed over
it), ``session.json`` and ``manifest.sha256``. A ``kill -9`` between those steps would leave a session that
matches neither its old nor its new manifest. So the intent is written (atomically, fsynced) before anything
else, in two steps:

- ``prepare`` (before the partial exists): nothing sealed has changed yet; recovery rolls **back**: the
  partial and the journal are removed, the session is as it was.
- ``commit`` (once the partial is complete, validated and fsynced): the journal holds the new master's
  sha256 and the exact bytes of the new ``session.json`` and manifest; recovery rolls **forward**: the partial
  is renamed over the master (unless that already happened), both files are written, all three sealed again,
  and only then is the journal removed.

Every step of ``apply`` can be repeated, so a kill during recovery is recovered the same way. The next amend,
finalize or ``acqd verify`` recovers first (``recover``), under the folder lock finalize takes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from acqd.errors import FinalizeError
from acqd.finalize.layout import MANIFEST
from acqd.finalize.seal import _sha256 as sha256_file  # the one sha256 reader of finalize
from acqd.finalize.seal import seal_paths, unseal
from acqd.session import SESSION_FILE, fsync_dir, write_bytes_atomic

JOURNAL = "amend.journal"
PREPARE, COMMIT = "prepare", "commit"

Checkpoint = Callable[[str], None]


def _nothing(step: str) -> None:
    pass


def begin(folder: Path, master: Path, partial: Path) -> None:
    """Write the intent to amend (``prepare``): until ``commit`` is written, recovery removes ``partial``."""
    _write(folder, {"step": PREPARE, "master": master.name, "partial": partial.name})


def commit(folder: Path, master_sha256: str, session_record: bytes, manifest: bytes) -> None:
    """The point of no return: the partial is complete and fsynced; from here recovery rolls forward."""
    journal = read(folder)
    if journal is None or journal["step"] != PREPARE:
        raise FinalizeError(f"{folder.name}: {JOURNAL} is not at {PREPARE!r}: the amend cannot commit")
    _write(folder, {**journal, "step": COMMIT, "master_sha256": master_sha256,
                    "session": session_record.decode(), "manifest": manifest.decode()})


def read(folder: Path) -> dict | None:
    """The journal of an amend in progress (or killed), None when there is none."""
    try:
        fd = os.open(Path(folder) / JOURNAL, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise FinalizeError(f"{folder.name}: {JOURNAL} cannot be read ({e.strerror})") from None
    with open(fd, "rb") as f:
        try:
            journal = json.loads(f.read())
        except ValueError:  # write_bytes_atomic never leaves a torn file: someone else wrote this one
            raise FinalizeError(f"{folder.name}: {JOURNAL} is not a journal acqd wrote; nothing was changed"
                                ) from None
    if journal.get("step") not in (PREPARE, COMMIT):
        raise FinalizeError(f"{folder.name}: {JOURNAL} has an unknown step {journal.get('step')!r}")
    return journal


def recover(folder: Path, checkpoint: Checkpoint = _nothing) -> str | None:
    """Finish what the journal says (``prepare``: roll back; ``commit``: roll forward) and remove it; returns what
    was done, None without a journal. The amend itself ends with this call; the next amend, finalize or verify
    starts with it. The caller holds the folder lock (``acqd.finalize._exclusive``)."""
    folder = Path(folder)
    journal = read(folder)
    if journal is None:
        _remove_stale_temporaries(folder)
        return None
    master, partial = folder / _name(journal, "master"), folder / _name(journal, "partial")
    if journal["step"] == PREPARE:
        partial.unlink(missing_ok=True)
        done = "rolled back an amend that was interrupted before it committed (the session is as it was)"
    else:
        _roll_forward(folder, journal, master, partial, checkpoint)
        done = "completed an amend that was interrupted after it committed"
    checkpoint("amend_sealed")
    (folder / JOURNAL).unlink()
    _remove_stale_temporaries(folder)
    fsync_dir(folder)
    return done


def _roll_forward(folder: Path, journal: dict, master: Path, partial: Path, checkpoint: Checkpoint) -> None:
    session_file, manifest = folder / SESSION_FILE, folder / MANIFEST
    unseal([master, session_file, manifest])
    if partial.is_file() and not partial.is_symlink():
        if sha256_file(partial) != journal["master_sha256"]:
            raise FinalizeError(f"{folder.name}: {partial.name} does not hold the master {JOURNAL} committed; "
                                "nothing was changed")
        os.replace(partial, master)
        fsync_dir(folder)
    elif sha256_file(master) != journal["master_sha256"]:
        raise FinalizeError(f"{folder.name}: {JOURNAL} committed a master that is neither {partial.name} nor "
                            f"{master.name}; nothing was changed")
    checkpoint("amend_replaced")
    write_bytes_atomic(session_file, journal["session"].encode())
    checkpoint("amend_session")
    write_bytes_atomic(manifest, journal["manifest"].encode())
    checkpoint("amend_manifest")
    seal_paths([master, session_file, manifest])


def _name(journal: dict, key: str) -> str:
    """A file name of the journal: one component of the session folder, never a path out of it."""
    name = journal.get(key)
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise FinalizeError(f"{JOURNAL}: {key} {name!r} is not a file name of the session folder")
    return name


def _write(folder: Path, journal: dict) -> None:
    write_bytes_atomic(Path(folder) / JOURNAL, json.dumps(journal).encode())


def _remove_stale_temporaries(folder: Path) -> None:
    """A kill inside ``write_bytes_atomic`` (of the journal, session.json or the manifest) leaves its temporary
    file: never part of a session."""
    for name in (JOURNAL, SESSION_FILE, MANIFEST):
        for p in Path(folder).glob(f".{name}.*"):
            if p.is_file() and not p.is_symlink():
                p.unlink()
