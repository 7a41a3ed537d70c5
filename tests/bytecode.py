"""Bytecode caching for a test run whose environment turns it off (``PYTHONDONTWRITEBYTECODE``).

With that variable set, every process a test starts (~120 daemons, ~370 writers, the simulators and CLI runs of a
``make test``) compiles acqd's modules from source again: ~0.1 s of CPU per daemon, 0.03 s per writer, 40-50 s per
run; and each pytest worker compiles and rewrites every test module again (~3 s each). ``cache_bytecode`` lets the
run and the processes it starts keep their bytecode in a cache outside the source tree (``PYTHONPYCACHEPREFIX``,
``sys.pycache_prefix``: the tree stays free of ``__pycache__`` as the variable asked), kept between runs. Without
the variable it does nothing: Python caches next to the sources, as it does by default.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path


def cache_bytecode() -> None:
    """Turn bytecode caching back on, into a prefix outside the tree, for this process and those it starts."""
    if not os.environ.pop("PYTHONDONTWRITEBYTECODE", None):
        return
    prefix = Path(tempfile.gettempdir()) / f"acqd-test-pycache-{os.getuid()}"
    sys.pycache_prefix = os.environ.setdefault("PYTHONPYCACHEPREFIX", str(prefix))
    sys.dont_write_bytecode = False
