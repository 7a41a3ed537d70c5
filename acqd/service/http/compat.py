"""The rules the compatibility surfaces (Open Ephys HTTP routes, LabRecorder's socket) share.

Scripts written for the Open Ephys GUI or LabRecorder never read replies, so a start they send must record
unless recording is impossible (the data would be lost or mislabeled), and whatever is refused must be seen
where people look. This module owns those rules (docs/control-api.md "Open Ephys compatibility",
docs/lsl.md "LabRecorder compatibility"):

- ``unique_session`` gives a start whose session name is taken the next free name (``<name>_2``,
  ``<name>_3``, ...): the originals never refuse a clash either (LabRecorder renames the old file
  ``<name>_old1``; Open Ephys records into the existing folder as its next recording). acqd never renames
  an existing session, which may be finalized, sealed and shipped, so the new one takes the new name.
- ``folder_name`` and ``bids_label`` turn text a lab typed (spaces, accents) into a usable folder name, as
  the originals use any text in their file names; the metadata keep the text as typed.
- ``Incidents`` reports a refusal or a rename as an incident (log, console, ``acqd status``); a flood of the
  same kind and reason (a client that loops) is one incident per ``INCIDENT_SUMMARY_S``, the next one carrying
  the count of those held back.
"""

from __future__ import annotations

import re
import threading
import time
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING

from acqd.config import check_name
from acqd.errors import SessionError

if TYPE_CHECKING:
    from acqd.service.supervisor import Supervisor

NAME_MAX = 64
"""acqd's session names are at most 64 characters (acqd.config.check_name)."""
_NOT_NAME = re.compile(r"[^A-Za-z0-9_.-]+")
_NOT_LABEL = re.compile(r"[^A-Za-z0-9]+")
INCIDENT_SUMMARY_S = 10.0
"""The same kind of incident from one surface is recorded at most once per this many seconds (then summarised)."""


def ascii_fold(text: str) -> str:
    """``Jörg Müller`` -> ``Jorg Muller``: accents dropped, other non-ASCII characters removed."""
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()


def bids_label(text: str) -> str:
    """A BIDS label (letters and digits only) from any text: ``P 01`` -> ``P01``, ``Jörg`` -> ``Jorg``."""
    return _NOT_LABEL.sub("", ascii_fold(text))


def folder_name(text: str) -> str:
    """A valid session name from any text ('' when nothing usable is left): runs of characters a folder name
    cannot hold become ``-``, ``..`` cannot appear, the name starts with a letter or digit and is cut to 64."""
    name = re.sub(r"\.{2,}", ".", _NOT_NAME.sub("-", ascii_fold(text)))
    name = name.lstrip("-_.")[:NAME_MAX].rstrip("-_.")
    return name


def start_metadata(prepared: dict, participant: str | None) -> dict:
    """The metadata of a start from a script: what the operator prepared for the next session (``acqd record
    --prepare``, ``PUT /api/recording {"metadata"}``), with LabRecorder's participant as the subject's id. A
    participant that is not the prepared subject is refused: the session would carry another animal's fields."""
    subject = dict(prepared.get("subject") or {})
    if participant:
        if subject.get("subject_id") not in (None, participant):
            raise SessionError(f"participant {participant!r} is not the subject prepared for the next session "
                               f"({subject['subject_id']!r}): prepare this animal first (acqd record --prepare "
                               f"--subject-id ...), so it is never recorded under another animal's fields")
        subject["subject_id"] = participant
    return {**prepared, "subject": subject} if subject else dict(prepared)


def unique_session(root: Path, name: str) -> str:
    """``name`` if no session (or any file) of that name is under ``root``, else the first free
    ``<name>_<n>`` (n = 2, 3, ...), cut so that it stays a valid name."""
    check_name(name, "session name")
    if not (root / name).exists() and not (root / name).is_symlink():
        return name
    n = 2
    while True:
        suffix = f"_{n}"
        candidate = name[:NAME_MAX - len(suffix)] + suffix
        if not (root / candidate).exists() and not (root / candidate).is_symlink():
            return candidate
        n += 1


class Incidents:
    """Incidents raised by one compatibility surface, from any thread, never blocking the caller's reply.

    Each goes through the supervisor's own incident mechanism (log line, ``incident`` event for the console,
    ``recent_incidents`` in the status, ``session.json`` while recording). The first of a kind is recorded at
    once; more of the same kind within ``INCIDENT_SUMMARY_S`` are counted, and the count is recorded with the
    next one after that.
    """

    def __init__(self, sup: Supervisor, surface: str):
        self.sup = sup
        self.surface = surface
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def report(self, kind: str, detail: str, summarise: bool = True, like: str = "") -> None:
        """Record an incident ``kind``; ``like`` tells alike ones of a kind apart (a reason); ``summarise=False``:
        always, one by one (e.g. each renamed session)."""
        now, key = time.monotonic(), f"{kind}:{like}"
        with self._lock:
            held = self._held.pop(key, 0) if summarise else 0
            last = self._last.get(key)
            if summarise and last is not None and now - last < INCIDENT_SUMMARY_S:
                self._held[key] = held + 1
                return
            self._last[key] = now
        if held:
            detail += f" (and {held} more like it in the last {INCIDENT_SUMMARY_S:.0f} s)"
        self._post(kind, f"{self.surface}: {detail}")

    def _post(self, kind: str, detail: str) -> None:
        # The supervisor thread owns incidents: queued there, never waited for (it may be busy starting a
        # recording for the very client being answered).
        self.sup.post(self.sup.incident, None, kind, detail)
