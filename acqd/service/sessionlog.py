"""The session's own log: what the daemon said while a session recorded, kept in the session folder.

``<session>/log.jsonl`` holds one JSON object per line for every line the daemon logs between RECORD and the
close of the session: mode changes, incidents (with their stream and kind), reject summaries, writer restarts,
operator commands with who sent them and when. Whoever analyses the data months later reads what the operator
saw. It is written as the lines come (one ``write`` each, O_APPEND), fsynced whenever session.json is saved and
at the close, sealed with the session by finalize and summarised in its QC report (``acqd.finalize.report``).

A ``logging.Handler`` on the ``acqd`` logger, so the session log and the daemon's own log are the same lines.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

from acqd.session import LOG_FILE, fsync_dir

MAX_LINE_BYTES = 16 << 10
"""A longer message is cut (and says so): one runaway detail must not grow the session folder without bound."""


def log_line(record: logging.LogRecord) -> bytes:
    """One record as a JSON line: time (UTC), level, logger, message and the record's structured ``fields``."""
    out = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
           "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
           **getattr(record, "fields", {})}
    line = json.dumps(out, default=str, ensure_ascii=False).encode()
    if len(line) > MAX_LINE_BYTES:
        out["message"] = out["message"][:MAX_LINE_BYTES // 2] + f"... (cut: {len(line)} bytes)"
        line = json.dumps({k: out[k] for k in ("time", "level", "logger", "message")}, ensure_ascii=False).encode()
    return line + b"\n"


class SessionLog(logging.Handler):
    """Appends the ``acqd`` logger's lines to the open session's ``log.jsonl``; does nothing between sessions."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self._fd: int | None = None

    def open(self, folder: Path) -> None:
        """Start the log of the session in ``folder`` (a new file: O_EXCL, never through a planted link)."""
        self.close()
        fd = os.open(Path(folder) / LOG_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                     0o644)
        fsync_dir(Path(folder))
        with self.lock:
            self._fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, log_line(record))
        except OSError:  # a full disk: the daemon's own log still has the line, the recording goes on
            self.handleError(record)

    def sync(self) -> None:
        """Make what was logged durable (with each save of session.json)."""
        with self.lock:
            if self._fd is not None:
                try:
                    os.fsync(self._fd)
                except OSError:
                    pass  # a full disk or EIO: said by the writers' own incidents; never stops the session

    def close(self) -> None:
        """Sync and close the log of the session that ends (the next lines belong to no session)."""
        self.sync()
        with self.lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
