"""Fault-matrix rows 41 and 46 (LabRecorder part) (/work/shared/fault-matrix.md): compatibility clients.

Row 41: a start sent by an unmodified Open Ephys or LabRecorder script records unless recording is impossible;
what is refused keeps the original's reply shape and is an incident in the status (console, ``acqd status``).
Row 46: the LabRecorder port is bounded (line length, connections, threads) and refuses what is not its
protocol (an HTTP request from a web page), and its ``root`` cannot leave the configured data roots.
The Open Ephys side uses the real open-ephys-python-tools client; the LabRecorder side is a plain-socket script
written from LabRecorder's README ("Remote Control").
"""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import httpx
import pytest
from open_ephys.control import OpenEphysHTTPServer
from rich.console import Console

from acqd.service.procs import Simulator, wait_until
from acqd.service.status import status_renderable
from acqd.session import read_annotations
from tests.conftest import SMALL_RIG, write_rig
from tests.sessions import SUBJECT


def incidents(daemon, kind: str) -> list[dict]:
    """Recent incidents of ``kind`` as the console and ``acqd status`` show them."""
    return [i for i in daemon.command("status")["recent_incidents"] if i["kind"] == kind]


def wait_incident(daemon, kind: str, text: str) -> dict:
    return wait_until(lambda: next((i for i in incidents(daemon, kind) if text in i["detail"]), None),
                      f"a {kind} incident saying {text!r}", 20)


def acqd_status_text(daemon) -> str:
    """What `acqd status` prints (80 columns)."""
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(status_renderable(daemon.command("status")))
    return console.export_text()


def session_json(folder: Path) -> dict:
    return json.loads((folder / "session.json").read_text())


@pytest.mark.e2e
def test_row41_open_ephys_client_records_under_a_unique_name_and_its_refusals_keep_mode(daemon_factory, tmp_path):
    rig_file = write_rig(tmp_path, stream_overrides=SMALL_RIG)
    daemon = daemon_factory(rig_file)
    gui = OpenEphysHTTPServer()
    gui.address = daemon.url
    data = tmp_path / "data"

    note = gui.message("animal in the rig")  # the GUI takes a message in any mode; nothing is lost in IDLE
    assert note["mode"] == "IDLE" and "error" not in note, note
    assert [a["text"] for a in read_annotations(data)] == ["animal in the rig"]

    gui.set_base_text("m1_day3")
    daemon.command("recording", metadata={"subject": SUBJECT})  # the operator names the animal (acqd record --prepare)
    assert gui.acquire() == "ACQUIRE"
    sim = Simulator(rig_file, 60, seed=41)
    try:
        wait_until(lambda: not daemon.command("preflight")["problems"], "all streams to flow")
        assert gui.record() == "RECORD"
        assert gui.acquire() == "ACQUIRE"
        assert gui.record() == "RECORD"  # the same name again: recorded as the next free name, as the GUI would
        assert daemon.command("status")["session"]["session_id"] == "m1_day3_2"
        assert gui.acquire() == "ACQUIRE"
    finally:
        sim.stop()
    for name in ("m1_day3", "m1_day3_2"):
        assert session_json(data / name)["state"] == "closed", name
    renamed = wait_incident(daemon, "session_renamed", "'m1_day3_2'")
    assert "'m1_day3' exists" in renamed["detail"]
    assert any(i["kind"] == "session_renamed" for i in session_json(data / "m1_day3_2")["incidents"])

    # Every stream silent: recording is impossible. The client gets the mode (no KeyError), the console an incident.
    assert gui.idle() == "IDLE"
    assert gui.record() == "ACQUIRE"
    refused = wait_incident(daemon, "openephys_refused", "RECORD refused")
    assert "silent" in refused["detail"]
    assert "openephys_refused: Open Ephys: RECORD refused" in acqd_status_text(daemon)
    assert not (data / "m1_day3_3").exists()


def _say(sock: socket.socket, line: str) -> bytes:
    sock.sendall(line.encode() + b"\n")
    return sock.recv(4096)


def _lr_rig(tmp_path: Path, **labrecorder: object) -> Path:
    return write_rig(tmp_path, stream_overrides=SMALL_RIG,
                     daemon_overrides={"labrecorder": {"port": 0, **labrecorder},
                                       "control": {"data_roots": [str(tmp_path / "study")]}})


def test_row41_labrecorder_script_records_every_start_it_sends(tmp_path, daemon_factory):
    cfg = _lr_rig(tmp_path)
    daemon = daemon_factory(cfg)
    study = tmp_path / "study"
    # The operator prepares what the participants share; each start's participant is its subject's id.
    daemon.command("recording", metadata={"subject": {k: v for k, v in SUBJECT.items() if k != "subject_id"}})
    daemon.command("acquire")
    with socket.create_connection(("127.0.0.1", daemon.info["labrecorder_port"]), timeout=60) as lr:
        # Before any driver runs: recording is impossible (silent streams): an error reply and an incident.
        assert _say(lr, "filename {participant:P000}") == b"OK"
        assert _say(lr, "start").startswith(b"error: ")
        assert "silent" in wait_incident(daemon, "labrecorder_start_refused", "'start'")["detail"]
        assert "labrecorder_start_refused: LabRecorder: 'start'" in acqd_status_text(daemon)
        sim = Simulator(cfg, 60, seed=42)
        try:
            wait_until(lambda: not daemon.command("preflight")["problems"], "all streams to flow")
            _say(lr, "select all")
            line = f"filename {{root:{study}}} {{participant:P003}} {{task:MemoryGuided}} {{run:2}}"
            for _ in range(2):  # the same filename twice, then start: LabRecorder keeps both recordings
                _say(lr, line)
                assert _say(lr, "start") in (b"OK", b"OK session 'sub-P003_task-MemoryGuided_run-2' exists in "
                                             + str(study).encode() + b": recording as 'sub-P003_task-MemoryGuided_run-2_2'\n")
                _say(lr, "stop")
            # An option LabRecorder ignores is ignored; the rest of the line is taken.
            assert _say(lr, "filename {C:\\Users\\lab} {participant:P004}") == b"OK"
            assert _say(lr, "Start") == b"OK"  # any case
            _say(lr, "stop")
            # A participant with a space and an accent: the folder in plain letters, the subject as typed.
            _say(lr, "filename {participant:Jörg 5}")
            assert _say(lr, "start") == b"OK"
            _say(lr, "stop")
        finally:
            sim.stop()
    for name, subject in (("sub-P003_task-MemoryGuided_run-2", "P003"), ("sub-P003_task-MemoryGuided_run-2_2", "P003"),
                          ("sub-P004_task-MemoryGuided_run-2", "P004"), ("sub-Jorg5_task-MemoryGuided_run-2", "Jörg 5")):
        s = session_json(study / name)
        assert s["state"] == "closed" and s["metadata"]["subject"]["subject_id"] == subject, name
        assert (study / name / "streams" / "nidaq.h5").is_file()
    wait_incident(daemon, "session_renamed", "'sub-P003_task-MemoryGuided_run-2_2'")


def test_labrecorder_root_is_confined_and_a_web_page_cannot_start_a_recording(tmp_path, daemon_factory):
    """Issue 22.3: a text/plain POST to the LabRecorder port carried `filename {root:...}` and `start`."""
    daemon = daemon_factory(_lr_rig(tmp_path))
    port = daemon.info["labrecorder_port"]
    data = tmp_path / "data"
    elsewhere = tmp_path / "elsewhere"
    body = f"filename {{root:{elsewhere}}} {{participant:X1}}\nstart\n"
    with pytest.raises(httpx.TransportError):  # the connection is closed at the request line
        httpx.post(f"http://127.0.0.1:{port}/", content=body, headers={"Content-Type": "text/plain"}, timeout=10)
    wait_incident(daemon, "labrecorder_refused", "HTTP request")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as lr:
        reply = _say(lr, f"filename {{root:{elsewhere}}}")
        assert reply.startswith(b"error: ") and b"outside the allowed folders" in reply
        assert daemon.command("recording")["parent_directory"] == str(data.resolve())
        reply = _say(lr, f"filename {{root:{tmp_path / 'study' / 'lab1'}}} {{participant:X1}}")
        assert reply == b"OK"
        assert _say(lr, "start").startswith(b"error: ")  # nothing flows: refused, and the root did not move
    assert not elsewhere.exists() and not (tmp_path / "study").exists()
    status = daemon.command("status")
    assert status["mode"] == "IDLE" and status["session"] is None  # refused before acquiring: no subject prepared
    assert daemon.command("recording")["parent_directory"] == str(data.resolve())


def test_labrecorder_token_is_the_first_line_when_configured_and_a_silent_client_is_closed(tmp_path,
                                                                                           daemon_factory):
    daemon = daemon_factory(_lr_rig(tmp_path, token="a-long-labrecorder-secret"))
    port = daemon.info["labrecorder_port"]
    silent = socket.create_connection(("127.0.0.1", port), timeout=30)  # holds a slot, says nothing
    with socket.create_connection(("127.0.0.1", port), timeout=30) as lr:
        assert _say(lr, "update").startswith(b"error: a token is required")
        assert lr.recv(10) == b""  # closed
    with socket.create_connection(("127.0.0.1", port), timeout=30) as lr:
        assert _say(lr, "token a-long-labrecorder-secret") == b"OK"
        assert _say(lr, "update") == b"OK"
    with silent:
        assert silent.recv(10) == b""  # closed after FIRST_LINE_TIMEOUT_S (10 s)


def _rss_threads(pid: int) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["Threads"])


def test_row46_labrecorder_huge_line_and_600_connections_are_bounded(tmp_path, daemon_factory):
    daemon = daemon_factory(_lr_rig(tmp_path))
    port = daemon.info["labrecorder_port"]
    rss0, _ = _rss_threads(daemon.pid)

    line = b"filename {task:" + b"x" * (256 << 20) + b"}\n"  # a 256 MB line
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        try:
            s.sendall(line)
            reply = s.recv(4096)
        except ConnectionError:
            reply = b""
    del line
    rss1, _ = _rss_threads(daemon.pid)
    assert rss1 - rss0 < 32 << 20, f"daemon RSS grew by {(rss1 - rss0) >> 20} MB for one line"
    assert reply in (b"", b"error: a line longer than 16384 bytes\n"), reply[:200]
    wait_incident(daemon, "labrecorder_refused", "a line longer than")

    def served() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            return _say(s, "update") == b"OK"
    assert served()
    _, threads0 = _rss_threads(daemon.pid)  # with the command thread and the API's worker started
    socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(600)]
    try:
        replies = []
        for s in socks:
            s.sendall(b"update\n")
        for s in socks:
            try:
                replies.append(s.recv(100))
            except ConnectionError:
                replies.append(b"")
        _, threads = _rss_threads(daemon.pid)
        assert threads - threads0 <= 2, f"{threads - threads0} more threads for 600 connections"
        # labrecorder.max_connections (8) are served (fewer if a slot of the client above is not yet freed)
        assert 0 < replies.count(b"OK") <= 8, replies.count(b"OK")
        assert all(r in (b"OK", b"error: too many connections\n", b"") for r in replies)
        wait_incident(daemon, "labrecorder_refused", "too many")
    finally:
        for s in socks:
            s.close()
    # Once they are gone, a script connects and is served.
    wait_until(served, "a new client to be served", 20)
