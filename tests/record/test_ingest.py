"""Chunk checks and edge extraction, against known truth (hypothesis)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from acqd.record.ingest import Gap, Reject, advance, check_continuity, check_format, rising_edges
from acqd.wire.protocol import Header


def h(seq: int, first: int, n: int = 10, epoch: int = 1, **kw) -> Header:
    return Header("s", seq, epoch, first, n, kw.get("dtype", "<i2"), kw.get("shape", (2,)))


def run(headers: list[Header]):
    cursor, out = None, []
    for hd in headers:
        v = check_continuity(cursor, hd)
        out.append(v)
        if v.accepted:
            cursor = advance(hd)
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), min_size=2, max_size=60))
def test_dropped_messages_become_exact_gaps(kept):
    kept[0] = True
    sent = [h(i, 1000 + 10 * i) for i in range(len(kept))]
    verdicts = run([m for m, k in zip(sent, kept) if k])
    gaps = [(v.gap.seq_from, v.gap.seq_to, v.gap.sample_from, v.gap.sample_to) for v in verdicts if v.gap]
    expected, i = [], 0
    while i < len(kept):
        if not kept[i]:
            j = i
            while j < len(kept) and not kept[j]:
                j += 1
            if j < len(kept):  # a trailing loss is only seen when the next message comes
                expected.append((i, j, 1000 + 10 * i, 1000 + 10 * j))
            i = j
        else:
            i += 1
    assert gaps == expected
    assert all(v.accepted for v in verdicts)
    assert all(v.gap.kind == Gap.SEQ for v in verdicts if v.gap)


def test_duplicates_and_late_messages_are_rejected():
    v = run([h(0, 0), h(1, 10), h(1, 10), h(3, 30), h(2, 20), h(4, 40)])
    assert [x.reject for x in v] == [None, None, Reject.DUPLICATE, None, Reject.LATE, None]
    assert v[3].gap.kind == Gap.SEQ and (v[3].gap.seq_from, v[3].gap.seq_to) == (2, 3)


def test_restart_sample_jump_and_counter_reset():
    v = run([h(0, 0), h(1, 10), h(2, 5000, epoch=2), h(3, 5010, epoch=2), h(4, 6000, epoch=2),
             h(5, 0, epoch=2)])
    assert [x.gap.kind if x.gap else None for x in v] == [None, None, Gap.RESTART, None, Gap.SAMPLES,
                                                          Gap.COUNTER_RESET]
    assert (v[2].gap.seq_from, v[2].gap.seq_to, v[2].gap.sample_from, v[2].gap.sample_to) == (0, 2, 20, 5000)
    assert (v[4].gap.sample_from, v[4].gap.sample_to) == (5020, 6000)
    assert all(x.accepted for x in v)


def test_format_is_never_coerced():
    assert check_format(h(0, 0, dtype="<f4"), "s", "<i2", (2,)).reject == Reject.DTYPE
    assert check_format(h(0, 0, shape=(3,)), "s", "<i2", (2,)).reject == Reject.SHAPE
    assert check_format(h(0, 0), "t", "<i2", (2,)).reject == Reject.WRONG_STREAM
    assert check_format(h(0, 0, n=0), "s", "<i2", (2,)).reject == Reject.MALFORMED
    assert check_format(h(0, 0), "s", "<i2", (2,)).accepted


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 7), min_size=1, max_size=300), st.lists(st.integers(1, 40), max_size=20),
       st.integers(0, 2))
def test_edges_across_chunk_boundaries_equal_edges_of_the_whole(words, cuts, bit):
    column = np.array(words, dtype=np.int16)
    level = (column >> bit) & 1
    whole = np.flatnonzero((level[1:] == 1) & (level[:-1] == 0)) + 1
    found, prev, start = [], None, 0
    bounds = np.cumsum(cuts)
    for end in [b for b in bounds if b < len(column)] + [len(column)]:
        idx, prev = rising_edges(column[start:end], bit, prev)
        found.extend(start + idx)
        start = end
    assert np.array_equal(np.array(found, dtype=np.int64), whole)
