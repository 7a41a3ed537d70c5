"""The daemon's log lines, in the form whoever reads them expects.

- ``text`` on a terminal: time, level, logger, message (for people).
- ``json`` when stderr is a pipe or a file (a container, a log shipper): one JSON object per line with
  ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``, and ``exception`` when there is one.
- ``journal`` under systemd (stderr is the stream named by ``JOURNAL_STREAM``): no timestamp, since journald
  stamps every line itself, and the level as a syslog priority prefix (``<4>`` for a warning), which journald
  turns into the entry's PRIORITY, so ``journalctl -p warning`` filters acqd's lines.

``auto`` (the default) picks one of those from where stderr goes; ``--log-format`` or ``ACQD_LOG_FORMAT`` forces one.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime, timezone
from typing import TextIO

FORMATS = ("auto", "text", "json", "journal")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
SYSLOG_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def choose_format(requested: str, stream: TextIO, journal_stream: str | None) -> str:
    """``requested`` unless it is ``auto``; else journal, text or json by what ``stream`` is connected to."""
    if requested != "auto":
        return requested
    try:
        st = os.fstat(stream.fileno())
        if journal_stream and journal_stream == f"{st.st_dev}:{st.st_ino}":  # systemd's own test (systemd.exec(5))
            return "journal"
        return "text" if stream.isatty() else "json"
    except (OSError, ValueError):  # no file descriptor (a test's StringIO)
        return "json"


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class JournalFormatter(logging.Formatter):
    """``<priority>logger: message``; continuation lines of a traceback keep the priority of their record."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{SYSLOG_PRIORITY.get(record.levelno, 6)}>"
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return "\n".join(prefix + line for line in text.splitlines())


def setup_logging(requested: str = "auto", stream: TextIO = sys.stderr) -> str:
    """Configure the root logger for the daemon; returns the format chosen."""
    fmt = choose_format(requested, stream, os.environ.get("JOURNAL_STREAM"))
    handler = logging.StreamHandler(stream)
    handler.setFormatter({"json": JsonFormatter(), "journal": JournalFormatter()}.get(fmt) or
                         logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(os.environ.get("ACQD_LOG_LEVEL", "INFO").upper())
    return fmt
