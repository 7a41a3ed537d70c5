"""The ship queue: one SQLite file under the data root (``.acqd-ship.sqlite``) that survives any kill.

A job is one thing (a session folder or its export) going to one destination. Its states:

    queued -> copying -> verifying -> verified
       ^         |           |
       +---------+-----------+---- (a failed attempt: queued again at next_try, with the error)
                                 -> failed (max_attempts reached, or a fault retrying cannot fix: tampered session)

Only the daemon writes (one writer; WAL so that readers never wait). Every transition is one committed
transaction, so a kill -9 leaves each job in a state it can resume from: ``recover`` puts a job that was copying or
verifying back to queued (rclone copies only what is missing or different, so nothing is sent twice in full).
``backoff_s`` is the pure rule for when a failed attempt may run again.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

QUEUE_FILE = ".acqd-ship.sqlite"
QUEUED, COPYING, VERIFYING, VERIFIED, FAILED = "queued", "copying", "verifying", "verified", "failed"
ACTIVE = (QUEUED, COPYING, VERIFYING)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session TEXT NOT NULL,
    folder TEXT NOT NULL,
    dest TEXT NOT NULL,
    what TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    bytes_total INTEGER NOT NULL DEFAULT 0,
    bytes_done INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    started REAL,
    finished REAL,
    next_try REAL NOT NULL DEFAULT 0,
    manifest_sha256 TEXT,
    reverify INTEGER NOT NULL DEFAULT 0,
    files TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, next_try);
"""
_ADDED_COLUMNS = (("reverify", "INTEGER NOT NULL DEFAULT 0"), ("files", "TEXT"))
"""Columns added after the first schema, in order: ``Queue`` adds them to an older file."""


@dataclass(frozen=True, slots=True)
class Job:
    """One row of the queue."""

    id: int
    session: str
    folder: str
    """The local folder that is shipped (the session folder, or its export folder)."""
    dest: str
    """The destination's name (the rig config's ship[].name)."""
    what: str
    """session | export"""
    state: str
    attempts: int
    bytes_total: int
    bytes_done: int
    error: str | None
    created: float
    updated: float
    started: float | None
    finished: float | None
    next_try: float
    manifest_sha256: str | None
    reverify: int
    """1: the next run only hashes the destination again (``acqd ship --reverify``), it copies nothing."""
    files: str | None
    """An export's files as JSON {path relative to ``folder``: sha256}, hashed when it was queued (a session's
    files are its manifest's)."""

    def as_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


def backoff_s(attempts: int, base_s: float, cap_s: float) -> float:
    """Wait before attempt ``attempts + 1`` after ``attempts`` failed ones: base, 2 base, 4 base ... at most cap."""
    if attempts <= 0:
        return 0.0
    return min(cap_s, base_s * 2.0 ** min(attempts - 1, 62))


class Queue:
    """The jobs table. Each method is one transaction; the threads of one process share a Queue (a lock
    serialises them), other processes open their own (SQLite's lock serialises those)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a verified job must stay verified after a power cut
        self._db.executescript(_SCHEMA)
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """A queue file written by an earlier acqd gains the columns added since (with their defaults)."""
        have = {r["name"] for r in self._db.execute("PRAGMA table_info(jobs)")}
        for name, decl in _ADDED_COLUMNS:
            if name not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {decl}")

    def close(self) -> None:
        self._db.close()

    def add(self, session: str, folder: Path, dest: str, what: str, files: str | None = None) -> Job:
        """Queue ``folder`` for ``dest``; an active or verified job of the same (session, dest, what) is returned
        instead (shipping twice is asking for a re-verify, see ``reverify``)."""
        with self._tx():
            row = self._db.execute("SELECT * FROM jobs WHERE session=? AND dest=? AND what=? AND state!=? "
                                   "ORDER BY id DESC LIMIT 1", (session, dest, what, FAILED)).fetchone()
            if row is not None:
                return _job(row)
            now = time.time()
            cur = self._db.execute(
                "INSERT INTO jobs (session, folder, dest, what, state, created, updated, files) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (session, str(folder), dest, what, QUEUED, now, now, files))
            return self.get(cur.lastrowid)

    def get(self, job_id: int) -> Job:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(f"no ship job {job_id}")
        return _job(row)

    def jobs(self, session: str | None = None) -> list[Job]:
        sql, args = ("SELECT * FROM jobs WHERE session=? ORDER BY id", (session,)) if session else \
            ("SELECT * FROM jobs ORDER BY id", ())
        with self._lock:
            return [_job(r) for r in self._db.execute(sql, args)]

    def next_due(self, dest: str, now: float | None = None) -> Job | None:
        """The oldest queued job of ``dest`` whose next_try has come."""
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE dest=? AND state=? AND next_try<=? ORDER BY id LIMIT 1",
                                   (dest, QUEUED, time.time() if now is None else now)).fetchone()
        return None if row is None else _job(row)

    def start(self, job_id: int, bytes_total: int) -> Job:
        """An attempt begins: copying, attempts + 1."""
        now = time.time()
        return self._set(job_id, "state=?, attempts=attempts+1, bytes_total=?, bytes_done=0, started=?, error=NULL",
                         (COPYING, bytes_total, now))

    def progress(self, job_id: int, bytes_done: int) -> None:
        self._set(job_id, "bytes_done=?", (bytes_done,))

    def verifying(self, job_id: int) -> Job:
        return self._set(job_id, "state=?", (VERIFYING,))

    def verified(self, job_id: int, manifest_sha256: str) -> Job:
        return self._set(job_id, "state=?, finished=?, error=NULL, manifest_sha256=?, bytes_done=bytes_total, "
                         "reverify=0", (VERIFIED, time.time(), manifest_sha256))

    def retry_later(self, job_id: int, error: str, wait_s: float) -> Job:
        """The attempt failed with ``error``; queued again in ``wait_s`` seconds."""
        return self._set(job_id, "state=?, error=?, next_try=?", (QUEUED, error, time.time() + wait_s))

    def interrupted(self, job_id: int, why: str) -> Job:
        """The attempt was stopped by acqd itself (a recording started, the daemon stops): queued, not counted."""
        return self._set(job_id, "state=?, attempts=max(attempts-1, 0), error=?, next_try=0", (QUEUED, why))

    def fail(self, job_id: int, error: str) -> Job:
        return self._set(job_id, "state=?, error=?, finished=?, reverify=0", (FAILED, error, time.time()))

    def requeue(self, job_id: int, reverify: bool = False) -> Job:
        """``acqd ship --retry`` (copy and verify again) or ``--reverify`` (only hash the destination again): queued
        now, attempts from zero (the last error is kept until the next attempt starts)."""
        return self._set(job_id, "state=?, attempts=0, next_try=0, finished=NULL, reverify=?", (QUEUED, int(reverify)))

    def recover(self) -> list[int]:
        """At daemon start: jobs a kill left copying or verifying are queued again (not counted as failed)."""
        with self._tx():
            ids = [r["id"] for r in self._db.execute("SELECT id FROM jobs WHERE state IN (?, ?)", (COPYING, VERIFYING))]
            self._db.execute("UPDATE jobs SET state=?, next_try=0, updated=? WHERE state IN (?, ?)",
                             (QUEUED, time.time(), COPYING, VERIFYING))
        return ids

    def _set(self, job_id: int, assignments: str, args: tuple) -> Job:
        with self._tx():
            self._db.execute(f"UPDATE jobs SET {assignments}, updated=? WHERE id=?", (*args, time.time(), job_id))
            return self.get(job_id)

    def _tx(self):
        return _Transaction(self._db, self._lock)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on an exception): the write lock is taken up front, so two writers
    never deadlock on an upgrade."""

    def __init__(self, db: sqlite3.Connection, lock: threading.RLock):
        self._db, self._lock = db, lock

    def __enter__(self) -> None:
        self._lock.acquire()
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, *_: object) -> None:
        try:
            self._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self._lock.release()


def _job(row: sqlite3.Row) -> Job:
    return Job(**dict(row))
