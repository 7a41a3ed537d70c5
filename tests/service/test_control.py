"""The control plane against a real daemon: status never waits, live events, metrics, refusals, sd_notify, CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from acqd.client import ApiError
from acqd.service.procs import Daemon, Simulator
from acqd.service.status import status_renderable
from tests import zygote
from tests.conftest import acquiring, write_rig

SUBJECT = {"subject_id": "m1", "species": "Mus musculus", "sex": "F", "age": "P90D"}


def _rig(tmp_path: Path, **control) -> Path:
    path = write_rig(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["daemon"]["control"].update(control)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def acquiring_daemon(tmp_path_factory) -> Iterator[Daemon]:
    """One daemon on the example rig in ACQUIRE with no driver, for the tests that only read it (status, metrics):
    one start instead of one each. Its tests share an xdist group, so that one worker starts it once."""
    tmp = tmp_path_factory.mktemp("acquiring")
    daemon = Daemon(write_rig(tmp), tmp / "data", tmp)
    try:
        daemon.command("acquire")
        yield daemon
    finally:
        daemon.stop(timeout_s=30)


SHARED = pytest.mark.xdist_group("control-acquiring")


def _raw_status(url: str, request: str) -> int:
    """Send a hand-made HTTP request; the status code of the reply (0: closed without one)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host.strip("[]"), int(port)), timeout=10) as s:
        s.sendall(request.encode())
        reply = s.recv(4096).decode(errors="replace")
    return int(reply.split(" ", 2)[1]) if reply.startswith("HTTP/") else 0


@pytest.mark.e2e
def test_status_answers_while_a_record_command_runs(small_rig_file, daemon_factory):
    """Regression: GET /api/status waited 3.5 s for a PUT RECORD to finish (one supervisor thread for all)."""
    daemon = daemon_factory(small_rig_file)
    sim = Simulator(small_rig_file, 60, seed=3, extra=("--wait-peers", "0"))  # publishing before any writer connects
    try:
        result: dict = {}
        record = threading.Thread(target=lambda: result.update(  # RECORD from IDLE (the subject comes with it)
            daemon.command("record", metadata={"subject": SUBJECT})))
        record.start()  # from IDLE: start every writer, wait for data, open the files: seconds of work
        latencies, modes = [], set()
        with httpx.Client(base_url=daemon.url, timeout=30) as http:
            while record.is_alive():
                t0 = time.monotonic()
                modes.add(http.get("/api/status").json()["mode"])
                latencies.append(time.monotonic() - t0)
                time.sleep(0.02)
        record.join()
        assert result["mode"] == "RECORD" and len(latencies) >= 10
        assert max(latencies) < 1.0, f"status took {max(latencies):.2f} s during RECORD"
        assert "IDLE" in modes or "ACQUIRE" in modes  # it was really asked while the command ran
    finally:
        sim.stop()


@pytest.mark.e2e
def test_event_stream_delivers_a_gap_incident_from_a_dropped_message(small_rig_file, daemon_factory):
    daemon = daemon_factory(small_rig_file)
    daemon.command("acquire")
    seen: list[tuple[str, dict]] = []
    with httpx.Client(base_url=daemon.url, timeout=httpx.Timeout(60, read=60)) as http:
        opened = time.monotonic()
        with http.stream("GET", "/api/events") as resp:
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
            sim = Simulator(small_rig_file, 60, seed=4, faults=("sensor:drop:40", "sensor:malformed:60"))
            try:
                kind = None
                deadline = time.monotonic() + 40
                for line in resp.iter_lines():
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: "):
                        seen.append((kind, json.loads(line[6:])))
                        if kind == "incident" and seen[-1][1]["kind"] == "rejects":
                            break
                    assert time.monotonic() < deadline, f"no gap and rejects incidents; saw {seen[-5:]}"
            finally:
                sim.stop()
    incidents = [d for k, d in seen if k == "incident" and d["stream"] == "sensor"]
    (gap,) = [d for d in incidents if d["kind"] == "gap"]
    assert "seq [40, 41)" in gap["detail"]
    assert incidents[-1]["detail"].startswith("1 messages rejected in the last") and "malformed: 1" in \
        incidents[-1]["detail"]  # summarised once a second, with the reason
    assert seen[0][0] == "status" and seen[0][1]["mode"] == "ACQUIRE"  # the snapshot comes first
    assert sum(k == "status" for k, _ in seen) <= 2 * (time.monotonic() - opened) + 2  # status at most 2 Hz


@SHARED
def test_concurrent_requests_are_all_answered(acquiring_daemon):
    """Regression: one thread per connection and a backlog of 5 left 9-48 of 300 concurrent requests unanswered."""
    import asyncio

    daemon = acquiring_daemon

    async def burst() -> list[int]:
        limits = httpx.Limits(max_connections=300)
        async with httpx.AsyncClient(base_url=daemon.url, timeout=30, limits=limits) as http:
            replies = await asyncio.gather(*(http.get("/api/status") for _ in range(300)), return_exceptions=True)
        return [r.status_code if isinstance(r, httpx.Response) else repr(r) for r in replies]

    codes = asyncio.run(burst())
    assert codes == [200] * 300, sorted(set(map(str, codes)))


@SHARED
def test_metrics_are_prometheus_text(acquiring_daemon):
    daemon = acquiring_daemon
    text = httpx.get(daemon.url + "/metrics", timeout=30).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    mode = {s.labels["mode"]: s.value for s in families["acqd_mode"].samples}
    assert mode == {"IDLE": 0.0, "ACQUIRE": 1.0, "RECORD": 0.0}
    assert families["acqd_disk_free_bytes"].samples[0].value > 0
    for name in ("acqd_stream_bytes", "acqd_stream_messages", "acqd_stream_gaps", "acqd_stream_writer_restarts"):
        assert families[name].type == "counter"
        assert {s.labels["stream"] for s in families[name].samples if s.name.endswith("_total")} == {
            "probe", "nidaq", "camera", "sensor"}
    age = {s.labels["stream"]: s.value for s in families["acqd_stream_last_message_age_seconds"].samples}
    assert age["probe"] == float("inf")  # no driver: no message yet
    assert families["acqd_stream_samples"].type == "counter" and families["acqd_incidents"].type == "counter"
    build = families["acqd_build_info"].samples[0]  # an info metric: a gauge of 1 in the text format
    assert build.name == "acqd_build_info" and build.value == 1 and {"version", "hdf5", "pynwb"} <= build.labels.keys()
    assert families["process_resident_memory_bytes"].samples[0].value > 0  # the daemon process itself
    assert families["process_cpu_seconds"].type == "counter"
    for name in ("acqd_stream_overloaded", "acqd_stream_behind_seconds", "acqd_stream_flush_max_seconds",
                 "acqd_stream_encoder_backlog_frames"):  # the writers' load (README "Overload")
        assert families[name].type == "gauge"
        assert {s.labels["stream"] for s in families[name].samples} == {"probe", "nidaq", "camera", "sensor"}
    assert families["acqd_stream_lost_messages"].type == "counter"


def test_hostile_requests_are_refused_before_anything_runs(tmp_path, daemon_factory):
    path = _rig(tmp_path, cors_origins=["http://console.lab:8080"], token="s3cret")
    daemon = daemon_factory(path)
    ok = {"Authorization": "Bearer s3cret"}
    with httpx.Client(base_url=daemon.url, timeout=30) as http:
        def post(cmd: str, content: bytes, **headers: str) -> httpx.Response:
            return http.post(f"/api/commands/{cmd}", content=content, headers={**ok, **headers})

        r = http.get("/api/status", headers={**ok, "Host": "evil.example"})
        assert r.status_code == 421 and "evil.example" in r.json()["error"]
        r = post("acquire", b"{}", **{"Content-Type": "text/plain", "Origin": "http://evil.example"})
        assert r.status_code == 403
        assert post("acquire", b"{}", **{"Content-Type": "text/plain"}).status_code == 415
        assert post("acquire", b"{}", **{"Authorization": "s3cret", "Content-Type": "application/json"}
                    ).status_code == 401
        deep = b"[" * 100_000 + b"]" * 100_000
        assert post("acquire", deep, **{"Content-Type": "application/json"}).status_code in (400, 413)
        deep = b'{"a":' * 100 + b"1" + b"}" * 100
        assert post("acquire", deep, **{"Content-Type": "application/json"}).status_code == 400
        for length in ("1e20", "-1", str(1 << 40)):  # httpx will not send these: a raw socket does
            assert _raw_status(daemon.url, f"POST /api/commands/status HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                               f"Authorization: Bearer s3cret\r\nContent-Type: application/json\r\n"
                               f"Content-Length: {length}\r\n\r\n{{}}") in (400, 413), length
        assert post("record", b'{"session": "../x"}', **{"Content-Type": "application/json"}).status_code == 422
        # An invalid record in IDLE starts nothing: no writer, no folder.
        r = post("record", json.dumps({"session": "ok1", "metadata": {"subject": {**SUBJECT, "age": "90 days"}}}).encode(),
                 **{"Content-Type": "application/json"})
        assert r.status_code == 422 and "age" in r.json()["error"]
        outside = tmp_path / "elsewhere"
        r = http.put("/api/recording", json={"parent_directory": str(outside)}, headers=ok)
        assert r.status_code == 422 and "outside the allowed folders" in r.json()["error"]
        r = post("export", json.dumps({"session": "x", "out": "/etc/acqd"}).encode(),
                 **{"Content-Type": "application/json"})
        assert r.status_code == 422
        assert not outside.exists() and not Path("/etc/acqd").exists()
        # CORS: the configured origin may call; its preflight is answered for it only.
        r = http.options("/api/commands/acquire", headers={"Origin": "http://console.lab:8080",
                                                           "Access-Control-Request-Method": "POST"})
        assert r.headers.get("access-control-allow-origin") == "http://console.lab:8080"
        r = http.get("/api/status", headers={**ok, "Origin": "http://console.lab:8080"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://console.lab:8080"
        status = http.get("/api/status", headers=ok).json()
    assert status["mode"] == "IDLE" and all(s["pid"] is None for s in status["streams"].values())
    assert [p.name for p in (tmp_path / "data").iterdir() if p.is_dir()] == []


def test_ipv6_loopback_binds_and_serves(tmp_path, daemon_factory):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    daemon = daemon_factory(_rig(tmp_path, host="::1"))
    assert daemon.url.startswith("http://[::1]:")
    assert daemon.client.request("GET", "/api/status")["mode"] == "IDLE"


def test_sd_notify_ready_watchdog_and_stopping(rig_file, daemon_factory, tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(30)
    try:
        daemon = daemon_factory(rig_file, env={"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "200000"})
        got: list[str] = []
        while not any(m.startswith("WATCHDOG=1") for m in got[1:]):
            got.append(sock.recv(4096).decode())
        assert got[0].startswith("READY=1") and "serving http://127.0.0.1" in got[0]
        assert daemon.client.request("GET", "/api/status")["mode"] == "IDLE"  # READY came after the API was up
        daemon.stop()
        while not got[-1].startswith("STOPPING=1"):
            got.append(sock.recv(4096).decode())
    finally:
        sock.close()


@pytest.mark.e2e
def test_mode_changes_are_idempotent_and_acquire_does_not_end_a_recording(small_rig_file, daemon_factory):
    daemon = daemon_factory(small_rig_file)
    with acquiring(daemon, small_rig_file, seed=5):
        first = daemon.command("record", session="idem", metadata={"subject": SUBJECT})
        again = daemon.command("record")
        assert again["already_recording"] and again["session"]["session_id"] == "idem"
        assert daemon.client.request("PUT", "/api/status", {"mode": "RECORD"})["session"]["session_id"] == "idem"
        with pytest.raises(ApiError, match="acqd stop") as e:
            daemon.command("acquire")
        assert e.value.status == 409
        with pytest.raises(ApiError, match="already recording session 'idem'") as e:
            daemon.command("record", session="other", metadata={"subject": SUBJECT})
        assert e.value.status == 409 and first["session"]["session_id"] == "idem"
        assert daemon.command("status")["mode"] == "RECORD"
        daemon.command("stop")
        assert daemon.command("stop", idle=True)["mode"] == "IDLE"
        assert daemon.command("stop", idle=True)["mode"] == "IDLE"


def test_cli_without_a_daemon_says_so_in_one_line_with_exit_code_3():
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    out = zygote.run([sys.executable, "-m", "acqd.cli", "status", "--url", f"http://127.0.0.1:{port}"],
                     capture_output=True, text=True, timeout=60)
    assert out.returncode == 3 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "no acqd daemon at" in out.stderr and "Traceback" not in out.stderr


@SHARED
def test_cli_status_fits_80_columns_with_a_verdict(acquiring_daemon):
    daemon = acquiring_daemon
    env = {**os.environ, "ACQD_URL": daemon.url, "COLUMNS": "80"}
    out = zygote.run([sys.executable, "-m", "acqd.cli", "status"], capture_output=True, text=True, timeout=60,
                     env=env)
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and max(len(x) for x in lines) <= 80, out.stdout
    assert lines[0].startswith("ACQUIRE") and "disk" in lines[0]
    assert lines[-1].startswith("PROBLEM: probe: no driver connected (+3 more)"), out.stdout
    assert any(x.startswith("probe") for x in lines)


@SHARED
def test_cli_client_commands_import_neither_the_config_models_nor_hdf5_nor_prometheus(acquiring_daemon):
    """Every client command (acquire, status, stop...) imported acqd.service.status, which imported the session and
    config models, h5py and prometheus_client for what only the daemon and the session summaries use: 0.45 s of CPU
    per call, 0.15 s now (a lab's scripts call these often; so does the test suite)."""
    from tests.service.test_startup import imported

    env = {**os.environ, "ACQD_URL": acquiring_daemon.url, "COLUMNS": "80"}
    for command in ("status", "acquire"):  # the status table rendered, and a command (idempotent in ACQUIRE)
        run = subprocess.run([sys.executable, "-X", "importtime", "-m", "acqd.cli", command], capture_output=True,
                             text=True, timeout=60, env=env)
        assert run.returncode == 0 and "ACQUIRE" in run.stdout, run.stderr[-2000:]
        loaded = imported(run.stderr)
        assert {"acqd", "httpx", "rich"} <= loaded, loaded
        assert not loaded & {"pydantic", "h5py", "numpy", "yaml", "prometheus_client"}, command


def test_status_rendering_of_a_recording_names_elapsed_time_silence_and_time_left():
    stream = {"state": "recording", "reason": None, "connected": True, "silent_s": 12.5, "messages_per_s": 100.0,
              "mb_per_s": 23.04, "gaps": 2, "rejected": 1, "restarts": 1, "required": True, "pid": 1}
    status = {"mode": "RECORD", "session": {"session_id": "a_long_session_name_of_sixty_four_characters_xxxxxxxxxxxxxxxxxx",
                                            "elapsed_s": 3723}, "disk_free_bytes": 5e11, "disk_time_left_s": 7200,
              "streams": {"neuropixels_probe_a": stream}, "recent_incidents": [
                  {"time": time.time(), "stream": "probe", "kind": "gap", "detail": "x" * 200}], "incident_count": 7,
              "verdict": {"ok": False, "problems": ["neuropixels_probe_a: 2 gaps, 1 rejected"],
                          "line": "PROBLEM: neuropixels_probe_a: 2 gaps, 1 rejected"}}
    from rich.console import Console

    console = Console(width=80, record=True, file=open(os.devnull, "w"))
    console.print(status_renderable(status, 80))
    text = console.export_text()
    assert max(len(x) for x in text.splitlines()) <= 80
    assert "1:02:03" in text and "2.0 h left" in text and "12.5" in text and "incidents: 7" in text
    assert text.splitlines()[-1].startswith("PROBLEM: neuropixels_probe_a")


def test_status_shows_a_writer_behind_what_it_sheds_and_what_it_lost_in_80_columns():
    base = {"state": "recording", "reason": None, "connected": True, "silent_s": 0.1, "messages_per_s": 100.0,
            "mb_per_s": 23.04, "gaps": 0, "rejected": 0, "restarts": 0, "required": True, "pid": 1}
    load = {"overloaded": True, "behind_s": 4.2, "backlog_messages": 420, "flush_s": 0.3, "flush_max_s": 0.61,
            "encoder_backlog": 0, "encoder_limit": 0}
    status = {"mode": "RECORD", "session": None, "disk_free_bytes": 5e11, "streams": {
        "probe": {**base, "gaps": 3, "load": load, "shedding": ["previews", "live_sync"], "lost": {"overload": 120}},
        "camera": {**base, "load": {**load, "overloaded": False, "behind_s": 0, "encoder_limit": 600}, "shedding": [],
                   "lost": {}, "closing": {"encoder_backlog": 40, "encoded": 900}},
        "sensor": {**base, "load": {**load, "overloaded": False, "behind_s": 0}, "shedding": [], "lost": {}}}}
    from rich.console import Console

    console = Console(width=80, record=True, file=open(os.devnull, "w"))
    console.print(status_renderable(status, 80))
    lines = console.export_text().splitlines()
    assert max(len(x) for x in lines) <= 80, lines
    row = {x.split()[0]: x.split()[-2] for x in lines if x.split() and x.split()[0] in status["streams"]}
    assert row == {"probe": "4s", "camera": "enc40", "sensor": "ok"}, lines
    text = " ".join(" ".join(lines).split())  # a long line is broken between words over two
    assert "probe: behind 4.2 s, 420 msgs, flush 0.61 s; shedding previews, live_sync; lost 120 overload" in text
    assert "camera: encoder 0/600 frames; closing: encoder 40 frames to go" in text


def test_status_shortens_incidents_between_words_over_at_most_two_lines():
    detail = ("writer died (exit code -9, signal SIGKILL); restarted into part 3 (restart 1 of 5 within 60 s): "
              "recording continues, the gap between the parts is recorded in /gaps with its reason")
    status = {"mode": "RECORD", "session": None, "disk_free_bytes": 5e11, "streams": {}, "incident_count": 1,
              "recent_incidents": [{"time": time.time(), "stream": "sensor", "kind": "writer_died", "detail": detail}]}
    from rich.console import Console

    console = Console(width=80, record=True, file=open(os.devnull, "w"))
    console.print(status_renderable(status, 80))
    lines = console.export_text().splitlines()
    first = next(i for i, x in enumerate(lines) if "writer_died" in x)
    shown = [lines[first], lines[first + 1]]
    assert all(len(x) <= 80 for x in shown) and shown[1].startswith(" " * 11)
    assert shown[1].endswith(" …")
    words = set(detail.split())
    assert all(w in words for x in shown for w in x.split()[3 if x is shown[0] else 0:] if w != "…"), shown


def test_the_service_units_documentation_exists_where_its_install_steps_put_it():
    """Every Documentation= file of configs/acqd.service is one of docs/, and the unit's install steps (and the
    Dockerfile, same folder /opt/acqd) copy docs/ there."""
    root = Path(__file__).resolve().parents[2]
    unit = (root / "configs" / "acqd.service").read_text()
    docs = [u.removeprefix("file:///opt/acqd/") for line in unit.splitlines() if line.startswith("Documentation=")
            for u in line.removeprefix("Documentation=").split()]
    assert docs and all(d.startswith("docs/") and (root / d).is_file() for d in docs), docs
    assert "cp -r /path/to/acqd/docs /opt/acqd/docs" in unit
    assert "COPY docs ./docs" in (root / "Dockerfile").read_text() and "WORKDIR /opt/acqd" in (root / "Dockerfile").read_text()


def test_status_shows_each_streams_sync_lock_in_80_columns():
    def stream(sync: dict | None) -> dict:
        return {"state": "recording", "reason": None, "connected": True, "silent_s": 0.01, "messages_per_s": 100.0,
                "mb_per_s": 23.04, "gaps": 12345, "rejected": 12345, "restarts": 1, "required": True, "sync": sync}
    locks = {"neuropixels_probe_a": "no edges", "nidaq": "locked", "sensor": "drift out of range",
             "probe2": "not pairing", "probe3": "searching", "camera": None}
    status = {"mode": "RECORD", "session": None, "disk_free_bytes": 5e11, "incident_count": 0,
              "streams": {n: stream(st and {"state": st, "drift_ppm": 1.0}) for n, st in locks.items()}}
    from rich.console import Console

    console = Console(width=80, record=True, file=open(os.devnull, "w"))
    console.print(status_renderable(status, 80))
    lines = console.export_text().splitlines()
    assert max(len(x) for x in lines) <= 80, "\n".join(lines)
    row = {x.split()[0]: x[-7:].strip() for x in lines if x.split() and x.split()[0][:5] in
           ("neuro", "nidaq", "senso", "probe", "camer")}
    assert row == {"neuropixel…": "NO EDGE", "nidaq": "locked", "sensor": "DRIFT", "probe2": "NO PAIR",
                   "probe3": "search", "camera": "-"}, "\n".join(lines)
