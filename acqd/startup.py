"""Process start-up: the imports of acqd's process mains run without the cyclic garbage collector.

The daemon imports about 1,500 modules (FastAPI, pynwb, pandas, the pydantic models: 150,000 tracked objects)
before it serves, a writer about 500 (numpy, h5py, the config models). Every full collection during those imports
walks every object imported so far, and the interpreter's last collection at exit walks them all once more, though
what an import builds lives as long as the process. ``importing()`` keeps the collector off while an entry point
imports, then moves everything built so far to the permanent generation (``gc.freeze``), which no later collection
walks; the collector is on again for what the process does afterwards. Measured in docs/performance.md ("Start-up
of the daemon and writers").
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def importing() -> Iterator[None]:
    """Run the block (a process main's imports) without collections; freeze what it built."""
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()
