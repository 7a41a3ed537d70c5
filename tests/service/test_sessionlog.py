"""The session keeps its own log: what the daemon said while it recorded, in the session folder, sealed with it,
summarised in QC and shown by the console; the real daemon, simulated rig and finalize."""

from __future__ import annotations

import getpass
import json
import logging
import os
import signal

import httpx

from acqd.config import load_config
from acqd.service.procs import wait_until
from acqd.service.sessionlog import MAX_LINE_BYTES, SessionLog, log_line
from acqd.session import LOG_FILE
from tests.conftest import recording


def test_log_lines_are_json_with_fields_and_bounded(tmp_path):
    record = logging.LogRecord("acqd", logging.WARNING, __file__, 1, "probe: gap: %s", ("3 messages",), None)
    record.fields = {"incident": "gap", "stream": "probe"}
    line = json.loads(log_line(record))
    assert line["level"] == "warning" and line["message"] == "probe: gap: 3 messages" and line["incident"] == "gap"
    huge = logging.LogRecord("acqd", logging.INFO, __file__, 1, "x" * (4 * MAX_LINE_BYTES), (), None)
    assert len(log_line(huge)) <= MAX_LINE_BYTES and "(cut:" in json.loads(log_line(huge))["message"]

    handler = SessionLog()
    handler.emit(record)  # no session open: nothing written anywhere
    (tmp_path / LOG_FILE).symlink_to(tmp_path / "victim")
    try:
        handler.open(tmp_path)  # a planted link is refused, never followed
        raise AssertionError("opened through a symlink")
    except OSError:
        pass
    assert not (tmp_path / "victim").exists()


def test_the_session_log_holds_modes_commands_incidents_and_is_sealed(tmp_path, small_rig_file, daemon_factory):
    daemon = daemon_factory(small_rig_file)
    with recording(daemon, small_rig_file, "logged", seed=11) as (_, folder):
        daemon.command("annotate", text="drug on")
        os.kill(daemon.command("status")["streams"]["sensor"]["pid"], signal.SIGKILL)
        wait_until(lambda: daemon.command("status")["streams"]["sensor"]["restarts"] == 1, "the writer's restart")
        # Record on for 3 s of both host-timed streams after the restart: each needs 10 receive times in a part to
        # be placed on the timebase. Under load the new writer took 1.4 s to connect while the camera's rows came
        # on in bursts, so each stream's own rows are waited for.
        rates = {s.name: s.rate for s in load_config(small_rig_file).streams if s.name in ("camera", "sensor")}
        before = daemon.command("status")["streams"]
        wait_until(lambda: all(daemon.command("status")["streams"][n]["rows"] >= before[n]["rows"] + 3 * rate
                               for n, rate in rates.items()), "3 s of camera and sensor", 60)
        daemon.command("stop")
    lines = [json.loads(x) for x in (folder / LOG_FILE).read_text().splitlines()]
    messages = [x["message"] for x in lines]
    me = f"127.0.0.1 ({getpass.getuser()})"
    assert any(m.startswith("mode RECORD (session logged)") for m in messages), messages
    assert any(x.get("command") == "annotate" and x["by"] == me for x in lines), lines
    assert any(x.get("command") == "stop" and x["by"] == me for x in lines)
    died = [x for x in lines if x.get("incident") == "writer_died"]
    assert died and died[0]["stream"] == "sensor" and died[0]["level"] == "warning"
    assert messages[-1] == "session logged closed"  # the close is the last line: nothing after it belongs here
    assert not any(x.get("command") == "status" for x in lines)  # reads are not logged

    job = daemon.command("finalize", session="logged")
    wait_until(lambda: daemon.command("finalize_status", session="logged")["state"] != "running", "finalize", 180)
    done = daemon.command("finalize_status", session="logged")
    assert done["state"] == "done", json.dumps(done)
    assert any(line.endswith(f"  {LOG_FILE}") for line in (folder / "manifest.sha256").read_text().splitlines())
    summary = json.loads((folder / "qc" / "qc.json").read_text())["session_log"]
    assert summary["lines"] == len(lines) and summary["incidents"]["writer_died"] == 1
    assert summary["commands"][f"stop by {me}"] == 1
    assert "session log (log.jsonl)" in (folder / "qc" / "index.html").read_text()
    shown = httpx.get(f"{daemon.url}/api/console/sessions/logged/log", params={"tail": 3}, timeout=30).json()
    assert shown["total"] == len(lines) and [x["message"] for x in shown["lines"]] == messages[-3:]


def test_kill9_of_the_daemon_keeps_every_line_logged_before_it(tmp_path, small_rig_file, daemon_factory):
    daemon = daemon_factory(small_rig_file)
    with recording(daemon, small_rig_file, "cut", seed=12) as (_, folder):
        daemon.command("annotate", text="just before the crash")
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.proc.wait(30)
    lines = [json.loads(x) for x in (folder / LOG_FILE).read_text().splitlines()]  # every line whole
    assert lines[-1].get("command") == "annotate" and "just before the crash" in lines[-1]["message"]
