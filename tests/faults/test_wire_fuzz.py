"""A wire fuzzer against a live writer process: valid messages interleaved with hostile ones.

Hypothesis draws a plan of messages; one writer process (started once per test) records each plan
into its own folder, over a real PUSH/PULL socket. After every plan: the writer is alive, every valid
message is stored bit-exact (and nothing else is in /index), no gap is invented, and every hostile
message is counted and recorded in /rejects under the rule it breaks. The short version runs in
``make test``; the seed sweep (``-m slow``) prints its figures.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from acqd.record.ingest import Reject
from acqd.record.streamfile import open_for_read
from acqd.wire.protocol import EDGE_DTYPE, HEADER
from tests.record.livewriter import LiveWriter, message

MAX_MESSAGE_BYTES = 64 << 10
BAD_DTYPES = [b",", b"((1,)),", b"i,i", b"\xff\xfe", b"O", b"2i", b"<f\xb4"]  # numpy cannot, or must not, parse
OTHER_DTYPES = [b"<u2", b">i2", b"<f2", b">u2"]  # parse, 2 bytes like the stream's int16, but are not it

# kind -> the rule the message breaks (None: a valid message; "edges": valid data with bad edges)
KINDS = {
    "valid": None, "valid_edges": None, "bad_edges": "edges", "junk_header": Reject.MALFORMED,
    "short_header": Reject.MALFORMED, "bad_dtype_text": Reject.MALFORMED, "other_dtype": Reject.DTYPE,
    "no_payload": Reject.MALFORMED, "extra_frame": Reject.MALFORMED, "payload_size": Reject.MALFORMED,
    "wrong_stream": Reject.WRONG_STREAM, "wrong_shape": Reject.SHAPE, "oversized": Reject.OVERSIZED,
    "duplicate": Reject.DUPLICATE, "replay": Reject.LATE, "seq_max": Reject.RANGE, "sample_max": Reject.RANGE,
    "seq_jump": Reject.SEQ_JUMP, "flipped_magic": Reject.MALFORMED, "ndim": Reject.MALFORMED,
}


@dataclass
class Plan:
    """What was sent to one recording and what the writer must have made of it."""

    valid: dict[int, np.ndarray] = field(default_factory=dict)
    rules: Counter = field(default_factory=Counter)
    edges: list[tuple[int, int, int]] = field(default_factory=list)


class Driver:
    """Builds each kind of message from the state of a well-behaved publisher (seq, sample counter)."""

    def __init__(self, seq: int = 0):
        self.seq = seq

    def build(self, kind: str, draw: st.DataObject, plan: Plan) -> list[bytes]:
        seq, first = self.seq, 10 * self.seq
        frames, data = message(seq, first)
        if kind in ("valid", "valid_edges", "bad_edges"):
            edges = None
            if kind != "valid":
                good = np.array([(first + 1, 0, 1), (first + 7, 2, 0)], dtype=EDGE_DTYPE)
                bad = np.array([(first + 3, 1 << 16, 1), (first + 4, 0, 256)], dtype=EDGE_DTYPE)
                edges = np.concatenate([good, bad]) if kind == "bad_edges" else good
                plan.edges += [tuple(int(x) for x in e) for e in good]
                plan.rules[Reject.EDGE] += 2 if kind == "bad_edges" else 0
            frames, data = message(seq, first, edges=edges)
            plan.valid[seq] = data
            self.seq += 1
            return frames
        header = bytearray(frames[1])
        if kind == "junk_header":
            return [frames[0], draw.draw(st.binary(min_size=HEADER.size, max_size=HEADER.size)), frames[2]]
        if kind == "short_header":
            return [frames[0], bytes(header[:draw.draw(st.integers(0, HEADER.size - 1))]), frames[2]]
        if kind in ("bad_dtype_text", "other_dtype"):
            header[56:64] = draw.draw(st.sampled_from(BAD_DTYPES if kind == "bad_dtype_text" else OTHER_DTYPES)
                                      ).ljust(8, b"\0")
            return [frames[0], bytes(header), frames[2]]
        if kind == "no_payload":
            return frames[:2]
        if kind == "extra_frame":
            return [*frames, draw.draw(st.binary(max_size=32))]
        if kind == "payload_size":
            return [frames[0], frames[1], frames[2][:-draw.draw(st.integers(1, len(frames[2])))]]
        if kind == "wrong_stream":
            return message(seq, first, stream="other")[0]
        if kind == "wrong_shape":
            return message(seq, first, shape=(5,))[0]
        if kind == "oversized":  # each frame under ZeroMQ's frame limit, the whole message over the stream's
            half = np.zeros((MAX_MESSAGE_BYTES * 3 // 5 // 8, 4), "<i2").tobytes()
            return [frames[0], frames[1], half, half]
        if kind == "duplicate":
            return message(seq - 1, first - 10)[0] if seq else [frames[0], b"", frames[2]]
        if kind == "replay":
            return message(max(seq - 3, 0) - (1 if seq < 3 else 0), first)[0] if seq >= 3 else [frames[0], b"", b""]
        if kind == "seq_max":
            header[16:24] = (2**64 - 1).to_bytes(8, "little")
        elif kind == "sample_max":
            header[24:32] = (2**64 - draw.draw(st.integers(1, 2**62))).to_bytes(8, "little")
        elif kind == "seq_jump":  # far ahead, at a random sample index: never continues an earlier jump
            header[16:24] = (seq + draw.draw(st.integers(2**21, 2**62))).to_bytes(8, "little")
            header[24:32] = draw.draw(st.integers(0, 2**62)).to_bytes(8, "little")
        elif kind == "flipped_magic":
            header[draw.draw(st.integers(0, 3))] ^= 1 << draw.draw(st.integers(0, 7))
        elif kind == "ndim":
            header[36:40] = draw.draw(st.sampled_from([0, 5, 2**32 - 1])).to_bytes(4, "little")
        return [frames[0], bytes(header), frames[2]]


def rule_of(kind: str, seq: int) -> Reject | str | None:
    """The rule a hostile message breaks (a duplicate/replay before there is anything to repeat is malformed)."""
    if kind == "duplicate" and seq == 0 or kind == "replay" and seq < 3:
        return Reject.MALFORMED
    return KINDS[kind]


class Fuzz:
    """One live writer shared by the examples of a test, and the running totals of what it was sent."""

    def __init__(self, tmp: Path):
        self.w = LiveWriter(tmp, socket="pull", sync={"source": "frame"}, max_message_bytes=MAX_MESSAGE_BYTES)
        self.w.connected()
        self.driver = Driver()
        self.examples = 0
        self.sent = 0
        self.valid_lost = 0

    def run(self, kinds: list[str], draw: st.DataObject) -> None:
        self.examples += 1
        folder = self.w.tmp / f"r{self.examples}"
        plan, messages, seq = Plan(), [], self.driver.seq
        try:  # every draw before anything is sent: hypothesis may give up on an example mid-draw
            for kind in ["valid", *kinds]:  # a recording starts at its first accepted message: give it one
                rule = rule_of(kind, self.driver.seq)
                if rule is not None and rule != "edges":
                    plan.rules[rule] += 1
                messages.append(self.driver.build(kind, draw, plan))
        except BaseException:  # (a message sent for an abandoned example was recorded by the next one)
            self.driver.seq = seq
            raise
        self.w.record(folder=folder)
        before = self.w.stats()["total"]
        for frames in messages:
            self.w.driver.send_multipart(frames)
        self.sent += len(kinds) + 1
        handled = before["messages"] + before["rejected_total"] + len(plan.valid) + sum(plan.rules.values())
        try:
            st_ = self.w.wait_handled(handled, timeout_s=10)
        except TimeoutError:
            now = self.w.stats()["total"]
            got = Counter(now["rejected"]) - Counter(before["rejected"])
            raise AssertionError(f"expected {len(plan.valid)} valid, rules {dict(plan.rules)}; the writer took "
                                 f"{now['messages'] - before['messages']} valid, rules {dict(got)}; "
                                 f"sent {['valid', *kinds]}; {self.debug(folder / 's.h5')}") from None
        assert self.w.proc.poll() is None, "the writer died"
        self.w.stop()
        self.check(folder / "s.h5", plan, st_)

    def debug(self, path: Path) -> str:
        self.w.stop()
        with open_for_read(path) as f:
            return f"stored {f['index']['seq'].tolist()}, rejects {f['rejects']['detail'].tolist()}"

    def check(self, path: Path, plan: Plan, stats: dict) -> None:
        with open_for_read(path) as f:
            index, data = f["index"][:], f["data"]
            stored = index["seq"].tolist()
            self.valid_lost += len(set(plan.valid) - set(stored))
            assert stored == sorted(plan.valid), (
                f"valid messages lost, or something else stored: {f['rejects']['detail'].tolist()}")
            for row in index:
                a, n = int(row["file_row"]), int(row["n_samples"])
                assert np.array_equal(data[a:a + n], plan.valid[int(row["seq"])])
            assert f["gaps"].shape[0] == 0, "a gap was invented"
            got = Counter(Reject(int(r)) for r in f["rejects"]["reason"])
            assert got == +plan.rules, (got, plan.rules)
            assert all(len(d) > 0 for d in f["rejects"]["detail"])
            assert sorted(map(tuple, f["sync/edges"][:].tolist())) == sorted(plan.edges)
        assert stats["recording_counts"]["rejected_total"] == sum(plan.rules.values())


pytestmark = pytest.mark.xdist_group("wire_fuzz")  # one xdist worker: the module-scoped session is built once


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    f = Fuzz(tmp_path_factory.mktemp("fz"))
    yield f
    rc = f.w.close()
    print(f"\nwire fuzz: {f.sent} messages in {f.examples} recordings, writer crashes "
          f"{0 if rc == 0 else 1}, valid messages lost {f.valid_lost}")
    assert rc == 0


PLAN = st.lists(st.sampled_from(sorted(KINDS)), min_size=10, max_size=40)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kinds=PLAN, data=st.data())
def test_wire_fuzz_against_a_live_writer(fuzz, kinds, data):
    fuzz.run(kinds, data)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kinds=st.lists(st.sampled_from(sorted(KINDS)), min_size=20, max_size=80), data=st.data())
def test_wire_fuzz_seed_sweep(fuzz, kinds, data):
    fuzz.run(kinds, data)
