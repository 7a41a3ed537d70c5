"""Annotations: timestamped operator notes ("drug on", trial labels) put into the recording.

``annotate`` runs on the calling (HTTP) thread, not the supervisor's: a note taken while a mode change is in
progress is written at once, with the time it was asked for. It is placed by host time and by the reference
stream's sample counter at that moment (extrapolated at the nominal rate from the last chunk the reference
writer reported: within a chunk's length of the true sample), appended to ``<session>/annotations.jsonl`` and
fsynced before the call returns. In ACQUIRE (and in IDLE for Open Ephys ``message``), with no session open, the
note goes to ``<data_root>/annotations.jsonl``. Finalize turns a session's notes into the NWB ``annotations`` events table.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from acqd.errors import SessionError
from acqd.session import append_annotation, now_iso

if TYPE_CHECKING:
    from acqd.service.supervisor import Supervisor

_lock = threading.Lock()  # one writer of the annotation files at a time: lines stay whole and in order


def reference_sample(last_chunk: list | None, rate: float, mono_ns: int) -> int | None:
    """The reference device's sample counter at ``mono_ns``, from its last chunk (first_sample, mono_ns, wall_ns)."""
    if not last_chunk:
        return None
    first, at_ns = int(last_chunk[0]), int(last_chunk[1])
    return first + round((mono_ns - at_ns) * rate / 1e9)


def annotate(sup: Supervisor, text: str, source: str = "api", in_idle: bool = False) -> dict:
    """Record ``text`` now; return the stored record. Refused (SessionError) in IDLE unless ``in_idle`` (Open
    Ephys scripts send messages whatever the mode: kept in the data root's file, as in ACQUIRE)."""
    mode, session = sup.mode, sup.session  # plain reads: the supervisor swaps these, never mutates in place
    if mode == "IDLE" and not in_idle:
        raise SessionError("not acquiring: annotations are taken in ACQUIRE or RECORD (start with `acqd acquire`)")
    wall_ns, mono_ns = time.time_ns(), time.monotonic_ns()
    ref = sup.cfg.reference
    h = sup.writers.get(ref)
    sample = reference_sample(h.stats.get("last_chunk") if h else None, sup.cfg.stream(ref).rate, mono_ns)
    session_id = session["session_id"] if session is not None else None
    record = {"text": text, "taken_at": now_iso(), "host_time_ns": wall_ns, "monotonic_ns": mono_ns,
              "reference": ref, "reference_sample": sample, "session": session_id, "mode": mode, "source": source}
    folder = sup.data_root / session_id if session_id else sup.data_root
    with _lock:
        append_annotation(folder, record)
        if session_id:
            sup.live.annotations[session_id] += 1
    sup.events.publish("annotation", record)
    return record
