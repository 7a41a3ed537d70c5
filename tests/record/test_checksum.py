"""The /index CRC-32 (acqd.record.checksum): ISA-L's, with zlib's values, so parts written before it still check."""

from __future__ import annotations

import zlib

import numpy as np
from hypothesis import given, strategies as st

from acqd.record.checksum import crc32
from acqd.record.streamfile import rows_crc32


def test_the_crc_is_isal_s_not_zlib_s():
    assert crc32 is not zlib.crc32 and crc32.__module__.startswith("isal")


@given(st.binary(max_size=5000), st.integers(0, 2**32 - 1), st.integers(0, 5000))
def test_same_values_as_zlib_whole_running_and_split(data, start, cut):
    view = memoryview(data)
    assert crc32(data) == zlib.crc32(data)
    assert crc32(data, start) == zlib.crc32(data, start)
    assert crc32(view[cut:], crc32(view[:cut])) == zlib.crc32(data)  # the hasher feeds a row's bytes in pieces


def test_rows_crc32_of_a_message_is_zlib_s_crc_of_its_bytes_as_stored():
    rows = np.random.default_rng(1).integers(-2000, 2000, (300, 385), dtype=np.int16)
    assert rows_crc32(rows) == zlib.crc32(rows.tobytes())
    assert rows_crc32(rows[::2]) == zlib.crc32(rows[::2].tobytes())  # a non-contiguous view is hashed as stored
