"""The daemon's log lines: JSON for a pipe or a file, syslog priorities without timestamps under journald,
text on a terminal; the real daemon, its stderr in a file."""

from __future__ import annotations

import io
import json
import logging
import os
import re

import pytest

from acqd.service.logs import JournalFormatter, choose_format, setup_logging
from tests.conftest import write_rig


def test_the_format_follows_where_stderr_goes(tmp_path):
    master, slave = os.openpty()
    log = (tmp_path / "log").open("w")
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            assert choose_format("auto", tty, None) == "text"
        st = os.fstat(log.fileno())
        assert choose_format("auto", log, None) == "json"
        assert choose_format("auto", log, f"{st.st_dev}:{st.st_ino}") == "journal"
        assert choose_format("auto", log, f"{st.st_dev}:{st.st_ino + 1}") == "json"  # journald, but not our stderr
        assert choose_format("text", log, None) == "text"  # asked for
    finally:
        log.close()
        os.close(master)
        os.close(slave)


def test_a_traceback_under_journald_keeps_its_priority_on_every_line():
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("acqd", logging.ERROR, __file__, 1, "writer %s failed", ("probe",), True)
        import sys

        record.exc_info = sys.exc_info()
    lines = JournalFormatter().format(record).splitlines()
    assert lines[0] == "<3>acqd: writer probe failed" and len(lines) > 2 and all(x.startswith("<3>") for x in lines)


def test_json_lines_carry_time_level_logger_and_message():
    stream = io.StringIO()
    try:
        assert setup_logging("json", stream) == "json"
        logging.getLogger("acqd").warning("disk %s", "low")
    finally:
        logging.getLogger().handlers.clear()
    line = json.loads(stream.getvalue())
    assert line["level"] == "warning" and line["logger"] == "acqd" and line["message"] == "disk low"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", line["time"])


@pytest.mark.parametrize("journald", [False, True], ids=["file", "journald"])
def test_the_daemon_logs_json_to_a_file_and_priorities_to_journald(tmp_path, journald):
    from acqd.service.procs import Daemon

    log = tmp_path / "daemon.log"
    log.touch()
    st = os.stat(log)
    env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"} if journald else {}
    daemon = Daemon(write_rig(tmp_path), tmp_path / "data", tmp_path, env=env, log=log)
    try:
        daemon.command("acquire")
    finally:
        daemon.stop(timeout_s=30)
    lines = [x for x in log.read_text().splitlines() if x.strip()]
    if journald:
        assert any(re.fullmatch(r"<6>acqd: serving http://127\.0\.0\.1:\d+ .*", x) for x in lines), lines
        assert not any(re.match(r"<\d>\d{4}-", x) for x in lines)  # journald stamps lines itself
    else:
        records = [json.loads(x) for x in lines]  # every line is one JSON object
        assert any(r["message"].startswith("serving http://") and r["level"] == "info" for r in records)
        assert any(r["message"].startswith("mode ACQUIRE") for r in records)
