"""A rig of several PCs on loopback: a real leader daemon driving real follower daemons (acqd.service.rig).

Each node is its own ``acqd serve`` with its own config, data root, token and streams; the network-namespace rig
and the gather/finalize end-to-end tests are tests/multipc/. Here: preflight refusals (one line per problem,
naming the node), rollback when a follower refuses to start, record/annotate/stop fanned out with the session
and ``leader`` blocks each node writes, the leader's ``nodes`` status and start skew, and a follower killed
mid-record (an incident on the leader, then back).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from acqd.client import ApiError, Client
from acqd.service.procs import Daemon, Simulator, wait_until
from acqd.session import read_session
from tests.conftest import SIM_SECONDS, write_rig
from tests.sessions import SUBJECT

TOKEN = "follower-token-0123456789"


def node_rig(tmp_path: Path, node: str, *, prefix: str | None = None, required: bool = True,
             followers: list[dict] = (), port: int = 0) -> Path:
    """A small rig (the example's NIDAQ and behaviour sensor) for node ``node`` in its own folder: stream names
    prefixed with ``prefix`` (default: the node's name, so nodes' streams never clash), its own token."""
    folder = tmp_path / node
    folder.mkdir()
    path = write_rig(folder, daemon_overrides={"control": {"token": TOKEN, "port": port}})
    raw = yaml.safe_load(path.read_text())
    pre = f"{node if prefix is None else prefix}_" if prefix != "" else ""
    raw["streams"] = [{**s, "name": pre + s["name"], "required": required}
                      for s in raw["streams"] if s["name"] in ("nidaq", "sensor")]
    raw.update(reference=pre + "nidaq", node=node, followers=list(followers))
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@contextmanager
def start_nodes() -> Iterator[Callable[..., list[Daemon]]]:
    """Start ``acqd serve`` for each node's config at once (its data root beside it), with a client holding the
    token; every one stopped on the way out. ``configs``: paths, or (path, env) pairs."""
    started: list[Daemon] = []

    def one(config: Path | tuple[Path, dict]) -> Daemon:
        config, env = config if isinstance(config, tuple) else (config, None)
        port = yaml.safe_load(config.read_text())["daemon"]["control"]["port"]
        d = Daemon(config, config.parent / "data", config.parent, env=env, port=port)
        d.client = Client(d.url, TOKEN)
        started.append(d)
        return d

    def start(*configs: Path | tuple[Path, dict]) -> list[Daemon]:
        with ThreadPoolExecutor(len(configs)) as pool:  # each start is mostly waiting: start them together
            return list(pool.map(one, configs))

    try:
        yield start
    finally:
        with ThreadPoolExecutor(max(len(started), 1)) as pool:
            list(pool.map(lambda d: d.stop(timeout_s=30), started))


@pytest.fixture
def nodes() -> Iterator[Callable[..., list[Daemon]]]:
    with start_nodes() as start:
        yield start


def follower_entry(name: str, d: Daemon | str, token: str = TOKEN) -> dict:
    return {"name": name, "url": d if isinstance(d, str) else d.url, "token": token}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def simulated(*configs: Path) -> Iterator[None]:
    sims = [Simulator(c, SIM_SECONDS, seed=i) for i, c in enumerate(configs)]
    try:
        yield
    finally:
        for s in sims:
            s.stop()


@contextmanager
def other_acqd(answer: dict) -> Iterator[str]:
    """An HTTP server answering ``GET /api/rig`` with ``answer``: a node running another acqd release (one
    machine runs one acqd, so the other version is played by its answer)."""
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({**answer, "time_ns": time.time_ns()}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def refusal(d: Daemon, **body: object) -> str:
    with pytest.raises(ApiError) as e:
        d.command("record", metadata={"subject": SUBJECT}, **body)
    assert e.value.status == 409
    return str(e.value)


@pytest.mark.e2e
def test_preflight_refuses_each_problem_with_one_line_naming_the_node(tmp_path, nodes):
    good, busy, offset, silent = nodes(
        node_rig(tmp_path, "good", required=False), node_rig(tmp_path, "busy", required=False),
        (node_rig(tmp_path, "offset", required=False), {"ACQD_TEST_CLOCK_OFFSET_S": "7200"}),
        node_rig(tmp_path, "silent", prefix="main"))  # no driver, and the leader's stream names
    busy.command("record", session="other", metadata={"subject": SUBJECT})
    old = {**httpx.get(f"{good.url}/api/rig", headers={"Authorization": f"Bearer {TOKEN}"}).json(),
           "node": "old", "rig_protocol": 0, "streams": {"old_nidaq": {}}}
    with other_acqd(old) as old_url:
        [leader] = nodes(node_rig(tmp_path, "main", followers=[
            follower_entry("good", good), follower_entry("busy", busy), follower_entry("offset", offset),
            follower_entry("silent", silent), follower_entry("nobody", good),
            follower_entry("wrongtoken", good, token="not-the-token"), follower_entry("old", old_url),
            follower_entry("gone", f"http://127.0.0.1:{free_port()}")]))
        message = refusal(leader, session="s1")
    lines = message.removeprefix("refusing to record: node ").split("; node ")
    by_node: dict[str, list[str]] = {}
    for ln in lines:
        by_node.setdefault(ln.split(":", 1)[0], []).append(ln.split(":", 1)[1].strip())
    assert "good" not in by_node, message
    assert by_node["busy"] == ["already recording session 'other'"]
    [clock] = by_node["offset"]
    m = re.fullmatch(r"its clock is \+(\d+\.\d{3}) s \(± (\d+\.\d{3}) s\) off the leader's \(bound 1 s\): "
                     r"synchronise the PCs' clocks \(NTP or PTP\)", clock)
    assert m and abs(float(m[1]) - 7200) <= float(m[2]) + 1e-3, clock  # 7200 s, to within half the round trip
    assert sorted(by_node["silent"]) == [
        "preflight failed: stream 'main_nidaq' is silent (no message received yet); stream 'main_sensor' is silent "
        "(no message received yet)",
        "stream name 'main_nidaq' is also a stream of node main (stream names must be unique across the rig)",
        "stream name 'main_sensor' is also a stream of node main (stream names must be unique across the rig)"], message
    assert by_node["nobody"] == [f"the daemon at {good.url} is node 'good' (its config's node)"]
    assert by_node["wrongtoken"] == [f"wrong token (refused by {good.url}: give the follower's control.token)"]
    [old_line] = by_node["old"]
    assert old_line.startswith("its acqd rig protocol 0 differs from the leader's 1")
    [gone] = by_node["gone"]
    assert gone.startswith("unreachable at http://127.0.0.1:")
    assert "Traceback" not in message
    assert not (tmp_path / "main" / "data" / "s1").exists(), "a refused record creates no session"
    for d in (good, silent):
        assert d.command("status")["mode"] != "RECORD"


@pytest.mark.e2e
def test_a_follower_that_refuses_to_start_stops_the_started_ones_and_aborts_the_session(tmp_path, nodes):
    ok, refuses = nodes(node_rig(tmp_path, "ok", required=False), node_rig(tmp_path, "refuses", required=False))
    (tmp_path / "refuses" / "data" / "s1").mkdir(parents=True)  # its start is refused: the folder exists
    [leader] = nodes(node_rig(tmp_path, "main", required=False, followers=[
        follower_entry("ok", ok), follower_entry("refuses", refuses)]))
    message = refusal(leader, session="s1")
    assert "node refuses: session 's1' already exists" in message and "aborted" in message, message
    assert leader.command("status")["mode"] != "RECORD"
    assert ok.command("status")["mode"] != "RECORD", "the follower that started is stopped again"
    ours = read_session(tmp_path / "main" / "data" / "s1")
    assert ours["state"] == "closed" and "node refuses: session 's1' already exists" in ours["aborted"]
    assert any(i["kind"] == "rig_start_failed" for i in ours["incidents"])
    theirs = read_session(tmp_path / "ok" / "data" / "s1")
    assert theirs["state"] == "closed" and theirs["leader"] == {"node": "main", "session": "s1"}


@pytest.mark.e2e
def test_a_rig_records_annotates_and_stops_together(tmp_path, nodes):
    follower_cfg = node_rig(tmp_path, "video")
    [follower] = nodes((follower_cfg, {"ACQD_TEST_CLOCK_OFFSET_S": "0.4"}))  # within the 1 s bound
    leader_cfg = node_rig(tmp_path, "ephys", followers=[follower_entry("video", follower)])
    [leader] = nodes(leader_cfg)
    leader.command("acquire")
    assert follower.command("status")["mode"] == "ACQUIRE", "acquire fans out"
    with simulated(leader_cfg, follower_cfg):
        wait_until(lambda: not leader.command("preflight")["problems"], "the leader's streams to flow")
        status = leader.command("record", session="rig1", metadata={"subject": SUBJECT})
        assert status["mode"] == "RECORD" and follower.command("status")["mode"] == "RECORD"
        wait_until(lambda: leader.command("status").get("start_skew_s") is not None, "the start skew")
        st = leader.command("status")
        assert list(st["nodes"]) == ["ephys", "video"] and st["node"] == "ephys"
        video = st["nodes"]["video"]
        assert video["reachable"] is True and abs(video["clock_offset_s"] - 0.4) <= video["round_trip_s"] / 2 + 1e-3, \
            video  # the estimate's bound: the follower read its clock within the round trip
        assert set(video["streams"]) == {"video_nidaq", "video_sensor"} and video["disk"]["free_bytes"] > 0
        assert set(st["nodes"]["ephys"]["streams"]) == {"ephys_nidaq", "ephys_sensor"}
        assert 0 <= st["start_skew_s"] < 5, st["start_skew_s"]
        leader.command("annotate", text="drug on")
        notes = tmp_path / "video" / "data" / "rig1" / "annotations.jsonl"
        wait_until(lambda: notes.exists() and "drug on" in notes.read_text(), "the note on the follower")
        metrics = httpx.get(f"{leader.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
        mode = next(f for f in text_string_to_metric_families(metrics) if f.name == "acqd_mode")
        assert {s.labels["node"] for s in mode.samples} == {"ephys"}
        reach = next(f for f in text_string_to_metric_families(metrics) if f.name == "acqd_node_reachable")
        assert {s.labels["node"]: s.value for s in reach.samples} == {"ephys": 1.0, "video": 1.0}
        leader.command("stop")
    assert follower.command("status")["mode"] == "ACQUIRE", "stop fans out"
    ours, theirs = (read_session(tmp_path / n / "data" / "rig1") for n in ("ephys", "video"))
    assert theirs["state"] == "closed" and theirs["node"] == "video"
    assert theirs["leader"] == {"node": "ephys", "session": "rig1"} and "leader" not in ours
    assert theirs["metadata"]["subject"] == ours["metadata"]["subject"]
    assert ours["node"] == "ephys" and set(ours["nodes"]) == {"ephys", "video"}
    assert ours["nodes"]["video"]["state"] == ours["nodes"]["ephys"]["state"] == "stopped"
    assert ours["nodes"]["video"]["url"] == follower.url
    assert all(n["start_host_ns"] for n in ours["nodes"].values()) and ours["start_skew_s"] is not None


@pytest.mark.e2e
def test_a_follower_killed_mid_record_is_an_incident_on_the_leader_and_shows_again(tmp_path, nodes):
    port = free_port()
    follower_cfg = node_rig(tmp_path, "video", required=False, port=port)
    [follower] = nodes(follower_cfg)
    [leader] = nodes(node_rig(tmp_path, "ephys", required=False, followers=[follower_entry("video", follower)]))
    leader.command("record", session="rig2", metadata={"subject": SUBJECT})
    os.kill(follower.pid, signal.SIGKILL)
    follower.proc.wait(10)

    def incidents(kind: str) -> list[dict]:
        return [i for i in leader.command("status")["recent_incidents"] if i["kind"] == kind]
    wait_until(lambda: incidents("node_unreachable"), "the leader's incident")
    st = leader.command("status")
    assert st["mode"] == "RECORD" and st["nodes"]["video"]["reachable"] is False
    assert "node video: unreachable" in incidents("node_unreachable")[0]["detail"]
    assert "node video: unreachable" in st["verdict"]["line"] or any("node video" in p for p in
                                                                    st["verdict"]["problems"])
    nodes(follower_cfg)  # back on the same port: its session was interrupted, it is IDLE
    wait_until(lambda: incidents("node_reachable"), "the follower to show again")
    wait_until(lambda: incidents("node_not_recording"), "the leader to see it no longer records the session")
    assert leader.command("status")["nodes"]["video"]["reachable"] is True
    leader.command("stop")
    ours = read_session(tmp_path / "ephys" / "data" / "rig2")
    kinds = [i["kind"] for i in ours["incidents"]]
    assert kinds.index("node_unreachable") < kinds.index("node_reachable")
    assert read_session(tmp_path / "video" / "data" / "rig2")["state"] == "interrupted"


def test_acqd_status_names_each_other_node_in_one_line():
    """The CLI's status rendering of a leader's ``nodes`` block (no daemon needed: it renders a snapshot)."""
    from rich.console import Console

    from acqd.service.status import status_renderable

    stream = {"state": "recording", "connected": True, "messages_per_s": 100.0, "mb_per_s": 0.1, "silent_s": 0.0,
              "gaps": 0, "rejected": 0, "restarts": 0}
    status = {"mode": "RECORD", "session": None, "disk_free_bytes": 60e9, "streams": {"ephys_nidaq": stream},
              "node": "ephys", "nodes": {
                  "ephys": {"reachable": True, "clock_offset_s": 0.0, "disk": {"free_bytes": 60e9}, "mode": "RECORD",
                            "streams": {"ephys_nidaq": stream}},
                  "video": {"reachable": True, "clock_offset_s": 0.0031, "disk": {"free_bytes": 1.2e12},
                            "mode": "RECORD", "streams": {"video_nidaq": stream, "video_sensor": stream}},
                  "behaviour": {"reachable": False, "error": "node behaviour: unreachable at http://10.0.0.13:8600",
                                "clock_offset_s": None, "disk": None, "mode": None, "streams": {}}}}
    console = Console(width=80, record=True)
    console.print(status_renderable(status))
    text = console.export_text()
    assert "node video: reachable, clock +0.003 s, disk 1200 GB free, RECORD, 2 streams" in text
    assert "node behaviour: unreachable at http://10.0.0.13:8600" in text
    assert "node ephys" not in text


def test_the_start_skew_puts_each_follower_on_the_leader_clock_first():
    """Unit: a follower whose clock runs 0.4 s ahead and whose first message came 0.05 s after the leader's has a
    skew of 0.05 s, not 0.45; until every started node has a first message there is none."""
    from types import SimpleNamespace

    from acqd.config import Follower
    from acqd.service.rig import Rig

    followers = tuple(Follower(name=n, url=f"http://{n}:8600", token="t") for n in ("video", "behaviour"))
    rig = Rig(SimpleNamespace(cfg=SimpleNamespace(followers=followers, node="ephys")))
    rig.started = ("video", "behaviour")
    leader_ns = 1_000_000_000_000
    rig.views["video"].start_host_ns, rig.views["video"].clock_offset_s = leader_ns + 450_000_000, 0.4
    assert rig.skew_s(leader_ns) is None, "behaviour has not recorded yet"
    rig.views["behaviour"].start_host_ns, rig.views["behaviour"].clock_offset_s = leader_ns - 20_000_000, 0.0
    assert rig.skew_s(leader_ns) == pytest.approx(0.07)  # from behaviour (-0.02 s) to video (+0.05 s)
    rig.started = ("video",)
    assert rig.skew_s(leader_ns) == pytest.approx(0.05)


def test_a_stop_notes_each_node_s_first_message_though_no_watcher_noted_it_yet():
    """Unit: the watchers note the nodes' first messages in session.json once a second; a stop that comes sooner
    (the leader's own first message arrived after the last note) still leaves every start there, and the skew."""
    from types import SimpleNamespace

    from acqd.config import Follower
    from acqd.service.rig import Rig

    leader_ns = 1_000_000_000_000
    saves: list[dict] = []
    session = {"nodes": {n: {"url": f"http://{n}:8600", "start_host_ns": None, "state": "recording"}
                         for n in ("ephys", "video")}, "start_skew_s": None}
    writer = SimpleNamespace(stats={"first_recorded_ns": leader_ns})
    sup = SimpleNamespace(cfg=SimpleNamespace(followers=(Follower(name="video", url="http://video:8600", token="t"),),
                                              node="ephys"),
                          mode="RECORD", session=session, writers={"ephys_nidaq": writer},
                          session_record=SimpleNamespace(save=lambda: saves.append(json.loads(json.dumps(session)))))
    rig = Rig(sup)
    rig.started = ("video",)
    rig.views["video"].start_host_ns, rig.views["video"].clock_offset_s = leader_ns + 30_000_000, 0.0
    rig._note_stops({"video": {"mode": "ACQUIRE"}})
    nodes = saves[-1]["nodes"]
    assert {n: v["start_host_ns"] for n, v in nodes.items()} == {"ephys": leader_ns, "video": leader_ns + 30_000_000}
    assert nodes["video"]["state"] == nodes["ephys"]["state"] == "stopped"
    assert saves[-1]["start_skew_s"] == pytest.approx(0.03)
