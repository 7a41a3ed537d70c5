"""The wire protocol: round trips, zero-copy decode, and every malformed message refused."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from acqd.errors import ProtocolError
from acqd.wire.protocol import EDGE_DTYPE, HEADER, Header, decode, decode_header, encode, encode_header
from acqd.wire.publisher import edge_records


def header(**kw) -> Header:
    base = dict(stream="probe", seq=7, epoch=99, first_sample=123456789012, n_samples=4, dtype="<i2", shape=(3,),
                device_time_ns=-5)
    return Header(**{**base, **kw})


def frames_of(h: Header, data: np.ndarray, **kw) -> list[bytes]:
    return [bytes(memoryview(f)) if not isinstance(f, bytes) else f for f in encode(h, data, **kw)]


@settings(max_examples=50, deadline=None)
@given(seq=st.integers(0, 2**64 - 1), first=st.integers(0, 2**64 - 1), n=st.integers(1, 50),
       shape=st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple),
       dtype=st.sampled_from(["<i2", "<u2", "<f4", "<f8", "|u1", "<i8"]), with_ts=st.booleans(),
       n_edges=st.integers(0, 3))
def test_round_trip(seq, first, n, shape, dtype, with_ts, n_edges):
    data = (np.arange(n * int(np.prod(shape))) % 100).astype(dtype).reshape((n, *shape))
    ts = np.arange(n, dtype="<i8") * 1000 if with_ts else None
    edges = edge_records(np.arange(n_edges, dtype=np.uint64) + 5) if n_edges else None
    h = Header("s", seq, 1, first, n, np.dtype(dtype).str, shape)
    chunk = decode(frames_of(h, data, timestamps=ts, edges=edges))
    assert chunk.header.seq == seq and chunk.header.first_sample == first and chunk.header.shape == shape
    assert np.array_equal(chunk.data, data)
    assert (chunk.timestamps is None) == (ts is None) and (chunk.edges is None) == (edges is None)
    if edges is not None:
        assert np.array_equal(chunk.edges, edges)


def test_decode_is_zero_copy():
    data = np.arange(12, dtype="<i2").reshape(4, 3)
    frames = frames_of(header(), data)
    payload = bytearray(frames[2])
    chunk = decode([frames[0], frames[1], payload])
    payload[0] = 42  # the decoded array is a view of the received frame
    assert chunk.data[0, 0] == 42


def test_header_layout_is_fixed():
    raw = encode_header(header())
    assert len(raw) == HEADER.size == 104 and raw[:4] == b"ACQD"
    assert raw[4:6] == (1).to_bytes(2, "little")


GOOD = frames_of(header(), np.zeros((4, 3), "<i2"))


@pytest.mark.parametrize("frames, message", [
    (GOOD[:2], "2 frames, expected at least"),  # no payload frame
    ([GOOD[0], b"ACQD", GOOD[2]], "header is 4 bytes"),
    ([GOOD[0], b"NOPE" + GOOD[1][4:], GOOD[2]], "bad magic"),
    ([GOOD[0], GOOD[1][:4] + (2).to_bytes(2, "little") + GOOD[1][6:], GOOD[2]], "version 2"),
    ([GOOD[0], GOOD[1] + b"\0", GOOD[2]], "header_len"),
    ([GOOD[0], GOOD[1], GOOD[2][:-1]], "payload is 23 bytes"),
    ([b"other", GOOD[1], GOOD[2]], "topic"),
    (GOOD + [b"extra"], "frames"),
    ([GOOD[0], frames_of(header(), np.zeros((4, 3), "<i2"), timestamps=np.zeros(3, "<i8"))[1], GOOD[2],
      np.zeros(3, "<i8").tobytes()], "timestamps frame"),
    ([GOOD[0], frames_of(header(), np.zeros((4, 3), "<i2"), edges=edge_records(np.array([1])))[1], GOOD[2],
      b"\0" * (EDGE_DTYPE.itemsize - 1)], "whole number"),
])
def test_malformed_messages_are_refused_with_a_reason(frames, message):
    with pytest.raises(ProtocolError, match=message):
        decode(frames)


def test_bad_header_fields():
    raw = bytearray(encode_header(header()))
    raw[8:12] = (1 << 7).to_bytes(4, "little")  # unknown flag
    with pytest.raises(ProtocolError, match="unknown flags"):
        decode_header(bytes(raw))
    with pytest.raises(ProtocolError, match="longer than 32"):
        encode_header(header(stream="x" * 33))


def test_public_api_is_flat_and_keeps_pynwb_out_of_writers():
    import subprocess
    import sys

    code = ("import sys, acqd, acqd.record.writer; assert 'pynwb' not in sys.modules, 'writer imports pynwb'; "
            "assert all(getattr(acqd, n) for n in acqd.__all__)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def check_decodes_or_refuses(frames: list[bytes]) -> None:
    """The decoder's contract for hostile input: a Chunk or a ProtocolError, never another exception."""
    try:
        decode(frames)
    except ProtocolError:
        pass


VALID = frames_of(header(), np.zeros((4, 3), "<i2"))


@settings(max_examples=400, deadline=None)
@given(raw=st.binary(min_size=0, max_size=2 * HEADER.size))
def test_any_header_bytes_decode_or_raise_protocol_error_only(raw):
    try:
        decode_header(raw)
    except ProtocolError:
        pass
    check_decodes_or_refuses([VALID[0], raw, VALID[2]])


@settings(max_examples=600, deadline=None)
@given(edits=st.lists(st.tuples(st.integers(0, HEADER.size - 1), st.integers(0, 255)), min_size=1, max_size=8),
       dtype=st.binary(min_size=0, max_size=8))
def test_mutated_valid_headers_decode_or_raise_protocol_error_only(edits, dtype):
    raw = bytearray(VALID[1])
    for at, value in edits:
        raw[at] = value
    check_decodes_or_refuses([VALID[0], bytes(raw), VALID[2]])
    raw[56:64] = dtype.ljust(8, b"\0")  # the dtype field: numpy's own parser sees these bytes
    check_decodes_or_refuses([VALID[0], bytes(raw), VALID[2]])


@settings(max_examples=300, deadline=None)
@given(frames=st.lists(st.one_of(st.binary(max_size=64), st.sampled_from(VALID)), min_size=0, max_size=7))
def test_any_frame_count_decodes_or_raises_protocol_error_only(frames):
    check_decodes_or_refuses(frames)


@pytest.mark.parametrize("dtype", [b",", b"((1,)),", b"i,i", b"2i", b"O", b"V8", b"U2", b"S0", b"M8", b"\xff"])
def test_dtype_fields_numpy_cannot_or_should_not_parse_are_malformed(dtype):
    # Issue 10 item 1: np.dtype(",") raised SyntaxError and np.dtype("((1,)),") ValueError out of the decoder.
    raw = bytearray(VALID[1])
    raw[56:64] = dtype.ljust(8, b"\0")
    with pytest.raises(ProtocolError, match="dtype"):
        decode_header(bytes(raw))


def test_shape_extents_that_overflow_int64_do_not_match_a_small_payload():
    # np.prod of four 2^32-1 extents wraps in int64; the payload size check must use exact integers.
    h = header(shape=(2**16, 2**16, 2**16, 2**16), n_samples=1)
    raw = encode_header(h)
    with pytest.raises(ProtocolError, match="payload is"):
        decode([b"probe", raw, b""])


def test_config_refuses_stream_names_the_header_cannot_carry():
    # Issue 10 item 12: names of 33-64 bytes passed validation, then every message of the stream was rejected.
    from pydantic import ValidationError

    from acqd.config import STREAM_NAME_BYTES, StreamConfig
    assert HEADER.format.endswith(f"{STREAM_NAME_BYTES}s")
    fields = dict(endpoint="ipc:///x", dtype="int16", rate=1.0)
    assert StreamConfig(name="p" * STREAM_NAME_BYTES, **fields).name == "p" * STREAM_NAME_BYTES
    with pytest.raises(ValidationError, match="is 33 bytes; the wire header's stream field holds 32"):
        StreamConfig(name="p" * 33, **fields)
