"""The NWB stack loaded ahead of the first RECORD, on a thread of its own, once the daemon starts acquiring.

RECORD checks the session's metadata with finalize's nwbinspector rules on an in-memory NWB file
(``acqd.finalize.amend.check_metadata``), on the supervisor's thread. pynwb, hdmf, pandas, scipy and nwbinspector are
not imported at the daemon's start (a daemon that never records never pays their ~0.3 s of CPU), so the first check
would import them there, and meanwhile the supervisor would neither read its writers' reports nor answer: on a
loaded machine RECORD then found every stream "silent" (its last report seemed seconds old). ACQUIRE, which comes
before any RECORD, starts the import here instead, while its writers start; a RECORD that arrives sooner waits only
for the rest of it (Python's per-module import lock). Only an import of a package waits for it: a submodule imported
directly on another thread meanwhile can deadlock with this thread, so such code imports the package first
(``acqd.metadata.probes``).
"""

from __future__ import annotations

import importlib
import logging
import threading

log = logging.getLogger("acqd")
_started = threading.Event()


def preload_nwb() -> None:
    """Import what the metadata check uses on a background thread; once per process, at once if already done."""
    if _started.is_set():
        return
    _started.set()
    threading.Thread(target=_import, name="acqd-preload-nwb", daemon=True).start()


def _import() -> None:
    try:
        for module in ("acqd.finalize.nwb", "nwbinspector"):  # nwbinspector: imported by metadata_problems itself
            importlib.import_module(module)
    except Exception:  # noqa: BLE001 - the check imports them again, and reports the failure where it is asked
        log.exception("loading pynwb and nwbinspector ahead of RECORD failed")
