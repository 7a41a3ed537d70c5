"""Finalize a recorded session: align every clock, write the master NWB, validate it, seal the folder.

The package owns the finalize stage end to end, from a quiescent session folder to a sealed one
(docs/finalize.md). This module owns the orchestration: which sessions may be finalized (state, no stream
file held open, one finalizer at a time), the stages in order and their progress, the rollback, and the
state changes in ``session.json``. The stages live in:

- ``streams``: what each stream's part files committed, recovery of parts a killed writer left open, the
  file the master links (a part, a recovered copy, or a virtual dataset over the parts);
- ``clock``: edge pairing and the fit of each device clock to the reference (pure numpy);
- ``timing``: every stream on the session timebase (``clock`` fits, frame/strobe pairing, time zero,
  row times, gaps and events);
- ``plan``: the plan of the master NWB file (``masterplan``'s plain dataclasses), built from it by ``nwb`` (the only
  module that imports pynwb, imported only where a file is written or checked);
- ``report``: ``FinalizeReport``, ``StreamReport`` and the QC summary and plots (written by ``qc``);
- ``integrity``: what the folder may hold (no links, no unknown files) and every chunk's checksum;
- ``seal``: read-only, immutable, ``manifest.sha256`` (``session.json`` included) and its verification;
- ``digests`` and ``hasher``: parts hashed (and their chunks checked) while the session records, which finalize
  trusts while their stamp is unchanged (the report lists them: ``trusted_from_recording``);
- ``scrub``: after the seal, every sealed byte read again; only then is a session ``verified`` (``is_verified``);
- ``layout``: the names of the outputs and the write-then-rename rule they follow;
- ``nodes``: a session recorded by several PCs, on the leader: the other nodes' parts (``nodes/<node>/``) waited
  for, verified against their own manifests, aligned on the leader's reference, and listed when missing.

Idempotent and resumable: every output is rebuilt deterministically from the stream files, the master is
written as ``<id>.nwb.partial`` and renamed only once it validates, and ``session.json`` turns 'finalized'
last. A run that fails leaves the session as it found it; a run that is killed leaves it 'finalizing',
and the next run starts over. On a finalized session a run only verifies the manifest.

Imports: the root modules, ``wire`` and ``record`` (to read stream files); never ``service`` or ``share``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from acqd.finalize import journal, nodes, qc  # never hasher nor scrub: ``python -m`` runs them, and runpy warns
# of (and runs twice) a module that its package already imported
from acqd.config import DaemonConfig, QcConfig, StreamConfig
from acqd.errors import FinalizeError
from acqd.finalize.digests import Entry, lock_for_finalize, trusted
from acqd.finalize.integrity import Integrity, folder_problems, scan_folder, verify_chunks
from acqd.finalize.layout import (DIGESTS, MANIFEST, PARTIAL, QC_DIR, RECOVERED_DIR, SCRUB_FILE, VDS_DIR,
                                  partial_then_rename, rel)
from acqd.finalize.report import (QC_SUMMARY, FinalizeReport, StreamReport, incident_times, qc_plot, qc_summary,
                                  stream_qc)
from acqd.finalize.seal import (Digests, is_immutable, manifest_files, merge_seal, seal_paths, unseal,
                                unseal_session, verify_manifest, write_manifest)
from acqd.finalize.streams import Stream, linked_file, read_stream, stream_parts
from acqd.session import (CLOSED, FINALIZED, FINALIZING, INTERRUPTED, RECORDING, SESSION_FILE, fsync_dir,
                          json_bytes, read_session, summarise_log, write_bytes_atomic, write_json_atomic)
from acqd.record.partread import probe_parts
from acqd.record.salvage import salvage_part
from acqd.record.video import VIDEO_DIR

__all__ = ["FinalizeReport", "StreamReport", "finalize_session", "is_immutable", "pair_frames", "recover_amend",
           "unseal_session", "verify_manifest"]

Progress = Callable[[str, float], None]


def __getattr__(name: str) -> object:
    """``pair_frames`` (``acqd.finalize.timing``), imported when asked for: see ``_run``."""
    if name == "pair_frames":
        from acqd.finalize.timing import pair_frames
        return pair_frames
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# Tests: pause at a step (read, partial, qc, sealed, manifest) after writing our pid to the marker file.
PAUSE_ENV = "ACQD_FINALIZE_PAUSE_AT"
PAUSE_MARKER_ENV = "ACQD_FINALIZE_PAUSE_MARKER"

# Progress: stage -> (fraction at its start, fraction at its end).
STAGES = {"check": (0.0, 0.02), "read": (0.02, 0.1), "align": (0.1, 0.2), "write": (0.2, 0.45),
          "validate": (0.45, 0.7), "qc": (0.7, 0.8), "seal": (0.8, 1.0)}


def finalize_session(folder: Path, progress: Progress | None = None, *, accept_corrupt: bool = False,
                     wait_nodes_s: float | None = None) -> FinalizeReport:
    """Finalize the session in ``folder``: clock fits, master NWB, validation, QC, seal. See the module docstring.

    Raises ``FinalizeError`` (nothing sealed, state unchanged) if the folder holds a symbolic link or a file acqd
    does not write, the session is not quiescent, a chunk fails its checksum (unless ``accept_corrupt``: then the
    corrupt chunks are sealed and listed in the report, ``qc.json`` and ``session.json``), a stream cannot be
    placed on the timebase, or the master fails validation (the message lists every blocking finding).

    A multi-PC session on its leader (``acqd.finalize.nodes``) first waits up to ``wait_nodes_s`` (default: the
    session config's ``daemon.nodes_timeout_s``) for every other node's part; a finalized one whose missing node
    has arrived since is finalized again, with it.
    """
    started = time.monotonic()
    folder = Path(folder).resolve()
    report_progress = _progress(progress)
    with _exclusive(folder):
        _refuse(folder, scan_folder(folder)[2])  # links first: not even session.json is read through one
        journal.recover(folder)  # an amend killed after finalize is rolled forward or back first
        session = read_session(folder)
        sid = session.get("session_id") or folder.name
        master = folder / f"{sid}.nwb"
        if session.get("state") == FINALIZED:
            if not nodes.late_arrivals(folder, session):
                return _already_finalized(folder, session, master, started)
            unseal_session(folder)  # a node arrived after this finalize: again, with it
            session = {**session, "state": session["finalize"]["previous_state"]}
        report_progress("check", 0.0)
        _refuse(folder, folder_problems(folder, sid, [s["name"] for s in session["config"]["streams"]]
                                        + nodes.stream_names(folder, session)))  # their QC plots are ours
        parts = _check_quiescent(folder, session)
        absent, node_digests = nodes.wait_for_nodes(folder, session, _nodes_timeout(session, wait_nodes_s),
                                                    report_progress)
        previous = session.get("finalize", {}).get("previous_state") or session["state"]
        _clear_outputs(folder, master)  # a killed earlier run may have left any of them
        hasher_lock, created = _lock_digests(folder)  # held to the end: the hasher appends nothing meanwhile
        write_json_atomic(folder / SESSION_FILE, {**session, "state": FINALIZING,
                                                  "finalize": {"previous_state": previous}})
        try:
            # Parts hashed while recording are trusted if unchanged (before anything here chmods them, which
            # changes their ctime); the rest is hashed for the manifest while the master is built and validated.
            recorded = _recorded_files(folder, parts)
            early = trusted(folder, recorded)
            with Digests(recorded, known={**node_digests, **{p: (e.sha256, e.stamp) for p, e in early[0].items()}}
                         ) as digests:
                report, record = _run(folder, session, previous, parts, master, digests, report_progress,
                                      accept_corrupt, early, _readable(folder, parts), absent)
        except BaseException:
            _clear_outputs(folder, master)
            unseal(sorted(p for ps in parts.values() for p in ps) + [folder / DIGESTS] + nodes.node_files(folder))
            write_json_atomic(folder / SESSION_FILE, session)
            if created and not (folder / DIGESTS).stat().st_size:  # leave the folder as it was found
                (folder / DIGESTS).unlink()
            os.close(hasher_lock)
            raise
        write_bytes_atomic(folder / SESSION_FILE, record)  # the commit point; the manifest has its digest
        os.close(hasher_lock)
        merge_seal(report.sealed, seal_paths([folder / SESSION_FILE]))
        report.state = FINALIZED
        report.seconds = round(time.monotonic() - started, 3)
        report_progress("seal", 1.0)
        return report


def _run(folder: Path, session: dict, previous: str, parts: dict[str, list[Path]], master: Path,
         digests: Digests, progress: Progress, accept_corrupt: bool,
         early: tuple[dict[Path, Entry], list[str]],
         readable: tuple[dict[str, list[Path]], list[LostPart]], absent: dict[str, str]
         ) -> tuple[FinalizeReport, bytes]:
    """Everything between the checks and the commit point; raises on any failure (the caller rolls back).
    ``early``: the digests (and chunk checks) taken while recording that still hold, and a line per file that
    changed since; ``readable``: the parts that can be read, and those that cannot (``_readable``); ``absent``:
    the other nodes of a multi-PC session that did not arrive, and why (``nodes.wait_for_nodes``). Returns the
    report and the finalized ``session.json`` (its digest is in the manifest) to write."""
    sid = session.get("session_id") or folder.name
    parts, lost = readable
    configs = {s["name"]: StreamConfig.model_validate(s) for s in session["config"]["streams"]}
    ref_name = session["reference"]
    if ref_name not in configs:
        raise FinalizeError(f"reference stream {ref_name!r} is not in the session's config")
    missing = [n for n in configs if not parts.get(n)]
    if ref_name in missing:
        unread = [str(x) for x in lost if x.stream == ref_name]
        raise FinalizeError(f"the reference stream {ref_name!r} " + (
            "has no part that can be read: there is no timebase:\n  " + "\n  ".join(unread) if unread
            else "recorded nothing: there is no timebase"))
    progress("read", 0.0)
    integrity = _verify_chunks(folder, parts, accept_corrupt, {p: e.chunks for p, e in early[0].items() if e.chunks})
    integrity.lost = [asdict(x) for x in lost]
    streams, empty = _read_streams(folder, configs, parts, ref_name, progress)
    rig = nodes.gather(folder, session, digests, absent, set(streams))  # the other PCs' parts, if any
    warnings = [f"stream {n!r} has no file (it never recorded)" for n in missing
                if not any(x.stream == n for x in lost)] + [str(x) for x in lost] + empty + early[1]
    warnings += [f"corrupt chunk sealed (--accept-corrupt): {c}" for c in integrity.corrupt]
    warnings += [f"{p}: written without chunk checksums (not checksummed)" for p in integrity.not_checksummed]
    _checkpoint("read")

    progress("align", 0.0)
    # timing, plan and nwb (pynwb, hdmf, pandas) are imported here, not with the package: the hasher and the scrub
    # (``python -m acqd.finalize.hasher``, ``.scrub``) import this package and start ~0.75 s of CPU faster without.
    from acqd.finalize import nwb
    from acqd.finalize.plan import plan_master
    from acqd.finalize.timing import align_all, timebase_of, zero_sample

    ref, moved = timebase_of(streams, streams[ref_name])  # a reference whose counter was reset gives way
    limits = QcConfig.model_validate(session["config"].get("qc", {}))
    aligned = align_all(streams, ref, limits.max_pairing_ppm)
    if moved:
        aligned[ref_name].flags.insert(0, moved)
        warnings.append(moved)
    aligned.update(rig.align(ref, limits.max_pairing_ppm))
    streams = {**streams, **rig.streams}
    warnings += rig.warnings
    zero = zero_sample(streams, aligned, ref)
    zero_s = zero / ref.rate
    progress("align", 1.0)

    progress("write", 0.0)
    linked = {**{name: linked_file(folder, s) for name, s in streams.items() if name not in rig.linked}, **rig.linked}
    plan, stream_reports = plan_master(folder, session, streams, aligned, ref, zero, linked)
    with partial_then_rename(master) as partial:  # under its final name only once it has validated
        nwb.write_master(partial, plan)
        progress("write", 1.0)
        _checkpoint("partial")
        progress("validate", 0.0)
        series = {n: r.series_rows for n, r in stream_reports.items() if r.timing != "events"}  # LSL markers: /events
        check = nwb.check_master(partial, series)
        if not check.ok:
            raise FinalizeError(f"{partial.name} failed validation, nothing was sealed:\n  "
                                + "\n  ".join(check.blocking))
    fsync_dir(folder)
    progress("validate", 1.0)

    timebase = {"reference": ref.name, "configured_reference": ref_name, "reference_rate": ref.rate,
                "zero_sample": zero,
                "zero_reference_s": zero_s, "session_start_time": plan.session_start_time.isoformat(),
                "definition": "session time = reference seconds (reference sample / nominal reference rate) "
                              "- zero_reference_s; zero = the earliest first recorded sample of any stream"}
    message = f"finalized {sid}" + (f" with {len(integrity.corrupt)} corrupt chunk(s) accepted"
                                    if integrity.corrupt else "")
    report = FinalizeReport(session_id=sid, folder=str(folder), state=FINALIZING, changed=True,
                            message=message, master=master.name, timebase=timebase, streams=stream_reports,
                            check=check.to_dict(), warnings=warnings, integrity=integrity.to_dict(),
                            session_log=summarise_log(folder),
                            trusted_from_recording=sorted(rel(p, folder) for p in early[0]))
    progress("qc", 0.0)
    for n, r in stream_reports.items():
        r.qc = stream_qc(streams[n], r, rig.incidents(n, session.get("incidents", [])), limits, zero_s)
    rig.label(stream_reports)
    report.nodes = nodes.node_summary(session, {n: r for n, r in stream_reports.items() if r.node is None}, rig)
    events = incident_times(session.get("incidents", []), plan.session_start_time)
    qc.write_report(folder / QC_DIR, qc_summary(report, limits),
                    [qc_plot(streams[n], aligned[n], zero_s, stream_reports[n],
                             [(t, kind) for t, who, kind in events if who in (n, None)], limits) for n in streams])
    progress("qc", 1.0)
    _checkpoint("qc")

    progress("seal", 0.0)
    outputs = [p for p in manifest_files(folder) if rig.sealed(p, folder)]
    rehashed = digests.recheck()  # a file changed since it was queued; before the seal changes every ctime
    report.sealed = seal_paths(outputs)
    report.sealed["digests"] = {"hashed_while_recording": digests.reused, "changed_after_hashing": early[1],
                                "changed_during_finalize": [rel(p, folder) for p in rehashed]}
    _checkpoint("sealed")
    final = {**session, "state": FINALIZED,
             "finalize": {"previous_state": previous, "master": report.master, "manifest": MANIFEST,
                          "qc": report.qc, "integrity": _integrity_record(integrity),
                          **({"nodes": report.nodes} if report.nodes else {})}}
    if any(not x.empty for x in lost):  # data the index of a lost part proved is gone
        final["incomplete"] = True
    record = json_bytes(final)
    write_manifest(folder, outputs, digests, lambda done, total: progress("seal", 0.95 * done / total), record)
    merge_seal(report.sealed, seal_paths([folder / MANIFEST]))
    _checkpoint("manifest")
    return report, record


def _verify_chunks(folder: Path, parts: dict[str, list[Path]], accept_corrupt: bool,
                   known: dict[Path, dict]) -> Integrity:
    """Every chunk against its checksum (``known``: parts checked while recording and unchanged since); corrupt
    chunks refuse the session unless ``accept_corrupt``."""
    integrity = verify_chunks(folder, parts, known)
    if integrity.corrupt and not accept_corrupt:
        raise FinalizeError(f"{folder.name}: {len(integrity.corrupt)} chunk(s) do not match the checksum written "
                            "when they were recorded; nothing was sealed (finalize --accept-corrupt seals them, "
                            "listed as corrupt):\n  " + "\n  ".join(map(str, integrity.corrupt)))
    integrity.accepted = bool(integrity.corrupt)
    return integrity


def _integrity_record(integrity: Integrity) -> dict:
    """What ``session.json`` keeps of the chunk checks (the details are in the QC report)."""
    return {"chunks_checked": integrity.chunks_checked, "corrupt": [str(c) for c in integrity.corrupt],
            "not_checksummed": integrity.not_checksummed, "accepted": integrity.accepted, "lost": integrity.lost}


@dataclass(frozen=True)
class LostPart:
    """A part file no reader may open: empty or headerless (nothing was committed to it, e.g. created on a full
    disk), truncated below its superblock's end of file, or unreadable within the deadline. It is kept and sealed
    as it is, and left out of the master; of a truncated part, the rows its index proves are salvaged into a clean
    copy under ``recovered/`` (``acqd.record.salvage``), which the master links instead."""

    stream: str
    part: str
    """Relative to the session folder."""
    bytes: int
    empty: bool
    problem: str
    expected_bytes: int | None = None
    """A truncated part: the size its superblock records (``expected_bytes - bytes`` were cut off)."""
    salvaged_rows: int = 0
    """Rows of ``/data`` its index proves, copied to ``salvaged_to``."""
    salvaged_index_rows: int = 0
    listed_index_rows: int = 0
    """Index rows found below the cut (those beyond ``salvaged_index_rows`` failed their proof)."""
    salvaged_bytes: int = 0
    """Bytes of the rows salvaged."""
    salvaged_to: str | None = None
    salvage_problem: str | None = None
    """Why nothing could be salvaged, when HDF5 could not read what is left."""

    def __str__(self) -> str:
        if self.empty:
            return f"{self.part} ({self.bytes} bytes) is empty and skipped: {self.problem}"
        if self.salvaged_to:
            return (f"{self.part} ({self.bytes} bytes) is truncated ({self.expected_bytes - self.bytes} bytes of the "
                    f"{self.expected_bytes} its superblock records are cut off): the {self.salvaged_rows} rows "
                    f"({self.salvaged_index_rows} messages, {self.salvaged_bytes} bytes) its index proves are "
                    f"salvaged into {self.salvaged_to}; the rest is lost")
        return f"{self.part} ({self.bytes} bytes) cannot be read and is listed as lost: {self.problem}"


def _readable(folder: Path, parts: dict[str, list[Path]]) -> tuple[dict[str, list[Path]], list[LostPart]]:
    """The parts every reader of this run may open, and the others. Each part is first read in a child process
    with a deadline (``acqd.record.partread.probe_parts``): a part HDF5 cannot read never hangs finalize. A
    truncated part's proven rows are salvaged (``_salvage``): its clean copy takes its place."""
    health = probe_parts([p for ps in parts.values() for p in ps])
    lost, readable = [], {}
    for s, ps in parts.items():
        readable[s] = []
        for p in ps:
            h = health[p]
            if h.problem is None:
                readable[s].append(p)
                continue
            found = LostPart(s, rel(p, folder), h.bytes, h.empty, h.problem)
            if h.problem.startswith("truncated"):
                found = _salvage(folder, p, found)
                if found.salvaged_to:
                    readable[s].append(folder / found.salvaged_to)
            lost.append(found)
    return readable, lost


def _salvage(folder: Path, path: Path, lost: LostPart) -> LostPart:
    """Copy what the truncated part ``path`` proves to ``recovered/`` (the padded scratch copy goes beside the
    session folder, never inside it); ``lost`` with what was salvaged."""
    dest = folder / RECOVERED_DIR / path.name
    dest.parent.mkdir(exist_ok=True)
    got = salvage_part(path, dest.with_name(dest.name + PARTIAL), folder.parent / f".salvage-{folder.name}-{path.name}")
    if got.index_rows:
        os.replace(dest.with_name(dest.name + PARTIAL), dest)
    return replace(lost, expected_bytes=got.expected_bytes, salvaged_rows=got.rows,
                   salvaged_index_rows=got.index_rows, listed_index_rows=got.listed_index_rows,
                   salvaged_bytes=got.data_bytes, salvage_problem=got.problem,
                   salvaged_to=rel(dest, folder) if got.index_rows else None)


def _read_streams(folder: Path, configs: dict[str, StreamConfig], parts: dict[str, list[Path]], ref_name: str,
                  progress: Progress) -> tuple[dict[str, Stream], list[str]]:
    """Every stream that has files, and a warning for each that committed nothing (it is left out; the reference
    cannot be)."""
    streams: dict[str, Stream] = {}
    warnings = []
    for i, name in enumerate(n for n in configs if parts.get(n)):
        stream = read_stream(folder, configs[name], parts[name])
        if stream is not None:
            streams[name] = stream
        elif name == ref_name:
            raise FinalizeError(f"the reference stream {ref_name!r} committed no data: there is no timebase")
        else:
            warnings.append(f"stream {name!r} committed no data; it is left out of the master")
        progress("read", (i + 1) / len(configs))
    return streams, warnings


def recover_amend(folder: Path) -> str | None:
    """Finish an amend that was killed (``journal.recover``: rolled forward or back), under finalize's lock; what
    it did (None: nothing to do). ``acqd verify`` runs it before its scrub, as amend and finalize do first."""
    folder = Path(folder).resolve()
    with _exclusive(folder):
        return journal.recover(folder)


def _already_finalized(folder: Path, session: dict, master: Path, started: float) -> FinalizeReport:
    """Verify the manifest; the report's details come from the QC summary the finalizing run wrote."""
    from acqd.finalize import scrub

    problems = verify_manifest(folder)
    if problems:
        raise FinalizeError(f"{folder.name} is finalized but does not match its manifest:\n  " + "\n  ".join(problems))
    summary = json.loads((folder / QC_SUMMARY).read_text())
    listed = (folder / MANIFEST).read_text().splitlines()
    old = [] if any(line.endswith(f"  {SESSION_FILE}") for line in listed) else [
        f"{SESSION_FILE} is not covered by the manifest (finalized by an older acqd): edits to it go unnoticed"]
    return FinalizeReport(session_id=session.get("session_id", folder.name), folder=str(folder), state=FINALIZED,
                          changed=False, message="already finalized, nothing changed (manifest verified)",
                          master=master.name, timebase=summary["timebase"], check=summary["validation"],
                          streams={n: StreamReport(**r) for n, r in summary["streams"].items()},
                          sealed={"files": len(listed) + 1 + bool(old), "read_only": True,
                                  "immutable": (immutable := is_immutable(folder / MANIFEST)),
                                  "immutable_error": None if immutable else "the manifest has no immutable flag"},
                          warnings=summary["warnings"] + old, integrity=summary.get("integrity", {}),
                          trusted_from_recording=summary.get("trusted_from_recording", []),
                          nodes=summary.get("nodes", {}),
                          verification=scrub.verification(folder)["state"],
                          seconds=round(time.monotonic() - started, 3))


def _nodes_timeout(session: dict, wait_s: float | None) -> float:
    """How long to wait for the other nodes of a multi-PC session: ``wait_s``, else the session config's."""
    if wait_s is not None:
        return wait_s
    default = DaemonConfig.model_fields["nodes_timeout_s"].default
    return float((session["config"].get("daemon") or {}).get("nodes_timeout_s", default))


def _progress(progress: Progress | None) -> Progress:
    """Map a stage's own fraction onto the whole run."""
    def report(stage: str, fraction: float) -> None:
        if progress is not None:
            lo, hi = STAGES[stage]
            progress(stage, lo + (hi - lo) * min(max(fraction, 0.0), 1.0))
    return report


def _checkpoint(step: str) -> None:
    """Test hook: with ``ACQD_FINALIZE_PAUSE_AT=step``, touch the marker file and wait to be killed."""
    if os.environ.get(PAUSE_ENV) == step:
        marker = os.environ.get(PAUSE_MARKER_ENV)
        if marker:
            Path(marker).write_text(str(os.getpid()))
        while True:
            time.sleep(1)


# -- which sessions may be finalized ------------------------------------------------------------------------


def _refuse(folder: Path, problems: list[str]) -> None:
    """Finalize works only on a folder holding nothing but acqd's own files (``integrity.folder_problems``)."""
    if problems:
        raise FinalizeError(f"{folder.name}: finalize refuses a session folder holding links or files acqd did "
                            "not write; nothing was changed:\n  " + "\n  ".join(problems))


def _lock_digests(folder: Path) -> tuple[int, bool]:
    """Take digests.jsonl from the daemon's hasher (``acqd.finalize.hasher``): it stops, and appends nothing
    until this run ends. Returns the locked descriptor and whether the (empty) file was created for it."""
    try:
        return lock_for_finalize(folder)
    except (OSError, TimeoutError) as e:
        raise FinalizeError(f"{folder.name}: cannot lock {DIGESTS} ({e})") from None


@contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """One finalizer per session (CLI and API may both be asked): an flock on the folder itself, no lock file."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise FinalizeError(f"{folder}: not a session folder ({e.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FinalizeError(f"{folder.name} is being finalized by another process") from None
        yield
    finally:
        os.close(fd)


def _check_quiescent(folder: Path, session: dict) -> dict[str, list[Path]]:
    """Refuse a session any writer may still touch; returns each stream's part files, in part order."""
    state = session.get("state")
    if state == RECORDING:
        raise FinalizeError(f"{folder.name} is still recording (state 'recording'): stop the recording first; if "
                            "the daemon died, start it once so that it marks the session interrupted")
    if state not in (CLOSED, INTERRUPTED, FINALIZING):
        raise FinalizeError(f"{folder.name}: state {state!r} cannot be finalized (closed or interrupted only)")
    parts = stream_parts(folder, session)
    _check_writable(folder, _recorded_files(folder, parts))
    held = _held_open(_recorded_files(folder, parts))
    if held:
        raise FinalizeError(f"{folder.name}: files are still open in another process (a writer?): "
                            + ", ".join(f"{p.name} by pid {pid}" for p, pid in held))
    return parts


def _check_writable(folder: Path, recorded: list[Path]) -> None:
    """Finalize writes into the folder and seals (chmods) the recorded files: refuse clearly, before any change,
    a user who may not (chmod needs the file's owner, or root)."""
    uid = os.geteuid()
    denied = ([folder.name] if not os.access(folder, os.W_OK | os.X_OK) else []) + [
        p.name for p in recorded if uid not in (0, p.stat().st_uid)]
    if denied:
        raise FinalizeError(f"{folder.name}: finalize must write the session folder and seal its files, and this "
                            f"user (uid {uid}) may not: {', '.join(denied[:5])}; run it as the user who recorded "
                            "the session (or root)")


def _recorded_files(folder: Path, parts: dict[str, list[Path]]) -> list[Path]:
    """The files the writers produced: every stream's part files and the camera video files."""
    return [p for ps in parts.values() for p in ps] + sorted((folder / VIDEO_DIR).glob("*"))


def _held_open(paths: list[Path]) -> list[tuple[Path, int]]:
    """(file, pid) for every process that has one of ``paths`` open for writing (Linux /proc; empty where
    unavailable). Readers (the daemon's hasher, a live preview) change nothing finalize relies on."""
    wanted = {os.path.realpath(p): p for p in paths}
    held = []
    for pid in (d for d in os.listdir("/proc") if d.isdigit()) if os.path.isdir("/proc") else []:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target in wanted and _open_for_writing(pid, fd):
                held.append((wanted[target], int(pid)))
    return sorted(set(held))


def _open_for_writing(pid: str, fd: str) -> bool:
    """Whether descriptor ``fd`` of ``pid`` was opened for writing (its ``flags`` in /proc; True if unknown)."""
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            flags = next((int(line.split()[1], 8) for line in f if line.startswith("flags:")), None)
    except FileNotFoundError:  # closed since it was listed (the hasher reading a part that just closed): not held
        return False
    except (OSError, ValueError):
        return True
    return flags is None or flags & os.O_ACCMODE != os.O_RDONLY


def _clear_outputs(folder: Path, master: Path) -> None:
    """Remove what finalize writes (master, partials, qc, vds, recovered copies, manifest) so a run starts clean."""
    files = [master, master.with_name(master.name + PARTIAL), folder / MANIFEST, folder / SCRUB_FILE]
    dirs = [folder / d for d in (QC_DIR, VDS_DIR, RECOVERED_DIR)]
    for d in dirs:
        if d.is_dir():
            files += [p for p in d.rglob("*") if p.is_file()]
    unseal(files + [folder / SESSION_FILE])  # session.json is replaced next: its immutable flag would forbid that
    for f in files:
        f.unlink(missing_ok=True)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
