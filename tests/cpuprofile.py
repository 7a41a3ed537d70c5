"""A pytest plugin that writes the CPU seconds of every test: where `make test`'s CPU goes.

    ACQD_CPU_LOG=cpu.tsv python -m pytest -p tests.cpuprofile -n 4 --dist loadgroup -q -p no:cacheprovider

appends one line per test: node id, CPU of the pytest worker itself (in-process finalize, recorded sessions,
imports), CPU of the processes it started meanwhile (daemons with their writers, simulators, CLI runs: a child's
time counts once it is reaped, its own children's with it; those forked by the worker's zygote, tests/zygote.py,
are reaped by the zygote), wall seconds, the xdist worker and the start (Unix time). A module-scoped fixture is
charged to the first test that uses it on each worker. Sum per module with
``awk -F'\\t' '{split($1,a,"::"); c[a[1]]+=$2+$3} END{for(m in c) print c[m], m}' cpu.tsv | sort -rn``.
"""

from __future__ import annotations

import os
import resource
import time

import pytest


def _cpu() -> tuple[float, float]:
    own, reaped = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, reaped.ru_utime + reaped.ru_stime + _zygote_cpu()


def _zygote_cpu() -> float:
    """The CPU of the worker's zygote (tests/zygote.py) and of the children it has reaped so far: the zygote's own
    counts here, not in RUSAGE_CHILDREN, which takes it only when the last test's teardown reaps it."""
    from tests import zygote

    if zygote._zygote is None or zygote._zygote.proc is None:
        return 0.0
    try:
        with open(f"/proc/{zygote._zygote.proc.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return sum(map(int, fields[11:15])) / os.sysconf("SC_CLK_TCK")  # utime, stime, cutime, cstime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    (own0, reaped0), t0 = _cpu(), time.monotonic()
    yield
    (own1, reaped1), path = _cpu(), os.environ.get("ACQD_CPU_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{item.nodeid}\t{own1 - own0:.2f}\t{reaped1 - reaped0:.2f}\t{time.monotonic() - t0:.2f}\t"
                    f"{os.environ.get('PYTEST_XDIST_WORKER', '-')}\t{time.time() - (time.monotonic() - t0):.2f}\n")
