"""The CRC-32 of ``/index`` rows (``streamfile.rows_crc32``) and of their checks (``acqd.finalize.onepass``).

The same function as zlib's ``crc32`` (same polynomial, same values, same running ``value`` argument), from ISA-L
(the ``isal`` package) when it is installed: 28 GB/s against zlib's 7.4 GB/s here, 10x faster on a probe's
231 KB message, where the writers computed it for every message and the hasher again for every byte recorded
(docs/performance.md, "The hasher against sha256sum"). zlib's is kept as the fallback: the values are identical,
so files written with either are checked with either.
"""

from __future__ import annotations

try:
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is a dependency; an environment without it is only slower
    from zlib import crc32

__all__ = ["crc32"]
