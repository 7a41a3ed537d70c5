"""The writer process's entry point: tie its life to the daemon's before anything else runs.

``python -m acqd.record.launch SPEC_JSON`` is how the supervisor starts a writer (or a group writer, when the spec
names a ``group_file``: acqd.record.group). Before the heavy imports (numpy,
h5py, zmq) and before any driver connection, it asks Linux to send SIGTERM when the daemon dies
(``PR_SET_PDEATHSIG``), then compares its parent with the daemon's pid written in the spec: a daemon that died
before the prctl has already handed the writer to another parent, the signal will never come, and the writer
exits at once with ``EXIT_ORPHANED`` instead of connecting to drivers that a restarted daemon is reading.
Only the standard library is imported until that check has passed.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
EXIT_ORPHANED = 5


def die_with_parent() -> None:
    """Ask Linux to send SIGTERM when the parent dies, so the writer still closes its file cleanly."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the writer's loop still notices a new parent pid


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    die_with_parent()
    spec = json.loads(args[0])
    parent = spec.get("parent_pid")
    if parent and os.getppid() != parent:
        print(f"acqd writer: the daemon (pid {parent}) is gone; exiting", file=sys.stderr, flush=True)
        return EXIT_ORPHANED
    from acqd.startup import importing

    with importing():  # numpy, h5py, zmq and the config models: most of a writer's start-up (acqd.startup)
        if "group_file" in spec:  # several streams in one process (acqd.record.group)
            from acqd.record.group import main as run
        else:
            from acqd.record.writer import main as run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
