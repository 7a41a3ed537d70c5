"""The shipper: runs the queue's jobs, one at a time per destination, and proves each one arrived.

A job's run: refuse a session that is not finalized or no longer matches its manifest (failed at once, reported);
remove READY.json at the destination (a watcher must never see it over a changing copy); ``rclone copy`` exactly
the manifest's files; hash them at the destination; re-send what differs, once, and hash again (still different:
the job fails naming the files); write READY.json last; record the copy in shipping.json; then ``verified``.
A failed attempt (rclone's reason in one line) waits ``backoff_s`` (capped) and runs again, up to max_attempts.

While a session records, a ``pause`` destination's copy is stopped and waits; a ``throttle`` one is restarted at
its throttle bandwidth (rclone skips what already arrived). Events (``on_event(kind, payload)``): ship_queued,
ship_progress, shipped, ship_failed (``final``: no further attempt), ship_refused, ship_webhook (the POST to the
lab's pipeline after a verified copy, and whether it was taken), ship_deleted (``delete_after``, acqd.share.ship
.cleanup, with its proof).
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from acqd.finalize.layout import MANIFEST, READY
from acqd.finalize.nodes import DEFAULT_NODE, node_name
from acqd.session import read_session
from acqd.share.ship import cleanup, rclone
from acqd.share.ship.queue import ACTIVE, FAILED, QUEUE_FILE, VERIFIED, Job, Queue, backoff_s
from acqd.share.ship.verify import (describe, expected, export_files, forget_copy, listing_sha256, mismatches,
                                    record_copy, refusal)
from acqd.config.ship import ShipDestination

log = logging.getLogger("acqd")
PROGRESS_INTERVAL_S = 1.0

Event = Callable[[str, dict], None]


class AttemptFailed(Exception):
    """One attempt failed for a reason retrying may cure (network, destination, a killed rclone)."""


class JobFailed(Exception):
    """The job cannot succeed by retrying (a file still differs after being re-sent)."""


class Shipper:
    """The queue's worker threads (one per destination) and the operations on jobs."""

    def __init__(self, data_root: Path, destinations: tuple[ShipDestination, ...], on_event: Event | None = None):
        self.data_root = Path(data_root)
        self.dests = {d.name: d for d in destinations}
        self.queue = Queue(self.data_root / QUEUE_FILE)
        self._emit = on_event or (lambda kind, payload: None)
        self._recording = False
        self._wake = threading.Condition()
        self._stopping = False
        self._runs: dict[str, tuple[rclone.Run, str | None]] = {}  # dest -> (running rclone, its bwlimit)
        self._stop_reason: dict[str, str] = {}
        self._speed: dict[int, tuple[float, float | None]] = {}  # job id -> (bytes/s, eta s)
        self._threads: list[threading.Thread] = []
        self._no_sha256: set[str] = set()  # destinations whose backend cannot hash sha256: read back at once
        self._sweeping = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Jobs a kill left copying or verifying are queued again; one worker thread per destination."""
        for job_id in self.queue.recover():
            log.info("ship job %d resumes after an interruption", job_id)
        for name in self.dests:
            t = threading.Thread(target=self._worker, args=(name,), name=f"ship-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the running copies (their jobs are queued again, not counted as failed) and the workers."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
            for name in list(self._runs):
                self._interrupt(name, "the daemon stopped")
        for t in self._threads:
            t.join(timeout_s)
        self.queue.close()

    def set_recording(self, recording: bool) -> None:
        """A session started or stopped recording: pause or throttle the destinations that say so."""
        with self._wake:  # the lock _wait starts rclone under: a run starts either before this (and is stopped) or after
            self._recording = recording
            self._wake.notify_all()
            for name, (_, bwlimit) in list(self._runs.items()):
                dest = self.dests[name]
                if self._paused(dest):
                    self._interrupt(name, "paused while a session records")
                elif bwlimit is not None and bwlimit != self._bwlimit(dest):
                    self._interrupt(name, "bandwidth limit changed")

    # -- operations (CLI and API) ------------------------------------------------------------------------------------

    def ship(self, folder: Path, to: str | None = None) -> list[Job]:
        """Queue the session ``folder`` for ``to`` (default: every destination); already queued or verified jobs
        are returned as they are."""
        folder = Path(folder)
        names = [to] if to else list(self.dests)
        unknown = [n for n in names if n not in self.dests]
        if unknown:
            raise KeyError(f"no ship destination {unknown[0]!r}; configured: {', '.join(self.dests) or 'none'}")
        led = is_led(folder)
        if to and not self.dests[to].takes(led):
            raise ValueError(f"ship destination {to!r} takes only sessions {_TAKES[self.dests[to].sessions]}; "
                             f"{folder.name} {'was' if led else 'was not'} started by a leader")
        names = [n for n in names if self.dests[n].takes(led)]
        if not names:
            raise ValueError(f"no ship destination takes {folder.name}: " + ", ".join(
                f"{d.name} takes only sessions {_TAKES[d.sessions]}" for d in self.dests.values()))
        jobs = [self.queue.add(folder.name, folder, n, "session") for n in names]
        for job in jobs:
            if job.state == "queued" and job.attempts == 0:
                self._emit("ship_queued", _payload(job))
        self._notify()
        return jobs

    def ship_export(self, session: str, out: Path, names: list[str], to: list[str]) -> list[Job]:
        """Queue the export of ``session`` (its files ``names``, relative to the export folder ``out``, hashed now:
        the copy is verified against these) for the destinations ``to``."""
        files = json.dumps(export_files(Path(out), names), sort_keys=True)
        led = is_led(self.data_root / session)
        jobs = [self.queue.add(session, Path(out), name, "export", files) for name in to if self.dests[name].takes(led)]
        for job in jobs:
            if job.state == "queued" and job.attempts == 0:
                self._emit("ship_queued", _payload(job))
        self._notify()
        return jobs

    def retry(self, job_id: int) -> Job:
        job = self.queue.get(job_id)
        if job.state in ACTIVE:
            return job
        job = self.queue.requeue(job_id)
        self._notify()
        return job

    def reverify(self, job_id: int) -> Job:
        """Hash a verified copy at its destination again (a file changed there after verification fails the job)."""
        job = self.queue.get(job_id)
        if job.state != VERIFIED:
            raise ValueError(f"ship job {job_id} is {job.state}: only a verified copy can be re-verified")
        if not (Path(job.folder) / MANIFEST).is_file() and not (job.what == "export" and Path(job.folder).is_dir()):
            raise ValueError(f"ship job {job_id}: the local session {job.folder} is gone (delete_after?): there is no "
                             f"manifest to check the copy against")
        job = self.queue.requeue(job_id, reverify=True)
        self._notify()
        return job

    def status(self) -> dict:
        """The queue with progress, and per destination whether it waits for a recording to end."""
        jobs = self.queue.jobs()
        now = time.time()
        unverified = [j.created for j in jobs if j.state in ACTIVE]
        out = []
        for j in jobs:
            speed, eta = self._speed.get(j.id, (0.0, None)) if j.state in ACTIVE else (0.0, None)
            out.append({**j.as_dict(), "speed_bytes_s": speed, "eta_s": eta})
        return {"jobs": out,
                "destinations": [{"name": d.name, "remote": d.remote, "paused": self._paused(d),
                                  "bwlimit": self._bwlimit(d)} for d in self.dests.values()],
                "queued_bytes": sum(max(j.bytes_total - j.bytes_done, 0) for j in jobs if j.state in ACTIVE),
                "oldest_unverified_age_s": now - min(unverified) if unverified else 0.0,
                "failed": sum(j.state == FAILED for j in jobs), "verified": sum(j.state == VERIFIED for j in jobs),
                "deletions": [{"session": v.session, "delete": v.delete, "reason": v.reason, "dry_run": v.dry_run}
                              for v in self.deletions()] if any(d.delete_after for d in self.dests.values()) else []}

    # -- the worker --------------------------------------------------------------------------------------------------

    def _worker(self, name: str) -> None:
        dest = self.dests[name]
        while True:
            with self._wake:
                if self._stopping:
                    return
                job = None if self._paused(dest) else self.queue.next_due(name)
                if job is None:
                    self._wake.wait(self._idle_wait(name))
                    continue
            try:
                self.run(job, dest)
            except Exception as e:  # noqa: BLE001 - a bug in one job must not stop the destination's queue
                log.exception("ship job %d", job.id)
                self._attempt_failed(self.queue.get(job.id), dest, f"internal error: {e}")

    def _idle_wait(self, name: str) -> float:
        due = [j.next_try for j in self.queue.jobs() if j.dest == name and j.state == "queued"]
        return max(0.05, min(min(due) - time.time(), 60.0)) if due else 60.0

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def run(self, job: Job, dest: ShipDestination) -> Job:
        """One attempt at ``job``; the job as it stands after it."""
        folder = Path(job.folder)
        if why := _refusal(job):
            job = self.queue.fail(job.id, why)
            log.error("ship %s -> %s refused: %s", job.session, dest.name, why)
            self._emit("ship_refused", _payload(job))
            return job
        want, digest = _wanted(job)
        total = sum((folder / n).stat().st_size for n in want)
        job = self.queue.start(job.id, total)
        where = rclone.remote_path(dest, *destination_path(dest, job, self.data_root / job.session).split("/"))
        try:
            with tempfile.TemporaryDirectory(prefix="acqd-ship-") as tmp:
                if job.reverify:
                    return self._reverify(job, dest, want, where, Path(tmp))
                self._rclone(dest, rclone.deletefile_args(dest, f"{where}/{READY}"), tolerate_missing=True)
                self._copy(job, dest, want, where, Path(tmp))
                job = self.queue.verifying(job.id)
                self._verify(job, dest, want, where, Path(tmp))
                self._rclone(dest, rclone.rcat_args(dest, f"{where}/{READY}"),
                             stdin=_ready(job, dest, where, digest, len(want)))
        except _Interrupted as e:
            return self.queue.interrupted(job.id, str(e))
        except AttemptFailed as e:
            return self._attempt_failed(self.queue.get(job.id), dest, str(e))
        except JobFailed as e:
            return self._final_failure(job, dest, str(e))
        record_copy(self.data_root / job.session, dest.name, where, digest, job.what)
        job = self.queue.verified(job.id, digest)
        log.info("ship %s -> %s verified (%d files, %d bytes)", job.session, dest.name, len(want), total)
        self._emit("shipped", {**_payload(job), "path": where, "files": len(want)})
        if dest.webhook is not None:
            threading.Thread(target=self._webhook, args=(dest, job, where), name=f"webhook-{job.id}",
                             daemon=True).start()
        self.sweep()
        return job

    # -- hand-off and freeing the rig ----------------------------------------------------------------------------

    def _webhook(self, dest: ShipDestination, job: Job, where: str) -> bool:
        """POST the verified session to the lab's pipeline; retried with doubling waits; the outcome is an event."""
        hook = dest.webhook
        try:
            qc = read_session(Path(job.folder)).get("finalize", {}).get("qc")
        except Exception:  # noqa: BLE001 - the hand-off goes out without QC rather than not at all
            qc = None
        body = {"session": job.session, "destination": dest.name, "manifest_sha256": job.manifest_sha256,
                "qc": qc, "path": where, "ready": f"{where}/{READY}", "local_path": job.folder}
        error = ""
        for attempt in range(hook.retries + 1):
            if attempt:
                time.sleep(min(2.0 ** (attempt - 1), 60.0))
            try:
                resp = httpx.post(hook.url, json=body, timeout=hook.timeout_s)
                if resp.status_code < 300:
                    self._emit("ship_webhook", {"id": job.id, "session": job.session, "destination": dest.name,
                                                "ok": True, "attempts": attempt + 1})
                    return True
                error = f"HTTP {resp.status_code}"
            except httpx.HTTPError as e:
                error = f"{type(e).__name__}: {e}"
        log.error("webhook %s for %s -> %s failed after %d attempts: %s", hook.url, job.session, dest.name,
                  hook.retries + 1, error)
        self._emit("ship_webhook", {"id": job.id, "session": job.session, "destination": dest.name, "ok": False,
                                    "attempts": hook.retries + 1, "error": error})
        return False

    def deletions(self) -> list[cleanup.Verdict]:
        """What ``delete_after`` would do with each local session now, and why."""
        verified: dict[str, set[str]] = {}
        active: dict[str, set[str]] = {}
        for j in self.queue.jobs():
            if j.state in (VERIFIED, *ACTIVE):
                (verified if j.state == VERIFIED else active).setdefault(j.session, set()).add(j.dest)
        return cleanup.verdicts(self.data_root, list(self.dests.values()), verified, active)

    def sweep(self) -> list[cleanup.Verdict]:
        """Delete the sessions ``delete_after`` lets go (a dry-run policy only logs them); what was deleted."""
        if not any(d.delete_after for d in self.dests.values()):
            return []
        gone = []
        with self._sweeping:
            for v in self.deletions():
                if not v.delete:
                    continue
                if v.dry_run:
                    log.info("delete_after (dry run) would delete %s: %s", v.session, v.reason)
                    continue
                cleanup.delete(self.data_root, v)
                self._emit("ship_deleted", {"session": v.session, "proof": v.reason})
                gone.append(v)
        return gone

    def _copy(self, job: Job, dest: ShipDestination, want: dict[str, str], where: str, tmp: Path) -> None:
        files = _files_from(tmp / "copy.txt", want)
        bwlimit = self._bwlimit(dest)
        self._rclone(dest, rclone.copy_args(dest, Path(job.folder), where, files, bwlimit), job=job, bwlimit=bwlimit)

    def _verify(self, job: Job, dest: ShipDestination, want: dict[str, str], where: str, tmp: Path) -> None:
        """Every file hashes right at the destination; what does not is re-sent once, then hashed again."""
        found = self._hash(dest, where, want, tmp)
        if bad := mismatches(want, found):
            log.warning("ship %s -> %s: %s differ at the destination, re-sending once", job.session, dest.name,
                        describe(bad, found))
            again = {n: want[n] for n in bad}
            self._copy(job, dest, again, where, tmp)
            found = self._hash(dest, where, again, tmp)
            if still := mismatches(again, found):
                raise JobFailed(f"verification failed after re-sending: {describe(still, found)}")

    def _reverify(self, job: Job, dest: ShipDestination, want: dict[str, str], where: str, tmp: Path) -> Job:
        found = self._hash(dest, where, want, tmp)
        if bad := mismatches(want, found):
            forget_copy(self.data_root / job.session, dest.name, job.what)
            self._rclone(dest, rclone.deletefile_args(dest, f"{where}/{READY}"), tolerate_missing=True)
            return self._final_failure(job, dest, f"changed at the destination after verification: "
                                                  f"{describe(bad, found)}")
        job = self.queue.verified(job.id, _wanted(job)[1])
        self._emit("shipped", {**_payload(job), "path": where, "files": len(want), "reverified": True})
        return job

    def _hash(self, dest: ShipDestination, where: str, want: dict[str, str], tmp: Path) -> dict[str, str]:
        """sha256 of ``want``'s files at the destination: from the backend, or read back where it has none."""
        files = _files_from(tmp / "hash.txt", want)
        download = bool(dest.download_check) or dest.name in self._no_sha256
        found = self._hashsum(dest, where, files, download)
        if dest.download_check is None and not download and len(found) < len(want):
            found = self._hashsum(dest, where, files, True)  # the backend may not hash sha256: read back
            if len(found) == len(want):
                self._no_sha256.add(dest.name)
        return found

    def _hashsum(self, dest: ShipDestination, where: str, files: Path, download: bool) -> dict[str, str]:
        errors: list[str] = []
        run = rclone.Run(rclone.hashsum_args(dest, where, files, download))
        rc, out = self._wait(dest, run, lambda line: errors.append(rclone.parse_log_line(line)[1] or ""))
        found = rclone.parse_hashsum(out)
        if rc != 0 and not all(_is_not_found(e) or "hash type not supported" in e for e in errors if e):
            raise AttemptFailed(f"hashing at the destination: {rclone.reason(errors, rc)}")
        return found

    def _rclone(self, dest: ShipDestination, args: list[str], job: Job | None = None, stdin: bytes | None = None,
                tolerate_missing: bool = False, bwlimit: str | None = None) -> None:
        """Run rclone to its end; a failure raises AttemptFailed with its reason. With ``job``, its stats are the
        job's progress."""
        errors: list[str] = []
        last = [0.0]

        def on_line(line: str) -> None:
            stats, error = rclone.parse_log_line(line)
            if error:
                errors.append(error)
            if stats and job is not None:
                self._speed[job.id] = (stats.speed, stats.eta_s)
                if time.monotonic() - last[0] >= PROGRESS_INTERVAL_S:
                    last[0] = time.monotonic()
                    self.queue.progress(job.id, stats.bytes)
                    self._emit("ship_progress", {"id": job.id, "session": job.session, "destination": job.dest,
                                                 "bytes": stats.bytes, "total": stats.total_bytes,
                                                 "speed_bytes_s": stats.speed, "eta_s": stats.eta_s})

        rc, _ = self._wait(dest, rclone.Run(args), on_line, stdin, bwlimit)
        if rc != 0 and not (tolerate_missing and all(_is_not_found(e) for e in errors if e)):
            raise AttemptFailed(rclone.reason(errors, rc))

    def _wait(self, dest: ShipDestination, run: rclone.Run, on_line: Callable[[str], None],
              stdin: bytes | None = None, bwlimit: str | None = None) -> tuple[int, str]:
        """Run ``run`` to its end; _Interrupted if acqd stops it (or would have: a recording started, the bandwidth
        ``bwlimit`` it was built with is no longer the one to use, the daemon stops)."""
        with self._wake:
            if self._stopping:
                raise _Interrupted("the daemon stopped")
            if self._paused(dest):
                raise _Interrupted("paused while a session records")
            if bwlimit is not None and bwlimit != self._bwlimit(dest):
                raise _Interrupted("bandwidth limit changed")
            self._stop_reason.pop(dest.name, None)
            run.start(stdin)
            self._runs[dest.name] = (run, bwlimit)
        try:
            rc, out = run.wait(on_line, dest.timeout_s)
        finally:
            self._runs.pop(dest.name, None)
        if (why := self._stop_reason.pop(dest.name, None)) is not None:
            raise _Interrupted(why)
        return rc, out

    def _interrupt(self, name: str, why: str) -> None:
        if (entry := self._runs.get(name)) is not None:
            self._stop_reason[name] = why
            entry[0].stop()

    # -- decisions ---------------------------------------------------------------------------------------------------

    def _paused(self, dest: ShipDestination) -> bool:
        return self._recording and dest.while_recording == "pause"

    def _bwlimit(self, dest: ShipDestination) -> str:
        """rclone's --bwlimit now ("off": none)."""
        return (dest.throttle_bwlimit if self._recording and dest.while_recording == "throttle" else dest.bwlimit) \
            or "off"

    def _attempt_failed(self, job: Job, dest: ShipDestination, why: str) -> Job:
        if job.attempts >= dest.max_attempts:
            plural = "" if job.attempts == 1 else "s"
            return self._final_failure(job, dest, f"{why} (after {job.attempts} attempt{plural})")
        wait = backoff_s(job.attempts, dest.backoff_s, dest.max_backoff_s)
        job = self.queue.retry_later(job.id, why, wait)
        log.warning("ship %s -> %s, attempt %d failed: %s; next in %.0f s", job.session, dest.name, job.attempts,
                    why, wait)
        self._emit("ship_failed", {**_payload(job), "final": False, "retry_in_s": wait})
        return job

    def _final_failure(self, job: Job, dest: ShipDestination, why: str) -> Job:
        job = self.queue.fail(job.id, why)
        log.error("ship %s -> %s failed: %s", job.session, dest.name, why)
        self._emit("ship_failed", {**_payload(job), "final": True})
        return job


class _Interrupted(Exception):
    """acqd stopped rclone itself (recording started, bandwidth changed, daemon stopping)."""


def _files_from(path: Path, want: dict[str, str]) -> Path:
    path.write_text("".join(f"{name}\n" for name in sorted(want)))
    return path


def _is_not_found(error: str) -> bool:
    low = error.lower()
    return "not found" in low or "no such file" in low or "doesn't exist" in low


_TAKES = {"led": "a leader started (session.json has \"leader\")", "own": "no leader started"}


def is_led(folder: Path) -> bool:
    """Whether a leader started the session in ``folder`` (session.json has "leader": a follower's part)."""
    try:
        return "leader" in read_session(folder)
    except Exception:  # noqa: BLE001 - unreadable: refused by the run, which names the problem
        return False


def destination_path(dest: ShipDestination, job: Job, session: Path) -> str:
    """Where ``job`` lands below ``dest.remote``: ``dest.path`` filled from the session folder ``session`` (an
    export lands in ``export/`` below it)."""
    try:
        node = node_name(read_session(session))
    except Exception:  # noqa: BLE001 - no readable session.json (a moved export): the one-PC default
        node = DEFAULT_NODE
    where = dest.where(job.session, node)
    return f"{where}/export" if job.what == "export" else where


def what_to_ship(dests: list[ShipDestination], done: str, led: bool = False) -> tuple[list[str], list[str]]:
    """When a finalize or an export run of the daemon ends (``done``): the destinations the session goes to (their
    ``after:`` is that step, their ``what:`` includes the session) and those its export goes to (``what:`` export
    or both, once there is an export, whatever ``after:`` says); only destinations whose ``sessions:`` takes it
    (``led``: a leader started the session)."""
    dests = [d for d in dests if d.takes(led)]
    sessions = [d.name for d in dests if d.after == done and d.what in ("session", "both")]
    exports = [d.name for d in dests if d.what in ("export", "both")] if done == "export" else []
    return sessions, exports


def _refusal(job: Job) -> str | None:
    """Why ``job``'s files must not leave the rig: a session not finalized or changed since its seal, an export
    changed since it was queued."""
    if job.what != "export":
        return refusal(Path(job.folder))
    want = json.loads(job.files or "{}")
    try:
        found = export_files(Path(job.folder), list(want))
    except OSError as e:
        return f"export unreadable: {e}"
    if bad := mismatches(want, found):
        return f"export changed since it was queued, refused: {describe(bad, found)}"
    return None


def _wanted(job: Job) -> tuple[dict[str, str], str]:
    """({file: sha256} the destination must hold, the digest READY.json and shipping.json name)."""
    if job.what == "export":
        want = json.loads(job.files or "{}")
        return want, listing_sha256(want)
    want = expected(Path(job.folder))
    return want, want[MANIFEST]


def _ready(job: Job, dest: ShipDestination, where: str, digest: str, files: int) -> bytes:
    """READY.json: written last, so a watcher that sees it knows every file below hashed right."""
    return json.dumps({"session": job.session, "what": job.what, "destination": dest.name, "path": where,
                       "manifest_sha256": digest, "files": files,
                       "verified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1).encode()


def _payload(job: Job) -> dict:
    return {"id": job.id, "session": job.session, "destination": job.dest, "what": job.what, "state": job.state,
            "attempts": job.attempts, "error": job.error, "manifest_sha256": job.manifest_sha256}
