"""What every chunk must satisfy before it is written, and sync-edge extraction: pure functions.

A writer keeps one ``Cursor`` per stream (the last accepted message) and asks ``check_chunk`` what
to do with the next one: accept it, accept it and record a gap, or reject it with a reason. Rejected
and missing messages are always counted and recorded; they never stop a recording. Sync edges are
extracted here as chunks arrive so that finalize never rescans the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from acqd.wire.protocol import Header


class Reject(IntEnum):
    """Why a message was not written."""

    MALFORMED = 1  # breaks the wire protocol (frames, sizes, header fields)
    WRONG_STREAM = 2  # topic/header name is not this stream
    DTYPE = 3  # sample dtype differs from the config
    SHAPE = 4  # per-sample shape differs from the config
    OVERSIZED = 5  # larger than the stream's max_message_bytes
    DUPLICATE = 6  # same seq as the last accepted message
    LATE = 7  # an older seq than already written (reordered or replayed)
    RANGE = 8  # seq or sample counter at or past 2^63 (acqd keeps counters within int64 for every reader)
    SEQ_JUMP = 9  # seq more than MAX_SEQ_JUMP ahead of the last accepted one (a corrupted or hostile header)
    EDGE = 10  # one driver sync edge that cannot be stored (line > 65535, rising > 255, sample >= 2^63)


class Gap(IntEnum):
    """A discontinuity recorded in the stream file's gap table."""

    SEQ = 1  # messages lost between publisher and acqd (seq skipped)
    SAMPLES = 2  # the device skipped samples (contiguous seq, sample index jumped forward)
    RESTART = 3  # the publisher restarted (new epoch)
    COUNTER_RESET = 4  # the device sample counter went backwards
    RESYNC = 5  # two messages in a row continued a seq the cursor did not expect: the cursor follows the sender
    DROPPED = 6  # received by the writer but not stored: it could not keep up (the reason says what: the encoder)


class Loss(IntEnum):
    """Why a gap's data is missing: the ``reason`` column of ``/gaps`` (docs/file-format.md). 0 in files written
    before the column existed, which read it as ``unknown``."""

    UNKNOWN = 0  # not recorded (a file from before this column)
    SOURCE = 1  # the device or driver: skipped samples, a restart, a counter reset, a resync
    TRANSPORT = 2  # lost between driver and writer while the writer kept up (a reconnect, a driver-side drop)
    HWM = 3  # a SUB socket's high-water mark overflowed (ZeroMQ drops silently; the seq gap proves it)
    OVERLOAD = 4  # lost while this writer was behind (its receive backlog above the threshold): it could not keep up
    DISK = 5  # a write or fsync failed (EIO): what the suspect part may not hold
    ENCODER = 6  # a camera's video encoder fell too far behind: frames received but never encoded
    WRITER = 7  # the writer process died and was restarted: what it held was lost


SOURCE_GAPS = (Gap.SAMPLES, Gap.RESTART, Gap.COUNTER_RESET, Gap.RESYNC)
"""Gap kinds whose cause lies with the device or driver, whatever the writer's load."""


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where the stream stands after its last accepted message."""

    epoch: int
    seq: int
    next_sample: int


@dataclass(frozen=True, slots=True)
class GapRecord:
    """One discontinuity, as half-open ranges; a range is empty when it is not known."""

    kind: Gap
    seq_from: int
    seq_to: int
    sample_from: int
    sample_to: int
    reason: Loss = Loss.UNKNOWN


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with a message."""

    reject: Reject | None = None
    detail: str = ""
    gap: GapRecord | None = None

    @property
    def accepted(self) -> bool:
        return self.reject is None


ACCEPT = Verdict()

COUNTER_LIMIT = 2**63
"""seq and sample counters stay below this, so that finalize and any reader can use int64 arithmetic."""
MAX_SEQ_JUMP = 2**20
"""A larger forward seq jump within one epoch is not believed from one message (a flipped high bit of seq
would otherwise make every later message LATE): it is rejected unless the next message continues it."""


def check_format(h: Header, stream: str, dtype: str, shape: tuple[int, ...]) -> Verdict:
    """Does the chunk look like the configured stream? Never coerce: a mismatch is rejected."""
    if h.stream != stream:
        return Verdict(Reject.WRONG_STREAM, f"stream {h.stream!r}, expected {stream!r}")
    if h.dtype != dtype:
        return Verdict(Reject.DTYPE, f"dtype {h.dtype}, expected {dtype}")
    if tuple(h.shape) != tuple(shape):
        return Verdict(Reject.SHAPE, f"shape {tuple(h.shape)}, expected {tuple(shape)}")
    if h.n_samples == 0:
        return Verdict(Reject.MALFORMED, "empty chunk")
    if h.seq >= COUNTER_LIMIT or h.first_sample + h.n_samples > COUNTER_LIMIT:
        return Verdict(Reject.RANGE, f"seq {h.seq}, samples [{h.first_sample}, {h.first_sample + h.n_samples}): "
                                     f"counters must stay below 2^63")
    return ACCEPT


def check_continuity(prev: Cursor | None, h: Header, held: Cursor | None = None) -> Verdict:
    """Compare a well-formed chunk with the last accepted one.

    ``held`` is the cursor after the last message rejected as LATE or SEQ_JUMP: if ``h`` continues it
    exactly, two messages agree and the cursor was the one that was wrong (a hostile message moved it, or
    the jump was real): the stream resyncs to the sender instead of rejecting it for good.
    """
    if prev is None:
        return ACCEPT
    if h.epoch != prev.epoch:
        # The publisher restarted: messages [0, h.seq) of the new epoch never arrived.
        return Verdict(gap=_sample_gap(Gap.RESTART, prev, h, 0, h.seq))
    if h.seq == prev.seq:
        return Verdict(Reject.DUPLICATE, f"seq {h.seq} already written")
    if h.seq < prev.seq or h.seq > prev.seq + MAX_SEQ_JUMP:
        if held is not None and (held.epoch, held.seq + 1, held.next_sample) == (h.epoch, h.seq, h.first_sample):
            if h.seq > prev.seq:  # the jump was real: everything after the cursor up to h is missing
                return Verdict(gap=_sample_gap(Gap.RESYNC, prev, h, prev.seq + 1, h.seq))
            return Verdict(gap=GapRecord(Gap.RESYNC, held.seq, h.seq, h.first_sample, h.first_sample))
        if h.seq < prev.seq:
            return Verdict(Reject.LATE, f"seq {h.seq} arrived after seq {prev.seq}")
        return Verdict(Reject.SEQ_JUMP, f"seq {h.seq} is more than {MAX_SEQ_JUMP} ahead of seq {prev.seq}")
    if h.seq > prev.seq + 1:
        return Verdict(gap=_sample_gap(Gap.SEQ, prev, h, prev.seq + 1, h.seq))
    if h.first_sample != prev.next_sample:
        kind = Gap.SAMPLES if h.first_sample > prev.next_sample else Gap.COUNTER_RESET
        return Verdict(gap=_sample_gap(kind, prev, h, h.seq, h.seq))
    return ACCEPT


def check_edges(edges: np.ndarray) -> tuple[np.ndarray, list[Verdict]]:
    """Driver edges that can be stored, and one EDGE verdict per edge that cannot (the others are kept)."""
    bad = unstorable_edges(edges)
    if not bad.any():
        return edges, []
    rejects = [Verdict(Reject.EDGE, f"edge sample {int(e['sample'])} line {int(e['line'])} rising {int(e['rising'])}: "
                                    f"line must be <= 65535, rising <= 255, sample < 2^63") for e in edges[bad]]
    return edges[~bad], rejects


def unstorable_edges(edges: np.ndarray) -> np.ndarray:
    """Which driver edges ``check_edges`` rejects (EDGE): a line or rising value or sample beyond what is stored."""
    return (edges["line"] > 0xFFFF) | (edges["rising"] > 0xFF) | (edges["sample"] >= COUNTER_LIMIT)


def _sample_gap(kind: Gap, prev: Cursor, h: Header, seq_from: int, seq_to: int) -> GapRecord:
    if h.first_sample < prev.next_sample:
        kind = Gap.COUNTER_RESET if kind == Gap.SAMPLES else kind
        return GapRecord(kind, seq_from, seq_to, prev.next_sample, prev.next_sample)  # samples unknown
    return GapRecord(kind, seq_from, seq_to, prev.next_sample, h.first_sample)


def advance(h: Header) -> Cursor:
    """The cursor after accepting ``h``."""
    return Cursor(h.epoch, h.seq, h.first_sample + h.n_samples)


WALL_STEP_LIMIT_NS = 10**9
"""Host wall time and CLOCK_MONOTONIC may disagree by this much between two messages before it is a step."""


def wall_step_ns(prev: tuple[int, int, int] | None, mono_ns: int, wall_ns: int) -> int:
    """How far the host wall clock stepped against CLOCK_MONOTONIC since ``prev`` (sample, mono, wall); 0 if
    within WALL_STEP_LIMIT_NS (NTP slews by far less; a step is someone or something setting the clock)."""
    if prev is None:
        return 0
    step = (wall_ns - prev[2]) - (mono_ns - prev[1])
    return step if abs(step) > WALL_STEP_LIMIT_NS else 0


def rising_edges(column: np.ndarray, bit: int, prev_level: bool | None) -> tuple[np.ndarray, bool]:
    """Indices (within ``column``) where ``bit`` goes from 0 to 1, and the level of the last sample.

    ``prev_level`` is the level of the sample before ``column`` (None at the start of a recording,
    where a line already high is not an edge we saw).
    """
    level = ((column.astype(np.uint64, copy=False) >> np.uint64(bit)) & np.uint64(1)).astype(bool)
    if level.size == 0:
        return np.empty(0, np.int64), bool(prev_level)
    before = np.empty_like(level)
    before[0] = level[0] if prev_level is None else prev_level
    before[1:] = level[:-1]
    return np.flatnonzero(level & ~before), bool(level[-1])
