"""Writer handles (unit): one rule for "hung" and "silent" shared by RECORD's preflight and the status verdict,
and reconciliation of what a writer reports with what the session expects, over a real control socket."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from acqd.config import load_config
from acqd.service.live import verdict
from acqd.service.procs import wait_until
from acqd.service.sessionrecord import SessionRecord
from acqd.service.writers import WriterHandle, Writers, liveness
from tests.conftest import write_rig

SILENT_AFTER_S = 2.0


@pytest.mark.parametrize(("hung", "silent", "expected"), [
    (True, 0.1, "hung"), (True, None, "hung"), (False, None, "silent"), (False, SILENT_AFTER_S + 0.1, "silent"),
    (False, SILENT_AFTER_S, None), (False, 0.0, None)])
def test_liveness(hung, silent, expected):
    assert liveness(hung, silent, SILENT_AFTER_S) == expected


@pytest.fixture
def writers(tmp_path):
    incidents: list[tuple] = []
    cfg = load_config(write_rig(tmp_path))
    rejects: list[tuple] = []
    w = Writers(cfg, tmp_path, lambda *a, **k: incidents.append((*a, k.get("incomplete", False))),
                lambda *a: rejects.append(a))
    w.incidents, w.rejects = incidents, rejects
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield w, sleeper
    sleeper.kill()
    sleeper.wait()
    w.ctx.destroy(linger=0)  # also closes the test's own sockets, even after a failed assertion


def _handle(name: str, proc: subprocess.Popen, silent: float | None, hung: bool) -> WriterHandle:
    h = WriterHandle(name, proc, ready=True, state="acquiring", stats_at=time.monotonic(),
                     stats={"connected": True, **({"silent_s": silent} if silent is not None else {})})
    h.hung_since = time.monotonic() - 5 if hung else None
    return h


@pytest.mark.parametrize(("silent", "hung"), [(None, False), (0.1, False), (30.0, False), (0.1, True)])
def test_preflight_and_the_status_verdict_judge_a_stream_alike(writers, silent, hung):
    w, proc = writers
    for s in w.cfg.streams:
        w[s.name] = _handle(s.name, proc, 0.1, False)
    w["sensor"] = _handle("sensor", proc, silent, hung)
    status = {"mode": "ACQUIRE", "session": None, "streams": {s.name: w.stream_status(s) for s in w.cfg.streams}}
    said = verdict(status, w.cfg.daemon.silent_after_s)["problems"]
    sensor = [p for p in w.problems() if "'sensor'" in p]
    expected = liveness(hung, silent, w.cfg.daemon.silent_after_s)
    if expected is None:
        assert sensor == [] and said == []
    else:
        assert len(sensor) == 1 and {"hung": "has a hung writer", "silent": "is silent"}[expected] in sensor[0]
        assert len(said) == 1 and said[0].startswith(f"sensor: {expected}")


def _dealer(w: Writers, name: str) -> zmq.Socket:
    s = w.ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.IDENTITY, name.encode())
    s.setsockopt(zmq.LINGER, 0)
    s.connect(w.control_endpoint)
    return s


def _commands(sock: zmq.Socket) -> list[dict]:
    out = []
    while sock.poll(2000 if not out else 100):
        out.append(json.loads(sock.recv()))
    return out


def test_reconcile_corrects_a_writer_whose_command_was_lost(writers, tmp_path):
    w, proc = writers
    cfg = w.cfg
    (tmp_path / "data").mkdir(exist_ok=True)
    session = SessionRecord.create(tmp_path / "data", "s1", cfg, {"session_description": "x"})
    sock = _dealer(w, "sensor")
    sock.send(b"{}")  # the ROUTER learns this peer's identity (it drops what it sends to peers it has not heard)
    assert w.router.poll(10_000) and [n for n, _ in w.receive(lambda n: True, lambda raw: None)] == ["sensor"]
    w["sensor"] = h = _handle("sensor", proc, 0.1, False)
    # Not recording although the session records it: told to record into the next part, with an incident.
    h.stats = {**h.stats, "recording": False, "file": None}
    w.reconcile("sensor", h, session)
    (cmd,) = _commands(sock)
    assert cmd["cmd"] == "record" and cmd["part"] == 0 and cmd["folder"] == str(session.streams_dir)
    assert w.incidents[-1][:2] == ("sensor", "writer_reconciled") and w.incidents[-1][-1] is True
    # Recording into this session's file that is not listed (its report was lost): the part is listed.
    h.acked = h.sent
    file = str(session.streams_dir / "sensor.h5")
    h.stats = {**h.stats, "recording": True, "file": file, "part": 0}
    w.reconcile("sensor", h, session)
    assert session.parts("sensor") == [{"part": 0, "path": "streams/sensor.h5", "rows": None}]
    wait_until(lambda: (session.flush(), session.due == float("inf"))[1], "the part to be written", 5, 0.02)
    assert json.loads((session.folder / "session.json").read_text())["streams"]["sensor"]["parts"][0]["part"] == 0
    # Still recording after the session closed: told to stop.
    n = len(w.incidents)
    w.reconcile("sensor", h, None)
    assert [c["cmd"] for c in _commands(sock)] == ["stop"] and w.incidents[n][1] == "writer_reconciled"
    # A command still in flight: nothing is corrected yet.
    w.reconcile("sensor", h, session)
    assert _commands(sock) == [] and h.sent > h.acked
    sock.close()


def test_a_message_from_a_replaced_writer_is_ignored(writers):
    w, proc = writers
    w["sensor"] = h = _handle("sensor", proc, 0.1, False)
    assert w.on_message("sensor", {"type": "stats", "pid": proc.pid + 1}, None, False, lambda *a: None) is None
    assert w.on_message("sensor", {"type": "ready", "pid": proc.pid}, None, False, lambda *a: None) is h
    assert h.ready and h.state == "acquiring"


def test_rejects_are_counted_from_each_writer_process_s_stats_once(writers):
    """A writer reports no message per reject; the supervisor counts what each stats report adds, by reason, and a
    restarted writer (a new process, a new handle) counts from zero again."""
    w, proc = writers
    w["sensor"] = _handle("sensor", proc, 0.1, False)

    def stats(**rejected) -> None:
        w.on_message("sensor", {"type": "stats", "pid": proc.pid, "total": {"rejected": rejected}}, None, False,
                     lambda *a: None)

    stats(malformed=2)
    stats(malformed=2)
    stats(malformed=5, seq_jump=1)
    assert w.rejects == [("sensor", "malformed", 2), ("sensor", "malformed", 3), ("sensor", "seq_jump", 1)]
    w["sensor"] = _handle("sensor", proc, 0.1, False)  # restarted: its new process counts from zero
    stats(malformed=1)
    assert w.rejects[-1] == ("sensor", "malformed", 1)


def test_junk_on_the_control_socket_is_counted_never_raised(writers):
    w, _ = writers
    sock = _dealer(w, "rogue")
    for frames in ([b"not json"], [b"[1, 2]"], [b"two", b"frames"], [b'{"type": "stats"}']):
        sock.send_multipart(frames)
    deadline = time.monotonic() + 10
    got = []
    while w.junk_messages < 4 and time.monotonic() < deadline:
        w.router.poll(100)
        got += list(w.receive(lambda n: n != "rogue", lambda raw: None))
    assert got == [] and w.junk_messages == 4
    sock.close()


def test_a_path_outside_the_session_is_not_its_part(tmp_path):
    cfg = load_config(write_rig(tmp_path))
    (tmp_path / "data").mkdir(exist_ok=True)
    session = SessionRecord.create(tmp_path / "data", "s2", cfg, {"session_description": "x"})
    assert session.holds(str(session.streams_dir / "probe.h5"))
    assert not session.holds(str(Path(tmp_path) / "data" / "other" / "streams" / "probe.h5"))


def test_a_group_writer_is_polled_once_per_check_and_the_status_polls_no_process(writers, monkeypatch):
    """With a hundred streams in one group writer, the supervisor asks the OS about its process once per check, and
    the status (4 times a second) reads what that check found: no waitpid per stream."""
    w, proc = writers
    for s in w.cfg.streams:  # every stream hosted by one process, as in a group writer
        w[s.name] = _handle(s.name, proc, 0.1, False)
    polls, poll = [], proc.poll
    monkeypatch.setattr(proc, "poll", lambda: polls.append(1) or poll())
    w.check_processes(recording=False)
    assert len(w.cfg.streams) > 1 and len(polls) == 1
    assert all(w.stream_status(s)["pid"] == proc.pid for s in w.cfg.streams) and len(polls) == 1
    proc.kill()
    proc.wait()  # what check_processes' poll finds once the process is gone
    assert all(w.stream_status(s)["pid"] is None for s in w.cfg.streams)


def test_a_stalled_group_writer_raises_one_hang_and_one_recovery_and_every_stream_shows_hung(writers):
    """A group writer's stall is one event: one writer_hung when its first stream crosses the heartbeat timeout, one
    writer_recovered when its last hung stream answers, while each of its streams shows ``hung`` in the status."""
    w, proc = writers
    names = [s.name for s in w.cfg.streams]
    for i, name in enumerate(names):  # every stream hosted by one process, heard last at slightly different times
        w[name] = h = _handle(name, proc, 0.1, False)
        h.heard = time.monotonic() - w.cfg.daemon.heartbeat_timeout_s - 0.5 + 0.01 * i
    w.check_heartbeats()
    assert len(names) > 1 and [i[:2] for i in w.incidents] == [(names[0], "writer_hung")]
    assert f"hosts {len(names)} streams" in w.incidents[0][2]
    assert all(w.stream_status(s)["state"] == "hung" for s in w.cfg.streams)
    for name in names:
        assert w.on_message(name, {"type": "stats", "pid": proc.pid}, None, False, lambda *a: None) is not None
    assert [i[:2] for i in w.incidents] == [(names[0], "writer_hung"), (names[0], "writer_recovered")]
    assert all(w.stream_status(s)["state"] == "acquiring" for s in w.cfg.streams) and not w.hangs
