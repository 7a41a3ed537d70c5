"""Checking session metadata, and amending the metadata of a recorded session (docs/finalize.md "Amend").

This module owns the two rules about metadata that outlive RECORD:

- ``check_metadata``: the metadata (acqd's layout) is accepted only if ``SessionMetadata`` validates it and
  nwbinspector finds nothing that finalize's inspection would refuse or count as a violation
  (``nwb.metadata_problems``). RECORD and amend both call it, so a session that records can be finalized.
- ``amend_session``: new metadata merged over a closed or interrupted session's (``session.json`` only: finalize
  reads its metadata from there), or over a finalized one's, where the master NWB is rewritten: a copy of the
  previous master whose metadata datasets are replaced, validated like finalize validates, then swapped in with
  the manifest and ``session.json`` updated and sealed again, under a journal (``acqd.finalize.journal``) so
  that a kill at any step is rolled forward or back. The stream files are never opened for writing.
  Every amendment is appended to ``session.json["amendments"]``: who, when, what (``field: old -> new``), and
  after finalize the previous and the new master's sha256.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import shutil
import socket
from pathlib import Path

import h5py
from pydantic import ValidationError

from acqd.errors import FinalizeError, SessionError
from acqd.finalize import _checkpoint, _exclusive, journal
from acqd.finalize.layout import MANIFEST, PARTIAL
from acqd.finalize.masterplan import GENERAL_FIELDS
from acqd.finalize.seal import _sha256 as sha256_file  # the one sha256 reader of finalize
from acqd.finalize.seal import verify_manifest
from acqd.h5lock import written
from acqd.metadata import MetadataError, SessionMetadata, changes, merge, require_subject, validation_message
from acqd.session import (CLOSED, FINALIZED, INTERRUPTED, SESSION_FILE, json_bytes, now_iso, read_session,
                          write_json_atomic)

__all__ = ["amend_session", "check_metadata", "default_who"]

# SessionMetadata field -> (path in the master, is a list of strings). Fields not here cannot change after finalize.
_MASTER_PATHS = {"session_description": ("session_description", False), "experimenter": ("general/experimenter", True),
                 "institution": ("general/institution", False), "lab": ("general/lab", False),
                 "experiment_description": ("general/experiment_description", False),
                 "keywords": ("general/keywords", True), "notes": ("general/notes", False),
                 **{k: (f"general/{arg}", k == "related_publications") for k, arg in GENERAL_FIELDS.items()},
                 **{f"subject.{k}": (f"general/subject/{k}", False) for k in SessionMetadata.model_fields[
                     "subject"].annotation.model_fields}}


def default_who() -> str:
    """user@host of this process: who amended, when the caller does not say."""
    return f"{getpass.getuser()}@{socket.gethostname()}"


def check_metadata(meta: dict, session_id: str) -> dict:
    """``meta`` (acqd's layout) as JSON if it may be recorded and finalized; else ``MetadataError`` naming each
    field and the rule (the nwbinspector check) it breaks, with the problems in ``.problems``."""
    require_subject(meta)  # first, and in one line: every path that records (API, CLI, LabRecorder) says it so
    try:
        dumped = SessionMetadata.model_validate(meta).model_dump(mode="json")
    except ValidationError as e:
        raise MetadataError(f"session metadata incomplete or invalid: {validation_message(e)}") from None
    from acqd.finalize import nwb  # pynwb, hdmf, pandas, scipy: at the first check, not at the daemon's start

    problems = nwb.metadata_problems(dumped, session_id)
    if problems:
        err = MetadataError("session metadata would not pass finalize's inspection (DANDI config): " + "; ".join(
            f"{p['field']}: {_value(dumped, p['field'])}{p['message']} ({p['check']})" for p in problems))
        err.problems = problems
        raise err
    return dumped


def _value(meta: dict, field: str) -> str:
    value = _get(meta, field)
    return f"{value!r}: " if value not in (None, {}) else ""


def amend_session(folder: Path, update: dict, who: str) -> dict:
    """Merge ``update`` (acqd's layout) over the metadata of the session in ``folder``; see the module docstring.
    Returns the amendment recorded (``what`` empty and nothing written when nothing changes). Raises
    ``MetadataError`` for metadata that cannot be accepted, ``SessionError`` for a session in another state, and
    ``FinalizeError`` for a finalized session that no longer matches its manifest."""
    folder = Path(folder).resolve()
    with _exclusive(folder):
        journal.recover(folder)  # an amend killed earlier is rolled forward or back first
        session = read_session(folder)
        sid = session.get("session_id") or folder.name
        state = session.get("state")
        if state not in (CLOSED, INTERRUPTED, FINALIZED):
            raise SessionError(f"{sid}: state {state!r}: only a closed, interrupted or finalized session can be "
                                "amended (stop the recording, or let finalize finish)")
        old = session.get("metadata") or {}
        new = check_metadata(merge(old, update), sid)
        what = changes(old, new)
        amendment = {"who": who, "when": now_iso(), "what": what}
        if not what:
            return amendment
        if state == FINALIZED:
            _amend_finalized(folder, session, sid, new, amendment)
        else:
            write_json_atomic(folder / SESSION_FILE, _amended(session, new, amendment))
        return amendment


def _amended(session: dict, new: dict, amendment: dict) -> dict:
    return {**session, "metadata": new, "amendments": [*session.get("amendments", []), amendment]}


def _amend_finalized(folder: Path, session: dict, sid: str, new: dict, amendment: dict) -> None:
    """Rewrite the master and commit it with session.json and the manifest, journaled (``acqd.finalize.journal``):
    a kill at any step leaves a session that the next amend, finalize or verify rolls forward or back.
    ``amendment`` gains the digests of the previous and the new master."""
    old, what = session.get("metadata") or {}, amendment["what"]
    fixed = sorted({line.split(":", 1)[0] for line in what} - set(_MASTER_PATHS))
    if fixed:
        raise MetadataError(f"{sid} is finalized: {', '.join(fixed)} cannot change after finalize (the master "
                            f"keeps them in its structure); fields that can: {', '.join(sorted(_MASTER_PATHS))}")
    problems = verify_manifest(folder)
    if problems:
        raise FinalizeError(f"{sid} does not match its manifest, nothing amended:\n  " + "\n  ".join(problems))
    master = folder / f"{sid}.nwb"
    partial = master.with_name(master.name + PARTIAL)
    journal.begin(folder, master, partial)  # the intent first: until commit, recovery removes the partial
    _checkpoint("amend_journal")
    try:
        amendment |= _rewrite_master(master, partial, old, new, what)
    except BaseException:
        journal.recover(folder)  # rolls back
        raise
    _checkpoint("amend_partial")
    amendment["exports_stale"] = True  # exports made before hold the old metadata: `acqd export` rebuilds them
    record = json_bytes(_amended(session, new, amendment))
    journal.commit(folder, amendment["master_sha256"], record, _manifest(
        folder, {master.name: amendment["master_sha256"], SESSION_FILE: hashlib.sha256(record).hexdigest()}))
    _checkpoint("amend_commit")
    journal.recover(folder, _checkpoint)  # rolls forward: the partial replaces the master, then the records


def _rewrite_master(master: Path, partial: Path, old: dict, new: dict, what: list[str]) -> dict:
    """Write ``partial``: the master with the changed metadata, validated and fsynced; returns the digests."""
    partial.unlink(missing_ok=True)
    shutil.copyfile(master, partial)  # external links are relative to the folder: the copy links the same files
    os.chmod(partial, 0o644)
    with written(partial, "r+") as f:  # opening never opens an external link's target
        for line in what:
            field = line.split(":", 1)[0]
            _replace(f, field, _get(old, field), _get(new, field))
    from acqd.finalize import nwb  # pynwb: only here, see check_metadata

    check = nwb.check_master(partial, {n: rows for n, (rows, _) in nwb.series_lengths(master).items()})
    if not check.ok:
        raise MetadataError("the amended master failed validation, nothing amended:\n  "
                            + "\n  ".join(check.blocking))
    fd = os.open(partial, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)  # complete on disk before the journal commits to it (HDF5 never fsyncs)
    finally:
        os.close(fd)
    counts: dict[str, int] = {}
    for m in check.inspector:
        counts[m["importance"]] = counts.get(m["importance"], 0) + 1
    return {"previous_master_sha256": sha256_file(master), "master_sha256": sha256_file(partial), "inspector": counts}


def _manifest(folder: Path, digests: dict[str, str]) -> bytes:
    """The session's manifest with the digests of the files in ``digests`` replaced."""
    lines = []
    for line in (folder / MANIFEST).read_text().splitlines():
        digest, _, name = line.partition("  ")
        lines.append(f"{digests.get(name, digest)}  {name}\n")
    return "".join(lines).encode()


def _get(meta: dict, field: str) -> object:
    node: object = meta
    for part in field.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _replace(f: h5py.File, field: str, old: object, new: object) -> None:
    """Set one metadata dataset of the master as pynwb writes it (variable-length UTF-8 text, lists 1-D)."""
    path, is_list = _MASTER_PATHS[field]
    if field == "notes":  # the master's notes are the user's notes, then acqd's own
        ours = f[path][()].decode()
        ours = ours[len(old) + 2:] if old and ours.startswith(str(old)) else ours
        new = "\n\n".join(filter(None, (new, ours)))
    attrs = dict(f[path].attrs) if path in f else ({"reference": "birth"} if field == "subject.age" else {})
    if path in f:
        del f[path]
    if new in (None, "", [], ()):
        return
    data = [str(v) for v in new] if is_list else str(new)
    f.create_dataset(path, data=data, dtype=h5py.string_dtype())
    f[path].attrs.update(attrs)
