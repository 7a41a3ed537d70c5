"""A group writer's batch path (issue 27): one stream's drained messages checked and stored together.

Handled one at a time (``Writer.on_message``), a slow stream's small message (~10 rows) cost ~60 µs of Python:
decode, checks, the copy and CRC, the index row, the bookkeeping. Here the messages of one stream taken in one
drain are handled together: their header frames decoded as one numpy record array (``HEADER_DTYPE``), every check
of ``on_message`` made over the arrays, and each run of *plain* messages stored with one copy, one write of the
chunks it fills and one extension of the pending index (``StreamFile.append_batch``). A plain message is one whose
handling has no branch: well-formed, the stream's own name, dtype and shape byte for byte, no timestamps or offsets
frame, storable driver edges, within the counter range and ``max_message_bytes``, continuing the one before it
(the same epoch, the next seq, the next sample) with no host wall-clock step. Everything else (a stream's first
message, a gap, every reject, a part about to fill by size, an armed fault hook, a camera) goes through
``Writer.handle`` one message at a time, exactly as before, in its place in the order. What the batch path writes,
counts and reports is what ``on_message`` would have (tests/record/test_batch.py compares the files). While a page
watches the preview, each run goes to it as one chunk (``Writer.show``): the preview keeps rows on a fixed grid of
the device counter, so a run shows what its messages one by one would have. (A watched stream used to leave the
batch path: that cost the reference rig's two 1 kHz sensors +0.8 % of a core, measured.)
"""

from __future__ import annotations

import functools
import time

import numpy as np
import zmq

from acqd.config import FrameSync
from acqd.errors import DiskFullError, WriterError
from acqd.record.ingest import COUNTER_LIMIT, WALL_STEP_LIMIT_NS, Cursor, rising_edges, unstorable_edges
from acqd.record.streamfile import EDGE_DTYPE as FILE_EDGE_DTYPE
from acqd.record.streamfile import PENDING_DTYPE, chunk_rows
from acqd.record.writer import DRAIN_BUDGET_S, DRAIN_LIMIT, Writer
from acqd.wire.protocol import EDGE_DTYPE, FLAG_EDGES, HEADER, HEADER_DTYPE, Header, encode_header

SIZE_MARGIN_BYTES = 1 << 20
"""Room for HDF5's own metadata when a run is checked against ``max_file_bytes`` as a whole (see ``_fits``)."""
_BLANK = bytes(HEADER.size)


@functools.lru_cache(maxsize=None)
def _template(name: str, dtype: str, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The header bytes every plain message of a stream carries, and which of the 104 bytes those are (all but
    flags, epoch, seq, first sample, sample count and device time)."""
    fixed = np.ones(HEADER.size, bool)
    for field in ("flags", "epoch", "seq", "first_sample", "n_samples", "device_time_ns"):
        off = HEADER_DTYPE.fields[field][1]
        fixed[off:off + HEADER_DTYPE[field].itemsize] = False
    template = np.frombuffer(encode_header(Header(name, 0, 0, 0, 1, dtype, shape)), np.uint8)
    return template[fixed], fixed


def eligible(w: Writer) -> bool:
    """Whether ``w`` may take a run now: it has accepted a message (a first one may be a late joiner, an event), no
    fault hook is armed (they count per message), no camera's encoder (it may drop frames) and nothing dropped
    waiting for its gap row."""
    return (w.cursor is not None and w.last_seq is not None and not w.faults.at
            and w.dropped is None and (w.file is None or w.file.video is None))


def drain_batch(w: Writer, limit: int, budget_s: float = DRAIN_BUDGET_S) -> None:
    """Handle what ``w``'s receiver queued, at most ``limit`` messages and, as ``Writer.drain``, not much longer than
    ``budget_s`` (a hostile flood on one stream must not hold the others back), in batches of at most DRAIN_LIMIT;
    tells ``w.load`` whether the queue ran empty."""
    started = time.monotonic()
    handled = 0
    while handled < limit and w.inbox:
        items = [w.inbox.popleft() for _ in range(min(DRAIN_LIMIT, limit - handled, len(w.inbox)))]
        handle_batch(w, items)
        handled += len(items)
        if time.monotonic() > started + budget_s:
            break
    w.load.drained(started, not w.inbox, handled)


def handle_batch(w: Writer, items: list[tuple[int, int, list[zmq.Frame]]]) -> None:
    """Every message of ``items`` (wall ns, monotonic ns, frames), in order: plain runs stored together, the others
    through ``Writer.handle``."""
    k = len(items)
    plain, heads, payloads, edge_bufs, nbytes = _inspect(w, items)
    wall = np.fromiter((it[0] for it in items), np.int64, k)
    mono = np.fromiter((it[1] for it in items), np.int64, k)
    seq, epoch = heads["seq"].astype(np.int64), heads["epoch"].astype(np.int64)
    first, n = heads["first_sample"].astype(np.int64), heads["n_samples"].astype(np.int64)
    # linked[i]: message i continues message i - 1 exactly, both plain, no wall-clock step between them.
    linked = np.zeros(k, bool)
    if k > 1:
        step = (wall[1:] - wall[:-1]) - (mono[1:] - mono[:-1])
        linked[1:] = (plain[1:] & plain[:-1] & (epoch[1:] == epoch[:-1]) & (seq[1:] == seq[:-1] + 1)
                      & (first[1:] == first[:-1] + n[:-1]) & (np.abs(step) <= WALL_STEP_LIMIT_NS))
    breaks = np.flatnonzero(~linked)
    plain_l, seq_l, epoch_l, first_l = plain.tolist(), seq.tolist(), epoch.tolist(), first.tolist()
    wall_l, mono_l = wall.tolist(), mono.tolist()
    i = 0
    while i < k:
        c = w.cursor
        if plain_l[i] and eligible(w) and (epoch_l[i], seq_l[i], first_l[i]) == (c.epoch, c.seq + 1, c.next_sample) \
                and not _wall_step(w.last_chunk, mono_l[i], wall_l[i]):
            b = int(np.searchsorted(breaks, i, side="right"))
            end = int(breaks[b]) if b < len(breaks) else k
            i = _run(w, items, i, end, heads, payloads, edge_bufs, nbytes)
        else:
            _one(w, items[i])
            i += 1


def _one(w: Writer, item: tuple[int, int, list]) -> None:
    """One message through ``Writer.handle``, which reads zmq.Frames (the receiver queues bytes)."""
    wall_ns, mono_ns, frames = item
    w.handle([zmq.Frame(f) if isinstance(f, bytes) else f for f in frames], (wall_ns, mono_ns))


def _wall_step(last_chunk: tuple[int, int, int] | None, mono_ns: int, wall_ns: int) -> bool:
    return last_chunk is not None and abs((wall_ns - last_chunk[2]) - (mono_ns - last_chunk[1])) > WALL_STEP_LIMIT_NS


def _inspect(w: Writer, items: list) -> tuple[np.ndarray, np.ndarray, list, list, np.ndarray]:
    """Which messages are plain (see the module docstring), their decoded headers, payload and edge frames, sizes."""
    k = len(items)
    cfg = w.cfg
    name = cfg.name.encode()
    heads_raw, payloads, edge_bufs, sizes, shape_ok, n_frames = [], [], [], [], [], []
    for _, _, frames in items:
        bufs = frames if type(frames[0]) is bytes else [f.buffer for f in frames]
        nf = len(bufs)
        sizes.append(sum(map(len, bufs)))
        n_frames.append(nf)
        if (nf == 3 or nf == 4) and len(bufs[1]) == HEADER.size and bufs[0] == name:
            heads_raw.append(bufs[1])
            payloads.append(bufs[2])
            edge_bufs.append(bufs[3] if nf == 4 else None)
            shape_ok.append(nf == 3 or len(bufs[3]) % EDGE_DTYPE.itemsize == 0)
        else:
            heads_raw.append(_BLANK)
            payloads.append(b"")
            edge_bufs.append(None)
            shape_ok.append(False)
    raw = np.frombuffer(b"".join(heads_raw), np.uint8).reshape(k, HEADER.size)
    heads = raw.view(HEADER_DTYPE).reshape(k)
    template, fixed = _template(cfg.name, cfg.dtype, tuple(cfg.shape))
    nbytes = np.array(sizes, np.int64)
    n = heads["n_samples"].astype(np.int64)
    flags = heads["flags"]
    n_frames = np.array(n_frames)
    plain = (np.array(shape_ok) & (raw[:, fixed] == template).all(axis=1)
             & ((flags == 0) & (n_frames == 3) | (flags == FLAG_EDGES) & (n_frames == 4))
             & (n > 0) & (heads["seq"] < COUNTER_LIMIT) & (heads["first_sample"] <= COUNTER_LIMIT - n.astype(np.uint64))
             & (nbytes <= cfg.max_message_bytes)
             & (np.fromiter((len(p) for p in payloads), np.int64, k) == n * cfg.sample_bytes))
    if isinstance(cfg.sync, FrameSync) and any(b is not None for b in edge_bufs):
        # A message with an edge that cannot be stored is not plain: on_message rejects that edge with its seq.
        counts = [len(b) // EDGE_DTYPE.itemsize if b is not None and p else 0 for b, p in zip(edge_bufs, plain)]
        bad = unstorable_edges(np.frombuffer(b"".join(b for b, c in zip(edge_bufs, counts) if c), EDGE_DTYPE))
        if bad.any():
            plain[np.unique(np.repeat(np.arange(k), counts)[bad])] = False
    return plain, heads, payloads, edge_bufs, nbytes


def _run(w: Writer, items: list, i: int, end: int, heads: np.ndarray, payloads: list, edge_bufs: list,
         nbytes: np.ndarray) -> int:
    """Accept the plain run ``items[i:end]``, which continues ``w.cursor``; stored in sub-runs that each fit the
    current part. Returns where handling continues (``end``, or after a write failure the first message left to
    ``Writer.handle``)."""
    while i < end:
        try:
            stop = end
            if w.file is not None:
                if w.part_full():
                    w.roll_over()
                stop = i + _fits(w, heads["n_samples"][i:end], nbytes[i:end])
            _accept(w, items, i, stop, heads, payloads, edge_bufs, nbytes)
        except DiskFullError:
            raise
        except WriterError as e:  # EIO: as Writer.handle does, the part is suspect and the messages go to the next
            w.part_failed(e)
            for item in items[i:end]:
                _one(w, item)
            return end
        i = stop
    return end


def _fits(w: Writer, n: np.ndarray, nbytes: np.ndarray) -> int:
    """How many messages of a run the current part takes before ``Writer.part_full`` would say it is full: by rows
    exactly; by bytes all of them when even the whole run and a chunk cannot reach the limit, else one (whose
    store is then followed by ``part_full``'s own look, as for a message handled alone)."""
    c, f = w.cfg, w.file
    starts = f.rows + np.cumsum(n.astype(np.int64)) - n
    m = len(n)
    if c.max_file_seconds:
        m = max(1, int(np.count_nonzero(starts < c.max_file_seconds * c.rate)))
    if c.max_file_bytes:
        growth = (int(n[:m].sum()) + chunk_rows(c)) * c.sample_bytes + SIZE_MARGIN_BYTES
        if f.size_bytes + growth >= c.max_file_bytes:
            m = 1
    return m


def _accept(w: Writer, items: list, i: int, end: int, heads: np.ndarray, payloads: list, edge_bufs: list,
            nbytes: np.ndarray) -> None:
    """What ``on_message`` does for each accepted plain message of ``items[i:end]``, done once for all of them."""
    h = heads[i:end]
    cfg = w.cfg
    last = end - 1
    seq_last, epoch_last = int(h["seq"][-1]), int(h["epoch"][-1])
    n_total = int(h["n_samples"].astype(np.int64).sum())
    first0 = int(h["first_sample"][0])
    wall_last, mono_last = items[last][0], items[last][1]
    data = None
    if w.file is not None or w.preview is not None:
        data = np.frombuffer(b"".join(payloads[i:end]), cfg.np_dtype).reshape((n_total, *cfg.shape))
    if w.file is not None:
        index = np.zeros(end - i, PENDING_DTYPE)
        for name in ("seq", "epoch", "n_samples", "first_sample", "device_time_ns"):
            index[name] = h[name]
        index["host_wall_ns"] = [it[0] for it in items[i:end]]
        index["host_mono_ns"] = [it[1] for it in items[i:end]]
        w.file.append_batch(data, index)
        if w.first_recorded_ns is None:
            w.first_recorded_ns = items[i][0]
        _store_edges(w, data, first0, h, edge_bufs[i:end])
    # The state on_message leaves after the last of them (counted once stored: accepted, never both).
    w.last_message_mono = mono_last / 1e9
    w.held = None
    w.cursor = Cursor(epoch_last, seq_last, int(h["first_sample"][-1]) + int(h["n_samples"][-1]))
    w.last_seq = seq_last
    w.last_chunk = (int(h["first_sample"][-1]), mono_last, wall_last)
    w.next_gap_reason, w.link_dropped = None, False
    size = int(nbytes[i:end].sum())
    for counts in (w.total, w.rec) if w.file is not None else (w.total,):
        counts.messages += end - i
        counts.samples += n_total
        counts.bytes += size
    if data is not None:
        w.show(data, first0, mono_last)  # as on_message: after the counts (a no-op when nobody watches)


def _store_edges(w: Writer, data: np.ndarray, first0: int, h: np.ndarray, edge_bufs: list) -> None:
    """``Writer.store_edges`` for the run: each line's rising edges over the run's rows (its level carried from the
    message before, as per message: a run has no gap), and the drivers' edges; queued in the order of messages,
    each message's own lines first, then its driver's edges, and the live sync edges likewise."""
    n = h["n_samples"].astype(np.int64)
    starts = np.cumsum(n) - n
    samples, lines, rising, owner, live = [], [], [], [], []
    for k, line in enumerate(w.spec.lines):
        idx, w.levels[k] = rising_edges(data[:, line.channel], line.bit, w.levels[k])
        samples.append(first0 + idx)
        lines.append(np.full(len(idx), k))
        rising.append(np.ones(len(idx), np.int64))
        owner.append(np.searchsorted(starts, idx, side="right") - 1)
        live.append(np.full(len(idx), line.label == "sync"))
    if isinstance(w.cfg.sync, FrameSync) and any(b is not None for b in edge_bufs):
        counts = [0 if b is None else len(b) // EDGE_DTYPE.itemsize for b in edge_bufs]
        edges = np.frombuffer(b"".join(b for b in edge_bufs if b is not None), EDGE_DTYPE)
        samples.append(edges["sample"].astype(np.int64))
        lines.append(edges["line"].astype(np.int64))
        rising.append(edges["rising"].astype(np.int64))
        owner.append(np.repeat(np.arange(len(edge_bufs)), counts))
        live.append((edges["line"] == 0) & (edges["rising"] == 1))
    if not samples or not sum(len(s) for s in samples):
        return
    order = np.argsort(np.concatenate(owner), kind="stable")  # per message: its lines' edges, then its driver's
    rows = np.empty(len(order), FILE_EDGE_DTYPE)
    rows["sample"] = np.concatenate(samples)[order]
    rows["line"] = np.concatenate(lines)[order]
    rows["rising"] = np.concatenate(rising)[order]
    w.file.queue("sync/edges", rows)
    keep = np.concatenate(live)[order]
    if keep.any():
        w.keep_live_edges(rows["sample"][keep].tolist())
