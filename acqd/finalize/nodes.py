"""A session recorded by several PCs, finalized on the leader: the other nodes' parts, checked and aligned.

This module owns what the leader's finalize adds for a rig of several PCs (docs/finalize.md "A rig of several
PCs"). The leader's ``session.json`` names every node under ``"nodes"`` (its own under ``"node"``); each other
node seals its own part of the session and hands it over (the ship queue, a destination with ``path:
"{session}/nodes/{node}"``, or a shared mount), so that it lands in ``<session>/nodes/<node>/`` with the node's
``manifest.sha256``, ``session.json``, stream files and its own finalize outputs. Here:

- ``wait_for_nodes``: a node has *arrived* once its manifest is there and either ``READY.json`` (the ship queue
  writes it last, after verifying) or every file the manifest lists, unchanged from one poll to the next (a copy
  fills each file under its final name) and hashing to the manifest (a copy can stall for longer than a poll);
  finalize waits for every node up to a timeout, then goes on without the rest (gather then says why);
- ``gather``: every arrived node is verified against its own manifest (sha256, with the finalize run's
  ``Digests``, so the leader's manifest reuses the hashes), its streams read from its files (never written: its
  recovered copies and virtual datasets are its own finalize's), and the nodes that are missing, fail their
  manifest, clash with another node's stream names or cannot be aligned are listed with a verdict, never
  dropped silently;
- ``NodeParts.align``: each node's streams on the leader's reference timebase. A node's reference is paired
  with the leader's by the shared sync line (``bridge``). A stream with sync edges is paired with the leader's
  reference directly, like a local stream, its prior the node's own fit through the bridge (host clocks of two
  PCs are not one clock); every other stream (host-timed, strobe-timed, LSL) is the node's own fit to its
  reference composed with the bridge (``compose``), the error bounds added.

A node that arrives after the leader finalized is picked up by finalizing again (``late_arrivals``).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from acqd.config import ChannelSync, FrameSync, StreamConfig
from acqd.errors import ClockFitError, FinalizeError, SessionError
from acqd.finalize.clock import ClockFit, align_stream
from acqd.finalize.digests import Stamp
from acqd.finalize.layout import MANIFEST, NODES_DIR, READY, RECOVERED_DIR, VDS_DIR, rel
from acqd.finalize.report import FAIL, PASS, WARN, StreamReport
from acqd.finalize.seal import Digests, listed_problems, read_manifest
from acqd.finalize.streams import Stream, read_stream, stream_parts
from acqd.session import FINALIZED, read_session

DEFAULT_NODE = "main"  # the node name of a session that does not say (acqd.config's ``node`` default)
ARRIVED, MISSING, UNVERIFIED, UNUSABLE = "arrived", "missing", "unverified", "unusable"
POLL_S = 1.0

Progress = Callable[[str, float], None]


def node_name(session: dict) -> str:
    """The PC that recorded ``session``: its ``node``, else its config's (the rig config's ``node``)."""
    return session.get("node") or (session.get("config") or {}).get("node") or DEFAULT_NODE


def other_nodes(session: dict) -> list[str]:
    """The nodes of a multi-PC session other than this one (empty on a one-PC session)."""
    own = node_name(session)
    return sorted(n for n in session.get("nodes") or {} if n != own)


def node_files(folder: Path) -> list[Path]:
    """Every regular file below ``nodes/`` (to unseal when a run rolls back)."""
    root = Path(folder) / NODES_DIR
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()) if root.is_dir() else []


def stream_names(folder: Path, session: dict) -> list[str]:
    """The stream names of every other node whose part holds a readable session.json."""
    names = []
    for n in other_nodes(session):
        try:
            names += [s["name"] for s in read_session(Path(folder) / NODES_DIR / n)["config"]["streams"]]
        except (SessionError, KeyError, TypeError):
            continue  # not arrived, or not a session: gather says why
    return names


# -- arrival ---------------------------------------------------------------------------------------------------


def arrival(folder: Path, name: str) -> str | None:
    """None when node ``name``'s part has arrived, else why not (in words)."""
    part = Path(folder) / NODES_DIR / name
    if not part.is_dir():
        return f"nothing arrived in {NODES_DIR}/{name}/"
    try:
        listed = read_manifest(part)
    except OSError:
        return f"no {MANIFEST} in {NODES_DIR}/{name}/ (not sealed on the node, or still arriving)"
    if (part / READY).is_file():
        return None
    absent = [n for n in listed if not (part / n).is_file()]
    return f"still arriving: {len(absent)} of {len(listed)} files missing" if absent else None


def wait_for_nodes(folder: Path, session: dict, timeout_s: float, progress: Progress | None = None
                   ) -> tuple[dict[str, str], dict[Path, tuple[str, Stamp]]]:
    """Wait up to ``timeout_s`` for every other node's part; returns why each node still missing is missing, and
    the digests taken of parts that arrived without ``READY.json`` (``Digests``'s ``known``: not read again)."""
    deadline = time.monotonic() + timeout_s
    names = other_nodes(session)
    seen: dict[str, tuple] = {}
    with Digests() as digests:
        poll = 0
        while True:
            poll += 1
            missing = {n: why for n in names if (why := arrival(folder, n) or _unsettled(folder, n, seen)) is not None}
            if time.monotonic() < deadline:  # past it, a part that still does not match is gather's to report
                digests.recheck()  # what changed since the last poll is hashed anew (and handed on as it is now)
                missing |= {n: why for n in names if n not in missing and (why := _unmatched(folder, n, digests))}
            # a part first seen complete is looked at once more even past the deadline: it may have settled
            if not missing or (time.monotonic() >= deadline and (poll > 1 or not set(missing) & set(seen))):
                return missing, digests.taken()
            if progress is not None:
                progress("check", (len(names) - len(missing)) / max(1, len(names)))
            time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))


def _unmatched(folder: Path, name: str, digests: Digests) -> str | None:
    """Why a settled part without READY.json may still be arriving: a copy that stalled for a poll mid-file (a
    loaded machine) looks settled, so its files must also hash to its manifest (a node was left out as "contents
    changed" while its copy still ran, its files intact a moment later). None with READY.json."""
    part = Path(folder) / NODES_DIR / name
    if (part / READY).is_file():
        return None
    problems = verify_part(part, digests)
    return f"still arriving: {len(problems)} file(s) of {NODES_DIR}/{name}/ do not match its manifest yet" \
        if problems else None


def _unsettled(folder: Path, name: str, seen: dict[str, tuple]) -> str | None:
    """Why a part without READY.json whose listed files are all there may still be arriving: a copy (rclone's
    local backend, cp) creates each file under its final name and then fills it, so the part counts only once its
    files' sizes and times stayed the same from one poll to the next. None with READY.json (written last by the
    ship queue, after it verified the copy)."""
    part = Path(folder) / NODES_DIR / name
    if (part / READY).is_file():
        return None
    try:
        stats = [(n, (st := (part / n).stat()).st_size, st.st_mtime_ns, st.st_ctime_ns)
                 for n in sorted(read_manifest(part))]
    except OSError:
        return f"still arriving in {NODES_DIR}/{name}/"
    previous, seen[name] = seen.get(name), tuple(stats)
    return None if previous == seen[name] else f"still arriving: files of {NODES_DIR}/{name}/ are changing"


def late_arrivals(folder: Path, session: dict) -> list[str]:
    """Nodes a finalized session left out (missing, unverified, unusable) whose part has arrived, or changed, since
    (finalize again to take them); a part left out as it still is would only be left out again."""
    states = (session.get("finalize") or {}).get("nodes") or {}
    return [n for n in other_nodes(session) if states.get(n, {}).get("state") != ARRIVED
            and arrival(folder, n) is None and fingerprint(folder, n) != states.get(n, {}).get("fingerprint")]


def fingerprint(folder: Path, name: str) -> str:
    """What node ``name``'s folder holds now (names, sizes, modification times), to tell a changed part."""
    root = Path(folder) / NODES_DIR / name
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    listing = "".join(f"{rel(p, root)} {(st := p.stat()).st_size} {st.st_mtime_ns}\n" for p in files)
    return hashlib.sha256(listing.encode()).hexdigest()


# -- gathering -------------------------------------------------------------------------------------------------


@dataclass
class NodePart:
    """One other node's arrived, verified part: its streams as read from its files."""

    name: str
    folder: Path
    session: dict
    streams: dict[str, Stream]
    linked: dict[str, Path]
    reference: str


@dataclass
class NodeParts:
    """Every other node of the session: the usable parts, and a state, verdict and reason for each node."""

    parts: dict[str, NodePart] = field(default_factory=dict)
    states: dict[str, dict] = field(default_factory=dict)
    """node -> {state, verdict, problem, streams, ...} (qc.json "nodes", session.json finalize.nodes)."""

    @property
    def streams(self) -> dict[str, Stream]:
        return {n: s for p in self.parts.values() for n, s in p.streams.items()}

    @property
    def linked(self) -> dict[str, Path]:
        return {n: f for p in self.parts.values() for n, f in p.linked.items()}

    @property
    def warnings(self) -> list[str]:
        return [f"node {n!r} {s['state']}: {s['problem']}" for n, s in self.states.items() if s.get("problem")]

    def sealed(self, path: Path, folder: Path) -> bool:
        """Whether the leader seals ``path``: its own files, and those of the nodes used. A part left out (still
        arriving, failing its manifest) is neither sealed nor listed: it may still be completed and taken by
        finalizing again."""
        parts = Path(rel(path, folder)).parts
        return len(parts) < 2 or parts[0] != NODES_DIR or parts[1] in self.parts

    def node_of(self, stream: str) -> str | None:
        return next((p.name for p in self.parts.values() if stream in p.streams), None)

    def incidents(self, stream: str, own: list[dict]) -> list[dict]:
        """The incidents recorded for ``stream``: its node's, or the leader's own (``own``)."""
        node = self.node_of(stream)
        return own if node is None else self.parts[node].session.get("incidents", [])

    def align(self, ref: Stream, max_ppm: float) -> dict:
        """Every usable node's streams on the timebase ``ref`` (``Alignment`` by stream); a node whose reference
        cannot be paired with ``ref`` is moved to the unusable ones (FAIL), its streams left out."""
        out = {}
        for name, part in list(self.parts.items()):
            try:
                aligned, bridge = align_node(part, ref, max_ppm)
            except ClockFitError as e:
                del self.parts[name]
                self.states[name].update(state=UNUSABLE, verdict=FAIL, fingerprint=fingerprint(part.folder.parents[1],
                                                                                                name), problem=(
                    f"its reference {part.reference!r} cannot be paired with {ref.name!r} by the shared sync line "
                    f"({e}); is it wired to the rig's sync line? Its streams are left out of the master"))
                continue
            self.states[name]["bridge"] = bridge.to_dict()
            out.update(aligned)
        return out

    def label(self, reports: dict[str, StreamReport]) -> None:
        """Each stream report names its node; each node's verdict is its streams' worst."""
        for name, part in self.parts.items():
            verdicts = set()
            for s in part.streams:
                reports[s].node = name
                verdicts.add((reports[s].qc or {}).get("verdict", PASS))
            self.states[name]["verdict"] = FAIL if FAIL in verdicts else WARN if WARN in verdicts else PASS


def gather(folder: Path, session: dict, digests: Digests, missing: dict[str, str], taken: set[str]) -> NodeParts:
    """Every other node's part: verified against its manifest and read, or listed with why it is not used.
    ``missing``: the nodes that did not arrive and why (``wait_for_nodes``); ``taken``: stream names already in
    the master (the leader's own)."""
    out = NodeParts()
    for name in other_nodes(session):
        if name in missing:
            out.states[name] = {"state": MISSING, "verdict": WARN, "streams": [], "problem": (
                f"{missing[name]}; the session is finalized without it (`acqd finalize` again once it arrives)"),
                "fingerprint": fingerprint(folder, name)}
            continue
        part_folder = Path(folder) / NODES_DIR / name
        try:
            part = _read_part(name, part_folder, digests, taken)
        except (FinalizeError, SessionError) as e:
            out.states[name] = {"state": UNVERIFIED, "verdict": FAIL, "streams": [], "problem": str(e),
                                "fingerprint": fingerprint(folder, name)}
            continue
        taken |= set(part.streams)
        out.parts[name] = part
        out.states[name] = {"state": ARRIVED, "verdict": PASS, "streams": sorted(part.streams), "problem": None,
                            "folder": rel(part_folder, folder), "reference": part.reference}
    return out


def _read_part(name: str, folder: Path, digests: Digests, taken: set[str]) -> NodePart:
    """Node ``name``'s part: verified, its session finalized by the node, its stream names free; its streams."""
    problems = verify_part(folder, digests)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise FinalizeError(f"does not match its own {MANIFEST}: {'; '.join(problems[:5])}{more}; left out")
    session = read_session(folder)
    if session.get("state") != FINALIZED:
        raise FinalizeError(f"its session is {session.get('state')}, not finalized on the node; left out")
    if node_name(session) != name:
        raise FinalizeError(f"its session.json says node {node_name(session)!r}; left out")
    configs = [StreamConfig.model_validate(s) for s in session["config"]["streams"]]
    if clash := sorted({c.name for c in configs} & taken):
        raise FinalizeError(f"stream name(s) {', '.join(clash)} also recorded by another node; left out")
    parts = stream_parts(folder, session)
    home = f"{rel(folder, folder.parent.parent)}/"
    streams, linked = {}, {}
    for cfg in configs:
        paths = [_clean_copy(folder, p) for p in parts.get(cfg.name, [])]
        s = read_stream(folder, _described(cfg, name), paths) if paths else None
        if s is None:
            continue
        streams[cfg.name] = replace(s, home=home)
        linked[cfg.name] = _linked(folder, streams[cfg.name])
    if session["reference"] not in streams:
        raise FinalizeError(f"its reference stream {session['reference']!r} recorded nothing; left out")
    return NodePart(name, folder, session, streams, linked, session["reference"])


def verify_part(folder: Path, digests: Digests) -> list[str]:
    """Problems of a node's part against its own manifest: files missing, changed, or not listed (but the
    manifest and READY.json)."""
    try:
        listed = read_manifest(folder)
    except OSError as e:
        return [f"{MANIFEST}: {e.strerror}"]
    problems, present = listed_problems(folder, listed)
    digests.add(present.values())
    problems += [f"{n}: contents changed" for n, p in sorted(present.items()) if digests.get(p) != listed[n]]
    extra = sorted(rel(p, folder) for p in folder.rglob("*") if (p.is_file() or p.is_symlink())
                   and rel(p, folder) not in listed and rel(p, folder) not in (MANIFEST, READY))
    return problems + [f"{n}: not in the manifest" for n in extra]


def _clean_copy(folder: Path, part: Path) -> Path:
    """The node's own recovered copy of a part its writer left open (its finalize made it), else the part."""
    copy = folder / RECOVERED_DIR / part.name
    return copy if copy.is_file() else part


def _linked(folder: Path, s: Stream) -> Path:
    """The file the master links: the only part, or the node's own virtual dataset over its parts."""
    if len(s.parts) == 1:
        return s.parts[0].link
    vds = folder / VDS_DIR / f"{s.name}.h5"
    if not vds.is_file():
        raise FinalizeError(f"stream {s.name!r} has {len(s.parts)} parts but no {VDS_DIR}/{s.name}.h5; left out")
    return vds


def _described(cfg: StreamConfig, node: str) -> StreamConfig:
    """The stream's config with its node in the description the master's series carries."""
    return cfg.model_copy(update={"description": f"{cfg.description or cfg.name} (recorded by node {node})"})


# -- alignment -------------------------------------------------------------------------------------------------


def align_node(part: NodePart, ref: Stream, max_ppm: float) -> tuple[dict, ClockFit]:
    """The node's streams on ``ref``'s timebase, and the bridge (its reference -> ``ref``). Raises ClockFitError
    when its reference's sync edges cannot be paired with ``ref``'s."""
    from acqd.finalize.timing import Alignment, align_all, align_sync, covering_rows

    own = part.streams[part.reference]
    if own.n_segments > 1:
        raise ClockFitError(f"the node's reference counter was reset ({own.n_segments} counter segments)")
    bridge = covering_rows(align_stream(own.edges.get("sync", np.empty(0, np.int64)), own.rate,
                                        ref.edges.get("sync", np.empty(0, np.int64)), ref.rate, max_ppm=max_ppm), own)
    local = align_all(part.streams, own, max_ppm)  # as the node's own finalize timed them
    out = {}
    for n, s in part.streams.items():
        a = local[n]
        via = compose(a.fit, bridge, own.rate)
        if n == part.reference:
            out[n] = Alignment(bridge, [], pairs=None)
        elif a.fit.source == "sync" and isinstance(s.cfg.sync, (ChannelSync, FrameSync)):
            out[n] = align_sync(s, ref, max_ppm, host=via)  # the shared line, like a local stream
        else:
            pairs = None if a.pairs is None else (a.pairs[0], bridge.to_reference(a.pairs[1] * own.rate))
            flags = list(a.flags)
            if via.source == "host":
                flags.append(f"through node {part.name}'s reference {part.reference!r}: bound "
                             f"{a.fit.error_bound_s * 1e3:.3g} ms + {bridge.error_bound_s * 1e3:.3g} ms")
            out[n] = Alignment(via, flags, a.frames, pairs, a.lsl)
    return out, bridge


def compose(fit: ClockFit, bridge: ClockFit, rate: float) -> ClockFit:
    """``fit`` (device sample -> node reference seconds) followed by ``bridge`` (node reference sample -> leader
    reference seconds, one counter segment; ``rate``: the node reference's nominal rate). Both are
    piecewise-linear, so the composition is too, with knots at ``fit``'s knots and the device samples where
    ``bridge`` has its own; its error bound is the sum of both."""
    if bridge.segments != 1:
        raise ClockFitError(f"the bridge has {bridge.segments} counter segments")
    knots, seconds = [], []
    for k, (x, y) in enumerate(zip(fit.knots, fit.seconds)):
        inner = bridge.knots[0] / rate  # bridge knots in node reference seconds
        inner = inner[(inner > y[0]) & (inner < y[-1])]
        kx = np.union1d(x, np.interp(inner, y, x))
        knots.append(kx)
        seconds.append(bridge.to_reference(fit.to_reference(kx, k) * rate))
    drift = ((1 + fit.drift_ppm * 1e-6) * (1 + bridge.drift_ppm * 1e-6) - 1) * 1e6
    source = "sync" if fit.source == "reference" else fit.source
    return replace(fit, knots=tuple(knots), seconds=tuple(seconds), source=source, drift_ppm=drift,
                   model="piecewise" if any(len(k) > 2 for k in knots) else fit.model,
                   error_bound_s=fit.error_bound_s + bridge.error_bound_s,
                   segment_bounds_s=tuple(b + bridge.error_bound_s for b in fit.segment_bounds_s),
                   extrapolation_ppm=fit.extrapolation_ppm + bridge.extrapolation_ppm)


def node_summary(session: dict, own_reports: dict[str, StreamReport], parts: NodeParts) -> dict[str, dict]:
    """qc.json's "nodes": the leader's own node (its streams' worst verdict) and every other node."""
    if not other_nodes(session):
        return {}
    verdicts = {(r.qc or {}).get("verdict", PASS) for r in own_reports.values()}
    own = {"state": "leader", "streams": sorted(own_reports), "problem": None,
           "verdict": FAIL if FAIL in verdicts else WARN if WARN in verdicts else PASS}
    return {node_name(session): own, **parts.states}

