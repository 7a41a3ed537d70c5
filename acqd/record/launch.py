"""The writer process's entry point: tie its life to its parent's before anything else runs.

The supervisor's writers are forked by the writer fork server (acqd.record.forkserver), which calls ``run`` in each
child; ``python -m acqd.record.launch SPEC_JSON`` starts one by hand (tests, debugging) the same way, as a process
of its own. Either way the spec names a ``group_file`` for a group writer (acqd.record.group), else it is a
writer's (acqd.record.writer). Before the heavy imports (numpy, h5py, zmq) and before any driver connection, a
writer asks Linux to send SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), then compares its parent with the
one it expects (here the ``parent_pid`` in the spec): a parent that died before the prctl has already handed the
writer to another, the signal will never come, and the writer exits at once with ``EXIT_ORPHANED`` instead of
connecting to drivers that a restarted daemon is reading. Only the standard library is imported until that check
has passed.
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


def tie_to_parent(expected: int) -> bool:
    """``die_with_parent``, then whether the parent is still ``expected``: False means it died before the prctl,
    and no signal will come."""
    die_with_parent()
    return os.getppid() == expected


def run(spec: str) -> int:
    """Run the writer (or group writer) of ``spec``; its exit code."""
    if "group_file" in json.loads(spec):  # several streams in one process (acqd.record.group)
        from acqd.record.group import main
    else:
        from acqd.record.writer import main
    return main([spec])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    parent = json.loads(args[0]).get("parent_pid")
    if not tie_to_parent(parent or os.getppid()):
        print(f"acqd writer: the daemon (pid {parent}) is gone; exiting", file=sys.stderr, flush=True)
        return EXIT_ORPHANED
    from acqd.startup import importing

    with importing():  # numpy, h5py, zmq and the config models (and the writer): most of its start-up
        import acqd.record.group  # noqa: F401
    return run(args[0])


if __name__ == "__main__":
    sys.exit(main())
